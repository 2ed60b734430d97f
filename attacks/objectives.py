"""Distances between a dummy gradient and the observed one."""

from __future__ import annotations

import torch

Params = dict[str, torch.Tensor]


def l2_distance(dummy: Params, target: Params) -> torch.Tensor:
    """Sum over all tensors of the squared Euclidean distance (DLG, Zhu et al. 2019)."""
    return sum(((dummy[n] - target[n]) ** 2).sum() for n in target)
