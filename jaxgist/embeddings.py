"""Batched, jitted image and text embedding extraction (L2-normalized, float32 numpy)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxgist import tokenizer as tokenizer_lib


@nnx.jit
def _encode_images(model, pixels):
    return model.encode_image(pixels)


@nnx.jit
def _encode_texts(model, ids):
    return model.encode_text(ids)


def _batched(fn, model, data: np.ndarray, batch_size: int, what: str) -> np.ndarray:
    """Runs ``fn`` over ``data`` in fixed-size batches (the last one padded, so one compile)."""
    n = len(data)
    if n == 0:
        raise ValueError(f"no {what} to encode")
    out, t0 = [], time.perf_counter()
    for start in range(0, n, batch_size):
        chunk = data[start : start + batch_size]
        valid = len(chunk)
        if valid < batch_size and n > batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, axis=0)])
        emb = np.asarray(fn(model, jnp.asarray(chunk)))[:valid]
        out.append(emb / np.linalg.norm(emb, axis=-1, keepdims=True))
        done = start + valid
        if done == n or (start // batch_size) % 20 == 19:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            logging.info("encoded %d/%d %s (%.1f/s)", done, n, what, rate)
    return np.concatenate(out).astype(np.float32)


def encode_images(model, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Normalized pixels [N, H, W, 3] -> unit-norm image embeddings [N, E]."""
    return _batched(_encode_images, model, np.asarray(pixels, np.float32), batch_size, "images")


def encode_texts(model, ids: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Token ids [N, L] -> unit-norm text embeddings [N, E] (padding columns no text uses are dropped)."""
    return _batched(_encode_texts, model, tokenizer_lib.trim_padding(ids), batch_size, "texts")


def device_summary() -> str:
    return f"{jax.device_count()} {jax.default_backend()} device(s)"
