"""Distances between a dummy gradient and the observed one."""

from __future__ import annotations

import torch

Params = dict[str, torch.Tensor]


def l2_distance(dummy: Params, target: Params) -> torch.Tensor:
    """Sum over all tensors of the squared Euclidean distance (DLG, Zhu et al. 2019)."""
    return sum(((dummy[n] - target[n]) ** 2).sum() for n in target)


def cosine_distance(dummy: Params, target: Params) -> torch.Tensor:
    """1 - <g', g> / (||g'|| ||g||), inner product and norms taken over all tensors together
    (Inverting Gradients, Geiping et al. 2020). Invariant to the scale of either gradient, so
    it matches the direction of the update and ignores its magnitude."""
    dot = sum((dummy[n] * target[n]).sum() for n in target)
    dummy_norm = sum((dummy[n] ** 2).sum() for n in target).sqrt()
    target_norm = sum((target[n] ** 2).sum() for n in target).sqrt()
    return 1 - dot / (dummy_norm * target_norm).clamp_min(1e-12)
