"""The interface every fitted head shares (linear probes, Tip-Adapter, k-NN, nearest centroid, FLIP's
hybrid head, CODER's Tip-Adapter).

    head = probes.sgd_probe(train_x, train_y, val_x, val_y, num_classes)   # any fitting function
    logits = head.predict_logits(test_x)      # [n, C] float32 numpy (the hybrid head: (x, caption_x))
    labels = head.predict(test_x)             # [n] argmax of the logits, ties to the lower class
    row = head.summary()                      # {"method", "val_top1", chosen hyperparameters...}: JSON-ready
    head.method, head.val_accuracy, head.hparams

Hyperparameters are chosen on the validation split by the fitting function; a head only scores.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["FittedHead"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FittedHead:
    """What every fitted head shares (subclasses are frozen dataclasses that add their arrays and
    define ``predict_logits``).

    ``method``: the head's name; ``hparams``: the chosen hyperparameters and fixed settings;
    ``val_accuracy``: validation top-1 of the chosen ones; ``grid`` / ``val_curve``: the candidates
    tried (epochs, L2 strengths, k values, transforms) and the validation accuracy of each, where the
    head searched a 1-d grid; ``extras``: anything else worth keeping (curves, final weights).
    Keyword-only, so subclass fields come in any order.
    """

    method: str
    hparams: dict[str, Any]
    val_accuracy: float
    grid: np.ndarray | None = None
    val_curve: np.ndarray | None = None
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    def predict_logits(self, *inputs) -> np.ndarray:  # pragma: no cover - overridden
        """[n, C] float32 logits of the inputs (image embeddings; FLIP's hybrid head also their captions')."""
        raise NotImplementedError

    def predict(self, *inputs) -> np.ndarray:
        """[n] predicted class indices (argmax of the logits; ties to the lower class index)."""
        return np.argmax(self.predict_logits(*inputs), axis=1)

    def summary(self) -> dict[str, Any]:
        """A flat, JSON-ready dict: method, chosen hyperparameters, validation top-1."""
        out: dict[str, Any] = {"method": self.method, "val_top1": float(self.val_accuracy)}
        for key, value in self.hparams.items():
            out[key] = value.item() if isinstance(value, np.generic) else value
        return out
