"""DP-SGD (Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, CCS 2016, arXiv 1607.00133)
in the client loop.

Each example's gradient is clipped to L2 norm C (over all trainable tensors together), the
clipped gradients are summed, Gaussian noise of std sigma*C is added to the sum, and the result
is divided by the batch size. Per-example gradients come from `torch.func.vmap`
(`Task.per_example_gradients`). The privacy spent is Opacus' RDP accountant's epsilon at
`--dp-delta`, under the assumptions in `fedsim.accounting`.

Departure from the paper: the "lot" is the client's round batch (fixed size, drawn at random)
rather than a Poisson sample; the accountant treats it as Poisson at rate B/n.
"""

from __future__ import annotations

import torch

from defenses.base import gaussian_like
from fedsim.api import Defense, Task
from fedsim.options import Option, above, at_least, within
from fedsim.task import Params

DELTA = Option("delta", 1e-5, "delta at which epsilon is reported", key="dp_delta",
                **within(0, 1, open_low=True))


def clip_per_example(per_example: Params, clip: float) -> Params:
    """Scale each example's gradient so its norm over all tensors is at most `clip`."""
    # reshape, not flatten(1): a scalar parameter (CLIP's logit scale) has per-example shape [B]
    norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in per_example.values()))
    factor = (clip / (norms + 1e-12)).clamp(max=1.0)
    return {n: g * factor.view(-1, *[1] * (g.dim() - 1)) for n, g in per_example.items()}


class DPSGD(Defense):
    name = "dp"
    options = (Option("clip", 1.0, "per-example gradient L2 clipping bound C", **above(0)),
               Option("noise", 1.0, "noise multiplier sigma (noise std = sigma * C on the summed gradient)",
                      **at_least(0)),
               DELTA)

    def __init__(self, clip: float = 1.0, noise: float = 1.0, delta: float = 1e-5):
        if not clip > 0 or not noise >= 0:
            raise ValueError(f"dp needs clip > 0 and noise >= 0, got clip={clip}, noise={noise}")
        self.clip, self.noise, self.delta = clip, noise, delta

    def gradient(self, task: Task, params: Params, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> Params:
        clipped = clip_per_example(task.per_example_gradients(params, images, labels), self.clip)
        batch = images.shape[0]
        return {name: (g.sum(0) + gaussian_like(g[0], self.noise * self.clip, generator)) / batch
                for name, g in clipped.items()}

    def audited(self, grads, task, params, images, labels, update_scale, generator):
        """The noise only: N(0, (sigma C / B)^2) on the mean gradient. Per-example clipping is left
        out: it rescales the gradient (a bias) rather than hiding it."""
        std = self.noise * self.clip / images.shape[0]
        return ({n: g + gaussian_like(g, std, generator) for n, g in grads.items()},
                f"dp: Gaussian std {std:.3g} (sigma C / B), clipping left out")

    def privacy(self, accounting) -> dict[str, float]:
        return {"epsilon": accounting.example_epsilon(self.noise, self.delta), "delta": self.delta}
