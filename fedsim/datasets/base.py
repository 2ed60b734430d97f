"""The in-memory image dataset every loader returns, and the conversion all loaders share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CHUNK = 4096  # images converted at a time, so large datasets never hold two float copies


@dataclass(frozen=True)
class ImageDataset:
    """Images in [0, 1], shape [N, 3, H, W], with integer labels and class names.

    `test_start`, when set, is the index where the dataset's official test split begins
    (images before it are the official train split); None means there is no official split.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    test_start: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: np.ndarray) -> "ImageDataset":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(self.name, self.images[idx], self.labels[idx], self.class_names)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of [N, C, H, W] to size x size (antialiased when shrinking)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)


def to_images(array: np.ndarray, size: int) -> torch.Tensor:
    """[N, H, W] or [N, C, H, W] (C = 1 or 3; uint8 in 0..255 or float in 0..1) -> float
    [N, 3, size, size] in [0, 1], grey repeated to three channels, converted in chunks."""
    if array.ndim == 3:
        array = array[:, None]
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    out = torch.empty((len(array), 3, size, size), dtype=torch.float32)
    for start in range(0, len(array), CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(array[start:start + CHUNK])).float() / scale
        out[start:start + len(chunk)] = resize(chunk.clamp(0, 1), size).expand(-1, 3, -1, -1)
    return out


def labels_tensor(labels) -> torch.Tensor:
    return torch.as_tensor(np.asarray(labels), dtype=torch.long)
