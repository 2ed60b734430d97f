"""`fedsim attack FILE`: run an attack on a saved Observation, offline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from rich.console import Console

from fedsim.config import ConfigError, RunConfig
from fedsim.models import build_task
from fedsim.observation import Observation
from fedsim.plugins import ATTACK_GROUP, attack_names, available
from fedsim.report import save_grid


def replay(path: Path, attack: str, iterations: int, seed: int, out: Path, console: Console,
           dataset: str | None = None) -> None:
    """Attacks get built from the run's config.yaml when the observation sits in a run folder
    (so MIP's priors learn from that run's public split), else from the defaults; `dataset`
    overrides the public split's dataset."""
    if attack not in attack_names():
        raise ConfigError(f"--attack {attack!r} is not installed; valid: {', '.join(attack_names())}")
    obs = Observation.load(path)
    saved = Path(path).resolve().parent.parent / "config.yaml"
    cfg = RunConfig.load(saved) if saved.exists() else RunConfig(image_size=obs.model_spec["image_size"])
    cfg = dataclasses.replace(cfg, attack=attack, attack_iters=iterations, seed=seed, label_strategy="default",
                              **({"dataset": dataset} if dataset else {}))
    task = build_task(obs.model_spec, "cuda" if torch.cuda.is_available() else "cpu")
    recon = available(ATTACK_GROUP)[attack].load().from_config(cfg).reconstruct(obs, task)
    save_grid(out, [(recon.images, recon.labels)], obs.model_spec["class_names"])
    console.print(f"round {obs.round}, client {obs.client}: labels {recon.labels.tolist()}, "
                  f"gradient loss {recon.extras.get('gradient_loss', float('nan')):.3g}; saved {out}")
