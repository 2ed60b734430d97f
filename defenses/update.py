"""Defenses on the update as it leaves the client: clipping and noise, pruning, quantisation."""

from __future__ import annotations

import torch

from defenses.base import gaussian_like, update_norm
from defenses.dp import DELTA
from fedsim.api import Defense
from fedsim.options import Option, above, at_least, within
from fedsim.task import Params

QUANTIZE_MODES = ("deterministic", "stochastic")
# dp-update's and flower-dp's: both clip and noise a client's whole update
UPDATE_CLIP = Option("clip", 1.0, "L2 clipping bound C of a client's whole update",
                     key="update_clip", **above(0))
UPDATE_NOISE = Option("noise", 1.0, "noise multiplier sigma (dp-update: std sigma * C on the update; flower-dp: "
                      "on the sum, added by the server)", key="update_noise", **at_least(0))


def clip_update(update: Params, clip: float) -> Params:
    """Scale the update so that its norm over all tensors is at most `clip`."""
    factor = min(1.0, clip / (float(update_norm(update)) + 1e-12))
    return {n: u * factor for n, u in update.items()}


class UpdateDP(Defense):
    """Local DP on the update, the Gaussian mechanism on a client's whole contribution: clip the
    update to L2 norm C, add N(0, sigma^2 C^2) to every coordinate. This is the client-level
    mechanism of DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018, arXiv 1710.06963), with
    the noise added by the client itself (local DP) rather than by the server to the sum:
    the curious server sees the noised update. Epsilon is client-level (see fedsim.accounting)."""

    name = "dp-update"
    options = (UPDATE_CLIP, UPDATE_NOISE, DELTA)

    def __init__(self, clip: float = 1.0, noise: float = 1.0, delta: float = 1e-5):
        if not clip > 0 or not noise >= 0:
            raise ValueError(f"dp-update needs clip > 0 and noise >= 0, got clip={clip}, noise={noise}")
        self.clip, self.noise, self.delta = clip, noise, delta

    def transform_update(self, update: Params, generator: torch.Generator) -> Params:
        return {n: u + gaussian_like(u, self.noise * self.clip, generator)
                for n, u in clip_update(update, self.clip).items()}

    def privacy(self, accounting) -> dict[str, float]:
        return {"epsilon_client": accounting.client_epsilon(self.noise, self.delta), "delta": self.delta}

    def audited(self, grads, task, params, images, labels, update_scale, generator):
        """The noise only, N(0, (sigma C)^2) on the update, in gradient units; clipping left out."""
        std = self.noise * self.clip * abs(update_scale)
        return ({n: g + gaussian_like(g, std, generator) for n, g in grads.items()},
                f"dp-update: Gaussian std {std:.3g} (sigma C, gradient units), clipping left out")


class Prune(Defense):
    """Magnitude pruning of the update, the defense of DLG (Zhu, Liu, Han, NeurIPS 2019,
    arXiv 1906.08935, Sec. 5): in every tensor, the `ratio` share of entries smallest in
    magnitude are set to zero (ratio 0.9 keeps the largest 10 %). Exactly round(ratio * numel)
    entries are zeroed per tensor (ties broken by position, via topk), so the kept share does not
    depend on how many entries tie at the threshold, unlike a quantile threshold."""

    name = "prune"
    options = (Option("ratio", 0.9, "share of each tensor's entries, smallest in magnitude, set to zero",
                      **within(0, 1)),)

    def __init__(self, ratio: float = 0.9):
        if not 0 <= ratio < 1:
            raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio

    def transform_update(self, update: Params, generator: torch.Generator) -> Params:
        out = {}
        for name, u in update.items():
            flat = u.flatten()
            keep = flat.numel() - round(self.ratio * flat.numel())
            mask = torch.zeros_like(flat, dtype=torch.bool)
            mask[flat.abs().topk(keep).indices] = True
            out[name] = (flat * mask).view_as(u)
        return out


class Quantize(Defense):
    """k-bit quantisation of every tensor of the update onto 2^k evenly spaced levels between
    its minimum and maximum (sent along as two floats). `deterministic` rounds to the nearest
    level; `stochastic` rounds up with probability equal to the distance from the level below,
    so that the quantised update is unbiased (stochastic rounding as in QSGD, Alistarh, Grubic,
    Li, Tomioka, Vojnovic, NeurIPS 2017, arXiv 1610.02132). Departure from QSGD: a min-max grid
    per tensor rather than QSGD's norm-scaled levels with a sign bit, so that k bits mean 2^k
    levels; fp16/int8 conversion, which DLG tried as a defense, is the deterministic mode."""

    name = "quantize"
    options = (Option("bits", 8, "bits per entry (2^bits levels between a tensor's min and max)",
                      check=lambda b: 1 <= b <= 16, valid="in 1..16"),
               Option("mode", "stochastic", "stochastic (unbiased rounding) or deterministic (nearest)",
                      choices=("stochastic", "deterministic")))

    def __init__(self, bits: int = 8, mode: str = "stochastic"):
        if not 1 <= bits <= 16:
            raise ValueError(f"quantize bits must be in 1..16, got {bits}")
        if mode not in QUANTIZE_MODES:
            raise ValueError(f"quantize mode {mode!r} is not valid; valid: {', '.join(QUANTIZE_MODES)}")
        self.bits, self.mode = bits, mode

    def transform_update(self, update: Params, generator: torch.Generator) -> Params:
        return {n: self.quantize(u, generator) for n, u in update.items()}

    def quantize(self, u: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        lo, hi = u.min(), u.max()
        step = (hi - lo) / (2 ** self.bits - 1)
        if step == 0:  # a constant tensor is its own quantisation
            return u.clone()
        scaled = (u - lo) / step
        if self.mode == "deterministic":
            index = scaled.round()
        else:
            below = scaled.floor()
            draw = torch.rand(u.shape, generator=generator, dtype=u.dtype).to(u.device)
            index = below + (draw < scaled - below).to(u.dtype)
        return lo + index.clamp(0, 2 ** self.bits - 1) * step
