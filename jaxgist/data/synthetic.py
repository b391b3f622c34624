"""Procedurally drawn images for offline runs and tests: coloured shapes on textured backgrounds.

Each class is a (colour, shape) pair; images vary in position, size and background noise, and are
deterministic given the seed.
"""

from __future__ import annotations

import itertools

import numpy as np

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40),
    "purple": (150, 60, 190), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross")


def class_names(num_classes: int) -> list[str]:
    """The first ``num_classes`` "<colour> <shape>" names."""
    combos = [f"{c} {s}" for s, c in itertools.product(SHAPES, COLOURS)]
    if not 1 <= num_classes <= len(combos):
        raise ValueError(f"num_classes must be in [1, {len(combos)}], got {num_classes}")
    return combos[:num_classes]


def _mask(shape: str, size: int, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size].astype(np.float32)
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "ring":
        d = dy**2 + dx**2
        return (d <= r**2) & (d >= (0.55 * r) ** 2)
    if shape == "cross":
        return ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r)) | ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def draw(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 [size, size, 3] image of class ``name`` ("<colour> <shape>")."""
    colour, shape = name.split(" ")
    background = rng.integers(60, 200, size=3)
    img = np.clip(background + rng.normal(0, 18, size=(size, size, 3)), 0, 255)
    r = size * rng.uniform(0.2, 0.32)
    cy, cx = rng.uniform(r, size - r, size=2)
    img[_mask(shape, size, cy, cx, r)] = COLOURS[colour]
    return img.astype(np.uint8)


def make_images(num_classes: int, per_class: int, size: int, seed: int = 0):
    """Returns (uint8 images [N, size, size, 3], int32 labels [N], class names)."""
    names = class_names(num_classes)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
    images = np.stack([draw(names[c], size, rng) for c in labels])
    return images, labels, names
