"""The array helpers every layer shares: L2-normalized rows, fp32-accurate matmuls, padded batches.

    from jaxgist.core import arrays

    unit = arrays.l2_normalize(x)            # rows of unit L2 norm; numpy in, numpy out; jax in, jax out
    logits = arrays.matmul(a, b)             # jnp.matmul at HIGHEST precision (no TF32 / bf16 passes)
    scores = jnp.einsum("bd,nd->bn", a, b, precision=arrays.HIGHEST)   # the same precision elsewhere
    emb = arrays.map_batches(jitted_fn, [pixels], batch_size=64)      # fn compiles once, for one shape
    padded = arrays.pad_rows(batch, 64, fill="zeros")                  # a short last batch, made full

``map_batches`` calls ``fn`` on batches of ``batch_size`` rows (or of all rows when there are fewer),
pads the last batch by repeating its last row, so every call has one shape, and returns the outputs
(an array or a tuple / pytree of arrays, rows first) as numpy arrays without the padding rows.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["HIGHEST", "l2_normalize", "matmul", "pad_rows", "map_batches"]

# fp32 matmuls everywhere (on GPUs and TPUs the default precision rounds inputs to TF32 or bf16).
HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x, axis: int = -1, eps: float = 0.0):
    """``x / (||x|| + eps)`` along ``axis`` (default: rows of unit L2 norm).

    A jax array (or a tracer, under ``jit``) gives a jax array; anything else is computed in numpy
    and keeps its floating dtype (a float32 input stays float32). A zero row gives NaN unless
    ``eps`` > 0: callers that can meet one check for it.
    """
    if isinstance(x, jax.Array):
        norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
    else:
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / (norm + eps) if eps else x / norm


def matmul(a, b):
    """``jnp.matmul(a, b)`` computed in full float32 precision (``HIGHEST``), on every backend."""
    return jnp.matmul(a, b, precision=HIGHEST)


def pad_rows(x: np.ndarray, size: int, fill: str = "edge") -> np.ndarray:
    """``x`` [m, ...] with rows appended up to ``size`` rows: copies of its last row (``fill="edge"``,
    valid inputs for any function) or zeros (``fill="zeros"``). ``x`` itself when it has ``size`` rows."""
    x = np.asarray(x)
    missing = size - x.shape[0]
    if missing < 0:
        raise ValueError(f"cannot pad {x.shape[0]} rows to {size}")
    if missing == 0:
        return x
    if fill == "edge":
        if x.shape[0] == 0:
            raise ValueError("cannot pad an empty array by repeating its last row")
        extra = np.repeat(x[-1:], missing, axis=0)
    elif fill == "zeros":
        extra = np.zeros((missing, *x.shape[1:]), x.dtype)
    else:
        raise ValueError(f"fill must be 'edge' or 'zeros', got {fill!r}")
    return np.concatenate([x, extra])


def map_batches(fn: Callable[..., Any], arrays: Sequence[Any] | np.ndarray, batch_size: int, *,
                on_batch: Callable[[int, int], None] | None = None) -> Any:
    """``fn(*batch)`` over consecutive row batches of ``arrays``, outputs concatenated along rows.

    ``arrays``: one array or a sequence of arrays with the same number of rows n (a sequence gives
    ``fn`` one batch of each, positionally; bind other arguments with ``functools.partial``). Batches
    have ``min(n, batch_size)`` rows; the last one is padded with copies of its last row, so ``fn``
    (jitted) compiles once. ``fn`` returns an array or a pytree of arrays with rows first; the result
    has the same structure, as numpy arrays of n rows (padding dropped). ``on_batch(done, n)`` is
    called after each batch (progress logging).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    single = not isinstance(arrays, (list, tuple))
    rows = [np.asarray(arrays)] if single else [np.asarray(a) for a in arrays]
    if not rows:
        raise ValueError("map_batches needs at least one array")
    n = rows[0].shape[0] if rows[0].ndim else 0
    if any(r.ndim == 0 or r.shape[0] != n for r in rows):
        raise ValueError(f"every array must have the same number of rows, got shapes {[r.shape for r in rows]}")
    if n == 0:
        raise ValueError("map_batches got no rows")
    size = min(n, int(batch_size))
    pieces = []
    for start in range(0, n, size):
        batch = [r[start:start + size] for r in rows]
        valid = batch[0].shape[0]
        out = fn(*(pad_rows(b, size) for b in batch))
        pieces.append(jax.tree.map(lambda a, v=valid: np.asarray(a)[:v], out))
        if on_batch is not None:
            on_batch(start + valid, n)
    if len(pieces) == 1:
        return pieces[0]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)
