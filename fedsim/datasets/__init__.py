"""Dataset loaders. Each returns an ImageDataset: float images in [0, 1], [N, 3, S, S] at
--image-size, int64 labels, class names that are words (they become CLIP prompts).

Embedded (no files needed): digits, faces, photos, synthetic (fedsim/datasets/embedded.py,
synthetic.py). Read from --data-root in torchvision's layouts: mnist, cifar10, cifar100,
caltech101, imagefolder (fedsim/datasets/files.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fedsim.datasets.base import ImageDataset, resize, to_images
from fedsim.datasets.embedded import load_digits, load_faces, load_photos
from fedsim.datasets.files import load_caltech101, load_cifar10, load_cifar100, load_imagefolder, load_mnist
from fedsim.datasets.synthetic import load_synthetic

__all__ = ["ImageDataset", "SOURCES", "Source", "loader_args", "resize", "to_images"]


@dataclass(frozen=True)
class Source:
    """A loader and the RunConfig fields it takes (image_size always comes first)."""

    load: Callable[..., ImageDataset]
    fields: tuple[str, ...] = ("image_size",)


DATASET_SEED = 0  # generated datasets (photo crops, shapes) are the same for every run
_FILES = ("image_size", "data_root", "download")
SOURCES = {
    "digits": Source(load_digits),
    "faces": Source(load_faces),
    # Fixed content: --seed varies the partition, schedule and model, not what the dataset is.
    "photos": Source(lambda image_size: load_photos(image_size, DATASET_SEED)),
    "synthetic": Source(lambda image_size, classes, size: load_synthetic(image_size, DATASET_SEED, classes, size),
                        ("image_size", "synthetic_classes", "synthetic_size")),
    "mnist": Source(load_mnist, _FILES),
    "cifar10": Source(load_cifar10, _FILES),
    "cifar100": Source(load_cifar100, _FILES),
    "caltech101": Source(load_caltech101, _FILES),
    "imagefolder": Source(load_imagefolder, ("image_size", "data_root")),
}


def loader_args(cfg) -> tuple:
    """The values of the fields cfg.dataset's loader reads: the dataset's cache key."""
    return tuple(getattr(cfg, name) for name in SOURCES[cfg.dataset].fields)
