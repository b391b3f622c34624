"""A held-out ``minival`` carved from the training images, for every selection a run makes (the epoch,
hyperparameters) when the dataset's own validation split is its test (ImageNet's ``val``).

    train, minival = minival.split(source, fraction=0.01)

Within each class the images are ordered by a hash of their name and the first
``ceil(fraction * n)`` (at least one, when the class has two or more) are held out, so the split
depends on the names only: the same images whatever the listing order, the number of processes or
a re-listed folder.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np


class Subset:
    """The records of ``source`` at ``indices`` (in that order), renumbered from 0 (``index``); the
    source's ``class_names`` are kept."""

    def __init__(self, source, indices, name: str = ""):
        self.source, self.indices = source, [int(i) for i in indices]
        self.class_names = source.class_names
        self.name = name

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = dict(self.source[self.indices[int(index)]])
        record["index"] = int(index)
        return record

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.source.labels)[self.indices]

    @property
    def filenames(self) -> list[str]:
        names = self.source.filenames
        return [names[i] for i in self.indices]


def _rank(name: str) -> bytes:
    return hashlib.sha1(name.encode("utf-8")).digest()


def held_out(filenames, labels, fraction: float) -> np.ndarray:
    """Bool [N]: which images ``split`` holds out (module docstring)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"minival fraction {fraction} must be in [0, 1)")
    labels = np.asarray(labels)
    out = np.zeros(len(labels), bool)
    if fraction == 0.0:
        return out
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue
        k = min(max(1, math.ceil(fraction * len(members))), len(members) - 1)
        order = sorted(members, key=lambda i: _rank(filenames[i]))
        out[order[:k]] = True
    return out


def split(source, fraction: float) -> tuple[Subset, Subset]:
    """(train, minival) subsets of ``source``."""
    mask = held_out(source.filenames, source.labels, fraction)
    return (Subset(source, np.flatnonzero(~mask), "train"), Subset(source, np.flatnonzero(mask), "minival"))
