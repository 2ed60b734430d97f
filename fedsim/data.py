"""Datasets, the client partition and the per-round batch schedule, all seeded.

Everything here is a pure function of the RunConfig, so the evaluator can re-derive any
client's true batch after the fact instead of anyone carrying ground truth around.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.config import ConfigError, RunConfig

PUBLIC_FRACTION = 0.2  # share of each dataset held out as the public split the server may hold


@dataclass(frozen=True)
class ImageDataset:
    """Images in [0, 1], shape [N, 3, H, W], with integer labels and class names."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: np.ndarray) -> "ImageDataset":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(self.name, self.images[idx], self.labels[idx], self.class_names)


@dataclass(frozen=True)
class FederatedData:
    """The private pool split across clients, plus the public split."""

    private: ImageDataset
    public: ImageDataset
    client_indices: tuple[np.ndarray, ...]  # indices into `private`, one array per client

    def client_batch_indices(self, cfg: RunConfig, round_: int, client: int) -> np.ndarray:
        """The seeded batch a client trains on in a round (indices into `private`)."""
        pool = self.client_indices[client]
        rng = np.random.default_rng([cfg.seed, round_, client])
        return np.sort(rng.choice(pool, size=cfg.batch_size, replace=False))

    def client_data(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(self.client_indices[client])
        return self.private.images[idx], self.private.labels[idx]

    def client_batch(self, cfg: RunConfig, round_: int, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(self.client_batch_indices(cfg, round_, client))
        return self.private.images[idx], self.private.labels[idx]


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def load_digits(image_size: int) -> ImageDataset:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as RGB images in [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    grey = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = _resize(grey, image_size).repeat(1, 3, 1, 1).contiguous()
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    return ImageDataset("digits", images, torch.tensor(bunch.target, dtype=torch.long), names)


LOADERS = {"digits": load_digits}


@lru_cache(maxsize=4)
def _load(name: str, image_size: int) -> ImageDataset:
    return LOADERS[name](image_size)


def load_dataset(cfg: RunConfig) -> ImageDataset:
    return _load(cfg.dataset, cfg.image_size)


def split_public(dataset: ImageDataset, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Seeded (private, public) split; the public part is what a server may legitimately hold."""
    order = np.random.default_rng([seed, 0xDA7A]).permutation(len(dataset))
    n_public = int(round(PUBLIC_FRACTION * len(dataset)))
    return dataset.subset(np.sort(order[n_public:])), dataset.subset(np.sort(order[:n_public]))


def partition_iid(n: int, clients: int, seed: int) -> tuple[np.ndarray, ...]:
    """Shuffle the private pool and cut it into `clients` near-equal parts."""
    order = np.random.default_rng([seed, 0x11D]).permutation(n)
    return tuple(np.sort(part) for part in np.array_split(order, clients))


def federated_data(cfg: RunConfig) -> FederatedData:
    """Build the federation's data and check the batch size fits every client."""
    private, public = split_public(load_dataset(cfg), cfg.seed)
    if cfg.clients > len(private):
        raise ConfigError(f"--clients {cfg.clients} exceeds the {len(private)} private images of "
                          f"{cfg.dataset}; valid: 1..{len(private)}")
    parts = partition_iid(len(private), cfg.clients, cfg.seed)
    smallest = min(len(p) for p in parts)
    if cfg.batch_size > smallest:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the smallest client's data "
                          f"({smallest} images with --clients {cfg.clients}); valid: 1..{smallest}")
    return FederatedData(private, public, parts)
