"""Procedural coloured shapes: any number of classes and images, drawn from a seed."""

from __future__ import annotations

import numpy as np
import torch

from fedsim.datasets.base import ImageDataset, labels_tensor

SHAPES = ("circle", "square", "triangle", "cross", "ring", "stripes", "diamond", "star")
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.9, 0.1), "purple": (0.6, 0.15, 0.8), "orange": (1.0, 0.55, 0.0),
           "white": (0.97, 0.97, 0.97), "black": (0.05, 0.05, 0.05)}
MAX_CLASSES = len(SHAPES) * len(COLOURS)
NOISE_FIELDS = 16  # pixel noise is drawn once per field and shared, to keep large sizes fast
MAX_TILT = np.pi / 9  # shapes turn at most 20 degrees, so a square never becomes a diamond


def class_spec(classes: int) -> list[tuple[str, str | None]]:
    """(shape, colour) per class. Up to len(SHAPES) classes the colour is random per image;
    beyond that every class is a distinct shape-and-colour pair ("red circle", ...)."""
    if classes <= len(SHAPES):
        return [(shape, None) for shape in SHAPES[:classes]]
    colours = list(COLOURS)
    return [(SHAPES[k % len(SHAPES)], colours[(k % len(SHAPES) + k // len(SHAPES)) % len(colours)])
            for k in range(classes)]


STAR_INNER = 0.42  # inner radius of the five-pointed star, outer radius 1
_TIP, _NOTCH = np.array([1.0, 0.0]), STAR_INNER * np.array([np.cos(np.pi / 5), np.sin(np.pi / 5)])


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Fold every point into the sector between the upward tip and the next notch, then test
    it against the straight edge from tip to notch."""
    angle = np.mod(np.arctan2(v, u) + np.pi / 2, 2 * np.pi / 5)
    angle = np.minimum(angle, 2 * np.pi / 5 - angle)
    r = np.hypot(u, v)
    x, y = r * np.cos(angle), r * np.sin(angle)
    edge = _NOTCH - _TIP  # inside = same side of the edge as the centre
    return edge[0] * (y - _TIP[1]) - edge[1] * (x - _TIP[0]) >= 0


def _mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels inside `shape` given coordinates (u right, v down) scaled to its radius."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r <= 1
    if shape == "ring":
        return (r <= 1) & (r >= 0.6)
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8
    if shape == "diamond":
        return abs(u) + abs(v) <= 1
    if shape == "cross":
        return ((abs(u) <= 0.28) & (abs(v) <= 1)) | ((abs(v) <= 0.28) & (abs(u) <= 1))
    if shape == "stripes":
        return (np.maximum(abs(u), abs(v)) <= 0.9) & (np.floor((u + 0.9) * 2.8) % 2 == 0)
    if shape == "triangle":  # apex up, circumradius 1
        return (v <= 0.5) & (v >= -1 + np.sqrt(3) * abs(u))
    return _star(u, v)


def _colour_far_from(rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    """A random background colour at least a fixed distance from the shape's colour."""
    while True:
        background = rng.uniform(0, 1, 3)
        if np.linalg.norm(background - colour) > 0.6:
            return background


def load_synthetic(image_size: int, seed: int, synthetic_classes: int, synthetic_size: int) -> ImageDataset:
    """`synthetic_size` images of each of `synthetic_classes` shape classes.

    Label k is class_spec(classes)[k]: with up to 8 classes the shapes circle, square,
    triangle, cross, ring, stripes, diamond, star in that order, each in a random colour;
    with more, shape-and-colour pairs named e.g. "red circle", "green square" (at most 64).
    Position, size, a tilt of up to 20 degrees, colours and light pixel noise come from `seed`."""
    rng = np.random.default_rng([seed, 0x5A9E])
    spec = class_spec(synthetic_classes)
    grid = ((np.arange(image_size) + 0.5) / image_size).astype(np.float32)  # pixel centres
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    labels = np.repeat(np.arange(synthetic_classes), synthetic_size)
    images = np.empty((len(labels), 3, image_size, image_size), np.float32)
    noise = 0.03 * rng.standard_normal((NOISE_FIELDS, 3, image_size, image_size), dtype=np.float32)
    for i, label in enumerate(labels):
        shape, colour_name = spec[label]
        colour = np.array(COLOURS[colour_name]) if colour_name else rng.uniform(0, 1, 3)
        if colour_name:
            colour = np.clip(colour + rng.normal(0, 0.04, 3), 0, 1)
        background = _colour_far_from(rng, colour)
        radius = rng.uniform(0.18, 0.4)
        cx, cy = rng.uniform(radius, 1 - radius, 2)
        tilt = rng.uniform(-MAX_TILT, MAX_TILT)
        dx, dy = (xs - cx) / radius, (ys - cy) / radius
        u, v = np.cos(tilt) * dx + np.sin(tilt) * dy, -np.sin(tilt) * dx + np.cos(tilt) * dy
        inside = _mask(shape, u, v).astype(np.float32)
        image = images[i]
        image[:] = noise[rng.integers(NOISE_FIELDS)]
        image += background[:, None, None].astype(np.float32)
        image += (colour - background)[:, None, None].astype(np.float32) * inside
        np.clip(image, 0, 1, out=image)
    names = tuple(shape if colour is None else f"{colour} {shape}" for shape, colour in spec)
    return ImageDataset("synthetic", torch.from_numpy(images), labels_tensor(labels), names)
