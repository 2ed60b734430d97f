"""Inverting Gradients (Geiping, Bauermeister, Droege, Moeller, NeurIPS 2020, arXiv 2003.14053).

Minimises, over candidate images x, the cosine distance between the gradient they induce and
the observed one, summed over all trainable tensors, plus alpha_TV * TV(x):

    1 - <grad L(x, y), g> / (||grad L(x, y)|| ||g||)  +  alpha_TV * TV(x)

with signed Adam, the step schedule (x0.1 at 3/8, 5/8, 7/8 of the iterations), the images
boxed to the valid range after every step, and R restarts of which the one with the lowest
gradient loss (cosine distance) is kept. The R restarts run in one vectorised computation
(`torch.func.vmap` over a per-restart loss built on `Task.functional_gradients`): the gradient
is a mean over the batch, so restarts cannot be stacked into one larger batch.

Labels (`label_strategy`):
- "auto" (default, as the paper's code): batch 1 -> iDLG's rule (strategy "idlg"; if it does
  not apply, joint optimisation); larger batches -> soft labels optimised jointly with the
  images (DLG-style logits, softmax, signed Adam like the images);
- None: always joint optimisation;
- any other name: that strategy from `attacks.labels`, labels fixed (its error propagates).

Defaults follow the paper-style recipe of the reference code (reconstruct_image.py "ours",
notes section 5): Adam lr 0.1, 24,000 iterations, signed, boxed, step decay, TV 1e-4, one
restart, random-normal init.

Departures: images are optimised in normalised units u = (x - 0.5) / 0.25 for every dataset
(the reference code uses each dataset's own mean and std); the TV term is computed on these
units. The paper's other variants (weighting layers, top-k layers, scoring restarts by other
criteria) are not implemented.
"""

from __future__ import annotations

import time

import torch

from attacks.labels import LABEL_STRATEGY, strategy_argument, strategy_labels
from attacks.objectives import cosine_distance
from attacks.optim import UNIT_BOX, adam_loop, init_dummies, per_restart, to_pixels
from attacks.priors import total_variation
from fedsim.api import Attack, Observation, Reconstruction, Task, observed


class InvertingGradients(Attack):
    name = "ig"
    options = (*Attack.options, LABEL_STRATEGY)

    def __init__(self, iterations: int = 24_000, restarts: int = 1, seed: int = 0, progress=None,
                 lr: float = 0.1, tv: float = 1e-4, signed: bool = True, boxed: bool = True,
                 schedule: str = "step", label_strategy: str | None = "auto"):
        super().__init__(iterations, restarts, seed, progress)
        self.lr, self.tv, self.signed, self.boxed, self.schedule = lr, tv, signed, boxed, schedule
        self.label_strategy = strategy_argument(label_strategy, "auto")

    def reconstruct(self, observation: Observation, task: Task) -> Reconstruction:
        start = time.perf_counter()
        target, params = observed(observation, task)
        fixed, source = resolve_labels(self.label_strategy, observation, task)
        gen = torch.Generator().manual_seed(self.seed)
        units, labels = init_dummies(self.restarts, observation.batch_size, task, fixed, gen)
        vectorise = getattr(task.model, "supports_vmap", True)

        def gradient_loss(u, y):
            targets = y if fixed is not None else torch.softmax(y, dim=-1)
            return cosine_distance(task.functional_gradients(params, to_pixels(u), targets), target)

        def objective(u, y):
            return gradient_loss(u, y) + self.tv * total_variation(u)

        adam_loop(lambda it: per_restart(objective, units, labels, vectorise=vectorise), units,
                  self.iterations, self.lr, others=[labels] if fixed is None else (), signed=self.signed,
                  schedule=self.schedule, box=UNIT_BOX if self.boxed else None, progress=self.progress)
        units, labels = units.detach(), labels.detach()
        scores = per_restart(gradient_loss, units, labels, vectorise=vectorise)
        best = int(torch.nan_to_num(scores, nan=float("inf")).argmin())
        out_labels = fixed if fixed is not None else labels[best].argmax(-1)
        return Reconstruction(to_pixels(units[best]).clamp(0, 1).cpu(), out_labels.cpu(),
                              {"gradient_loss": float(scores[best]), "restart_losses": scores.tolist(),
                               "label_source": source, "seconds": time.perf_counter() - start})


def resolve_labels(strategy: str | None, observation: Observation, task: Task):
    """(fixed labels [B] or None for joint optimisation, what decided them)."""
    if strategy is None:
        return None, "optimised"
    if strategy == "auto":
        if observation.batch_size != 1:
            return None, "optimised"
        try:
            return strategy_labels("idlg", observation, task), "idlg"
        except ValueError:  # LabelStrategyError: the rule does not apply here
            return None, "optimised"
    return strategy_labels(strategy, observation, task), strategy
