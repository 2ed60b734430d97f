"""Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019, arXiv 1906.08935).

A dummy image and a dummy soft label are optimised jointly with L-BFGS so that the gradient
they induce on the public model matches the observed one in L2. Written against the Task,
so it runs on any model and any PEFT method.

Departures from the paper, and why:
- Dummy images start uniform in [0, 1] (the paper: standard normal), since fedsim images
  live in [0, 1]; the result is clipped to [0, 1].
- L-BFGS uses a strong-Wolfe line search. With the paper's plain unit step the first update
  can push a sigmoid LeNet into saturation, where every gradient vanishes and the run returns
  noise. The line search only accepts steps that decrease the objective.
- Several restarts may be asked for; the one whose gradient matches best is kept.

With `label_strategy` set (e.g. "idlg"), the labels come from that label-recovery strategy
(`attacks.labels`) and stay fixed: only the image is optimised, with hard-label
cross-entropy. That is iDLG (attacks.idlg).

An "iteration" is one `LBFGS.step` of up to `inner_steps` (20) L-BFGS iterations, as in the
reference code's loop of 300 steps.
"""

from __future__ import annotations

import math
import time

import torch

from attacks.labels import LABEL_STRATEGY, strategy_argument, strategy_labels
from attacks.objectives import l2_distance
from fedsim.api import Attack, Observation, Reconstruction, Task, observed


class DLG(Attack):
    name = "dlg"
    options = (*Attack.options, LABEL_STRATEGY)

    def __init__(self, iterations: int = 300, restarts: int = 1, seed: int = 0, progress=None,
                 lr: float = 1.0, inner_steps: int = 20, history_size: int = 100,
                 label_strategy: str | None = None):
        super().__init__(iterations, restarts, seed, progress)
        self.label_strategy = strategy_argument(label_strategy, None)  # None: soft labels optimised jointly
        self.lr = lr
        self.inner_steps = inner_steps  # L-BFGS iterations per optimiser.step(), as in DLG's code
        self.history_size = history_size

    def reconstruct(self, observation: Observation, task: Task) -> Reconstruction:
        start = time.perf_counter()
        device = task.device
        target, params = observed(observation, task)
        shape = (observation.batch_size, *task.image_shape)
        gen = torch.Generator().manual_seed(self.seed)
        fixed = None
        if self.label_strategy is not None:
            fixed = strategy_labels(self.label_strategy, observation, task).to(device)
        best = None
        for restart in range(self.restarts):
            images = torch.rand(shape, generator=gen).to(device).requires_grad_(True)
            label_logits = torch.randn(shape[0], task.num_classes, generator=gen).to(device).requires_grad_(True)
            loss = self._optimise(task, params, target, images, label_logits, fixed, restart)
            if best is None or loss < best[0]:
                best = (loss, images.detach(), label_logits.detach())
        loss, images, label_logits = best
        labels = fixed if fixed is not None else label_logits.argmax(1)
        return Reconstruction(images.clamp(0, 1).cpu(), labels.cpu(),
                              {"gradient_loss": loss, "seconds": time.perf_counter() - start,
                               "label_source": self.label_strategy or "optimised"})

    def _optimise(self, task, params, target, images, label_logits, fixed, restart) -> float:
        variables = [images] if fixed is not None else [images, label_logits]
        optimiser = torch.optim.LBFGS(variables, lr=self.lr, max_iter=self.inner_steps,
                                      history_size=self.history_size, line_search_fn="strong_wolfe",
                                      tolerance_grad=0.0, tolerance_change=0.0)

        def closure():
            optimiser.zero_grad()
            targets = fixed if fixed is not None else torch.softmax(label_logits, dim=-1)
            loss = l2_distance(task.gradients(params, images, targets, create_graph=True), target)
            loss.backward()
            return loss

        loss = math.inf
        for it in range(self.iterations):
            loss = float(optimiser.step(closure).detach())
            if self.progress:
                self.progress(restart * self.iterations + it + 1, self.restarts * self.iterations)
            if not math.isfinite(loss) or loss < 1e-12:
                break
        return loss if math.isfinite(loss) else math.inf
