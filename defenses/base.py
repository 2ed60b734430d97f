"""Parts the defenses share. The Defense interface and the chain live in fedsim.api."""

from __future__ import annotations

import torch

from fedsim.task import Params


def update_norm(update: Params) -> torch.Tensor:
    """L2 norm of an update over all its tensors together."""
    return torch.sqrt(sum(u.double().pow(2).sum() for u in update.values())).float()


def gaussian_like(t: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std^2) noise shaped like `t`, drawn on the CPU generator so that runs repeat on any device."""
    return (std * torch.randn(t.shape, generator=generator, dtype=t.dtype)).to(t.device)
