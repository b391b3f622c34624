"""Batched, jitted image and text embedding extraction (L2-normalized, float32 numpy).

    img = embeddings.encode_images(model, pixels)           # [N, H, W, 3] normalized pixels -> [N, E] unit rows
    txt = embeddings.encode_texts(model, tokenize(texts))   # [N, L] ids -> [N, E] (unused padding trimmed)
    d = embeddings.encode_source(model, source)             # {"x", "y", "index"}; normalize=False: raw
    embeddings.save(path, {"train": d, ...}, class_names)   # one .npz: <split>_x, <split>_y, <split>_index
    splits, class_names = embeddings.load(path)             # ({split: {"x", "y", "index"}}, class names)

Every batch has one shape (the last one padded), so the encoder compiles once; in a multi-process job
each process encodes its shard of a source and every process gets all rows.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxgist.core import arrays
from jaxgist.models.clip import tokenizer as tokenizer_lib
from jaxgist.training import parallel


@nnx.jit
def _encode_images(model, pixels):
    return model.encode_image(pixels)


@nnx.jit
def _encode_texts(model, ids):
    return model.encode_text(ids)


def _batched(fn, model, data: np.ndarray, batch_size: int, what: str) -> np.ndarray:
    """Unit-norm ``fn(model, batch)`` over ``data`` in fixed-size batches (the last one padded, so one
    compile)."""
    n = len(data)
    if n == 0:
        raise ValueError(f"no {what} to encode")
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done == total or (done // batch_size) % 20 == 0:
            logging.info("encoded %d/%d %s (%.1f/s)", done, total, what, done / max(time.perf_counter() - t0, 1e-9))

    emb = arrays.map_batches(functools.partial(fn, model), data, batch_size, on_batch=progress)
    return arrays.l2_normalize(emb).astype(np.float32)


def encode_images(model, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Normalized pixels [N, H, W, 3] -> unit-norm image embeddings [N, E]."""
    return _batched(_encode_images, model, np.asarray(pixels, np.float32), batch_size, "images")


def encode_texts(model, ids: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Token ids [N, L] -> unit-norm text embeddings [N, E] (padding columns no text uses are dropped)."""
    return _batched(_encode_texts, model, tokenizer_lib.trim_padding(ids), batch_size, "texts")


def encode_source(model, source, *, batch_size: int = 64, workers: int = 0, prefetch: int = 2,
                  skip_unreadable: bool = False, normalize: bool = True,
                  augment_seed: int | None = None, crop_rounding: str = "torchvision") -> dict[str, np.ndarray]:
    """Image embeddings (unit-norm, or as the model projects them with ``normalize=False``) of every
    record of ``source`` (CLIP eval preprocessing at the model's resolution, under ``crop_rounding``'s
    rule: "torchvision" or "hf", see ``jaxgist.data.transforms``), in source order:
    {"x" [N, E] float32, "y" [N] int32, "index" [N] int64}.

    Images are decoded by the grain eval pipeline; every batch is padded to ``batch_size`` so the
    encoder compiles once. In a multi-process job each process encodes its shard of the records and
    every process gets all of them. With ``skip_unreadable`` unreadable images are left out (and
    counted by ``pipeline.skipped_images``)."""
    from jaxgist.data import pipeline

    size = model.config.vision.image_size
    ds = pipeline.eval_dataset(source, image_size=size, batch_size=batch_size, skip_unreadable=skip_unreadable,
                               workers=workers, prefetch=prefetch, augment_seed=augment_seed,
                               crop_rounding=crop_rounding)
    n = len(source)
    x, y, filled = None, np.zeros(n, np.int32), np.zeros(n, bool)
    t0, done = time.perf_counter(), 0
    for i, batch in enumerate(ds):
        m = len(batch["label"])
        pixels = batch["image"]
        emb = np.asarray(_encode_images(model, jnp.asarray(arrays.pad_rows(pixels, batch_size, fill="zeros"))))[:m]
        if x is None:
            x = np.zeros((n, emb.shape[1]), np.float32)
        index = np.asarray(batch["index"])
        x[index] = arrays.l2_normalize(emb) if normalize else emb
        y[index], filled[index] = batch["label"], True
        done += m
        if i % 20 == 19:
            logging.info("encoded %d images (%.1f/s)", done, done / max(time.perf_counter() - t0, 1e-9))
    if x is None:  # this process had no readable image; its peers may have
        x = np.zeros((n, model.config.embed_dim), np.float32)
    x, _ = parallel.combine_rows(x, filled)
    y, filled = parallel.combine_rows(y, filled)
    keep = np.flatnonzero(filled)
    if not len(keep):
        raise ValueError(f"no images to encode in {source!r}")
    logging.info("encoded %d/%d images in %.1f s", len(keep), n, time.perf_counter() - t0)
    return {"x": x[keep], "y": y[keep], "index": keep.astype(np.int64)}


def save(path, splits: dict[str, dict[str, np.ndarray]], class_names) -> None:
    """Writes embeddings of several splits to one .npz: ``<split>_x``, ``<split>_y``, ``<split>_index``
    (replaced atomically: a reader never sees half a file)."""
    arrays = {f"{split}_{k}": v for split, d in splits.items() for k, v in d.items()}
    save_arrays(path, class_names=np.asarray(list(class_names)), **arrays)


def save_arrays(path, **arrays: np.ndarray) -> None:
    """``np.savez(path, **arrays)`` written to a temporary sibling and renamed into place."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
