"""Caption matching: for each training image, the class descriptions its CLIP embedding is closest to.

GIST (``caption_matching.py`` of github.com/emu1729/GIST) gives every training image the k (= 5)
LLM-written descriptions of its *own* class that CLIP scores highest for it (cosine of the raw
description, no template); they become its captions for contrastive fine-tuning. Same selection, batched:

    matches = match_captions(model, tokenize, train_source, descriptions, k=5)   # {filename: [caption, ...]}
    write_captions(workdir / "captions_top5.json", matches)                      # GIST's captions JSON
    # or, from files:
    match_to_file(model, tokenize, train_source, "long_captions.json", "captions_top5.json", k=5)
    # ... and their cosines beside it, captions_top5.scores.json (read_scores(scores_path(...)))
    m = match_indices(model, tokenize, train_source, descriptions, k=5)          # Matches: slots, scores

Ties go to the description listed first. What is scored, where we differ from GIST's script (never in the
captions chosen, up to float rounding of near-equal scores) and measured parity: docs/methods/gist.md.

As a job (``config.method = "caption_matching"``, ``configs/caption_matching.py``; also GIST's
``match`` stage): ``match_split(config.model, config.data, workdir, out, k=...)`` writes
``workdir/captions_top{k}.json`` from the data section's ``descriptions`` and train split.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from jaxgist import methods
from jaxgist.core import arrays
from jaxgist.core import config as config_lib
from jaxgist.core import files, results
from jaxgist.data import datasets, pipeline, sources
from jaxgist.data.sources import DataError, read_descriptions
from jaxgist.evaluation import embeddings
from jaxgist.models import clip
from jaxgist.models.clip import tokenizer as tokenizer_lib
from jaxgist.training import parallel

__all__ = ["Matches", "match_indices", "match_captions", "write_captions", "scores_path", "write_scores",
           "read_scores", "match_to_file", "match_split", "default_config", "validate", "run"]

# Seconds between progress lines of a long matching run.
_LOG_EVERY_S = 15.0


class Matches(NamedTuple):
    """The top-k descriptions of each matched image, as arrays (row ``i`` is ``filenames[i]``).

    ``slots[i, j]`` is the position, within the descriptions of class ``labels[i]``, of the image's
    j-th best description, and ``scores[i, j]`` its cosine; rows are ``-1`` / NaN past
    ``counts[i] = min(k, number of descriptions of the class)``.
    """

    filenames: list[str]
    labels: np.ndarray  # int32 [N]
    slots: np.ndarray  # int32 [N, k]
    scores: np.ndarray  # float32 [N, k]
    counts: np.ndarray  # int32 [N]

    def captions(self, descriptions: Sequence[Sequence[str]]) -> dict[str, list[str]]:
        """filename -> its matched descriptions, best first (the strings ``slots`` point at)."""
        return {name: [descriptions[label][s] for s in row[:n]]
                for name, label, row, n in zip(self.filenames, self.labels.tolist(), self.slots.tolist(),
                                                self.counts.tolist())}


class _Selected:
    """The records of ``source`` at ``positions``, re-indexed 0..n-1 (``index`` is the row of the
    result each record fills). Plain data, so grain worker processes can pickle it."""

    def __init__(self, source, positions: Sequence[int]):
        self.source, self.positions = source, list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = dict(self.source[self.positions[int(i)]])
        record["index"] = int(i)
        return record


def _select(source, split: str | None) -> tuple[list[int], list[str], np.ndarray]:
    """Positions, filenames and labels of the records to match: those whose ``split`` is ``split``
    (records without a split field are kept; ``split=None`` keeps all)."""
    n = len(source)
    selected = getattr(source, "split", None)
    if hasattr(source, "filenames") and hasattr(source, "labels") and (
            split is None or (isinstance(selected, tuple) and set(selected) == {split})):
        # Every record qualifies: take the metadata without reading records (a TFDS record holds
        # its encoded image).
        return list(range(n)), list(source.filenames), np.asarray(source.labels, np.int32)
    positions, filenames, labels = [], [], []
    for i in range(n):
        r = source[i]
        if split is None or r.get("split", split) == split:
            positions.append(i)
            filenames.append(r["filename"])
            labels.append(r["label"])
    return positions, filenames, np.asarray(labels, np.int32)


def _check_descriptions(descriptions: Sequence[Sequence[str]], source, labels: np.ndarray) -> None:
    names = list(getattr(source, "class_names", []) or [])
    if names and len(descriptions) != len(names):
        raise DataError(f"descriptions are given for {len(descriptions)} classes but the source has "
                        f"{len(names)} (descriptions must be a list by label; read them with "
                        f"sources.read_descriptions(path, source.class_names))")
    if labels.size and labels.max() >= len(descriptions):
        raise DataError(f"a record has label {int(labels.max())} but descriptions are given for only "
                        f"{len(descriptions)} classes")
    used = np.unique(labels).tolist()

    def name(label):
        return f"{label} ({names[label]!r})" if names else str(label)

    empty = [name(c) for c in used if len(descriptions[c]) == 0]
    if empty:
        raise DataError(f"{len(empty)} class(es) with images to match have no descriptions: "
                        + ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
    for c in used:
        for j, text in enumerate(descriptions[c]):
            if not isinstance(text, str):
                raise DataError(f"description {j} of class {name(c)} is a {type(text).__name__}, not a string")


def _even_batch(n: int, batch_size: int, multiple: int = 8) -> int:
    """The batch size (at most ``batch_size``, rounded up to ``multiple``) that covers ``n`` items in
    as many batches as ``batch_size`` would, with the least padding in the last one: 272 texts in
    batches of 256 become 2 batches of 136 rather than 256 + 16 padded to 256."""
    if n <= batch_size:
        return n
    batches = math.ceil(n / batch_size)
    return min(batch_size, math.ceil(math.ceil(n / batches) / multiple) * multiple)


def _class_table(model, tokenize, descriptions: Sequence[Sequence[str]], batch_size: int):
    """Unit-norm description embeddings padded per class: ([C, M, E] float32, [C] int32 counts).

    Each distinct string is encoded once."""
    unique: dict[str, int] = {}
    for texts in descriptions:
        for t in texts:
            unique.setdefault(t, len(unique))
    t0 = time.perf_counter()
    emb = embeddings.encode_texts(model, tokenize(list(unique)), batch_size=_even_batch(len(unique), batch_size))
    logging.info("caption matching: encoded %d distinct descriptions in %.1f s", len(unique),
                 time.perf_counter() - t0)
    counts = np.array([len(texts) for texts in descriptions], np.int32)
    table = np.zeros((len(descriptions), max(int(counts.max()), 1), emb.shape[1]), np.float32)
    for c, texts in enumerate(descriptions):
        if texts:
            table[c, : len(texts)] = emb[[unique[t] for t in texts]]
    return table, counts


@nnx.jit(static_argnames=("k",))
def _top_k(model, pixels, labels, table, counts, k: int):
    """Scores each image against its class's descriptions and keeps the k best.

    Returns (scores [B, k] descending, slots [B, k]); padding slots (past the class's count) have
    score -inf and sort last. Equal scores are ordered by slot."""
    img = model.encode_image(pixels).astype(jnp.float32)
    img = arrays.l2_normalize(img)
    cls = table[labels]  # [B, M, E]
    scores = jnp.einsum("be,bme->bm", img, cls, precision=arrays.HIGHEST)
    slot = jnp.broadcast_to(jnp.arange(table.shape[1], dtype=jnp.int32), scores.shape)
    valid = slot < counts[labels][:, None]
    # Sort by (-score, slot): best first, ties to the lower slot; padding (+inf) last.
    key = jnp.where(valid, -scores, jnp.inf)
    key, slot = jax.lax.sort((key, slot), dimension=-1, num_keys=2)
    return -key[:, :k], slot[:, :k]


def match_indices(model, tokenize: Callable[[Sequence[str]], np.ndarray], source,
                  descriptions: Sequence[Sequence[str]], *, k: int = 5, image_size: int | None = None,
                  batch_size: int = 64, text_batch_size: int = 256, split: str | None = "train",
                  workers: int = 0, skip_unreadable: bool = False, shard_index: int | None = None,
                  shard_count: int | None = None, crop_rounding: str = "torchvision") -> Matches:
    """The top-``k`` descriptions of each image's class for every selected record, as arrays.

    See ``match_captions`` for the arguments. Records left out by ``split`` or skipped as
    unreadable have no row. In a multi-process job each process scores its shard of the images
    (``shard_index`` of ``shard_count``, default this process's) and every process gets all rows.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    image_size = int(image_size or model.config.vision.image_size)

    positions, filenames, labels = _select(source, split)
    if not positions:
        raise DataError(f"{source!r}: no records of split {split!r} to match captions for")
    _check_descriptions(descriptions, source, labels)

    table, counts = _class_table(model, tokenize, descriptions, text_batch_size)
    kk = min(int(k), table.shape[1])
    table_d, counts_d = jnp.asarray(table), jnp.asarray(counts)

    n = len(positions)
    batch = _even_batch(n, batch_size)  # every call has this shape (the last batch is padded): one compile
    slots = np.full((n, kk), -1, np.int32)
    scores = np.full((n, kk), np.nan, np.float32)
    seen = np.zeros(n, bool)
    data = pipeline.eval_dataset(_Selected(source, positions), image_size=image_size, batch_size=batch,
                                 skip_unreadable=skip_unreadable, workers=workers, prefetch=4,
                                 shard_index=shard_index, shard_count=shard_count, crop_rounding=crop_rounding)
    logging.info("caption matching: %d images of %d classes, %d descriptions (%d to %d per class), "
                 "k=%d, %dpx, batch %d, %s", n, len(descriptions), int(counts.sum()), int(counts.min()),
                 int(counts.max()), k, image_size, batch, embeddings.device_summary())

    def collect(pending):
        (top_scores, top_slots), index = pending
        m = len(index)
        scores[index] = np.asarray(top_scores)[:m]
        slots[index] = np.asarray(top_slots)[:m]
        seen[index] = True
        return m

    t0 = last = time.perf_counter()
    done, pending = 0, None
    for b in data:
        pixels, batch_labels, index = b["image"], b["label"], np.asarray(b["index"])
        # pad the short last batch (skipped images can shorten any batch)
        pixels, batch_labels = (arrays.pad_rows(a, batch, fill="zeros") for a in (pixels, batch_labels))
        # Dispatch this batch, then read the previous one back while it runs.
        out = _top_k(model, jnp.asarray(pixels), jnp.asarray(batch_labels), table_d, counts_d, k=kk)
        if pending is not None:
            done += collect(pending)
        pending = (out, index)
        now = time.perf_counter()
        if now - last > _LOG_EVERY_S:
            rate = done / max(now - t0, 1e-9)
            logging.info("caption matching: %d/%d images (%.1f images/s, ETA %.0f s)", done, n, rate,
                         (n - done) / max(rate, 1e-9))
            last = now
    if pending is not None:
        done += collect(pending)
    elapsed = time.perf_counter() - t0
    logging.info("caption matching: %d images in %.1f s (%.1f images/s)", done, elapsed,
                 done / max(elapsed, 1e-9))
    # every process gets every process's rows
    slots, _ = parallel.combine_rows(slots, seen)
    scores, seen = parallel.combine_rows(scores, seen)

    if not seen.all():
        missing = [filenames[i] for i in np.flatnonzero(~seen)]
        if not skip_unreadable:
            raise RuntimeError(f"caption matching: {len(missing)} image(s) were not scored, e.g. {missing[:5]}")
        logging.warning("caption matching: %d unreadable image(s) skipped, e.g. %s", len(missing), missing[:5])
    keep = np.flatnonzero(seen)
    labels, slots, scores = labels[keep], slots[keep], scores[keep]
    row_counts = np.minimum(counts[labels], kk).astype(np.int32)
    past = np.arange(kk)[None, :] >= row_counts[:, None]  # slots past a short class's descriptions
    slots[past], scores[past] = -1, np.nan
    return Matches(filenames=[filenames[i] for i in keep], labels=labels, slots=slots, scores=scores,
                   counts=row_counts)


def match_captions(model, tokenize: Callable[[Sequence[str]], np.ndarray], source,
                   descriptions: Sequence[Sequence[str]], *, k: int = 5, image_size: int | None = None,
                   batch_size: int = 64, text_batch_size: int = 256, split: str | None = "train",
                   workers: int = 0, skip_unreadable: bool = False,
                   crop_rounding: str = "torchvision") -> dict[str, list[str]]:
    """``filename -> [caption, ...]``: each image's ``k`` best descriptions of its own class, best first.

    Args:
      model: a ``jaxgist.models.clip`` CLIP.
      tokenize: list of strings -> int ids ``[N, L]`` (``jaxgist.models.clip.tokenizer.load()``).
      source: records with ``filename``, ``path``, ``label`` (and ``split``), e.g. a ``GistSource``;
        its ``class_names`` (when present) must line up with ``descriptions``.
      descriptions: the description strings of each class, by label
        (``sources.read_descriptions(path, source.class_names)``).
      k: captions per image; a class with fewer descriptions gives its images all of them.
      image_size: the side of the CLIP input (default: the model's).
      batch_size: images per jitted call; ``text_batch_size``: descriptions per call.
      split: match only records whose ``split`` is this (records without one are matched);
        None matches every record. GIST matches the ``train`` split.
      workers: grain decoding processes (0: threads in this process).
      skip_unreadable: leave out (and log) images that cannot be read instead of failing.
      crop_rounding: the image preprocessing's rule, "torchvision" (OpenAI's clip) or "hf"
        (``CLIPImageProcessor``), see ``jaxgist.data.transforms``.

    Ties between equal scores go to the description that comes first in the class's list. The
    result is in the order of the source's records. Each process scores its shard of the images on
    its default device; every process gets the whole result.
    """
    matches = match_indices(model, tokenize, source, descriptions, k=k, image_size=image_size,
                            batch_size=batch_size, text_batch_size=text_batch_size, split=split,
                            workers=workers, skip_unreadable=skip_unreadable, crop_rounding=crop_rounding)
    return matches.captions(descriptions)


def write_captions(path: str | os.PathLike, matches: Mapping[str, Sequence[str]]) -> str:
    """Writes ``filename -> [caption, ...]`` as GIST's captions JSON (one object, as ``json.dump``
    writes it; ``sources.read_captions`` reads it). The file is replaced atomically."""
    path = os.fspath(path)
    data = {}
    for name, captions in matches.items():
        if not isinstance(name, str) or isinstance(captions, str) or \
                not all(isinstance(c, str) for c in captions):
            raise TypeError(f"captions must map filename strings to lists of strings; got "
                            f"{name!r}: {captions!r:.80}")
        data[name] = list(captions)
    files.write_json_atomic(path, data)
    return path


def scores_path(captions_path: str | os.PathLike) -> str:
    """The file beside a matched captions JSON holding the cosines of its captions
    (``captions_top5.json`` -> ``captions_top5.scores.json``)."""
    base = os.fspath(captions_path)
    return (base[:-len(".json")] if base.endswith(".json") else base) + ".scores.json"


def write_scores(path: str | os.PathLike, matches: Matches) -> str:
    """Writes ``filename -> [cosine, ...]`` of each image's matched captions, best first, in the order of
    its captions JSON (4 decimals). Replaced atomically."""
    data = {name: [round(float(v), 4) for v in row[:n]]
            for name, row, n in zip(matches.filenames, matches.scores.tolist(), matches.counts.tolist())}
    files.write_json_atomic(path, data)
    return os.fspath(path)


def read_scores(path: str | os.PathLike) -> dict[str, list[float]]:
    """What ``write_scores`` wrote ({} when the file does not exist: captions matched elsewhere)."""
    if not files.exists(path):
        return {}
    try:
        data = json.loads(files.read_text(path))
    except ValueError as e:
        raise DataError(f"{os.fspath(path)}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DataError(f"{os.fspath(path)}: expected an object of filename -> list of scores")
    return data


def match_to_file(model, tokenize: Callable[[Sequence[str]], np.ndarray], source,
                  descriptions_path: str | os.PathLike, out_path: str | os.PathLike, *, k: int = 5,
                  **kwargs) -> dict[str, list[str]]:
    """Reads the descriptions JSON (class key -> descriptions), matches, writes ``out_path`` (and the
    captions' cosines to ``scores_path(out_path)``).

    The descriptions are read with ``sources.read_descriptions(descriptions_path, source.class_names)``,
    whose ``DataError`` names every key that matches no class and every class without
    descriptions. ``kwargs`` go to ``match_captions``. Returns the matches.
    """
    descriptions_path = os.fspath(descriptions_path)
    if not os.path.isfile(descriptions_path):
        raise FileNotFoundError(f"descriptions file {descriptions_path!r} does not exist (it should be a "
                                f"JSON object of class key -> list of descriptions, e.g. GIST's "
                                f"long_captions.json)")
    class_names = getattr(source, "class_names", None)
    if not class_names:
        raise ValueError(f"{source!r} has no class_names to look descriptions up by")
    descriptions = read_descriptions(descriptions_path, class_names)
    t0 = time.perf_counter()
    found = match_indices(model, tokenize, source, descriptions, k=k, **kwargs)
    matches = found.captions(descriptions)
    if jax.process_index() == 0:
        write_captions(out_path, matches)
        write_scores(scores_path(out_path), found)
    parallel.sync("caption_matching.match_to_file")
    logging.info("caption matching: wrote top-%d captions of %d images to %s (%.1f s)", k, len(matches),
                 os.fspath(out_path), time.perf_counter() - t0)
    return matches


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------

def default_config() -> ml_collections.ConfigDict:
    """Every key the caption-matching job reads: GIST matches with open_clip's LAION ViT-B/32
    (``ViT-B-32/laion2b_s34b_b79k``), top 5 per image."""
    return methods.clip_job_config("caption_matching", "ViT-B-32/laion2b_s34b_b79k", match=dict(k=5, batch_size=64))


def validate(config) -> None:
    config_lib.check_keys(config, default_config(), free=("model.preset",))
    req = config_lib.require
    clip.check_model_config(config.model)
    req(config.match.k >= 1 and config.match.batch_size >= 1, "config.match.k and config.match.batch_size must be >= 1")
    check_data(config.data)


def check_data(data) -> None:
    """Matching reads GIST-format data (metadata CSV, images, class descriptions JSON)."""
    config_lib.require(data.source in ("gist", "synthetic"),
                       f"caption matching reads GIST-format descriptions; config.data.source={data.source!r} is "
                       f"not 'gist' or 'synthetic'")
    config_lib.require(data.source != "gist" or bool(data.descriptions),
                       "config.data.descriptions (class key -> descriptions JSON) must be set for caption matching")
    datasets.validate(data)


def match_split(model_config, data, workdir, out, *, k: int, batch_size: int, seed: int = 0) -> dict:
    """Matches the train split of the data section ``data`` with the CLIP of ``model_config`` and writes
    ``out`` (GIST's captions JSON); returns the run's figures."""
    paths = datasets.paths(data, workdir)
    source = sources.GistSource(paths["metadata"], paths["image_dir"], split="train", check_files=data.check_files)
    model = clip.from_config(model_config, seed=seed)
    tokenize = tokenizer_lib.load(model_config.tokenizer or None)
    t0 = time.perf_counter()
    matches = match_to_file(model, tokenize, source, paths["descriptions"], out, k=k, batch_size=batch_size,
                            workers=data.workers, skip_unreadable=data.skip_unreadable,
                            crop_rounding=data.crop_rounding)
    seconds = time.perf_counter() - t0
    return {"images": len(matches), "skipped_unreadable": len(source) - len(matches), "k": k,
            "seconds": round(seconds, 2), "images_per_s": round(len(matches) / max(seconds, 1e-9), 1),
            "captions": str(out)}


def run(config, workdir: str) -> dict:
    """Writes ``workdir/captions_top{k}.json``; the figures go to ``results.json`` (``run``)."""
    validate(config)
    workdir = pathlib.Path(workdir)
    out = match_split(config.model, config.data, workdir, workdir / f"captions_top{config.match.k}.json",
                      k=config.match.k, batch_size=config.match.batch_size, seed=config.seed)
    if jax.process_index() == 0:
        results.write(workdir, "caption_matching", {}, run=out)
    return {"caption_matching": out}
