"""Classic image classifiers used by the gradient-inversion literature."""

from __future__ import annotations

import torch
from torch import nn


class LeNet(nn.Module):
    """The LeNet variant of DLG (Zhu, Liu, Han 2019, arXiv 1906.08935): three 5x5 convolutions
    with sigmoid activations and one linear layer, every weight drawn from U(-0.5, 0.5).

    Sigmoid keeps the network twice differentiable everywhere, which gradient matching needs.
    Input images are in [0, 1].
    """

    def __init__(self, num_classes: int, image_size: int = 32, channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1), nn.Sigmoid(),
        )
        side = -(-image_size // 4)  # two stride-2 convolutions, rounding up
        self.fc = nn.Linear(12 * side * side, num_classes)
        for p in self.parameters():
            nn.init.uniform_(p, -0.5, 0.5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images).flatten(1))
