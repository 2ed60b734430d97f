"""Datasets, the client partition and the per-round batch schedule, all seeded.

Everything here is a pure function of the RunConfig, so the evaluator can re-derive any
client's true batch after the fact instead of anyone carrying ground truth around. The
loaders themselves live in fedsim/datasets/.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch

from fedsim.config import ConfigError, RunConfig
from fedsim.datasets import SOURCES, ImageDataset, loader_args

__all__ = ["FederatedData", "ImageDataset", "federated_data", "load_dataset", "partition",
           "partition_dirichlet", "partition_iid", "partition_shard", "split_public"]

PUBLIC_FRACTION = 0.2  # share held out as the public split when a dataset has no test split
DIRICHLET_ATTEMPTS = 100  # redraws allowed until every client gets at least a batch


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

    @cached_property
    def public_eval(self) -> ImageDataset:
        """The half of the public split the tiny CLIP was not pre-trained on: where the server
        measures global accuracy (see `public_halves`)."""
        return public_halves(self.public)[1]

    def client_data(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(self.client_indices[client])
        return self.private.images[idx], self.private.labels[idx]

    def client_batch(self, cfg: RunConfig, round_: int, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(self.client_batch_indices(cfg, round_, client))
        return self.private.images[idx], self.private.labels[idx]


@lru_cache(maxsize=4)
def _load(name: str, args: tuple) -> ImageDataset:
    return SOURCES[name].load(*args)


def load_dataset(cfg: RunConfig) -> ImageDataset:
    """cfg.dataset at cfg.image_size, cached per process on the fields its loader reads."""
    if cfg.dataset not in SOURCES:
        raise ConfigError(f"--dataset {cfg.dataset!r} is not valid; valid: {', '.join(SOURCES)}")
    return _load(cfg.dataset, loader_args(cfg))


PUBLIC_SPLIT_SEED = 0xDA7A


def split_public(dataset: ImageDataset) -> tuple[ImageDataset, ImageDataset]:
    """(private, public): the official train / test split when the dataset has one (as views,
    no copy), else a fixed 20 % public split, the same for every run seed, so that what was
    public in one run (and what the tiny CLIP was pre-trained on) is never a client's data in
    another. The public part is what a server may hold."""
    if dataset.test_start is not None:
        cut = dataset.test_start
        return tuple(ImageDataset(dataset.name, dataset.images[part], dataset.labels[part],
                                  dataset.class_names) for part in (slice(None, cut), slice(cut, None)))
    order = np.random.default_rng(PUBLIC_SPLIT_SEED).permutation(len(dataset))
    n_public = int(round(PUBLIC_FRACTION * len(dataset)))
    return dataset.subset(np.sort(order[n_public:])), dataset.subset(np.sort(order[:n_public]))


def partition_iid(n: int, clients: int, seed: int) -> tuple[np.ndarray, ...]:
    """Shuffle the private pool and cut it into `clients` near-equal parts."""
    order = np.random.default_rng([seed, 0x11D]).permutation(n)
    return tuple(np.sort(part) for part in np.array_split(order, clients))


def partition_dirichlet(labels: np.ndarray, clients: int, alpha: float, seed: int,
                        min_size: int) -> tuple[np.ndarray, ...]:
    """Label skew: each class is shared out in proportions drawn from Dirichlet(alpha), so a
    small alpha gives each client few classes. Redrawn (up to DIRICHLET_ATTEMPTS times) until
    every client holds at least `min_size` images, else a ConfigError."""
    if clients * min_size > len(labels):
        raise ConfigError(f"--clients {clients} x --batch-size {min_size} needs {clients * min_size} "
                          f"private images, only {len(labels)} exist")
    rng = np.random.default_rng([seed, 0xD1A])
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    smallest = 0
    for _ in range(DIRICHLET_ATTEMPTS):
        parts = [[] for _ in range(clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha)))[:-1] * len(idx)).astype(int)
            for part, piece in zip(parts, np.split(idx, cuts)):
                part.append(piece)
        sizes = [sum(len(p) for p in part) for part in parts]
        smallest = min(sizes)
        if smallest >= min_size:
            return tuple(np.sort(np.concatenate(part)) for part in parts)
    raise ConfigError(f"--partition dirichlet --alpha {alpha} left a client with fewer than "
                      f"--batch-size {min_size} images in {DIRICHLET_ATTEMPTS} draws (last smallest: "
                      f"{smallest}); raise --alpha, or lower --clients or --batch-size")


def partition_shard(labels: np.ndarray, clients: int, shards: int, seed: int) -> tuple[np.ndarray, ...]:
    """Pathological non-IID: each client holds `shards` distinct classes. Classes are handed
    out least-used first (ties broken at random), so each class goes to about
    clients * shards / classes clients, and its images are split evenly among them.

    Leftovers: when clients * shards < classes, the classes nobody drew are dealt round-robin
    to the clients (in random order), which then hold more than `shards` classes, so the pool
    is still covered. A client also ends up with fewer images of a class (possibly none) when
    the class has fewer images than the clients sharing it."""
    classes = np.unique(labels)
    if shards > len(classes):
        raise ConfigError(f"--shards {shards} exceeds the {len(classes)} classes; valid: 1..{len(classes)}")
    rng = np.random.default_rng([seed, 0x5A4D])
    holders: list[list[int]] = [[] for _ in classes]
    uses = np.zeros(len(classes), int)
    for client in range(clients):
        chosen = np.lexsort((rng.random(len(classes)), uses))[:shards]
        uses[chosen] += 1
        for c in chosen:
            holders[c].append(client)
    order = rng.permutation(clients)
    for k, c in enumerate(rng.permutation(np.flatnonzero(uses == 0))):
        holders[c].append(int(order[k % clients]))
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for c, owners in zip(classes, holders):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for owner, piece in zip(owners, np.array_split(idx, len(owners))):
            parts[owner].append(piece)
    return tuple(np.sort(np.concatenate(part)) if part else np.zeros(0, int) for part in parts)


def partition(cfg: RunConfig, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """The private pool's indices per client under cfg.partition: disjoint, covering the pool."""
    if cfg.partition == "iid":
        return partition_iid(len(labels), cfg.clients, cfg.seed)
    if cfg.partition == "dirichlet":
        return partition_dirichlet(labels, cfg.clients, cfg.alpha, cfg.seed, cfg.batch_size)
    if cfg.partition == "shard":
        return partition_shard(labels, cfg.clients, cfg.shards, cfg.seed)
    raise ConfigError(f"--partition {cfg.partition!r} is not valid; valid: iid, dirichlet, shard")


