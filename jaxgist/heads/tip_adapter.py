"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022) on frozen CLIP embeddings: zero-shot CLIP
plus a cache model of the few-shot training set,

    logits(x) = 100 * x @ W.T + alpha * exp(-beta * (1 - x @ K.T)) @ V

``x`` [n, D] rows L2-normalized first; class text embeddings ``W`` [C, D], cache keys ``K`` [N, D] and
one-hot values ``V`` [N, C] used as given (Tip-Adapter-F's trained keys are not renormalized).

    keys, values = tip_adapter.build_cache(train_views, train_y, num_classes)   # views [V, N, D] or [N, D]
    found = tip_adapter.search(val_x, val_y, text_weights, keys, values)        # GridSearch of every (beta, alpha)
    head = tip_adapter.tip_adapter(train_views, train_y, val_x, val_y, text_weights)   # or tip_adapter_f(...)
    logits = head.predict_logits(test_x)                                        # head.alpha, head.beta, head.summary()

Numpy in, numpy out; JAX inside, jitted. Everything is chosen on validation: (alpha, beta) by one
compiled grid search (ties to the smallest beta, then the smallest alpha), and for -F the epoch of the
keys trained with AdamW and a cosine schedule (ties to the earliest). The reference's code, where this
differs from it (the epoch on validation, not test) and measured speed: docs/methods/tip_adapter.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgist.core.arrays import l2_normalize, matmul
from jaxgist.heads.base import FittedHead
from jaxgist.heads.probes import _features, _labels, _positive_int

__all__ = ["TipAdapter", "GridSearch", "build_cache", "tip_logits", "search", "tip_adapter", "tip_adapter_f",
           "reference_grid", "DEFAULT_ALPHAS", "DEFAULT_BETAS", "LOGIT_SCALE"]

LOGIT_SCALE = 100.0  # CLIP's (clamped) logit scale, the zero-shot term's factor


def reference_grid(scale: float, steps: int) -> tuple[float, ...]:
    """The reference's search grid: ``0.1 + i * (scale - 0.1) / steps`` for ``i < steps`` (``scale``
    itself is not reached), computed in Python floats as it does."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not np.isfinite(scale) or scale <= 0.1:
        raise ValueError(f"scale must be finite and > 0.1 (the grid starts at 0.1), got {scale!r}")
    return tuple(i * (scale - 0.1) / steps + 0.1 for i in range(int(steps)))


# The reference sets (scale, steps) per dataset: betas (7..50, 200 steps), alphas (3..50, 20 steps).
# Defaults: its SUN397 / EuroSAT grid, in the middle of that range.
DEFAULT_BETAS = reference_grid(12.0, 200)
DEFAULT_ALPHAS = reference_grid(10.0, 20)

# Largest intermediate of one grid-search step, in float32 elements (64 MiB); the chunks follow from it.
_SEARCH_BUDGET = 1 << 24


# ---------------------------------------------------------------------------------------------------
# The results.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GridSearch:
    """Validation accuracy of every (beta, alpha): ``accuracies[i, j]`` is that of ``betas[i]``,
    ``alphas[j]`` (``counts``: correct examples). ``alpha``/``beta``: the chosen pair (module docstring
    for the tie rule), ``val_accuracy`` its accuracy."""

    alpha: float
    beta: float
    val_accuracy: float
    alphas: np.ndarray
    betas: np.ndarray
    accuracies: np.ndarray
    counts: np.ndarray


@dataclasses.dataclass(frozen=True)
class TipAdapter(FittedHead):
    """A Tip-Adapter (``method`` "tip_adapter") or Tip-Adapter-F ("tip_adapter_f") and how it was chosen.

    ``text_weights`` [C, D], ``keys`` [N, D] (trained ones for -F, in the order of the training
    examples) and ``values`` [N, C] define the logits (module docstring); ``hparams`` holds the chosen
    ``alpha`` and ``beta`` (and for -F the ``epoch`` and training settings), ``grid_search`` the
    validation accuracy of every (beta, alpha), ``extras`` the zero-shot validation accuracy and, for -F,
    per-epoch curves.
    """

    text_weights: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    grid_search: GridSearch

    @property
    def alpha(self) -> float:
        return float(self.hparams["alpha"])

    @property
    def beta(self) -> float:
        return float(self.hparams["beta"])

    @property
    def num_classes(self) -> int:
        return int(self.text_weights.shape[0])

    @functools.cached_property
    def _cache(self) -> "_Cache":
        return _Cache.build(self.keys, self.values)

    def predict_logits(self, x) -> np.ndarray:
        """[n, C] float32 Tip-Adapter logits of embeddings ``x`` [n, D] (rows normalized first)."""
        x = _embeddings(x, "x", self.text_weights.shape[1])
        cache = self._cache
        return np.asarray(_logits(x, self.text_weights, cache.keys, cache.values, cache.pads,
                                  jnp.float32(self.alpha), jnp.float32(self.beta)))

    def summary(self) -> dict[str, Any]:
        """A flat, JSON-ready dict: method, validation top-1 (and zero-shot's), chosen hyperparameters."""
        out = super().summary()
        for key in ("zero_shot_val_top1", "tip_adapter_val_top1"):
            if key in self.extras:
                out[key] = float(self.extras[key])
        return out


# ---------------------------------------------------------------------------------------------------
# Input checks.
# ---------------------------------------------------------------------------------------------------


def _embeddings(x, name: str, dim: int | None = None) -> np.ndarray:
    """A finite float32 [n, D] array without all-zero rows (they have no direction to normalize)."""
    x = _features(x, name)
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]} but the text weights have {dim}")
    zero = np.flatnonzero(~np.any(x != 0, axis=1))
    if zero.size:
        raise ValueError(f"{name} has {zero.size} all-zero row(s) (first: {zero[0]}): they cannot be normalized")
    return x


