"""What every attack plugin implements and returns."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsim.config import ConfigError
from fedsim.observation import Observation
from fedsim.task import Task


@dataclass
class Reconstruction:
    images: torch.Tensor  # [B, C, H, W] in [0, 1], in no particular order
    labels: torch.Tensor  # [B] class indices, -1 where the attack makes no guess
    extras: dict[str, Any] = field(default_factory=dict)  # plain values: losses, iterations, ...


class Attack(ABC):
    """An attack plugin. It sees an Observation and the public model (the Task) and nothing else.

    Register a new attack under the entry-point group ``fedsim.attacks`` in your package's
    pyproject.toml; `fedsim list` then shows it and `--attack NAME` runs it.
    """

    name: str = "attack"

    def __init__(self, iterations: int = 300, restarts: int = 1, seed: int = 0, progress=None):
        self.iterations = iterations
        self.restarts = restarts
        self.seed = seed
        self.progress = progress  # optional callable(done, total) for progress bars

    @classmethod
    def from_config(cls, cfg, progress=None) -> "Attack":
        """Build the attack from a RunConfig; override to read attack-specific fields.
        `--label-strategy` reaches attacks that take a `label_strategy` argument: `default`
        keeps the attack's own choice, `optimise` optimises soft labels jointly (DLG-style)."""
        kwargs = {}
        if cfg.label_strategy != "default":
            if "label_strategy" not in inspect.signature(cls.__init__).parameters:
                raise ConfigError(f"--label-strategy {cfg.label_strategy} does not apply to --attack "
                                 f"{cfg.attack}, which takes no label strategy")
            kwargs["label_strategy"] = None if cfg.label_strategy == "optimise" else cfg.label_strategy
        return cls(iterations=cfg.attack_iters, restarts=cfg.attack_restarts, seed=cfg.seed,
                   progress=progress, **kwargs)

    @abstractmethod
    def reconstruct(self, observation: Observation, task: Task) -> Reconstruction:
        """Rebuild the client's batch from its update."""


def observed(observation: Observation, task: Task) -> tuple[dict, dict]:
    """The observed update as a gradient, and the global parameters, on the task's device."""
    device = task.device
    return ({n: g.to(device) for n, g in observation.gradient().items()},
            {n: p.to(device) for n, p in observation.global_params.items()})


def strategy_labels(strategy: str, observation: Observation, task: Task) -> torch.Tensor:
    """Labels from a named label-recovery strategy (`attacks.labels.recover_labels`), imported
    only when an attack asks for one. Raises `attacks.labels.LabelStrategyError` (a ValueError)
    when the strategy does not apply to the observation."""
    from attacks.labels import recover_labels

    return torch.as_tensor(recover_labels(strategy, observation, task), dtype=torch.long)
