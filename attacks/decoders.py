"""Learned image priors for MIP: decoders from a CLIP image embedding back to the image, trained
by the attacker on the public split it legitimately holds, and cached on disk.

This is the "prior knowledge" view of seed 001 (learned end-to-end networks as priors) made
concrete: the embedding carries the image's content, but a hand-made smoothness prior cannot
get it out of a CLIP encoder (a TV-only inversion of the true embedding is no better than the
image's mean colour), so the attacker learns the inverse map on images it has.

- `ridge`: kernel ridge regression (closed form; an RBF kernel on the embeddings' angle).
- `conv`: a small transposed-convolution decoder (a linear layer to 4x4x128, three stride-2
  up-convolutions to 32 px, a sigmoid), trained with MSE under Adam.
Both learn from the public images and their shifted copies (the public split is small: 359
digits): shifts of up to 2 pixels for `ridge`, 1 for `conv` (`SHIFT_REACH`). On held-out digits
one-pixel shifts are worth about 1.1 dB to ridge in 5-fold cross-validation on the public
split; 2 pixels a further 0.10 dB there, and 0.6 dB on the 20 test digits of
`experiments/mip_tiny.py --part decoders` (README, MIP).

Decoders take the unit-norm output of the image tower (before any trainable head), so one
decoder serves every PEFT method on the same frozen CLIP, and are keyed in the cache on the
tower's weights, the public images, the kind and the training settings.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

LEARNED_PRIORS = ("ridge", "conv")  # --mip-prior's other value, tv, needs no decoder
SHIFT_REACH = {"ridge": 2, "conv": 1}  # pixels each way (module docstring)
RIDGE_ANCHORS = 10_000  # the kernel matrix is n x n (800 MB in float64 here): beyond, a seeded subset
VERSION = 3


def cache_dir() -> Path:
    root = Path(os.environ.get("FEDSIM_CACHE", Path.home() / ".cache" / "fedsim"))
    return root / "priors"


class RidgeDecoder(nn.Module):
    """Kernel ridge regression from unit-norm embeddings to pixels, closed form:
    x(z) = mean + k(z, Z) (K + lam I)^-1 (X - mean), with the kernel exp(gamma (z.z' - 1)) on
    the unit sphere (a Gaussian kernel in the embedding's angle). Keeps its training
    embeddings: at most a few thousand for the embedded public splits."""

    def __init__(self, dim: int, image_shape: tuple[int, int, int], n: int = 1, gamma: float = 3.0):
        super().__init__()
        self.image_shape, self.gamma = image_shape, gamma
        pixels = int(torch.tensor(image_shape).prod())
        self.register_buffer("anchors", torch.zeros(n, dim))
        self.register_buffer("coef", torch.zeros(n, pixels))
        self.register_buffer("mean", torch.zeros(pixels))

    def kernel(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.gamma * (a @ b.T - 1))

    def fit(self, z: torch.Tensor, x: torch.Tensor, ridge: float = 1e-2, **_) -> None:
        z, x = z.double(), x.flatten(1).double()
        mean = x.mean(0)
        K = self.kernel(z, z)
        K.diagonal().add_(ridge)  # K + ridge I: symmetric positive definite
        coef = torch.cholesky_solve(x - mean, torch.linalg.cholesky(K))
        self.anchors, self.coef, self.mean = z.float(), coef.float(), mean.float()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.mean + self.kernel(z, self.anchors) @ self.coef
        return out.view(len(z), *self.image_shape).clamp(0, 1)


class ConvDecoder(nn.Module):
    def __init__(self, dim: int, image_shape: tuple[int, int, int], width: int = 128):
        super().__init__()
        self.image_shape = image_shape
        w = width
        self.net = nn.Sequential(
            nn.Linear(dim, w * 16), nn.ReLU(), nn.Unflatten(1, (w, 4, 4)),
            nn.ConvTranspose2d(w, w // 2, 4, 2, 1), nn.BatchNorm2d(w // 2), nn.ReLU(),
            nn.ConvTranspose2d(w // 2, w // 4, 4, 2, 1), nn.BatchNorm2d(w // 4), nn.ReLU(),
            nn.ConvTranspose2d(w // 4, image_shape[0], 4, 2, 1), nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.net(z)
        if tuple(out.shape[-2:]) != tuple(self.image_shape[1:]):
            out = F.interpolate(out, size=self.image_shape[1:], mode="bilinear", align_corners=False)
        return out

    def fit(self, z: torch.Tensor, x: torch.Tensor, epochs: int = 40, seed: int = 0, progress=None):
        """Adam on MSE with a cosine decay, minibatches of 64."""
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        self.train()
        for epoch in range(epochs):
            for idx in torch.randperm(len(z), generator=gen).split(64):
                opt.zero_grad()
                F.mse_loss(self(z[idx]), x[idx]).backward()
                opt.step()
            sched.step()
            if progress:
                progress(epoch + 1, epochs)
        self.eval()


def fingerprint(*tensors: torch.Tensor, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for t in tensors:
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:20]


def shifted(images: torch.Tensor, reach: int = 1, limit: int | None = None) -> torch.Tensor:
    """The images and their copies rolled by up to `reach` pixels each way (the public split is
    small, and a digit moved by a pixel or two is still that digit), shift by shift; with
    `limit`, a seeded subset of at most that many of these copies."""
    shifts = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)]
    copies = torch.arange(len(shifts) * len(images))  # shift-major: copy k is shift k // n
    if limit is not None and len(copies) > limit:
        copies = copies[torch.randperm(len(copies), generator=torch.Generator().manual_seed(0))[:limit]].sort().values
    return torch.cat([torch.roll(images[copies[copies // len(images) == k] % len(images)], shifts=s, dims=(-2, -1))
                      for k, s in enumerate(shifts)])


def learned_prior(kind: str, encoder: nn.Module, encode, public_images: torch.Tensor, dim: int,
                  progress=None) -> nn.Module:
    """The decoder of `kind` for this image tower and public split: loaded from the cache, or
    trained (and cached). `encode` maps images in [0, 1] to unit-norm tower outputs."""
    if kind not in LEARNED_PRIORS:
        raise ValueError(f"unknown learned prior {kind!r}; valid: {', '.join(LEARNED_PRIORS)}")
    image_shape = tuple(public_images.shape[1:])
    tower = fingerprint(*[p for p in encoder.state_dict().values() if p.is_floating_point()],
                        extra=f"{kind}-v{VERSION}-{image_shape}")
    path = cache_dir() / f"{kind}-{fingerprint(public_images, extra=tower)}.safetensors"
    if path.exists():
        state = load_file(path)
        anchors = len(state["anchors"]) if "anchors" in state else 0  # a ridge decoder keeps its training embeddings
        decoder = _new(kind, dim, image_shape, anchors)
        decoder.load_state_dict(state)
        return decoder.eval()
    images = shifted(public_images, SHIFT_REACH[kind], RIDGE_ANCHORS if kind == "ridge" else None)
    decoder = fit_decoder(kind, encode, images, dim, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return decoder.eval()


def fit_decoder(kind: str, encode, images: torch.Tensor, dim: int, progress=None) -> nn.Module:
    """A decoder of `kind` trained, seeded, to map `encode(images)` back to `images` (no cache)."""
    with torch.no_grad():
        z = torch.cat([encode(chunk) for chunk in images.split(256)]).cpu()
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(0)
        decoder = _new(kind, dim, tuple(images.shape[1:]), len(images))
        decoder.fit(z, images.cpu(), progress=progress)
    return decoder


def _new(kind: str, dim: int, image_shape, n: int) -> nn.Module:
    return RidgeDecoder(dim, image_shape, n) if kind == "ridge" else ConvDecoder(dim, image_shape)
