"""`fedsim attack FILE`: run an attack on a saved Observation, offline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from rich.console import Console

from fedsim.config import ConfigError, RunConfig
from fedsim.knowledge import AttackerKnowledge
from fedsim.models import build_task
from fedsim.observation import Observation
from fedsim.plugins import attack_names, make_attack
from fedsim.protocol import Protocol
from fedsim.report import save_grid


def replay_knowledge(obs: Observation, saved: RunConfig | None, dataset: str | None) -> AttackerKnowledge:
    """The knowledge the run's server had: from the run's config.yaml when the observation sits in
    a run folder, else from the observation's model description over `dataset`'s public split
    (default digits). The model and the protocol are the observation's own, as the server saw them."""
    cfg = saved or RunConfig(image_size=obs.model_spec["image_size"])
    if dataset:
        cfg = dataclasses.replace(cfg, dataset=dataset)
    knowledge = AttackerKnowledge.of(cfg)
    if list(knowledge.class_names) != list(obs.model_spec["class_names"]):
        raise ConfigError(f"the public split of --dataset {cfg.dataset} has classes "
                          f"{list(knowledge.class_names)[:5]}..., "
                          f"the observation's model {list(obs.model_spec['class_names'])[:5]}...; pass the run's "
                          "dataset with --dataset")
    protocol = Protocol(name="fedsgd" if obs.kind == "gradient" else "fedavg", lr=obs.lr, batch_size=obs.batch_size,
                        local_steps=obs.local_steps, clients=knowledge.protocol.clients,
                        fraction=knowledge.protocol.fraction, rounds=knowledge.protocol.rounds)
    return dataclasses.replace(knowledge, model_spec=obs.model_spec,
                               protocol=knowledge.protocol if saved is not None else protocol)


def replay(path: Path, attack: str, iterations: int | None, attack_seed: int | None, out: Path,
           console: Console, dataset: str | None = None) -> None:
    """`iterations` and `attack_seed` left None keep the saved run's (or the attack's defaults)."""
    if attack not in attack_names():
        raise ConfigError(f"--attack {attack!r} is not installed; valid: {', '.join(attack_names())}")
    obs = Observation.load(path)
    saved_path = Path(path).resolve().parent.parent / "config.yaml"
    saved = RunConfig.load(saved_path) if saved_path.exists() else None
    knowledge = replay_knowledge(obs, saved, dataset)
    if attack_seed is not None:
        knowledge = dataclasses.replace(knowledge, attack_seed=attack_seed)
    # The saved run's options for this attack, if it ran this one; otherwise the attack's defaults.
    options = saved.relevant_options() if saved is not None and saved.attack == attack else {}
    if iterations is not None:
        options["attack_iters"] = iterations
    cfg = RunConfig(attack=attack, defense=saved.defense if saved is not None and saved.attack == attack else "none",
                    **options)
    cfg.validate_options()
    task = build_task(obs.model_spec, "cuda" if torch.cuda.is_available() else "cpu")
    recon = make_attack(cfg, knowledge).reconstruct(obs, task)
    save_grid(out, [(recon.images, recon.labels)], obs.model_spec["class_names"])
    console.print(f"round {obs.round}, client {obs.client}: labels {recon.labels.tolist()}, "
                  f"gradient loss {recon.extras.get('gradient_loss', float('nan')):.3g}; saved {out}")
