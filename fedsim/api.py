"""The plugin API: what an attack or a defense implements, and all it may depend on.

A plugin depends on this module, the Task (the public model's forward pass and loss), the
Observation (what the server saw of one reply), the AttackerKnowledge (what the server knows
besides the replies), the Protocol (the public training plan) and `fedsim.options` (how it
declares its options). fedsim itself never imports attacks/ or defenses/: it finds plugins
through the entry-point groups `fedsim.attacks` and `fedsim.defenses` (fedsim.plugins).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsim.knowledge import AttackerKnowledge
from fedsim.observation import Observation
from fedsim.options import ConfigError, Option, between
from fedsim.protocol import Protocol
from fedsim.task import Params, Task

# Bounds that keep a typo from meaning days of work (IG's paper runs 24,000 iterations)
MAX_ITERATIONS = 1_000_000
MAX_RESTARTS = 1_000

__all__ = ["Attack", "Reconstruction", "Defense", "Chain", "AttackerKnowledge", "Observation", "Option",
           "Protocol", "Task", "ConfigError", "observed"]


@dataclass
class Reconstruction:
    images: torch.Tensor  # [B, C, H, W] in [0, 1], in no particular order
    labels: torch.Tensor  # [B] class indices, -1 where the attack makes no guess
    extras: dict[str, Any] = field(default_factory=dict)  # plain values: losses, iterations, ...


class Attack(ABC):
    """An attack plugin. It is built from the AttackerKnowledge and its own options, and then
    sees one Observation at a time with the public model (the Task), and nothing else.

    Register a new attack under the entry-point group ``fedsim.attacks`` in your package's
    pyproject.toml; `fedsim list` then shows it and `--attack NAME` runs it. Declare options in
    `options` (see fedsim.options): each becomes `--NAME-OPTION` and is passed to `__init__` by
    name. Every attack takes the two below; `iterations` left unset (None) keeps the attack's
    own default, the one its paper uses.
    """

    name: str = "attack"
    options: tuple[Option, ...] = (
        Option("iterations", None, "optimiser iterations of the attack; unset = the attack's own default "
               "(`fedsim list` shows it)", type=int, key="attack_iters", **between(0, MAX_ITERATIONS)),
        Option("restarts", 1, "independent restarts; the one that matches the update best is kept",
               key="attack_restarts", **between(1, MAX_RESTARTS)),
    )

    def __init__(self, iterations: int = 300, restarts: int = 1, seed: int = 0, progress=None):
        self.iterations = iterations
        self.restarts = restarts
        self.seed = seed
        self.progress = progress  # optional callable(done, total) for progress bars

    @classmethod
    def from_knowledge(cls, knowledge: AttackerKnowledge, options: dict[str, Any] | None = None,
                       progress=None) -> "Attack":
        """Build the attack from what the server knows and the attack's options by name (None
        keeps the constructor's default). Override to hand the attack parts of the knowledge,
        such as the public split."""
        kwargs = {k: v for k, v in (options or {}).items() if v is not None}
        return cls(seed=knowledge.attack_seed, progress=progress, **kwargs)

    @abstractmethod
    def reconstruct(self, observation: Observation, task: Task) -> Reconstruction:
        """Rebuild the client's batch from its update."""


def observed(observation: Observation, task: Task) -> tuple[dict, dict]:
    """The observed update as a gradient, and the global parameters, on the task's device."""
    device = task.device
    return ({n: g.to(device) for n, g in observation.gradient().items()},
            {n: p.to(device) for n, p in observation.global_params.items()})


