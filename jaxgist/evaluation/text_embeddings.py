"""CLIP text embeddings of many texts (one description per image), computed in resumable parts and
written as an ``embedding_store`` keyed by image name.

    vectors = text_embeddings.encode(model, tokenize, texts)        # [N, E] unit rows, input order
    text_embeddings.build_store(model, tokenize, {key: text}, directory, part_size=4096)

Texts are tokenized to the model's context (77 tokens for OpenAI's CLIPs; longer texts truncated
with the end token kept last, ``clip.tokenize(..., truncate=True)``), sorted by token count and
encoded in batches trimmed to their longest member (rounded up to a multiple of 8, so at most ten
shapes compile). Trimming is exact: the text tower is causal and pools at the end token, so the
padding after it changes nothing.

``build_store`` splits the keys (sorted) into parts of ``part_size``; each part is written to
``<directory>/parts/part-NNNNN.npy`` when done, so a rerun after an interruption encodes only the
missing parts. In a multi-process job process p encodes parts p, p + P, ...; process 0 assembles the
store once every part is there.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxgist.core import arrays, files
from jaxgist.data import embedding_store
from jaxgist.training import parallel

LENGTH_MULTIPLE = 8


@nnx.jit
def _encode(model, ids):
    return model.encode_text(ids)


def _lengths(ids: np.ndarray, pad_id: int) -> np.ndarray:
    used = ids != pad_id
    return np.where(used.any(axis=1), ids.shape[1] - np.argmax(used[:, ::-1], axis=1), 1)


def encode(model, tokenize: Callable[[Sequence[str]], np.ndarray], texts: Sequence[str], *, batch_size: int = 256,
           pad_id: int = 0, normalize: bool = True) -> np.ndarray:
    """Unit-norm CLIP text embeddings [N, E] (float32) of ``texts``, in their order (``normalize=False``:
    as the text projection gives them)."""
    if not len(texts):
        raise ValueError("no texts to encode")
    ids = np.asarray(tokenize(list(texts)))
    lengths = _lengths(ids, pad_id)
    order = np.argsort(lengths, kind="stable")
    out = None
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = min(ids.shape[1], -(-int(lengths[rows].max()) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE)
        # a full batch keeps one shape per width; the last, short one is padded up
        batch = arrays.pad_rows(ids[rows, :width], min(batch_size, len(order)))
        emb = np.asarray(_encode(model, jnp.asarray(batch)))[:len(rows)]
        if out is None:
            out = np.zeros((len(texts), emb.shape[1]), np.float32)
        out[rows] = emb
    return (arrays.l2_normalize(out) if normalize else out).astype(np.float32)


def part_path(directory: str, i: int) -> str:
    """Where part ``i`` of a store being built in ``directory`` is kept until the store is assembled."""
    return os.path.join(directory, "parts", f"part-{i:05d}.npy")


def write_part(path: str, vectors: np.ndarray) -> None:
    """Writes one finished part atomically (a rerun sees it whole or not at all)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, vectors)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_manifest(directory: str, keys, texts, part_size: int, model, model_id: str) -> None:
    """Parts written for other texts, another part size or another text tower are stale: they are
    removed (with a warning) before encoding. The manifest records a digest of all three."""
    digest = hashlib.sha256()
    for k in keys:
        digest.update(k.encode("utf-8") + b"\0" + texts[k].encode("utf-8") + b"\0")
    digest.update(repr((part_size, model_id, getattr(model, "config", None))).encode("utf-8"))
    manifest = {"texts": len(keys), "part_size": part_size, "digest": digest.hexdigest()}
    path = os.path.join(directory, "parts", "manifest.json")
    if jax.process_index() == 0:
        old = None
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, json.JSONDecodeError):
                old = None
        if old != manifest:
            stale = sorted(glob.glob(os.path.join(directory, "parts", "part-*.npy")))
            if stale:
                logging.warning("text embeddings: %d part(s) in %s were written for other texts or another model; "
                                "removing them", len(stale), directory)
                for f in stale:
                    os.remove(f)
            files.write_json_atomic(path, manifest)
    parallel.sync("jaxgist text embedding manifest checked")


def build_store(model, tokenize, texts: Mapping[str, str], directory: str | os.PathLike, *, part_size: int = 4096,
                batch_size: int = 256, pad_id: int = 0, model_id: str = "", normalize: bool = True) -> dict:
    """Encodes ``texts`` ({key: text}) into an embedding store at ``directory`` (module docstring);
    returns {"texts", "dim", "parts", "parts_encoded", "seconds", "texts_per_s"}. ``model_id`` (the
    checkpoint's name) goes into the manifest that tells stale parts; ``normalize=False`` stores the
    embeddings unnormalized."""
    if part_size < 1:
        raise ValueError(f"part_size={part_size} must be >= 1")
    directory = os.fspath(directory)
    keys = sorted(texts)
    if not keys:
        raise ValueError("no texts to encode")
    num_parts = -(-len(keys) // part_size)
    _check_manifest(directory, keys, texts, part_size, model, model_id if normalize else f"{model_id} (unnormalized)")
    mine = [i for i in range(num_parts) if i % jax.process_count() == jax.process_index()]
    todo = [i for i in mine if not os.path.isfile(part_path(directory, i))]
    if len(todo) < len(mine):
        logging.info("text embeddings: %d of %d part(s) already written in %s; encoding the other %d",
                     len(mine) - len(todo), len(mine), directory, len(todo))
    t0, encoded = time.perf_counter(), 0
    for n, i in enumerate(todo):
        part_keys = keys[i * part_size:(i + 1) * part_size]
        vectors = encode(model, tokenize, [texts[k] for k in part_keys], batch_size=batch_size, pad_id=pad_id,
                         normalize=normalize)
        write_part(part_path(directory, i), vectors)
        encoded += len(part_keys)
        rate = encoded / max(time.perf_counter() - t0, 1e-9)
        left = sum(min(part_size, len(keys) - j * part_size) for j in todo[n + 1:])
        logging.info("text embeddings: part %d/%d done (%d texts, %.0f texts/s, ETA %.0f s)", i + 1, num_parts,
                     len(part_keys), rate, left / max(rate, 1e-9))
    seconds = time.perf_counter() - t0
    parallel.sync("jaxgist text embedding parts written")
    dim = None
    if jax.process_index() == 0:
        pieces = []
        for i in range(num_parts):
            part = np.load(part_path(directory, i))
            expected = min(part_size, len(keys) - i * part_size)
            if part.ndim != 2 or part.shape[0] != expected:
                raise embedding_store.EmbeddingStoreError(
                    f"{part_path(directory, i)} has shape {part.shape}, expected {expected} rows: delete it and rerun")
            pieces.append(part)
        vectors = np.concatenate(pieces)
        dim = int(vectors.shape[1])
        embedding_store.write(directory, keys, vectors)
    parallel.sync("jaxgist text embedding store written")
    return {"texts": len(keys), "dim": dim if dim is not None else embedding_store.EmbeddingStore(directory).dim,
            "parts": num_parts, "parts_encoded": len(todo), "seconds": round(seconds, 2),
            "texts_per_s": round(encoded / seconds, 1) if encoded and seconds > 0 else 0.0}
