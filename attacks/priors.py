"""Image priors that gradient-matching attacks add to their objective.

Every function takes one candidate batch [B, C, H, W] and returns a scalar, so an attack can
`vmap` it over restarts or seeds. Sources: total variation as in Inverting Gradients (Geiping
et al. 2020); l2, BatchNorm statistics and group consistency as in GradInversion (Yin et al.
2021), the BatchNorm term after DeepInversion (Yin et al. 2020).
"""

from __future__ import annotations

import torch
from torch import nn


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: mean |horizontal difference| + mean |vertical difference|."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy


def l2_prior(images: torch.Tensor, center: float = 0.0) -> torch.Tensor:
    """(1/2) mean (x - center)^2: pulls pixels towards `center` (0 = the data mean when the
    images are in normalised units)."""
    return 0.5 * ((images - center) ** 2).mean()


def group_consistency(images: torch.Tensor, consensus: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of a candidate to the (registered) consensus of all seeds."""
    return ((images - consensus) ** 2).mean()


class BatchNormStatistics:
    """Matches the batch statistics entering every BatchNorm2d to its running statistics:
    sum over layers of ||mean - running_mean||_2 + ||var - running_var||_2, the first layer
    weighted by `first_multiplier` (DeepInversion uses 10).

    Use as a context manager: forward hooks exist only inside the `with` block. Each forward
    pass inside it records its statistics; `loss()` turns the recorded ones into the term and
    forgets them. The hooks record inside `vmap` too, as long as `loss()` is called in the same
    vmapped function as the forward pass.
    """

    def __init__(self, model: nn.Module, first_multiplier: float = 10.0):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.first_multiplier = first_multiplier
        self.recorded: list[tuple[nn.BatchNorm2d, torch.Tensor, torch.Tensor]] = []
        self._handles = []

    def __enter__(self) -> "BatchNormStatistics":
        self._handles = [layer.register_forward_hook(self._record) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.recorded = []

    def _record(self, layer: nn.BatchNorm2d, inputs, output) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)  # the biased variance, as BatchNorm normalises with
        self.recorded.append((layer, mean, var))

    def loss(self) -> torch.Tensor:
        terms = []
        for i, (layer, mean, var) in enumerate(self.recorded):
            weight = self.first_multiplier if i == 0 else 1.0
            terms.append(weight * (torch.linalg.vector_norm(mean - layer.running_mean)
                                   + torch.linalg.vector_norm(var - layer.running_var)))
        self.recorded = []
        if not terms:
            raise RuntimeError("no BatchNorm statistics were recorded: run a forward pass inside the "
                               "`with` block first, or the model has no BatchNorm2d")
        return sum(terms)
