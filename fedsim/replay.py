"""`fedsim attack FILE`: run an attack on a saved Observation, offline."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from fedsim.config import ConfigError
from fedsim.models import build_task
from fedsim.observation import Observation
from fedsim.plugins import ATTACK_GROUP, attack_names, available
from fedsim.report import save_grid


def replay(path: Path, attack: str, iterations: int, seed: int, out: Path, console: Console) -> None:
    if attack not in attack_names():
        raise ConfigError(f"--attack {attack!r} is not installed; valid: {', '.join(attack_names())}")
    obs = Observation.load(path)
    task = build_task(obs.model_spec, "cuda" if torch.cuda.is_available() else "cpu")
    plugin = available(ATTACK_GROUP)[attack].load()(iterations=iterations, seed=seed)
    recon = plugin.reconstruct(obs, task)
    save_grid(out, [(recon.images, recon.labels)], obs.model_spec["class_names"])
    console.print(f"round {obs.round}, client {obs.client}: labels {recon.labels.tolist()}, "
                  f"gradient loss {recon.extras.get('gradient_loss', float('nan')):.3g}; saved {out}")