def public_halves(public: ImageDataset) -> tuple[ImageDataset, ImageDataset]:
    """(pre-training half, evaluation half) of a public split: alternate images, so both halves
    cover every class. fedsim's tiny CLIP sees only the first half."""
    idx = np.arange(len(public))
    return public.subset(idx[0::2]), public.subset(idx[1::2])


def pretraining_split_of(name: str, image_size: int) -> ImageDataset:
    """The pre-training half of an embedded dataset's public split, at its default settings."""
    return public_halves(split_public(load_dataset(RunConfig(dataset=name, image_size=image_size)))[1])[0]


def federated_data(cfg: RunConfig) -> FederatedData:
    """Build the federation's data and check the batch size fits every client."""
    private, public = split_public(load_dataset(cfg))
    if cfg.clients > len(private):
        raise ConfigError(f"--clients {cfg.clients} exceeds the {len(private)} private images of "
                          f"{cfg.dataset}; valid: 1..{len(private)}")
    parts = partition(cfg, private.labels.numpy())
    smallest = min(len(p) for p in parts)
    if smallest == 0:
        raise ConfigError(f"--partition {cfg.partition} left a client without images (--clients "
                          f"{cfg.clients}, {len(private)} private images); lower --clients")
    if cfg.batch_size > smallest:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the smallest client's data "
                          f"({smallest} images with --clients {cfg.clients}, --partition "
                          f"{cfg.partition}); valid: 1..{smallest}")
    return FederatedData(private, public, parts)
