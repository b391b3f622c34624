"""CgT-GAN's CLIP-aggregated text targets: for every training image, a softmax-weighted average of the
CLIP text embeddings of a whole sentence corpus.

    targets = clip_aggregate.aggregate(image_emb, corpus_emb, temperature=100.0)     # [N, D] float32
    clip_aggregate.write_targets(directory, keys, image_emb, corpus_emb, 100.0)     # an embedding store
    expected = clip_aggregate.reference_aggregate(image_emb, corpus_emb, 100.0)     # float64, the reference

The formula (CgT-GAN, github.com/Lihr747/CgtGAN, ``preprocess/generate_embedding.py``), for an image
with CLIP image embedding v and corpus sentences with CLIP text embeddings c_1 .. c_M::

    e_agg(v) = sum_j w_j c_j,    w_j = softmax_j(t * cos(v, c_j)) = exp(t cos_j) / sum_k exp(t cos_k)

The cosine uses both vectors L2-normalized; the weighted sum uses the *unnormalized* c_j. The
temperature t is 100 for the COCO corpus, 125 for Flickr30k and 175 for GCC.

The reference loops over the images one at a time on a GPU, with the whole corpus on the device: it
L2-normalizes both sets in their stored dtype (float16: the embeddings come from ``clip.load`` on CUDA),
casts the unit vectors to float64, computes the cosines in float64, takes ``exp(cos * t)`` without
subtracting the maximum (exp(175) ~ 1e76 fits float64, not float32), divides by the sum, sums
``c_j * w_j`` (float64 by type promotion) and stores the result as float16. Its overflow check
(``weight_sum == float('nan')``) is always false, so an overflow would pass silently.

Ours computes the same quantity in float32 (fp32 by default, the project's rule) without ever
holding the corpus, or a [N, M] matrix, in memory:

- The corpus is read block by block (``corpus_block`` rows; a ``np.memmap`` /
  ``np.load(mmap_mode="r")`` array is read from disk a block at a time and its mapping released
  after each block, so the resident size stays at a few blocks). The last block is padded and its
  padding masked out.
- Per block, a jitted update of an online softmax (a running log-sum-exp) for every image block of
  ``image_block`` rows: running max m, running denominator s = sum exp(t cos_j - m) and running
  numerator acc = sum exp(t cos_j - m) c_j, rescaled by exp(m_old - m_new) when the max grows. The
  result is acc / s. Subtracting the max keeps every exponential <= 1, so t = 175 is safe in float32
  (the reference's formula would overflow there).
- Both sides are L2-normalized inside (in float32) and the similarity and weighted-sum matmuls run at
  ``Precision.HIGHEST`` (``arrays.HIGHEST``): t * cos reaches 175, so rounding of the cosine is
  amplified 175-fold in the weights (on GPUs and TPUs the default precision would round to TF32/bf16).
  Against the float64 reference the difference is a few 1e-6 of the largest |target| (t = 100 to 175):
  the float32 cosine's rounding (~2e-7) times t. The reference script itself, fed float32 embeddings,
  differs from float64 by as much (it normalizes before casting to float64), and its float16 output
  rounds by ~5e-4.
- The corpus is read once per call; each corpus block is used for every image block before the next
  one is read, and reading the next block overlaps the device's work on the current one.
- Bad inputs are errors (``ValueError``): an empty corpus, differing widths, a zero-norm or
  non-finite row (with its index), a temperature <= 0.

``write_targets`` runs ``aggregate`` over the images in parts of ``part_size`` rows, each written
atomically to ``<directory>/parts/part-NNNNN.npy`` when done, so that a rerun after an interruption
computes only the missing parts (the pattern of ``jaxgist.evaluation.text_embeddings.build_store``).
``<directory>/parts/meta.json`` records the temperature, the sizes, the part size and a fingerprint
of the inputs (the keys, and sampled rows of both arrays): a rerun with other inputs refuses to mix
parts (delete the directory to start over). In a multi-process job process p computes parts p, p + P,
...; process 0 assembles the ``jaxgist.data.embedding_store`` (keyed by ``keys``) once every part is
there, then removes the part files (``meta.json`` stays, describing the store; a rerun of a finished
job returns at once).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import math
import mmap
import numbers
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxgist.core import arrays, files
from jaxgist.data import embedding_store
from jaxgist.evaluation.text_embeddings import part_path, write_part
from jaxgist.training import parallel

__all__ = ["aggregate", "reference_aggregate", "write_targets", "TEMPERATURES"]

# CgT-GAN's temperatures, by text corpus
TEMPERATURES = {"coco": 100.0, "flickr30k": 125.0, "gcc": 175.0}

META = "meta.json"
_FINGERPRINT_ROWS = 64  # rows of each array hashed into the fingerprint (evenly spaced, first and last included)


# ------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------

def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a positive finite number (CgT-GAN: 100 COCO, 125 Flickr30k, "
                         f"175 GCC), got {temperature!r}")
    return t


def _check_block(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_shapes(images, corpus) -> None:
    for name, a in (("image_embeddings", images), ("corpus_embeddings", corpus)):
        if a.ndim != 2:
            raise ValueError(f"{name} must be a 2-d array [rows, D], got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if corpus.shape[0] == 0:
        raise ValueError("corpus_embeddings is empty: the targets need at least one corpus sentence")
    if images.shape[1] != corpus.shape[1]:
        raise ValueError(f"image_embeddings are {images.shape[1]}-d but corpus_embeddings are {corpus.shape[1]}-d: "
                         f"both must come from the same CLIP model")


def _check_rows(name: str, rows: np.ndarray, first: int) -> None:
    """Raises for a row of ``rows`` (float32; row ``first`` of ``name`` is its row 0) that is non-finite,
    zero or too large to normalize in float32. One pass: the squared norm is NaN/inf for a NaN/inf value."""
    sq = np.einsum("ij,ij->i", rows, rows)
    bad = ~np.isfinite(sq) | (sq == 0)
    if not bad.any():
        return
    i = int(np.argmax(bad))
    row = rows[i]
    if not np.isfinite(row).all():
        value = row[~np.isfinite(row)][0]
        raise ValueError(f"{name} row {first + i} has a non-finite value ({value})")
    if sq[i] == 0:
        raise ValueError(f"{name} row {first + i} has zero norm: its cosine similarity is undefined")
    raise ValueError(f"{name} row {first + i} has a norm too large for float32 (max |value| {np.abs(row).max():.3g})")


def _release_mapping(array) -> None:
    """Drops this process's mapping of a read-only ``np.memmap``'s pages (``MADV_DONTNEED``): the data
    stay in the OS page cache, but the blocks already read no longer count in the resident size.
    Only for mode ``"r"`` (a copy-on-write map would lose its changes). A no-op for anything else."""
    mm = getattr(array, "_mmap", None)
    if getattr(array, "mode", None) == "r" and mm is not None and hasattr(mm, "madvise"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError, AttributeError):
            pass


def _read_block(corpus, start: int, size: int) -> tuple[np.ndarray, int]:
    """Rows ``start:start + size`` of the corpus as a new float32 array of exactly ``size`` rows (a
    short last block padded by repeating its last row), checked, and the number of real rows."""
    rows = np.array(corpus[start:start + size], dtype=np.float32)
    _release_mapping(corpus)
    _check_rows("corpus_embeddings", rows, start)
    return arrays.pad_rows(rows, size), rows.shape[0]


# ------------------------------------------------------------------------------------------------
# The blockwise online softmax
# ------------------------------------------------------------------------------------------------

def _unit(x):
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


@jax.jit
def _init(images):
    """Unit image rows [B, I, D] and the empty state (m = -inf, s = 0, acc = 0) of every image block."""
    unit = _unit(images)
    m = jnp.full(images.shape[:2], -jnp.inf, jnp.float32)
    return unit, (m, jnp.zeros_like(m), jnp.zeros_like(images))


@functools.partial(jax.jit, donate_argnums=(0,))
def _update(state, images, block, valid, temperature):
    """Folds one corpus block ([C, D], rows ``>= valid`` padding) into the running (m, s, acc) of every
    image block (``images``: [B, I, D] unit rows; state: m, s [B, I], acc [B, I, D])."""
    unit = _unit(block)
    real = jnp.arange(block.shape[0]) < valid

    def one(args):
        x, m, s, acc = args
        logits = temperature * jnp.einsum("id,cd->ic", x, unit, precision=arrays.HIGHEST)
        logits = jnp.where(real[None, :], logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(axis=1))
        p = jnp.exp(logits - m_new[:, None])
        scale = jnp.exp(m - m_new)  # 0 on the first block (m = -inf)
        s = s * scale + p.sum(axis=1)
        acc = acc * scale[:, None] + jnp.einsum("ic,cd->id", p, block, precision=arrays.HIGHEST)
        return m_new, s, acc

    return jax.lax.map(one, (images, *state))


@jax.jit
def _finish(state):
    _, s, acc = state
    return acc / s[..., None]


def aggregate(image_embeddings, corpus_embeddings, temperature: float, *, image_block: int = 1024,
              corpus_block: int = 16384) -> np.ndarray:
    """CgT-GAN's targets ``sum_j softmax_j(t cos(v_i, c_j)) c_j`` ([N, D] float32) of the N image
    embeddings over the M corpus embeddings (module docstring). ``corpus_embeddings`` may be a memory
    map: it is read ``corpus_block`` rows at a time, once. ``image_block`` rows of images share one
    similarity block ([image_block, corpus_block] floats in memory at a time)."""
    t = _check_temperature(temperature)
    image_block = _check_block("image_block", image_block)
    corpus_block = _check_block("corpus_block", corpus_block)
    images = np.asarray(image_embeddings)
    corpus = corpus_embeddings if isinstance(corpus_embeddings, np.ndarray) else np.asarray(corpus_embeddings)
    _check_shapes(images, corpus)
    n, d = images.shape
    m = corpus.shape[0]
    images = images.astype(np.float32)
    _check_rows("image_embeddings", images, 0)
    if n == 0:
        return np.zeros((0, d), np.float32)

    rows = min(n, image_block)
    blocks = -(-n // rows)
    unit, state = _init(jnp.asarray(arrays.pad_rows(images, blocks * rows).reshape(blocks, rows, d)))
    size = min(m, corpus_block)
    temperature = jnp.float32(t)
    for start in range(0, m, size):
        block, valid = _read_block(corpus, start, size)  # overlaps with the device's previous update
        if start:
            jax.block_until_ready(state)  # at most one block in flight: memory stays bounded
        state = _update(state, unit, block, np.int32(valid), temperature)
    return np.asarray(_finish(state)).reshape(blocks * rows, d)[:n]


# ------------------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------------------

def reference_aggregate(image_embeddings, corpus_embeddings, temperature: float, *,
                        image_block: int | None = None) -> np.ndarray:
    """CgT-GAN's per-image formula in NumPy float64 ([N, D] float64, before the reference's float16 cast):
    float64 cosines, ``exp(cos * t)`` with no max subtracted, weights divided by their sum, then the sum
    of the unnormalized ``c_j * w_j``. Vectorized over blocks of ``image_block`` images (default: a
    [block, M] float64 weight matrix of about 512 MB). Two differences from the script, both at float64
    rounding level: the normalization is done in float64 (the script normalizes in the stored dtype,
    then casts), and the cosine is computed as ``(v / |v|) . c_j / |c_j|`` so that only one float64
    copy of the corpus is held (the script holds the unit corpus in float64 and the raw one as stored).
    Holds the corpus in memory, as the reference does."""
    t = float(temperature)
    images = np.asarray(image_embeddings, np.float64)
    corpus = np.asarray(corpus_embeddings, np.float64)
    _check_shapes(images, corpus)
    unit_images = images / np.linalg.norm(images, axis=1, keepdims=True)
    inv_norms = 1.0 / np.linalg.norm(corpus, axis=1)
    n, m = images.shape[0], corpus.shape[0]
    step = image_block or max(1, min(n, (1 << 26) // m))
    out = np.empty(images.shape, np.float64)
    for a in range(0, n, step):
        w = unit_images[a:a + step] @ corpus.T  # [B, M]
        w *= inv_norms  # cosines
        w *= t
        np.exp(w, out=w)  # no max subtracted, as the reference
        w /= w.sum(axis=1, keepdims=True)
        out[a:a + step] = w @ corpus  # the unnormalized c_j
    return out


# ------------------------------------------------------------------------------------------------
# Resumable targets on disk
# ------------------------------------------------------------------------------------------------

def _sample_rows(array, count: int = _FINGERPRINT_ROWS) -> np.ndarray:
    n = array.shape[0]
    index = np.unique(np.linspace(0, n - 1, min(n, count)).round().astype(np.int64))
    return np.ascontiguousarray(np.asarray(array[index], np.float32))


def _fingerprint(keys: Sequence[str], images, corpus) -> str:
    digest = hashlib.sha256()
    for k in keys:
        digest.update(k.encode("utf-8") + b"\0")
    for a in (images, corpus):
        digest.update(repr(tuple(a.shape)).encode("ascii"))
        digest.update(_sample_rows(a).tobytes())
    return digest.hexdigest()


def _read_meta(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _part_ok(path: str, rows: int, dim: int) -> bool:
    try:
        part = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return part.dtype == np.float32 and part.shape == (rows, dim)


def _remove_parts(directory: str) -> None:
    for f in glob.glob(os.path.join(directory, "parts", "part-*.npy")):
        os.remove(f)


def write_targets(directory: str | os.PathLike, keys: Sequence[str], image_embeddings, corpus_embeddings,
                  temperature: float, *, part_size: int = 8192, progress: bool = True, image_block: int = 1024,
                  corpus_block: int = 16384) -> dict:
    """Writes the targets of ``image_embeddings`` (row i: image ``keys[i]``) over ``corpus_embeddings`` at
    ``temperature`` as an embedding store in ``directory``, in resumable parts (module docstring).
    ``progress``: log every finished part (images/s, ETA). Returns {"images", "dim", "corpus",
    "temperature", "parts", "parts_computed", "seconds", "images_per_s"}."""
    t = _check_temperature(temperature)
    part_size = _check_block("part_size", part_size)
    directory = os.fspath(directory)
    keys = [str(k) for k in keys]
    images = image_embeddings if isinstance(image_embeddings, np.ndarray) else np.asarray(image_embeddings)
    corpus = corpus_embeddings if isinstance(corpus_embeddings, np.ndarray) else np.asarray(corpus_embeddings)
    _check_shapes(images, corpus)
    n, d = images.shape
    m = corpus.shape[0]
    if not keys:
        raise ValueError("no images: keys is empty")
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} image embeddings: one key per row")
    if len(set(keys)) != n:
        seen, dup = set(), []
        for k in keys:
            (dup.append(k) if k in seen else seen.add(k))
        raise ValueError(f"duplicate keys: {dup[:5]}")
    _check_rows("image_embeddings", np.asarray(images, np.float32), 0)

    num_parts = -(-n // part_size)
    meta = {"temperature": t, "images": n, "corpus": m, "dim": d, "part_size": part_size,
            "fingerprint": _fingerprint(keys, images, corpus)}
    meta_path = os.path.join(directory, "parts", META)
    old = _read_meta(meta_path)
    if old is not None and old != meta:
        changed = ", ".join(f"{k} {old.get(k)!r} -> {meta[k]!r}" for k in meta if old.get(k) != meta[k])
        raise ValueError(f"{directory} holds CLIP-aggregated targets of other inputs ({changed}); delete the "
                         f"directory (or choose another) to compute these")
    summary = {"images": n, "dim": d, "corpus": m, "temperature": t, "parts": num_parts}
    if embedding_store.exists(directory):
        if old is None:
            raise ValueError(f"{directory} already holds an embedding store that write_targets did not write "
                             f"({meta_path} is missing); delete it or choose another directory")
        if jax.process_index() == 0:
            _remove_parts(directory)  # left by a run stopped between writing the store and cleaning up
        parallel.sync("jaxgist clip aggregate: store already written")
        logging.info("CLIP-aggregated targets: %s is already complete", directory)
        return {**summary, "parts_computed": 0, "seconds": 0.0, "images_per_s": 0.0}
    if old is None and glob.glob(os.path.join(directory, "parts", "part-*.npy")):
        raise ValueError(f"{directory}/parts holds parts but no {META}: their inputs are unknown; delete the "
                         f"directory (or choose another) to compute these targets")
    parallel.sync("jaxgist clip aggregate: meta checked")
    if jax.process_index() == 0 and old is None:
        files.write_json_atomic(meta_path, meta, indent=1)
    parallel.sync("jaxgist clip aggregate: meta written")

    def rows_of(i: int) -> int:
        return min(part_size, n - i * part_size)

    mine = [i for i in range(num_parts) if i % jax.process_count() == jax.process_index()]
    todo = []
    for i in mine:
        path = part_path(directory, i)
        if os.path.isfile(path) and not _part_ok(path, rows_of(i), d):
            logging.warning("CLIP-aggregated targets: %s is damaged (not float32 [%d, %d]); computing it again",
                            path, rows_of(i), d)
        elif os.path.isfile(path):
            continue
        todo.append(i)
    if progress:
        logging.info("CLIP-aggregated targets: %d images over %d corpus sentences (t = %g) in %d part(s) of %d; "
                     "process %d of %d computes %d part(s) into %s", n, m, t, num_parts, part_size,
                     jax.process_index(), jax.process_count(), len(mine), directory)
    if len(todo) < len(mine):
        logging.info("CLIP-aggregated targets: %d of %d part(s) already written in %s; computing the other %d",
                     len(mine) - len(todo), len(mine), directory, len(todo))
    t0, done = time.perf_counter(), 0
    for j, i in enumerate(todo):
        start = i * part_size
        vectors = aggregate(images[start:start + rows_of(i)], corpus, t, image_block=image_block,
                            corpus_block=corpus_block)
        write_part(part_path(directory, i), vectors)
        done += rows_of(i)
        if progress:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            left = sum(rows_of(k) for k in todo[j + 1:])
            logging.info("CLIP-aggregated targets: part %d/%d done (%d/%d parts of this process, %.1f images/s "
                         "over %d corpus sentences, ETA %.0f s)", i + 1, num_parts, j + 1, len(todo), rate, m,
                         left / max(rate, 1e-9))
    seconds = time.perf_counter() - t0
    parallel.sync("jaxgist clip aggregate: parts written")

    if jax.process_index() == 0:
        # Assembled in a memory-mapped file, not in memory (GCC: 3.3M images x 768 floats = 10 GB).
        tmp = os.path.join(directory, "parts", f".assembled.{os.getpid()}.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, d))
        try:
            for i in range(num_parts):
                path = part_path(directory, i)
                if not _part_ok(path, rows_of(i), d):
                    raise embedding_store.EmbeddingStoreError(
                        f"{path} is missing or is not float32 [{rows_of(i)}, {d}]: delete it and rerun")
                out[i * part_size:i * part_size + rows_of(i)] = np.load(path, mmap_mode="r")
            out.flush()
            embedding_store.write(directory, keys, out)
        finally:
            del out
            os.remove(tmp)
        _remove_parts(directory)
    parallel.sync("jaxgist clip aggregate: store written")
    computed = sum(rows_of(i) for i in todo)
    return {**summary, "parts_computed": len(todo), "seconds": round(seconds, 2),
            "images_per_s": round(computed / seconds, 1) if computed and seconds > 0 else 0.0}