def _text(text_weights) -> np.ndarray:
    text = _features(text_weights, "text_weights")
    if text.shape[0] < 2:
        raise ValueError(f"text_weights must be [num_classes >= 2, dim], got shape {text.shape}")
    return text


def _views(train_x) -> np.ndarray:
    """[V, N, D] float32 from [V, N, D] or [N, D] (one view)."""
    x = np.asarray(train_x)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or 0 in x.shape:
        raise ValueError(f"train_x must be [num_views, num_examples, dim] or [num_examples, dim] with no "
                         f"empty axis, got shape {np.shape(train_x)}")
    _features(x.reshape(-1, x.shape[-1]), "train_x")  # dtype and finiteness
    return x.astype(np.float32)


def _num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def _scalar(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return float(value)


def _grid(values, name: str) -> np.ndarray:
    grid = np.asarray(values, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-d sequence of values, got shape {grid.shape}")
    if not np.isfinite(grid).all() or (grid < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got {grid.tolist()}")
    return np.sort(grid)


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def _cache_arrays(keys, values, text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys = _features(keys, "keys")
    values = _features(values, "values")
    if keys.shape[0] == 0:
        raise ValueError("keys is empty: the cache needs at least one entry")
    if keys.shape[1] != text.shape[1]:
        raise ValueError(f"keys have dimension {keys.shape[1]} but the text weights have {text.shape[1]}")
    if values.shape != (keys.shape[0], text.shape[0]):
        raise ValueError(f"values must be [num_keys, num_classes] = {(keys.shape[0], text.shape[0])}, "
                         f"got shape {values.shape}")
    return keys, values


# ---------------------------------------------------------------------------------------------------
# The cache, as laid out on the device.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Cache:
    """Either dense (``values`` [M, C]) or grouped by class (``values`` None): key row c * K + k is class
    c's k-th entry, or a zero padding key. ``pads`` [C]: padding keys per class (None when there are
    none); ``rows`` [M]: for grouped caches, each key row's index among the given keys (-1: padding)."""

    keys: np.ndarray
    values: np.ndarray | None
    pads: np.ndarray | None
    rows: np.ndarray | None

    @property
    def real(self) -> np.ndarray | None:
        """[M, 1] float32: 1 for the given keys, 0 for padding ones (None without padding)."""
        return None if self.pads is None else (self.rows >= 0).astype(np.float32)[:, None]

    @staticmethod
    def build(keys: np.ndarray, values: np.ndarray) -> "_Cache":
        n, num_classes = values.shape
        one_hot = ((values == 0) | (values == 1)).all() and (values.sum(axis=1) == 1).all()
        if one_hot:
            labels = np.argmax(values, axis=1)
            counts = np.bincount(labels, minlength=num_classes)
            per_class = int(counts.max())
            if num_classes * per_class <= 2 * n:  # grouping pays unless the classes are very unequal
                order = np.argsort(labels, kind="stable")
                starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
                position = np.arange(n) - starts[labels[order]]
                rows = np.full((num_classes, per_class), -1, np.int64)
                rows[labels[order], position] = order
                rows = rows.reshape(-1)
                grouped = np.where((rows >= 0)[:, None], keys[np.maximum(rows, 0)], 0).astype(np.float32)
                pads = (per_class - counts).astype(np.float32)
                return _Cache(grouped, None, pads if pads.any() else None, rows)
        return _Cache(keys, values, None, None)

    def ungroup(self, keys: np.ndarray, n: int) -> np.ndarray:
        """Keys in this layout's row order back to the order of the given keys ([n, D])."""
        if self.rows is None:
            return keys
        out = np.empty((n, keys.shape[1]), keys.dtype)
        real = self.rows >= 0
        out[self.rows[real]] = keys[real]
        return out


def _clip_logits(x, text):
    return LOGIT_SCALE * matmul(x, text.T)


def _cache_logits(affinity, beta, values, pads, num_classes: int):
    """``exp(-beta * (1 - affinity)) @ V``: a matmul, or for a grouped cache per-class sums less the
    padding keys' terms (zero keys: exp(-beta) each; subtracted rather than masked, which XLA's CPU
    backend runs several times faster)."""
    weights = jnp.exp(-beta * (1.0 - affinity))
    if values is not None:
        return matmul(weights, values)
    per_class = weights.shape[-1] // num_classes
    sums = jnp.sum(weights.reshape(weights.shape[:-1] + (num_classes, per_class)), axis=-1)
    return sums if pads is None else sums - pads * jnp.exp(-beta)


def _combine(clip, cache, alpha):
    return clip + alpha * cache


def _count_correct(logits, labels, valid=None):
    """How many rows' ``argmax`` (the first maximum) is their label: no other class scores above the
    label, nor equal to it with a smaller index. Written as a comparison and an ``any`` (one fused
    pass), which XLA's CPU backend runs about 10x faster than ``argmax``. The label's own column is
    left out of the comparison: XLA may compute the gathered label logit and the row it came from in
    different fusions, one ulp apart. ``valid``: the rows to count."""
    classes = jnp.arange(logits.shape[-1])
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)
    others = classes != labels[..., None]
    earlier = classes < labels[..., None]
    beaten = others & ((logits > label_logit) | ((logits == label_logit) & earlier))
    correct = ~jnp.any(beaten, axis=-1)
    return jnp.sum(correct if valid is None else correct & valid)


@jax.jit
def _logits(x, text, keys, values, pads, alpha, beta):
    x = l2_normalize(x)
    return _combine(_clip_logits(x, text), _cache_logits(matmul(x, keys.T), beta, values, pads, text.shape[0]), alpha)


# ---------------------------------------------------------------------------------------------------
# The cache model and the grid search.
# ---------------------------------------------------------------------------------------------------


def build_cache(train_x_views, train_y, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The cache model: (keys [N, D] float32, values [N, C] float32).

    ``train_x_views``: [V, N, D] embeddings of V augmented passes over the N training images (the
    reference uses 10 random-resized-crop-and-flip passes), or [N, D]; ``train_y``: [N] labels. Keys are
    the mean over views, rows L2-normalized; values are the one-hot labels. (The reference averages
    unnormalized features; jaxgist's embeddings come normalized, ``encode_source(normalize=False)``
    gives the others.)
    """
    num_classes = _num_classes(num_classes)
    views = _views(train_x_views)
    labels = _labels(train_y, views.shape[1], num_classes, "train_y")
    keys = views.mean(axis=0, dtype=np.float64)
    norms = np.linalg.norm(keys, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{int((norms == 0).sum())} training example(s) average to a zero embedding")
    values = np.eye(num_classes, dtype=np.float32)[labels]
    return l2_normalize(keys).astype(np.float32), values


def tip_logits(x, text_weights, keys, values, alpha: float, beta: float) -> np.ndarray:
    """[n, C] float32: ``100 * x @ text_weights.T + alpha * exp(-beta * (1 - x @ keys.T)) @ values``.

    ``x`` [n, D] rows are L2-normalized first; ``text_weights`` [C, D], ``keys`` [N, D] and ``values``
    [N, C] are used as given (module docstring).
    """
    text = _text(text_weights)
    x = _embeddings(x, "x", text.shape[1])
    keys, values = _cache_arrays(keys, values, text)
    alpha, beta = _scalar(alpha, "alpha"), _scalar(beta, "beta")
    cache = _Cache.build(keys, values)
    return np.asarray(_logits(x, text, cache.keys, cache.values, cache.pads, jnp.float32(alpha), jnp.float32(beta)))


def _vectorize_alphas() -> bool:
    """Whether the search vmaps over alphas (accelerators) or maps over them one at a time (CPUs, where
    the [n, C] logits of one alpha stay in cache: about twice as fast as the vmap)."""
    return jax.default_backend() != "cpu"


@functools.partial(jax.jit, static_argnames=("vmap_alphas",))
def _grid_counts(x, y, valid, text, keys, values, pads, alphas, betas, *, vmap_alphas):
    """[B, A] int32: correct validation examples for every (beta, alpha). ``x`` [R, rows, D], ``y`` and
    ``valid`` [R, rows]: the validation set in R chunks of rows (padding rows not ``valid``)."""
    num_classes = text.shape[0]

    def for_rows(chunk):
        xc, yc, vc = chunk
        xc = l2_normalize(xc)
        clip = _clip_logits(xc, text)  # once per row chunk
        affinity = matmul(xc, keys.T)  # once per row chunk

        def for_beta(beta):
            cache = _cache_logits(affinity, beta, values, pads, num_classes)  # once per beta

            def count(alpha):
                return _count_correct(_combine(clip, cache, alpha), yc, vc)

            return jax.vmap(count)(alphas) if vmap_alphas else jax.lax.map(count, alphas)

        return jax.lax.map(for_beta, betas)

    return jnp.sum(jax.lax.map(for_rows, (x, y, valid)), axis=0)


def _search(x, y, text, cache: _Cache, alphas: np.ndarray, betas: np.ndarray) -> GridSearch:
    n, num_classes, width = x.shape[0], text.shape[0], cache.keys.shape[0]
    vmap_alphas = _vectorize_alphas()
    # Rows per chunk: the [rows, M] affinities (and with a vmap the [A, rows, C] logits) within budget.
    rows = max(1, min(n, _SEARCH_BUDGET // max(width, num_classes * (len(alphas) if vmap_alphas else 1))))
    chunks = -(-n // rows)
    rows = -(-n // chunks)
    pad = chunks * rows - n
    xs = np.concatenate([x, np.repeat(x[:1], pad, axis=0)]).reshape(chunks, rows, -1)
    ys = np.concatenate([y, np.zeros(pad, y.dtype)]).reshape(chunks, rows)
    valid = (np.arange(chunks * rows) < n).reshape(chunks, rows)
    counts = np.asarray(jax.device_get(_grid_counts(
        xs, ys, valid, text, cache.keys, cache.values, cache.pads, jnp.asarray(alphas, jnp.float32),
        jnp.asarray(betas, jnp.float32), vmap_alphas=vmap_alphas)))
    best_beta, best_alpha = np.unravel_index(int(np.argmax(counts)), counts.shape)  # the first maximum
    accuracies = counts / n
    return GridSearch(alpha=float(alphas[best_alpha]), beta=float(betas[best_beta]),
                      val_accuracy=float(accuracies[best_beta, best_alpha]), alphas=alphas, betas=betas,
                      accuracies=accuracies, counts=counts)


def search(val_x, val_y, text_weights, keys, values, alphas: Sequence[float] | None = None,
           betas: Sequence[float] | None = None) -> GridSearch:
    """The (alpha, beta) of highest validation accuracy over the grid ``betas`` x ``alphas``.

    All grid points are evaluated in one jitted program (module docstring); the grids are sorted
    ascending and ties go to the smallest beta, then the smallest alpha. Defaults: ``DEFAULT_ALPHAS``,
    ``DEFAULT_BETAS``. Values must be finite and >= 0 (alpha 0 is zero-shot CLIP).
    """
    text = _text(text_weights)
    x = _embeddings(val_x, "val_x", text.shape[1])
    y = _labels(val_y, x.shape[0], text.shape[0], "val_y")
    keys, values = _cache_arrays(keys, values, text)
    alphas = _grid(DEFAULT_ALPHAS if alphas is None else alphas, "alphas")
    betas = _grid(DEFAULT_BETAS if betas is None else betas, "betas")
    return _search(x, y, text, _Cache.build(keys, values), alphas, betas)


def _zero_shot_accuracy(x: np.ndarray, y: np.ndarray, text: np.ndarray) -> float:
    return float(np.mean(np.argmax(l2_normalize(x) @ text.T, axis=1) == y))


def _prepare(train_x, train_y, val_x, val_y, text_weights):
    text = _text(text_weights)
    num_classes, dim = text.shape
    views = _views(train_x)
    if views.shape[2] != dim:
        raise ValueError(f"train_x has dimension {views.shape[2]} but the text weights have {dim}")
    train_y = _labels(train_y, views.shape[1], num_classes, "train_y")
    val_x = _embeddings(val_x, "val_x", dim)
    val_y = _labels(val_y, val_x.shape[0], num_classes, "val_y")
    keys, values = build_cache(views, train_y, num_classes)
    return text, views, train_y, val_x, val_y, keys, values


def tip_adapter(train_x, train_y, val_x, val_y, text_weights, *, alphas: Sequence[float] | None = None,
                betas: Sequence[float] | None = None) -> TipAdapter:
    """Training-free Tip-Adapter: the cache of ``build_cache(train_x, train_y)``, (alpha, beta) searched
    on the validation split.

    ``train_x``: [V, N, D] augmented views (or [N, D]) of the few-shot training images, ``train_y`` [N];
    ``val_x`` [n, D], ``val_y`` [n]; ``text_weights`` [C, D] (the number of classes is C).
    ``extras["zero_shot_val_top1"]``: zero-shot CLIP's validation accuracy, for comparison.
    """
    text, _, _, val_x, val_y, keys, values = _prepare(train_x, train_y, val_x, val_y, text_weights)
    alphas = _grid(DEFAULT_ALPHAS if alphas is None else alphas, "alphas")
    betas = _grid(DEFAULT_BETAS if betas is None else betas, "betas")
    found = _search(val_x, val_y, text, _Cache.build(keys, values), alphas, betas)
    return TipAdapter(
        method="tip_adapter", text_weights=text, keys=keys, values=values,
        hparams={"alpha": found.alpha, "beta": found.beta, "cache_size": int(keys.shape[0])},
        val_accuracy=found.val_accuracy, grid_search=found,
        extras={"zero_shot_val_top1": _zero_shot_accuracy(val_x, val_y, text)})


# ---------------------------------------------------------------------------------------------------
# Tip-Adapter-F: the keys fine-tuned.
# ---------------------------------------------------------------------------------------------------


def _epoch_order(shuffle_key, epoch, n: int):
    """The order of the training examples in ``epoch`` (0-based); independent of the epoch count."""
    return jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), n)


@functools.partial(jax.jit, static_argnames=("epochs", "batch_size"))
def _train_keys(views, y, xv, yv, text, keys, values, pads, real, alpha, beta, lr, weight_decay, eps, shuffle_key,
                *, epochs, batch_size):
    """Trains the keys; returns (best keys, best epoch (1-based), val counts [E], mean train loss [E]).
    ``real`` ([M, 1], grouped caches with padding): padding keys are held at zero."""
    num_views, n, _ = views.shape
    num_classes = text.shape[0]
    views, xv = l2_normalize(views), l2_normalize(xv)
    num_batches = -(-n // batch_size)
    padded = num_batches * batch_size
    valid = (jnp.arange(padded) < n).reshape(num_batches, batch_size).astype(jnp.float32)
    # CosineAnnealingLR(T_max = all steps), stepped after every batch: step k uses lr (1 + cos(pi k / T)) / 2.
    schedule = optax.cosine_decay_schedule(lr, epochs * num_batches)
    opt = optax.adamw(schedule, b1=0.9, b2=0.999, eps=eps, weight_decay=weight_decay)
    val_clip = _clip_logits(xv, text)

    def tip(x, clip, k):
        k = k if real is None else k * real  # padding keys stay zero: no gradient reaches them
        return _combine(clip, _cache_logits(matmul(x, k.T), beta, values, pads, num_classes), alpha)

    def batch_loss(k, xb, yb, weight):
        nll = -jnp.take_along_axis(jax.nn.log_softmax(tip(xb, _clip_logits(xb, text), k)), yb[:, None], axis=1)
        return jnp.sum(nll[:, 0] * weight) / jnp.sum(weight)  # cross_entropy's mean over the real rows

    grad_fn = jax.value_and_grad(batch_loss)

    def epoch(carry, e):
        k, opt_state, best, best_count, best_epoch = carry
        x = views[e % num_views]
        order = jnp.pad(_epoch_order(shuffle_key, e, n), (0, padded - n)).reshape(num_batches, batch_size)

        def step(state, batch):
            k, opt_state = state
            idx, weight = batch
            loss, grad = grad_fn(k, x[idx], y[idx], weight)
            updates, opt_state = opt.update(grad, opt_state, k)
            return (optax.apply_updates(k, updates), opt_state), loss

        (k, opt_state), losses = jax.lax.scan(step, (k, opt_state), (order, valid))
        count = _count_correct(tip(xv, val_clip, k), yv)
        better = count > best_count  # strict: the earliest epoch on ties, as the reference's `acc > best_acc`
        carry = (k, opt_state, jnp.where(better, k, best), jnp.where(better, count, best_count),
                 jnp.where(better, e + 1, best_epoch))
        return carry, (count, jnp.mean(losses))

    carry0 = (keys, opt.init(keys), keys, jnp.int32(-1), jnp.int32(0))
    (_, _, best, _, best_epoch), (counts, losses) = jax.lax.scan(epoch, carry0, jnp.arange(epochs, dtype=jnp.int32))
    return (best if real is None else best * real), best_epoch, counts, losses


def tip_adapter_f(train_x, train_y, val_x, val_y, text_weights, *, alphas: Sequence[float] | None = None,
                  betas: Sequence[float] | None = None, epochs: int = 20, lr: float = 1e-3, batch_size: int = 256,
                  weight_decay: float = 0.01, eps: float = 1e-4, init_alpha: float | None = None,
                  init_beta: float | None = None, seed: int = 0) -> TipAdapter:
    """Tip-Adapter-F: the cache keys fine-tuned, the epoch and then (alpha, beta) chosen on validation.

    Arguments as ``tip_adapter``; epoch ``e`` trains on view ``e mod V`` of ``train_x``. Training runs at
    (``init_alpha``, ``init_beta``), by default the training-free Tip-Adapter's choice on validation
    (the reference hand-sets them per dataset, beta 1 and alpha 1.17 to 10). ``lr``, ``eps``,
    ``weight_decay``, ``epochs`` and ``batch_size`` are the reference's (AdamW, cosine schedule; module
    docstring); ``seed`` fixes the shuffles. ``extras``: ``epoch_val_curve`` (validation accuracy after
    each epoch at the training alpha and beta), ``train_loss`` (mean batch loss per epoch),
    ``zero_shot_val_top1`` and ``tip_adapter_val_top1`` (the training-free cache's).
    """
    text, views, train_y, val_x, val_y, keys, values = _prepare(train_x, train_y, val_x, val_y, text_weights)
    alphas = _grid(DEFAULT_ALPHAS if alphas is None else alphas, "alphas")
    betas = _grid(DEFAULT_BETAS if betas is None else betas, "betas")
    epochs, batch_size = _positive_int(epochs, "epochs"), _positive_int(batch_size, "batch_size")
    lr, eps = _positive(lr, "lr"), _positive(eps, "eps")
    weight_decay = _scalar(weight_decay, "weight_decay")
    cache = _Cache.build(keys, values)
    free = _search(val_x, val_y, text, cache, alphas, betas)  # training-free Tip-Adapter
    init_alpha = free.alpha if init_alpha is None else _scalar(init_alpha, "init_alpha")
    init_beta = free.beta if init_beta is None else _scalar(init_beta, "init_beta")

    best, best_epoch, counts, losses = jax.device_get(_train_keys(
        views, train_y, val_x, val_y, text, cache.keys, cache.values, cache.pads, cache.real,
        jnp.float32(init_alpha), jnp.float32(init_beta), jnp.float32(lr), jnp.float32(weight_decay),
        jnp.float32(eps), jax.random.key(seed), epochs=epochs, batch_size=batch_size))
    best = np.asarray(best)
    found = _search(val_x, val_y, text, dataclasses.replace(cache, keys=best), alphas, betas)
    return TipAdapter(
        method="tip_adapter_f", text_weights=text, keys=cache.ungroup(best, keys.shape[0]), values=values,
        hparams={"alpha": found.alpha, "beta": found.beta, "epoch": int(best_epoch), "epochs": epochs, "lr": lr,
                 "batch_size": batch_size, "weight_decay": weight_decay, "eps": eps,
                 "init_alpha": float(init_alpha), "init_beta": float(init_beta), "seed": seed,
                 "cache_size": int(keys.shape[0])},
        val_accuracy=found.val_accuracy, grid_search=found,
        extras={"epoch_val_curve": np.asarray(counts, np.float64) / len(val_y), "train_loss": np.asarray(losses),
                "zero_shot_val_top1": _zero_shot_accuracy(val_x, val_y, text),
                "tip_adapter_val_top1": free.val_accuracy})
