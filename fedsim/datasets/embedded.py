"""Datasets that ship inside installed packages (scikit-learn, scikit-image): no download."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from fedsim.datasets.base import ImageDataset, labels_tensor, resize, to_images

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# (skimage.data function, class name): photographs bundled with scikit-image itself (the
# ones behind pooch downloads are left out). The class is the source photograph.
PHOTOS = (("astronaut", "astronaut"), ("coffee", "coffee"), ("chelsea", "cat"),
          ("rocket", "rocket"), ("coins", "coins"), ("camera", "cameraman"), ("moon", "moon"),
          ("hubble_deep_field", "galaxies"), ("brick", "bricks"), ("grass", "grass"))
CROPS_PER_PHOTO = 60
CROP_SCALE = (0.15, 0.5)  # crop side as a fraction of the photo's shorter side


def load_digits(image_size: int) -> ImageDataset:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as RGB images in [0, 1].

    Labels 0-9 are the digit shown; class names "zero" ... "nine"."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = to_images(bunch.images.astype(np.float32) / 16.0, image_size)
    return ImageDataset("digits", images, labels_tensor(bunch.target), DIGIT_NAMES)


def load_faces(image_size: int) -> ImageDataset:
    """scikit-image's LFW subset: 200 grey 25x25 crops, 100 faces from Labeled Faces in the
    Wild, then 100 patches cut from the same photos' backgrounds (some show a bit of a face).

    Two classes: label 0 "face", label 1 "background"."""
    from skimage.data import lfw_subset

    grey = lfw_subset()  # float64 in [0, 1]
    labels = np.repeat([0, 1], [100, 100])
    return ImageDataset("faces", to_images(grey, image_size), labels_tensor(labels), ("face", "background"))


def load_photos(image_size: int, seed: int) -> ImageDataset:
    """Square crops of ten photographs bundled with scikit-image, 60 crops per photograph.

    The label is the source photograph: 0 astronaut (Eileen Collins), 1 coffee (a cup),
    2 cat (Chelsea), 3 rocket (on its launch pad), 4 coins, 5 cameraman, 6 moon (surface),
    7 galaxies (Hubble deep field), 8 bricks (a wall), 9 grass. Crop positions, sizes
    (15-50 % of the photo's shorter side) and horizontal flips are drawn from `seed`, so a
    crop may show only part of the subject (the sky behind the rocket, the astronaut's flag)."""
    import skimage.data

    rng = np.random.default_rng([seed, 0xF070])
    images, labels = [], []
    for label, (function, _) in enumerate(PHOTOS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            photo = np.asarray(getattr(skimage.data, function)())
        photo = photo[..., None] if photo.ndim == 2 else photo[..., :3]
        chw = torch.from_numpy(np.ascontiguousarray(photo.transpose(2, 0, 1))).float() / 255.0
        chw = chw.expand(3, -1, -1)
        height, width = photo.shape[:2]
        for _ in range(CROPS_PER_PHOTO):
            side = int(rng.uniform(*CROP_SCALE) * min(height, width))
            top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
            crop = resize(chw[None, :, top:top + side, left:left + side], image_size)[0]
            images.append(crop.flip(-1) if rng.random() < 0.5 else crop)
            labels.append(label)
    names = tuple(name for _, name in PHOTOS)
    return ImageDataset("photos", torch.stack(images), labels_tensor(labels), names)
