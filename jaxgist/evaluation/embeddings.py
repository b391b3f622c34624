"""Batched, jitted image and text embedding extraction (L2-normalized, float32 numpy)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxgist.models.clip import tokenizer as tokenizer_lib


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


def encode_source(model, source, *, batch_size: int = 64, workers: int = 0, prefetch: int = 2,
                  skip_unreadable: bool = False, normalize: bool = True,
                  augment_seed: int | None = None) -> dict[str, np.ndarray]:
    """Image embeddings (unit-norm, or as the model projects them with ``normalize=False``) of every
    record of ``source`` (CLIP eval preprocessing at the model's resolution), in source order:
    {"x" [N, E] float32, "y" [N] int32, "index" [N] int64}.

    Images are decoded by the grain eval pipeline; every batch is padded to ``batch_size`` so the
    encoder compiles once. With ``skip_unreadable`` unreadable images are left out (and counted by
    ``pipeline.skipped_images``)."""
    from jaxgist.data import pipeline

    size = model.config.vision.image_size
    ds = pipeline.eval_dataset(source, image_size=size, batch_size=batch_size, skip_unreadable=skip_unreadable,
                               workers=workers, prefetch=prefetch, shard_index=0, shard_count=1,
                               augment_seed=augment_seed)
    xs, ys, idx, t0, done = [], [], [], time.perf_counter(), 0
    for i, batch in enumerate(ds):
        n = len(batch["label"])
        pixels = batch["image"]
        if n < batch_size:
            pixels = np.concatenate([pixels, np.zeros((batch_size - n, *pixels.shape[1:]), pixels.dtype)])
        emb = np.asarray(_encode_images(model, jnp.asarray(pixels)))[:n]
        xs.append(emb / np.linalg.norm(emb, axis=-1, keepdims=True) if normalize else emb)
        ys.append(batch["label"])
        idx.append(batch["index"])
        done += n
        if i % 20 == 19 or done == len(source):
            logging.info("encoded %d/%d images (%.1f/s)", done, len(source), done / max(time.perf_counter() - t0, 1e-9))
    if not xs:
        raise ValueError(f"no images to encode in {source!r}")
    return {"x": np.concatenate(xs).astype(np.float32), "y": np.concatenate(ys).astype(np.int32),
            "index": np.concatenate(idx).astype(np.int64)}


def save(path, splits: dict[str, dict[str, np.ndarray]], class_names) -> None:
    """Writes embeddings of several splits to one .npz: ``<split>_x``, ``<split>_y``, ``<split>_index``."""
    arrays = {f"{split}_{k}": v for split, d in splits.items() for k, v in d.items()}
    np.savez(path, class_names=np.asarray(list(class_names)), **arrays)


def load(path) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    """Reads what ``save`` wrote: ({split: {"x", "y", "index"}}, class names)."""
    with np.load(path) as f:
        splits: dict[str, dict[str, np.ndarray]] = {}
        for key in f.files:
            if key == "class_names":
                continue
            split, _, field = key.rpartition("_")
            splits.setdefault(split, {})[field] = f[key]
        return splits, [str(n) for n in f["class_names"]]


def device_summary() -> str:
    return f"{jax.device_count()} {jax.default_backend()} device(s)"
