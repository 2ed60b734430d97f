"""The optimisation loop shared by Inverting Gradients and GradInversion, and the helper that
runs a per-restart objective for all restarts at once.

The loop is Adam on the candidate images (and optionally other variables such as soft-label
logits) with, as switches:
- signed gradients (Inverting Gradients, Geiping et al. 2020: "optimization strategies from
  adversarial attacks"): each gradient is replaced by its sign before the Adam step;
- a learning-rate schedule: "step" = MultiStepLR at 3/8, 5/8, 7/8 of the iterations with
  gamma 0.1 (Inverting Gradients), or "cosine" decay with a linear warm-up (breaching's
  reading of GradInversion); "none" keeps the rate fixed;
- boxing: after every step the images are clamped to a box (the valid pixel range);
- Langevin noise (GradInversion, Yin et al. 2021): grad += noise * lr_t * N(0, I) on the images,
  added to the raw gradient before signing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.func import vmap

SCHEDULES = ("step", "cosine", "none")


def lr_factor(schedule: str, iteration: int, iterations: int, warmup: int = 0) -> float:
    """The multiplier of the base learning rate at `iteration` (0-based)."""
    if schedule == "step":
        milestones = [iterations * 3 // 8, iterations * 5 // 8, iterations * 7 // 8]
        return 0.1 ** sum(iteration >= m for m in milestones)
    if schedule == "cosine":
        if iteration < warmup:
            return (iteration + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (iteration - warmup) / max(iterations - warmup, 1)))
    if schedule == "none":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def adam_loop(loss_fn: Callable[[int], torch.Tensor], images: torch.Tensor, iterations: int, lr: float, *,
              others: Sequence[torch.Tensor] = (), signed: bool = True, schedule: str = "step",
              warmup: int = 0, box: tuple[float, float] | None = (0.0, 1.0), langevin: float = 0.0,
              generator: torch.Generator | None = None, progress=None) -> torch.Tensor:
    """Minimise `loss_fn(iteration)`, which reads the current `images` (and `others`), all
    leaves that require grad, and returns one loss per restart [R] (or a scalar). The sum is
    minimised; restarts do not interact, so each restart follows its own loss. Updates the
    tensors in place and returns the last losses (computed before the last step).

    Stops early when every loss is non-finite (the last finite values are kept)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    variables = [images, *others]
    optimiser = torch.optim.Adam(variables, lr=lr)
    last = None
    for it in range(iterations):
        lr_t = lr * lr_factor(schedule, it, iterations, warmup)
        for group in optimiser.param_groups:
            group["lr"] = lr_t
        optimiser.zero_grad()
        losses = loss_fn(it)
        if not torch.isfinite(losses).any():
            break
        losses.sum().backward()
        last = losses.detach()
        if langevin:
            noise = torch.randn(images.shape, generator=generator).to(images.device)
            images.grad += langevin * lr_t * noise
        if signed:
            for v in variables:
                v.grad.sign_()
        optimiser.step()
        if box is not None:
            with torch.no_grad():
                images.clamp_(*box)
        if progress:
            progress(it + 1, iterations)
    return last if last is not None else torch.full((images.shape[0],), math.inf)


def per_restart(fn: Callable, *args: torch.Tensor, vectorise: bool = True):
    """fn(*args[r]) for every restart r, stacked on a leading dimension. With `vectorise`,
    one `vmap` call computes all restarts; otherwise a Python loop (models that cannot be
    vmapped, e.g. peft's LoRA on nn.MultiheadAttention). fn may return a tensor or a tuple."""
    if len(args[0]) == 1:  # one restart: vmap's batching rules would only add overhead
        out = fn(*(a[0] for a in args))
        return tuple(o.unsqueeze(0) for o in out) if isinstance(out, tuple) else out.unsqueeze(0)
    if vectorise:
        return vmap(fn, randomness="different")(*args)
    outs = [fn(*a) for a in zip(*args)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs))
    return torch.stack(outs)


# Candidates are optimised in normalised units u = (x - 0.5) / 0.25 (about CIFAR's per-channel
# mean and std), the space the papers' learning rates, random-normal inits and prior weights
# were tuned in; the model sees x = 0.5 + 0.25 u in [0, 1].
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25
UNIT_BOX = ((0 - PIXEL_MEAN) / PIXEL_STD, (1 - PIXEL_MEAN) / PIXEL_STD)


def to_pixels(units: torch.Tensor) -> torch.Tensor:
    return PIXEL_MEAN + PIXEL_STD * units


def init_dummies(restarts: int, batch: int, task, fixed: torch.Tensor | None, gen: torch.Generator):
    """Seeded starting points for `restarts` independent reconstructions of a batch: unbounded
    image units [R, B, C, H, W] (see `to_pixels`) and, unless labels are fixed, soft-label
    logits [R, B, classes]; fixed labels are broadcast to [R, B]."""
    device = task.device
    units = torch.randn(restarts, batch, *task.image_shape, generator=gen).to(device).requires_grad_(True)
    if fixed is None:
        labels = torch.randn(restarts, batch, task.num_classes, generator=gen).to(device).requires_grad_(True)
    else:
        labels = fixed.to(device).expand(restarts, batch)
    return units, labels
