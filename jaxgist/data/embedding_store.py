"""Per-image vectors on disk, keyed by the image's name: the CLIP text embeddings of each training
image's description that GPT4Image's loss pulls towards.

    embedding_store.write(directory, keys, vectors)        # keys: image names (source filenames)
    store = embedding_store.EmbeddingStore(directory)
    store.dim, len(store), store.vector("n01440764/img_1.JPEG")
    source = embedding_store.WithEmbeddings(source, store) # records gain "text_embedding"

A store is a directory with ``embeddings.npy`` ([N, D] float32, memory-mapped on first read) and
``keys.json`` (the N keys, row order). Rows are found by key, never by position: a reordered or
re-listed image folder still gets each image's own vector. Both files are written atomically, the
array first, so a directory with ``keys.json`` is complete.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from jaxgist.core import files

ARRAY, KEYS = "embeddings.npy", "keys.json"


class EmbeddingStoreError(ValueError):
    """A store that is missing, damaged, or does not cover the images asked of it."""


def _few(items: Sequence[Any], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in list(items)[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def write(directory: str | os.PathLike, keys: Sequence[str], vectors: np.ndarray) -> str:
    """Writes ``vectors`` ([N, D]) under ``keys`` (N distinct strings) into ``directory``; returns it."""
    vectors = np.asarray(vectors, np.float32)
    keys = [str(k) for k in keys]
    if vectors.ndim != 2 or vectors.shape[0] != len(keys):
        raise ValueError(f"{len(keys)} keys for vectors of shape {vectors.shape}: expected [{len(keys)}, D]")
    if len(set(keys)) != len(keys):
        seen, dup = set(), []
        for k in keys:
            (dup.append(k) if k in seen else seen.add(k))
        raise ValueError(f"duplicate keys: {_few(dup)}")
    directory = files.makedirs(directory)
    tmp = os.path.join(os.fspath(directory), f".{ARRAY}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, vectors)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(os.fspath(directory), ARRAY))
    files.write_json_atomic(os.path.join(os.fspath(directory), KEYS), keys)
    return os.fspath(directory)


def exists(directory: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(directory), KEYS))


class EmbeddingStore:
    """Read access to a store written by ``write``. Picklable (the memory map is reopened where it is
    read, e.g. in a grain worker process)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        keys_file = os.path.join(self.directory, KEYS)
        array_file = os.path.join(self.directory, ARRAY)
        for f in (keys_file, array_file):
            if not os.path.isfile(f):
                raise EmbeddingStoreError(f"embedding store {self.directory}: {os.path.basename(f)} is missing "
                                          f"(write it with the description-embedding job)")
        try:
            with open(keys_file, encoding="utf-8") as fh:
                keys = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise EmbeddingStoreError(f"{keys_file}: not a JSON list of keys ({e})") from None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise EmbeddingStoreError(f"{keys_file}: expected a JSON list of strings")
        try:
            array = np.load(array_file, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise EmbeddingStoreError(f"{array_file}: not a readable .npy array ({e})") from None
        if array.ndim != 2 or array.shape[0] != len(keys):
            raise EmbeddingStoreError(f"{array_file} has shape {array.shape} but {keys_file} lists {len(keys)} keys: "
                                      f"expected [{len(keys)}, D]")
        self.keys = keys
        self.rows = {k: i for i, k in enumerate(keys)}
        self.dim = int(array.shape[1])
        self._array = array

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(os.path.join(self.directory, ARRAY), mmap_mode="r")
        return self._array

    def vector(self, key: str) -> np.ndarray:
        row = self.rows.get(key)
        if row is None:
            raise KeyError(f"no embedding for image {key!r} in {self.directory}")
        return np.asarray(self.array[row], np.float32)

    def missing(self, keys: Sequence[str]) -> list[str]:
        return [k for k in keys if k not in self.rows]


class WithEmbeddings:
    """A source whose records carry ``text_embedding`` (float32 [D]), the store's vector for the record's
    ``filename``. Every record must have one: the constructor names the images that have none."""

    def __init__(self, source, store: EmbeddingStore, *, dim: int | None = None):
        missing = store.missing([r["filename"] for r in _records(source)])
        if missing:
            raise EmbeddingStoreError(f"{store.directory}: {len(missing)} of {len(source)} training image(s) have no "
                                      f"description embedding, e.g. {_few(missing)}; rerun the description-embedding "
                                      f"job for these images")
        if dim is not None and store.dim != dim:
            raise EmbeddingStoreError(f"{store.directory}: the embeddings are {store.dim}-d but the CLIP text tower "
                                      f"(config.clip) gives {dim}-d vectors: a store written by another model")
        self.source, self.store = source, store
        self.class_names = source.class_names

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[index]
        record["text_embedding"] = self.store.vector(record["filename"])
        return record

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels

    @property
    def filenames(self) -> list[str]:
        return self.source.filenames


def _records(source):
    records = getattr(source, "_records", None)
    return records if records is not None else (source[i] for i in range(len(source)))