class Defense:
    """A defense plugin, built from its options and the public Protocol. Three hooks, each a
    no-op by default:

    - `gradient`: how the client computes the gradient of one local step (DP-SGD replaces it with
      clipped, noised per-example gradients);
    - `transform_gradient`: a change to that gradient that needs the step's inputs (Soteria);
    - `transform_update`: a change to the update as it leaves the client (pruning, quantisation,
      noise on the update).

    Defenses that act in Flower's protocol rather than in the client loop (Flower's DP mods,
    secure aggregation) say so through `client_mods`, `wrap_strategy`, `fit_workflow`,
    and `replies_with_weights`; `check_chain` refuses chains it cannot join.
    Register a new defense under the entry-point group ``fedsim.defenses``; declare its options
    in `options`, passed to `__init__` by name.
    """

    name: str = "none"
    options: tuple[Option, ...] = ()
    replies_with_weights: bool = False  # the client replies with global + update (Flower's DP mods)

    @classmethod
    def from_options(cls, options: dict[str, Any], protocol: Protocol) -> "Defense":
        """Build the defense from its options by name; override to read the protocol too."""
        return cls(**options)

    def check_chain(self, chain: list[str], protocol: Protocol) -> None:
        """Raise ConfigError when this defense cannot run in `chain` under `protocol`."""

    def gradient(self, task: Task, params: Params, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> Params:
        """The client's gradient on its batch."""
        return task.gradients(params, images, labels)

    def transform_gradient(self, grads: Params, task: Task, params: Params, images: torch.Tensor,
                           labels: torch.Tensor, generator: torch.Generator) -> Params:
        """The gradient of one local step, changed with the step's inputs at hand."""
        return grads

    def transform_update(self, update: Params, generator: torch.Generator) -> Params:
        """The update as it leaves the client."""
        return update

    def client_mods(self) -> list:
        """Flower mods to install on the ClientApp."""
        return []

    def wrap_strategy(self, strategy):
        """The server strategy this defense needs around fedsim's own."""
        return strategy

    def fit_workflow(self, max_examples: int):
        """A Flower fit workflow that replaces the server's plain rounds (SecAgg+), or None.
        `max_examples`: the most examples behind one client's update."""
        return None

    def privacy(self, accounting) -> dict[str, float]:
        """Privacy spent after `accounting.rounds` rounds (a fedsim.accounting.Accounting), e.g. epsilon."""
        return {}

    def audited(self, grads: Params, task: Task, params: Params, images: torch.Tensor, labels: torch.Tensor,
                update_scale: float, generator: torch.Generator) -> tuple[Params, str]:
        """For `fedsim audit` (fedsim.audit, I2F): a random draw of the gradient as the server sees it
        under this defense, and a note on how it was modelled. `update_scale` turns an update into
        gradient units (1 for FedSGD). By default the defense's own update or gradient transform;
        a defense that replaces the gradient computation (DP-SGD) says how its noise enters, and a
        defense with none of these is noted as not modelled."""
        if type(self).transform_update is not Defense.transform_update:
            update = {n: g / update_scale for n, g in grads.items()}
            return ({n: u * update_scale for n, u in self.transform_update(update, generator).items()},
                    f"{self.name}: the defense's own transform of the update")
        if type(self).transform_gradient is not Defense.transform_gradient:
            return (self.transform_gradient(grads, task, params, images, labels, generator),
                    f"{self.name}: the defense's own transform of the gradient")
        return grads, f"{self.name}: not modelled"


def replaces_gradient(defense: Defense) -> bool:
    return type(defense).gradient is not Defense.gradient


class Chain(Defense):
    """Defenses composed in the order they are listed (`--defense soteria,prune,quantize`).

    Order of application, in every local step and then once per update:
    1. the step's gradient comes from the one defense in the chain that replaces `gradient`
       (at most one may: two ways of computing the same gradient cannot both hold), or plainly
       from the task;
    2. every `transform_gradient`, in the listed order;
    3. after the local steps, every `transform_update`, in the listed order: `prune,quantize`
       prunes and then quantises the pruned update, `quantize,prune` the reverse.
    """

    def __init__(self, defenses: list[Defense]):
        replacing = [d.name for d in defenses if replaces_gradient(d)]
        if len(replacing) > 1:
            raise ConfigError(f"defenses {replacing} each compute the client's gradient their own way; "
                              "a chain may hold only one of them")
        self.defenses = list(defenses)
        self.name = ",".join(d.name for d in defenses) or "none"
        self.replies_with_weights = any(d.replies_with_weights for d in defenses)

    def gradient(self, task, params, images, labels, generator):
        source = next((d for d in self.defenses if replaces_gradient(d)), Defense())
        grads = source.gradient(task, params, images, labels, generator)
        for d in self.defenses:
            grads = d.transform_gradient(grads, task, params, images, labels, generator)
        return grads

    def transform_update(self, update, generator):
        for d in self.defenses:
            update = d.transform_update(update, generator)
        return update

    def client_mods(self) -> list:
        return [mod for d in self.defenses for mod in d.client_mods()]

    def wrap_strategy(self, strategy):
        for d in self.defenses:
            strategy = d.wrap_strategy(strategy)
        return strategy

    def fit_workflow(self, max_examples: int):
        return next((w for w in (d.fit_workflow(max_examples) for d in self.defenses) if w is not None), None)

    def privacy(self, accounting) -> dict[str, float]:
        out: dict[str, float] = {}
        for d in self.defenses:
            out.update(d.privacy(accounting))
        return out
