"""What every defense plugin implements, and the chain that composes them. Defenses act in the client loop."""

from __future__ import annotations

import torch

from fedsim.task import Params, Task


class Defense:
    """A defense plugin. Three hooks, each a no-op by default:

    - `gradient`: how the client computes the gradient of one local step (DP-SGD replaces it with
      clipped, noised per-example gradients);
    - `transform_gradient`: a change to that gradient that needs the step's inputs (Soteria);
    - `transform_update`: a change to the update as it leaves the client (pruning, quantisation,
      noise on the update).

    Defenses that act in Flower's protocol rather than in the client loop (Flower's DP mods,
    secure aggregation) say so through `client_mods`, `wrap_strategy`, `fit_workflow`,
    `aggregate_only` and `replies_with_weights`.
    Register a new defense under the entry-point group ``fedsim.defenses``.
    """

    name: str = "none"
    aggregate_only: bool = False  # the server sees only the aggregate of the clients' updates
    replies_with_weights: bool = False  # the client replies with global + update (Flower's DP mods)

    @classmethod
    def from_config(cls, cfg) -> "Defense":
        """Build the defense from a RunConfig; override to read defense-specific fields."""
        return cls()

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

    def fit_workflow(self, cfg):
        """A Flower fit workflow that replaces the server's plain rounds (SecAgg+), or None."""
        return None

    def privacy(self, accounting) -> dict[str, float]:
        """Privacy spent after `accounting.rounds` rounds (see defenses.accounting), e.g. epsilon."""
        return {}


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
            raise ValueError(f"defenses {replacing} each compute the client's gradient their own way; "
                             "a chain may hold only one of them")
        self.defenses = list(defenses)
        self.name = ",".join(d.name for d in defenses) or "none"
        self.aggregate_only = any(d.aggregate_only for d in defenses)
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

    def fit_workflow(self, cfg):
        return next((w for w in (d.fit_workflow(cfg) for d in self.defenses) if w is not None), None)

    def privacy(self, accounting) -> dict[str, float]:
        out: dict[str, float] = {}
        for d in self.defenses:
            out.update(d.privacy(accounting))
        return out


def update_norm(update: Params) -> torch.Tensor:
    """L2 norm of an update over all its tensors together."""
    return torch.sqrt(sum(u.double().pow(2).sum() for u in update.values())).float()


def gaussian_like(t: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std^2) noise shaped like `t`, drawn on the CPU generator so that runs repeat on any device."""
    return (std * torch.randn(t.shape, generator=generator, dtype=t.dtype)).to(t.device)
