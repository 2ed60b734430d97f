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


class ConvNet(nn.Module):
    """A small ReLU ConvNet after the "ConvNet" of Geiping et al. 2020 (arXiv 2003.14053),
    narrowed for CPU: three 3x3 conv stages of width w, 2w, 4w, the last two followed by 2x2
    max-pooling, and a linear classifier on the flattened [4w, H/4, W/4] feature map.

    Like Geiping et al.'s ConvNet (and unlike a global-average-pooled head), the classifier
    reads the whole feature map, so the last layer's gradient keeps the image's spatial layout;
    with global average pooling Inverting Gradients fell from about 37 dB to about 10 dB PSNR
    (experiments/classic_attacks.py --head avg). Departures: fewer and narrower stages, no
    BatchNorm (so batch-1 gradients are well defined), PyTorch's default init."""

    def __init__(self, num_classes: int, image_size: int = 32, width: int = 32, channels: int = 3):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4  # two 2x2 max-pools, rounding down
        self.fc = nn.Linear(4 * w * side * side, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images).flatten(1))


def build_classic(name: str, num_classes: int, image_size: int) -> nn.Module:
    """A classic model with every parameter trainable (`--peft full`)."""
    if name == "lenet":
        return LeNet(num_classes, image_size)
    if name == "convnet":
        return ConvNet(num_classes, image_size)
    if name == "resnet18":
        from torchvision.models import resnet18

        return resnet18(weights=None, num_classes=num_classes)  # random init, with BatchNorm
    raise ValueError(f"unknown classic model {name!r}; valid: lenet, convnet, resnet18")
