"""What every defense plugin implements. Defenses act in the client loop."""

from __future__ import annotations

import torch

from fedsim.task import Params, Task


class Defense:
    """A defense plugin. It may replace how the client computes its gradient (e.g. DP-SGD on
    per-example gradients) and/or transform the update before it leaves the client (pruning,
    noise on the update). Both hooks default to doing nothing.

    Register a new defense under the entry-point group ``fedsim.defenses``.
    """

    name: str = "none"

    @classmethod
    def from_config(cls, cfg) -> "Defense":
        """Build the defense from a RunConfig; override to read defense-specific fields."""
        return cls()

    def gradient(self, task: Task, params: Params, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> Params:
        """The client's gradient on its batch."""
        return task.gradients(params, images, labels)

    def transform_update(self, update: Params, generator: torch.Generator) -> Params:
        """The update as it leaves the client."""
        return update

    def report(self) -> dict[str, float]:
        """Numbers for the results table (e.g. privacy spent)."""
        return {}
