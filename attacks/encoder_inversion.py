"""MIP step 3: images whose CLIP image-tower output points along given directions.

Minimises, over candidate images x (optimised in the unit space of `attacks.optim`, boxed to
the valid range), 1 - cos(tower(x), f) + tv * TV(x) + anchor * ||x - x0||^2, by Adam with a
cosine learning-rate decay, from a starting image x0 (a learned prior's output, or the public
mean image). Restarts add seeded noise to x0 and run stacked in one batch (the tower treats
images independently); for each image the restart with the best cosine is kept.

The strategy depends on the tower's size, as MIP (Zhou et al. 2024, arXiv 2403.07901)
prescribes in kind; the rule here is ours:
- small towers (input <= 64 px): pixels at the data's resolution, no jitter;
- large towers (e.g. ViT-B-32 at 224 px): the candidate stays at the data's resolution (capped
  at 64 px) and is upsampled by the model's own resize, which acts as a low-resolution
  parameterisation; every step shifts it by a random jitter of up to 1/16 of its side
  (a robustness prior against adversarial high-frequency solutions), and twice the restarts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attacks.optim import UNIT_BOX, to_pixels
from attacks.priors import total_variation

SMALL_TOWER_PX = 64


def tower_size(model) -> int:
    size = model.clip.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def strategy(model, image_shape) -> dict:
    """How to invert this tower (see the module docstring)."""
    large = tower_size(model) > SMALL_TOWER_PX
    return {"large": large, "side": min(image_shape[-1], SMALL_TOWER_PX),
            "jitter": max(1, image_shape[-1] // 16) if large else 0, "restart_factor": 2 if large else 1}


def invert_tower(model, targets: torch.Tensor, start: torch.Tensor, iterations: int, lr: float = 0.05,
                 tv: float = 1e-2, anchor: float = 0.0, restarts: int = 1, noise: float = 0.1,
                 generator: torch.Generator | None = None, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, C, H, W] in [0, 1] whose tower outputs align with `targets` [B, D], and the
    cosine each reached [B]. `start` [B, C, H, W] is the initial guess (and the anchor)."""
    plan = strategy(model, start.shape)
    R = restarts * plan["restart_factor"]
    B = start.shape[0]
    x0 = (start.clamp(0, 1) - 0.5) / 0.25
    units = x0.repeat(R, 1, 1, 1)
    if R > 1:  # the first restart is the start itself
        jitter = noise * torch.randn(units.shape, generator=generator)
        jitter[:B] = 0
        units = units + jitter.to(units.device)
    units = units.clamp(*UNIT_BOX).requires_grad_(True)
    goal = F.normalize(targets, dim=-1).repeat(R, 1)
    anchor_units = x0.repeat(R, 1, 1, 1)
    opt = torch.optim.Adam([units], lr=lr)
    for it in range(iterations):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * it / max(iterations, 1)))
        opt.zero_grad()
        x = to_pixels(units)
        if plan["jitter"]:
            dx, dy = (int(v) for v in torch.randint(-plan["jitter"], plan["jitter"] + 1, (2,), generator=generator))
            x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
        cos = (F.normalize(model.encode_image(x), dim=-1) * goal).sum(-1)
        loss = (1 - cos).sum() + tv * R * B * total_variation(units)
        if anchor:
            loss = loss + anchor * ((units - anchor_units) ** 2).flatten(1).mean(1).sum()
        loss.backward()
        opt.step()
        with torch.no_grad():
            units.clamp_(*UNIT_BOX)
        if progress:
            progress(it + 1, iterations)
    with torch.no_grad():
        x = to_pixels(units)
        cos = (F.normalize(model.encode_image(x), dim=-1) * goal).sum(-1).view(R, B)
        best = cos.argmax(0)
        images = x.view(R, B, *x.shape[1:])[best, torch.arange(B)]
    return images.clamp(0, 1), cos[best, torch.arange(B)]
