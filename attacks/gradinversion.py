"""GradInversion (Yin, Mallya, Vahdat, Alvarez, Kautz, Molchanov, "See through Gradients:
Image Batch Recovery via GradInversion", CVPR 2021, arXiv 2104.07586).

G seeds (here: `restarts`) each optimise a candidate batch x_g against

    grad_scale * ||grad L(x_g, y) - g||^2                       gradient matching (L2)
    + tv * TV(x_g) + l2 * R_l2(x_g) + bn * R_BN(x_g)           fidelity priors
    + group * ||x_g - E(x)||^2                                  group consistency

with Adam and Langevin noise (grad += noise * lr_t * N(0, I) before each step), the images
boxed to the valid range. The four parts of the paper are switches:
- batch label restoration: `label_strategy` ("gradinversion": the classes with the most
  negative minimum of their last-layer weight-gradient row; None: soft labels optimised
  jointly, DLG-style);
- fidelity priors: `fidelity` (TV and l2) and `bn_prior` (BatchNorm statistics; None = on when
  the model has a BatchNorm2d);
- group consistency: `group_consistency`;
- Langevin updates: `langevin`.
The G seeds run as one vectorised computation (`torch.func.vmap`), like IG's restarts.

Group consistency: every `group_every` iterations the consensus E(x) is rebuilt from the
seeds: each seed's images are registered to the reference seed's (the seed with the lowest
objective) by the integer translation (circular shift within +-`max_shift` pixels) with the
lowest MSE, matched to them by a Hungarian assignment on that MSE (the batch order of a seed
is arbitrary when labels are optimised or repeated), and the registered images are averaged.
Each seed is then pulled towards the consensus shifted back into its own frame. The term is
off until the first consensus. The result is the consensus (in the reference seed's frame);
without group consistency, the seed with the lowest gradient loss.

Defaults follow breaching's reading of the paper (config seethroughgradients.yaml, notes
section 2): Adam lr 0.1, 20,000 iterations, cosine decay with 50 warm-up steps, L2 gradient
loss scaled 1e-4, TV 1e-4, l2 1e-6, BN 0.1 with the first BatchNorm weighted x10 (DeepInversion),
group 0.01, random-normal init, boxed, Langevin noise 0.01 (breaching notes the paper's 0.2).
These weights were tuned for ResNet-50 on 224 px ImageNet, whose gradient distances are far
larger than a small model's: on LeNet at 32 px the priors, the group term and the noise
dominate the scaled gradient term (measured: each of them lowers PSNR there), so scale
`grad_scale` or the weights for small models.
Not found in the sources, our choices: G = 4 seeds, consensus every 100 iterations,
max_shift = image side // 8.

Departures:
- registration is the best integer circular translation, not the paper's RANSAC-flow;
- images are optimised in normalised units u = (x - 0.5) / 0.25 (the paper: the dataset's
  mean and std); TV and l2 are taken on these units, so l2 pulls towards grey;
- the group term is a mean squared distance (the paper writes an l2 norm); the output is the
  final consensus.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from attacks.ig import resolve_labels
from attacks.labels import LABEL_STRATEGY, strategy_argument
from attacks.objectives import l2_distance
from attacks.optim import UNIT_BOX, adam_loop, init_dummies, per_restart, to_pixels
from attacks.priors import BatchNormStatistics, group_consistency, l2_prior, total_variation
from fedsim.api import Attack, Observation, Reconstruction, Task, observed


class GradInversion(Attack):
    name = "gradinversion"
    options = (*Attack.options, LABEL_STRATEGY)

    def __init__(self, iterations: int = 20_000, restarts: int = 4, seed: int = 0, progress=None,
                 lr: float = 0.1, label_strategy: str | None = "gradinversion",
                 fidelity: bool = True, bn_prior: bool | None = None, group_consistency: bool = True,
                 langevin: bool = True, grad_scale: float = 1e-4, tv: float = 1e-4, l2: float = 1e-6,
                 bn: float = 0.1, first_bn_multiplier: float = 10.0, group: float = 0.01,
                 noise: float = 0.01, group_every: int = 100, max_shift: int | None = None,
                 schedule: str = "cosine", warmup: int = 50):
        super().__init__(iterations, restarts, seed, progress)
        self.lr, self.label_strategy = lr, strategy_argument(label_strategy, "gradinversion")
        self.fidelity, self.bn_prior = fidelity, bn_prior
        self.group_consistency, self.langevin = group_consistency, langevin
        self.grad_scale, self.tv, self.l2, self.bn = grad_scale, tv, l2, bn
        self.first_bn_multiplier, self.group, self.noise = first_bn_multiplier, group, noise
        self.group_every, self.max_shift = group_every, max_shift
        self.schedule, self.warmup = schedule, warmup

    def reconstruct(self, observation: Observation, task: Task) -> Reconstruction:
        start = time.perf_counter()
        target, params = observed(observation, task)
        fixed, source = resolve_labels(self.label_strategy, observation, task)
        gen = torch.Generator().manual_seed(self.seed)
        units, labels = init_dummies(self.restarts, observation.batch_size, task, fixed, gen)
        use_bn = self.bn_prior if self.bn_prior is not None else has_batchnorm(task.model)
        stats = BatchNormStatistics(task.model, self.first_bn_multiplier) if use_bn else None
        vectorise = getattr(task.model, "supports_vmap", True)
        group = {"weight": 0.0, "targets": torch.zeros_like(units)}  # the term is off until a consensus exists
        max_shift = self.max_shift if self.max_shift is not None else task.image_shape[-1] // 8

        def targets_of(y):
            return y if fixed is not None else torch.softmax(y, dim=-1)

        def gradient_loss(u, y):
            return l2_distance(task.functional_gradients(params, to_pixels(u), targets_of(y)), target)

        def objective(u, y, pull):
            if use_bn:
                grads, bn_loss = task.functional_gradients(params, to_pixels(u), targets_of(y), aux=stats.loss)
            else:
                grads, bn_loss = task.functional_gradients(params, to_pixels(u), targets_of(y)), 0.0
            loss = self.grad_scale * l2_distance(grads, target)
            if self.fidelity:
                loss = loss + self.tv * total_variation(u) + self.l2 * l2_prior(u)
            if use_bn:
                loss = loss + self.bn * bn_loss
            if group["weight"]:
                loss = loss + group["weight"] * group_consistency(u, pull)
            return loss

        def step(it):
            losses = per_restart(objective, units, labels, group["targets"], vectorise=vectorise)
            if self.group_consistency and self.restarts > 1 and (it + 1) % self.group_every == 0:
                # the next iterations pull towards a consensus of the current candidates
                ref = int(torch.nan_to_num(losses.detach(), nan=float("inf")).argmin())
                _, group["targets"] = consensus(units.detach(), ref, max_shift)
                group["weight"] = self.group
            return losses

        with stats if stats is not None else nullcontext():
            adam_loop(step, units, self.iterations, self.lr, others=[labels] if fixed is None else (),
                      signed=False, schedule=self.schedule, warmup=self.warmup, box=UNIT_BOX,
                      langevin=self.noise if self.langevin else 0.0, generator=gen, progress=self.progress)
        units, labels = units.detach(), labels.detach()
        scores = per_restart(gradient_loss, units, labels, vectorise=vectorise)
        best = int(torch.nan_to_num(scores, nan=float("inf")).argmin())
        if self.group_consistency and self.restarts > 1:
            ref = best
            result, _ = consensus(units, ref, max_shift)
            out_loss = float(gradient_loss(result, labels[ref]))
        else:
            ref, result, out_loss = best, units[best], float(scores[best])
        out_labels = fixed if fixed is not None else labels[ref].argmax(-1)
        return Reconstruction(to_pixels(result).clamp(0, 1).cpu(), out_labels.cpu(),
                              {"gradient_loss": out_loss, "seed_losses": scores.tolist(), "label_source": source,
                               "bn_prior": use_bn, "seconds": time.perf_counter() - start})


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def shifted_errors(candidates: torch.Tensor, reference: torch.Tensor, max_shift: int):
    """MSE between every reference image i and every candidate image j circularly shifted by
    every (dy, dx) within +-max_shift: ([S, B_ref, B_cand] errors, the S shifts)."""
    shifts = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
    rolled = torch.stack([torch.roll(candidates, s, dims=(-2, -1)) for s in shifts])  # [S, B, C, H, W]
    errors = ((rolled.unsqueeze(1) - reference.unsqueeze(1)) ** 2).flatten(3).mean(-1)
    return errors, shifts


def best_shift(image: torch.Tensor, reference: torch.Tensor, max_shift: int) -> tuple[int, int]:
    """The integer (dy, dx) within +-max_shift for which roll(image, (dy, dx)) is closest to
    `reference` in MSE."""
    errors, shifts = shifted_errors(image.unsqueeze(0), reference.unsqueeze(0), max_shift)
    return shifts[int(errors[:, 0, 0].argmin())]


def consensus(candidates: torch.Tensor, ref: int, max_shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates [G, B, C, H, W] -> (consensus [B, C, H, W] in the frame of candidate `ref`,
    per-candidate pull targets [G, B, C, H, W]: the consensus moved into each candidate's frame
    and order). Each candidate's images are assigned to the reference's (Hungarian, on the MSE
    after the best shift), then shifted onto them and averaged."""
    reference = candidates[ref]
    registered, placements = [], []
    for cand in candidates:
        errors, shifts = shifted_errors(cand, reference, max_shift)
        best_err, best_idx = errors.min(0)  # [B_ref, B_cand]
        rows, cols = linear_sum_assignment(best_err.double().cpu().numpy())
        order = cols[np.argsort(rows)]  # cand[order[i]] <-> reference[i]
        moves = [shifts[int(best_idx[i, j])] for i, j in enumerate(order)]
        registered.append(torch.stack([torch.roll(cand[j], m, dims=(-2, -1)) for j, m in zip(order, moves)]))
        placements.append((order, moves))
    mean = torch.stack(registered).mean(0)
    targets = torch.empty_like(candidates)
    for g, (order, moves) in enumerate(placements):
        for i, (j, (dy, dx)) in enumerate(zip(order, moves)):
            targets[g, j] = torch.roll(mean[i], (-dy, -dx), dims=(-2, -1))
    return mean, targets
