"""CODER's scores on the knowledge embeddings: the representation (an image's cosine to every knowledge
text), the zero-shot class scores, CODER*'s re-ranking of uncertain images with the one-to-one texts,
and the choice of its threshold on validation. Numpy in, numpy out; jitted and vectorized inside.

    from jaxgist.heads import coder

    cos = coder.represent(x, emb.text_emb)                           # [n, N]
    logits = coder.zero_shot_logits(x, emb.text_emb, emb.segments)   # [n, C], = class_scores(cos, segments)
    choice = coder.choose_threshold(val_x, val_logits, val_y, emb.pairs)   # ThresholdChoice
    out = coder.rerank(x, logits, emb.pairs, threshold=choice.threshold)   # Reranked: .predictions, .logits
    f = coder.coder_features(x, emb.text_emb)                        # [n, N] unit rows: CODER's features

The formulas and where they follow the paper and its reference code: docs/methods/coder.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgist.core.arrays import HIGHEST, l2_normalize, map_batches, matmul
from jaxgist.heads.coder.encode import SYNONYM, PairTable, TextSegments, _matrix

__all__ = ["DEFAULT_THRESHOLDS", "represent", "class_scores", "zero_shot_logits", "coder_features", "Reranked",
           "rerank", "ThresholdChoice", "choose_threshold"]

# Candidate re-ranking thresholds (on the top-1 minus top-2 softmax probability) for
# ``choose_threshold``; 0 never re-ranks (plain zero-shot), values above 1 re-rank every image.
DEFAULT_THRESHOLDS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.01)

_CHUNK = 2048  # images per jitted call when there are more (the last chunk is padded: one compile)


def _images_and_texts(image_x, text_emb) -> tuple[np.ndarray, np.ndarray]:
    x, t = _matrix(image_x, "image_x"), _matrix(text_emb, "text_emb")
    if x.shape[1] != t.shape[1]:
        raise ValueError(f"image_x has dimension {x.shape[1]} but text_emb has {t.shape[1]}")
    return x, t


def _check_segments(segments: TextSegments, num_texts: int) -> TextSegments:
    if not isinstance(segments, TextSegments):
        raise TypeError(f"segments must be a TextSegments, got {type(segments).__name__}")
    if len(segments) != num_texts:
        raise ValueError(f"segments describe {len(segments)} texts but text_emb has {num_texts} rows")
    return segments


def _chunked(fn, rows: Sequence[np.ndarray], shared: Sequence[Any] = ()):
    """``fn(*rows, *shared)`` over chunks of ``_CHUNK`` rows (``map_batches``: the last chunk padded, so
    one shape compiles), outputs concatenated along rows."""
    return map_batches(lambda *batch: fn(*batch, *shared), list(rows), _CHUNK)


@jax.jit
def _represent(x, t):
    return matmul(l2_normalize(x), l2_normalize(t).T)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _class_scores(cos, class_ids, is_name, *, num_classes):
    """[B, N] cosines -> [B, C] CODER zero-shot scores (``class_scores``)."""
    per_text = cos.T  # [N, B]: segment ops reduce the leading axis
    other = jnp.where(is_name[:, None], 0.0, per_text)
    total = jax.ops.segment_sum(other, class_ids, num_segments=num_classes, indices_are_sorted=True)
    count = jax.ops.segment_sum((~is_name).astype(jnp.float32), class_ids, num_segments=num_classes,
                                indices_are_sorted=True)
    name_max = jax.ops.segment_max(jnp.where(is_name[:, None], per_text, -jnp.inf), class_ids,
                                   num_segments=num_classes, indices_are_sorted=True)
    return (100.0 * (total + name_max) / (count[:, None] + 1.0)).T


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _zero_shot(x, t, class_ids, is_name, *, num_classes):
    return _class_scores(_represent(x, t), class_ids, is_name, num_classes=num_classes)


@jax.jit
def _features(x, t):
    return l2_normalize(_represent(x, t))


def represent(image_x, text_emb) -> np.ndarray:
    """[n, N] float32: the cosine of each image (rows of ``image_x`` [n, D]) to each knowledge text
    (rows of ``text_emb`` [N, D]); both are L2-normalized here."""
    x, t = _images_and_texts(image_x, text_emb)
    return _chunked(_represent, [x], [jnp.asarray(t)])


def class_scores(representation, segments: TextSegments) -> np.ndarray:
    """[n, C] CODER zero-shot scores from a representation [n, N] (``represent``'s cosines):
    ``100 * (sum of the attribute/analogous cosines + max of the name/synonym cosines) / (count + 1)``
    per class."""
    cos = np.asarray(representation, np.float32)
    if cos.ndim != 2:
        raise ValueError(f"representation must be [n, num_texts], got shape {cos.shape}")
    seg = _check_segments(segments, cos.shape[1])
    fn = functools.partial(_class_scores, num_classes=seg.num_classes)
    return _chunked(fn, [cos], [jnp.asarray(seg.class_ids), jnp.asarray(seg.kinds <= SYNONYM)])


def zero_shot_logits(image_x, text_emb, segments: TextSegments) -> np.ndarray:
    """[n, C] CODER zero-shot logits of images ``image_x`` [n, D]: for class c,
    ``100 * mean({cos to c's attribute and analogous texts} + {max cos over c's name and synonym
    texts})``, the max counting as one element of the mean (docs/methods/coder.md)."""
    x, t = _images_and_texts(image_x, text_emb)
    seg = _check_segments(segments, t.shape[0])
    fn = functools.partial(_zero_shot, num_classes=seg.num_classes)
    return _chunked(fn, [x], [jnp.asarray(t), jnp.asarray(seg.class_ids), jnp.asarray(seg.kinds <= SYNONYM)])


def coder_features(image_x, text_emb, segments: TextSegments | None = None) -> np.ndarray:
    """[n, N] CODER features for Tip-Adapter: the images L2-normalized, represented by their cosines
    to the N knowledge texts, and those rows L2-normalized again (CODER's cache keys and queries).
    ``segments``, when given, only checks that it describes the N texts."""
    x, t = _images_and_texts(image_x, text_emb)
    if segments is not None:
        _check_segments(segments, t.shape[0])
    return _chunked(_features, [x], [jnp.asarray(t)])


# ---------------------------------------------------------------------------------------------------
# Re-ranking with the one-to-one texts (CODER*).
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reranked:
    """The result of ``rerank``.

    ``predictions`` [n]: the re-ranked top-1 class. ``logits`` [n, C]: the input logits with, on
    re-scored images, the top-k values reassigned to the top-k classes in their new order (so top-k
    metrics see the new ranking; a class outside the top k keeps its logit; where the original top-k
    values tie, ``predictions`` is authoritative). ``reranked`` [n] bool: the image was under the
    threshold and re-scored; ``changed`` [n] bool: its top-1 changed. ``gap`` [n]: top-1 minus top-2
    softmax probability. ``candidates`` [n, k]: the original top-k classes, best first, and ``scores``
    [n, k] their one-to-one scores (computed for every image, used only under the threshold).
    """

    predictions: np.ndarray
    logits: np.ndarray
    reranked: np.ndarray
    changed: np.ndarray
    gap: np.ndarray
    candidates: np.ndarray
    scores: np.ndarray
    threshold: float
    top_k: int

    def summary(self) -> dict[str, Any]:
        return {"threshold": float(self.threshold), "top_k": int(self.top_k),
                "reranked_fraction": float(np.mean(self.reranked)), "changed_fraction": float(np.mean(self.changed))}


@functools.partial(jax.jit, static_argnames=("top_k",))
def _rerank(x, logits, threshold, centroids, lookup, *, top_k):
    x = l2_normalize(x)
    top_vals, top_idx = jax.lax.top_k(logits, top_k)  # ties: the lower class index first (= argmax)
    probs = jax.nn.softmax(logits, axis=-1)
    top_p = jnp.take_along_axis(probs, top_idx[:, :2], axis=1)
    gap = top_p[:, 0] - top_p[:, 1]
    rows = lookup[top_idx[:, :, None], top_idx[:, None, :]]  # [B, k, k]: pair (c_i, c_j), -1: no texts
    mean_cos = jnp.einsum("bd,bijd->bij", x, centroids[jnp.maximum(rows, 0)], precision=HIGHEST)
    rows_t, mean_cos_t = jnp.swapaxes(rows, 1, 2), jnp.swapaxes(mean_cos, 1, 2)
    terms = jnp.where((rows >= 0) & (rows_t >= 0), mean_cos - mean_cos_t, 0.0)  # diagonal: rows == -1
    scores = jnp.sum(terms, axis=2) / (top_k - 1)
    order = jnp.argsort(-scores, axis=1, stable=True)  # ties keep the original rank order
    new_idx = jnp.take_along_axis(top_idx, order, axis=1)
    selected = gap < threshold
    b = jnp.arange(logits.shape[0])[:, None]
    new_logits = jnp.where(selected[:, None], logits.at[b, new_idx].set(top_vals), logits)
    predictions = jnp.where(selected, new_idx[:, 0], top_idx[:, 0])
    return predictions, new_logits, selected, predictions != top_idx[:, 0], gap, top_idx, scores


def _check_rerank_inputs(image_x, logits, table: PairTable, top_k: int):
    x = _matrix(image_x, "image_x")
    logits = np.asarray(logits, np.float32)
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"logits must be [{x.shape[0]}, num_classes] (one row per image), got {logits.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinite values")
    if not isinstance(table, PairTable):
        raise TypeError(f"table must be a PairTable (see pair_table), got {type(table).__name__}")
    c = logits.shape[1]
    if table.num_classes != c:
        raise ValueError(f"the pair table has {table.num_classes} classes but logits have {c}")
    if table.centroids.shape[1] != x.shape[1]:
        raise ValueError(f"image_x has dimension {x.shape[1]} but the pair texts have {table.centroids.shape[1]}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 2:
        raise ValueError(f"top_k must be an integer >= 2, got {top_k!r}")
    if c < 2:
        raise ValueError("re-ranking needs at least 2 classes")
    return x, logits, min(int(top_k), c)


def rerank(image_x, logits, table: PairTable, threshold: float = 0.2, top_k: int = 5) -> Reranked:
    """CODER*'s re-ranking of uncertain images with the one-to-one texts (docs/methods/coder.md).

    ``image_x`` [n, D] image embeddings; ``logits`` [n, C] (e.g. ``zero_shot_logits``); ``table`` the
    ``PairTable`` of the pair texts. Images whose top-1 minus top-2 probability under
    ``softmax(logits)`` is below ``threshold`` have their ``top_k`` classes (at most C) re-ordered by
    their one-to-one scores; the others keep their logits. Labels are never used (choose the threshold
    on validation with ``choose_threshold``; the default 0.2 is the reference's value for CUB). One
    jitted, vectorized computation per chunk of images.
    """
    x, logits, k = _check_rerank_inputs(image_x, logits, table, top_k)
    if not np.isfinite(threshold):
        threshold = np.inf if threshold > 0 else -np.inf
    fn = functools.partial(_rerank, top_k=k)
    out = _chunked(fn, [x, logits], [jnp.float32(threshold), jnp.asarray(table.centroids), jnp.asarray(table.lookup)])
    predictions, new_logits, selected, changed, gap, candidates, scores = out
    return Reranked(predictions=predictions.astype(np.int64), logits=new_logits, reranked=selected.astype(bool),
                    changed=changed.astype(bool), gap=gap, candidates=candidates.astype(np.int64), scores=scores,
                    threshold=float(threshold), top_k=k)


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
    """The re-ranking threshold chosen on validation: ``grid`` (ascending), ``val_curve`` (top-1 of
    each), the chosen ``threshold`` and its ``val_accuracy`` (``zero_shot_val_accuracy``: threshold 0)."""

    threshold: float
    val_accuracy: float
    zero_shot_val_accuracy: float
    grid: np.ndarray
    val_curve: np.ndarray
    top_k: int

    def summary(self) -> dict[str, Any]:
        return {"threshold": float(self.threshold), "val_top1": float(self.val_accuracy),
                "val_top1_without_rerank": float(self.zero_shot_val_accuracy), "top_k": int(self.top_k)}


def choose_threshold(val_x, val_logits, val_y, table: PairTable, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                     top_k: int = 5) -> ThresholdChoice:
    """The re-ranking threshold of best validation top-1 among ``thresholds`` (ties: the smaller one,
    which re-ranks fewer images). One re-ranking of every validation image serves the whole grid."""
    x, logits, k = _check_rerank_inputs(val_x, val_logits, table, top_k)
    y = np.asarray(val_y)
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"val_y must be [{x.shape[0]}] integer class indices, got shape {y.shape}, dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= logits.shape[1]):
        raise ValueError(f"val_y must lie in [0, {logits.shape[1]})")
    grid = np.sort(np.asarray(thresholds, np.float64).reshape(-1))
    if grid.size == 0 or not np.isfinite(grid).all():
        raise ValueError(f"thresholds must be a non-empty list of finite numbers, got {list(thresholds)}")
    everything = rerank(x, logits, table, threshold=np.inf, top_k=k)
    plain = everything.candidates[:, 0]
    counts = np.asarray([np.count_nonzero(np.where(everything.gap < t, everything.predictions, plain) == y)
                         for t in grid])
    best = int(np.argmax(counts))  # first maximum: the smallest threshold
    curve = counts / len(y)
    return ThresholdChoice(threshold=float(grid[best]), val_accuracy=float(curve[best]),
                           zero_shot_val_accuracy=float(np.mean(plain == y)), grid=grid, val_curve=curve, top_k=k)
