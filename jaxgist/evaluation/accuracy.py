"""Classification accuracy for results files: top-k accuracy and bootstrap estimates of it (numpy in,
numpy or Python floats out).

    acc = accuracy.topk_accuracy(logits, labels, k=1)               # ok = topk_correct(...): [n] bool
    boot = accuracy.bootstrap_topk(logits, labels, ks=(1, 3))       # {"top1": {"mean", "std"}, "top3": ...}
    row = accuracy.accuracy_summary(logits, labels, prefix="test")  # test_top1, test_top1_bootstrap_mean, ...

Bootstrap as GIST's ``linear_probe.py``: ``n`` examples drawn with replacement per resample, mean and
``np.std`` (ddof=0) over resamples. Index streams: ``rng="numpy"`` (default, one
``default_rng(seed).integers`` call) or ``rng="gist"`` (``RandomState(seed + j)`` per resample:
GIST's numbers exactly with ``seed=0``). Ties: a class beats the label when its logit is larger, or
equal with a smaller index (``argmax``'s rule), so constant logits never count as correct.
Details: docs/methods/gist.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["topk_correct", "topk_accuracy", "bootstrap_topk", "accuracy_summary"]

# Upper bound on the elements of one gathered [resamples, n] block (bounds the memory of a bootstrap).
_GATHER_BLOCK = 1 << 24


def _check(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [num_examples, num_classes], got shape {logits.shape}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-d array of class indices, got shape {labels.shape}")
    n, num_classes = logits.shape
    if labels.shape[0] != n:
        raise ValueError(f"{n} rows of logits but {labels.shape[0]} labels")
    if n == 0:
        raise ValueError("no examples: accuracy of an empty set is undefined")
    if num_classes == 0:
        raise ValueError("logits have no classes (shape [n, 0])")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}); found values in [{lo}, {hi}]")
    if not np.issubdtype(logits.dtype, np.number):
        raise ValueError(f"logits must be numeric, got dtype {logits.dtype}")
    if np.issubdtype(logits.dtype, np.floating) and np.isnan(logits).any():
        raise ValueError(f"logits contain {int(np.isnan(logits).sum())} NaN value(s)")
    return logits, labels.astype(np.int64)


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _label_rank(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[n] int: how many classes outrank each example's label (0: the label is the argmax)."""
    n, num_classes = logits.shape
    true = logits[np.arange(n), labels][:, None]
    earlier = np.arange(num_classes)[None, :] < labels[:, None]
    return np.count_nonzero((logits > true) | ((logits == true) & earlier), axis=1)


def topk_correct(logits, labels, k: int = 1) -> np.ndarray:
    """[n] bool: whether each example's label is among its ``k`` highest logits (ties: see module doc)."""
    logits, labels = _check(logits, labels)
    return _label_rank(logits, labels) < _check_k(k)


def topk_accuracy(logits, labels, k: int = 1) -> float:
    """Fraction of examples whose label is among the ``k`` highest logits.

    ``logits``: [n, C]; ``labels``: [n] ints in [0, C). ``k >= C`` gives 1.0 (every label is in the
    top C). Mismatched lengths, labels out of range, NaN logits or an empty set raise ``ValueError``.
    """
    return float(np.mean(topk_correct(logits, labels, k)))


def _resample_indices(n: int, resamples: int, seed: int, rng: str) -> np.ndarray:
    if rng == "numpy":
        return np.random.default_rng(seed).integers(0, n, size=(resamples, n), dtype=np.int64)
    if rng == "gist":
        out = np.empty((resamples, n), dtype=np.int64)
        for j in range(resamples):
            out[j] = np.random.RandomState(seed + j).randint(0, n, size=n)
        return out
    raise ValueError(f"rng must be 'numpy' or 'gist', got {rng!r}")


def bootstrap_topk(logits, labels, ks: Sequence[int] = (1, 3), resamples: int = 1000, seed: int = 0,
                   rng: str = "numpy") -> dict[str, dict[str, float]]:
    """Bootstrap top-k accuracy: ``{"top1": {"mean": ..., "std": ...}, "top3": {...}}``.

    Each of ``resamples`` resamples draws ``n`` examples with replacement (all ks share the same
    draws); ``mean`` and ``std`` (ddof=0, as GIST's ``np.std``) are over the resamples. See the module
    docstring for the two index streams (``rng="numpy"`` or GIST's exact ``rng="gist"``).
    """
    logits, labels = _check(logits, labels)
    ks = [_check_k(k) for k in ks]
    if not ks:
        raise ValueError("ks is empty: ask for at least one k")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    n = len(labels)
    # One small integer per example: its label's rank, clipped past the largest k (all that matters).
    rank = np.minimum(_label_rank(logits, labels), max(ks)).astype(np.int32)
    idx = _resample_indices(n, int(resamples), int(seed), rng)
    correct = np.empty((len(ks), int(resamples)), dtype=np.int64)
    rows = max(1, _GATHER_BLOCK // n)
    for start in range(0, int(resamples), rows):  # blocks of resamples bound the gathered memory
        drawn = rank[idx[start:start + rows]]
        for i, k in enumerate(ks):
            correct[i, start:start + rows] = np.count_nonzero(drawn < k, axis=1)
    acc = correct / n
    return {f"top{k}": {"mean": float(acc[i].mean()), "std": float(acc[i].std())} for i, k in enumerate(ks)}


def accuracy_summary(logits, labels, prefix: str = "test", ks: Sequence[int] = (1, 3), resamples: int = 1000,
                     seed: int = 0, rng: str = "numpy") -> dict[str, float | int]:
    """A flat dict for ``results.json``: plain and bootstrap top-k accuracy of one split.

    Keys (``prefix="test"``, ``ks=(1, 3)``): ``test_top1``, ``test_top1_bootstrap_mean``,
    ``test_top1_bootstrap_std``, the same for ``top3``, and ``test_count`` (number of examples).
    ``resamples=0`` leaves the bootstrap keys out.
    """
    logits, labels = _check(logits, labels)
    ks = [_check_k(k) for k in ks]
    rank = _label_rank(logits, labels)
    out: dict[str, float | int] = {}
    for k in ks:
        out[f"{prefix}_top{k}"] = float(np.mean(rank < k))
    if resamples:
        boot = bootstrap_topk(logits, labels, ks=ks, resamples=resamples, seed=seed, rng=rng)
        for k in ks:
            out[f"{prefix}_top{k}_bootstrap_mean"] = boot[f"top{k}"]["mean"]
            out[f"{prefix}_top{k}_bootstrap_std"] = boot[f"top{k}"]["std"]
    out[f"{prefix}_count"] = int(len(labels))
    return out
