"""Caption data for unpaired captioning (CgT-GAN): images of a split with their reference captions,
and text corpora of sentences. Readers only; training lives in ``jaxgist.methods``.

    images = captions.read_karpathy("dataset_coco.json", "/data/coco", splits="test")
    gt = captions.coco_ground_truth(images)          # COCO-format GT for pycocotools / pycocoevalcap
    refs = captions.references(images)               # {image_id: [caption, ...]}
    train = captions.read_karpathy("dataset_coco.json", "/data/coco")          # train + restval
    corpus = captions.corpus_from_karpathy(train, shuffle=True)                # COCO <-> COCO setting
    corpus = captions.read_corpus("Train_GCC-training.tsv", style="gcc", shuffle=True)  # COCO <-> GCC
    demo = captions.synthetic_caption_images(synthetic.write_dataset(...), "val")

Images come from Karpathy's split files (``dataset_coco.json``, ``dataset_flickr30k.json``). What
the reference (github.com/Lihr747/CgtGAN, ``preprocess/``) does, and what this module follows:
- COCO ids are ``cocoid`` (its val/test GT files name images ``COCO_{split}2014_{id:012d}.jpg``).
  Flickr30k ids are the file name's stem as an int (``flickr30k_images/{int(img_id)}.jpg``);
  stems that are not all digits (Flickr8k) stay strings.
- The COCO train set is Karpathy's train + restval: ``coco_train_images.py`` looks each train
  image up in ``train2014/`` and, failing that, in ``val2014/``, which only restval images (cut
  from val2014) need. So ``restval_as_train=True`` by default: restval images get split "train".
- Corpora are shuffled once with ``np.random.seed(1024); np.random.shuffle(sentences)``
  (``shuffle=True`` here gives the same permutation of the same list).
- COCO/Flickr train captions become corpus sentences by ``normalize_coco`` (``coco_train_captions.py``);
  Conceptual Captions by ``gcc_filter`` (``gcc_external_captions.py``), including a seeding quirk
  documented there.

Errors are ``CaptionDataError`` naming the file and the entry or line, several at once where a
file has several problems. Anything skipped is counted in a log line.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import string
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from absl import logging

from jaxgist.data import synthetic
from jaxgist.data.sources import read_metadata

# How many offending items an error message lists before "... (N more)".
_SHOW = 5

KARPATHY_SPLITS = ("train", "restval", "val", "test")
CORPUS_STYLES = ("plain", "coco", "gcc")

# The reference's punctuation tokens: string.punctuation plus PTB tokens.
PUNCTUATION = frozenset(string.punctuation) | {
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}

# gcc_external_captions.py: keep 6 < length < 20 tokens, and 15 < length < 20 with this probability.
GCC_MIN_EXCLUSIVE = 6
GCC_MAX_EXCLUSIVE = 20
GCC_SAMPLED_ABOVE = 15
GCC_KEEP_PROBABILITY = 0.3


class CaptionDataError(ValueError):
    """Malformed or inconsistent caption data (split files, corpora, synthetic datasets)."""


@dataclasses.dataclass(frozen=True)
class CaptionImage:
    """One image and its reference captions.

    ``image_id``: an int (COCO id, Flickr30k number) or a str (other file stems, synthetic file
    names); ``path``: the image file; ``captions``: the raw sentences; ``split``: "train", "val",
    "test" (or "restval" when it is not merged into train).
    """

    image_id: int | str
    path: str
    captions: tuple[str, ...]
    split: str


def _few(items: Sequence[Any], n: int = _SHOW) -> str:
    shown = "; ".join(str(x) for x in list(items)[:n])
    return shown + (f"; ... ({len(items) - n} more)" if len(items) > n else "")


# =============================================================================================
# Karpathy split files
# =============================================================================================

def _load_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CaptionDataError(f"{path}: not valid JSON: {e}") from None


def _requested_splits(path: str, splits: str | Iterable[str], restval_as_train: bool) -> tuple[str, ...]:
    wanted = (splits,) if isinstance(splits, str) else tuple(splits)
    if not wanted:
        raise CaptionDataError(f"{path}: no split requested")
    unknown = [s for s in wanted if s not in KARPATHY_SPLITS]
    if unknown:
        raise CaptionDataError(f"{path}: unknown split(s) {unknown} requested; Karpathy splits are "
                               f"{list(KARPATHY_SPLITS)}")
    if "restval" in wanted and restval_as_train:
        raise CaptionDataError(f"{path}: split 'restval' requested, but restval_as_train=True reads "
                               f"restval images as 'train'; request 'train', or pass restval_as_train=False")
    return tuple(dict.fromkeys(wanted))


def karpathy_image_id(entry: dict[str, Any], is_coco: bool) -> int | str:
    """The reference's id of a Karpathy entry: ``cocoid`` for COCO, else the file name's stem
    (an int when it is all digits, as Flickr30k's are)."""
    if is_coco:
        return entry["cocoid"]
    stem = os.path.splitext(os.path.basename(entry["filename"]))[0]
    return int(stem) if stem.isascii() and stem.isdigit() else stem


def _entry_problems(entry: Any, is_coco: bool) -> list[str]:
    """What is wrong with one entry of ``images`` (empty when nothing is)."""
    if not isinstance(entry, dict):
        return [f"not an object but {type(entry).__name__}"]
    problems = []
    filename = entry.get("filename")
    if not isinstance(filename, str) or not filename.strip():
        problems.append("no 'filename'")
    if "filepath" in entry and not isinstance(entry["filepath"], str):
        problems.append(f"'filepath' is not a string: {entry['filepath']!r}")
    split = entry.get("split")
    if split not in KARPATHY_SPLITS:
        problems.append(f"split {split!r} is none of {list(KARPATHY_SPLITS)}" if "split" in entry else "no 'split'")
    sentences = entry.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        problems.append("no 'sentences'" if sentences is None else "'sentences' is not a non-empty list")
    else:
        bad = [k for k, s in enumerate(sentences)
               if not isinstance(s, dict) or not isinstance(s.get("raw"), str) or not s["raw"].strip()]
        if bad:
            problems.append(f"sentence(s) {bad} have no non-empty 'raw'")
    if is_coco and (not isinstance(entry.get("cocoid"), int) or isinstance(entry.get("cocoid"), bool)):
        problems.append("no integer 'cocoid' in a COCO file")
    return problems


def _entry_name(i: int, entry: Any) -> str:
    name = f"images[{i}]"
    if isinstance(entry, dict) and isinstance(entry.get("filename"), str):
        name += f" ({entry['filename']!r})"
    return name


def read_karpathy(path: str | os.PathLike, image_root: str | os.PathLike, *,
                  splits: str | Iterable[str] = ("train",), restval_as_train: bool = True,
                  check_files: bool = False) -> list[CaptionImage]:
    """The images of ``splits`` in a Karpathy split file, in file order.

    ``path`` is ``dataset_coco.json``, ``dataset_flickr30k.json`` (or Flickr8k's): ``{"dataset":
    ..., "images": [{"filepath" (COCO), "filename", "split", "sentences": [{"raw", ...}],
    "cocoid" (COCO), ...}]}``. ``path`` of an image is ``image_root/filepath/filename`` (COCO:
    ``image_root/val2014/COCO_val2014_...jpg``; Flickr: ``image_root/1000092795.jpg``, so
    ``image_root`` is the folder of the images). ``image_id`` is ``karpathy_image_id``.

    ``restval_as_train`` (default, as the reference): restval images belong to "train" (request
    "train" to get them). ``check_files``: every selected image file must exist (all missing ones
    are reported together). Every entry of the file is checked, selected or not; a requested split
    without images is an error.
    """
    path, image_root = os.fspath(path), os.fspath(image_root)
    wanted = _requested_splits(path, splits, restval_as_train)
    data = _load_json(path)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise CaptionDataError(f"{path}: no 'images' list (not a Karpathy split file)")
    is_coco = data.get("dataset") == "coco"

    problems = []
    for i, entry in enumerate(entries):
        if found := _entry_problems(entry, is_coco):
            problems.append(f"{_entry_name(i, entry)}: {', '.join(found)}")
    if problems:
        raise CaptionDataError(f"{path}: {len(problems)} malformed entr{'y' if len(problems) == 1 else 'ies'}: "
                               f"{_few(problems)}")

    images, first_entry, duplicates = [], {}, []
    for i, entry in enumerate(entries):
        image_id = karpathy_image_id(entry, is_coco)
        if image_id in first_entry:
            duplicates.append(f"id {image_id!r} in images[{first_entry[image_id]}] and images[{i}]")
        first_entry.setdefault(image_id, i)
        split = "train" if entry["split"] == "restval" and restval_as_train else entry["split"]
        images.append(CaptionImage(
            image_id=image_id, path=os.path.join(image_root, entry.get("filepath", ""), entry["filename"]),
            captions=tuple(s["raw"] for s in entry["sentences"]), split=split))
    if duplicates:
        raise CaptionDataError(f"{path}: {len(duplicates)} duplicate image id(s): {_few(duplicates)}")

    counts = collections.Counter(im.split for im in images)
    empty = [s for s in wanted if not counts[s]]
    if empty:
        raise CaptionDataError(f"{path}: requested split(s) {empty} have no images (the file has "
                               f"{dict(counts)}{'' if restval_as_train else ', restval kept apart'})")
    selected = [im for im in images if im.split in wanted]
    if check_files:
        check_image_files(selected, where=f"{path} (image_root {image_root})")
    merged = sum(e["split"] == "restval" for e in entries) if restval_as_train and "train" in wanted else 0
    logging.info("%s: %d images of split(s) %s (%s%s) out of %d, %d captions", path, len(selected),
                 "+".join(wanted), ", ".join(f"{s} {counts[s]}" for s in wanted),
                 f", of which restval {merged}" if merged else "", len(images),
                 sum(len(im.captions) for im in selected))
    return selected


def check_image_files(images: Sequence[CaptionImage], where: str = "images") -> None:
    """Raises CaptionDataError listing the first few missing image files and how many are missing."""
    missing = [im.path for im in images if not os.path.isfile(im.path)]
    if missing:
        raise CaptionDataError(f"{where}: {len(missing)} of {len(images)} image files are missing: {_few(missing)}")


# =============================================================================================
# Ground truth for metrics
# =============================================================================================

def _check_unique_ids(images: Sequence[CaptionImage]) -> None:
    counts = collections.Counter(im.image_id for im in images)
    repeated = [f"{k!r} x{n}" for k, n in counts.items() if n > 1]
    if repeated:
        raise CaptionDataError(f"{len(repeated)} image id(s) occur more than once: {_few(repeated)}")


def references(images: Sequence[CaptionImage]) -> dict[int | str, list[str]]:
    """``{image_id: [caption, ...]}``, in the order of ``images``."""
    _check_unique_ids(images)
    return {im.image_id: list(im.captions) for im in images}


def coco_ground_truth(images: Sequence[CaptionImage]) -> dict[str, Any]:
    """COCO-format caption ground truth (what ``pycocotools.coco.COCO`` loads and the reference's
    ``{val,test}_caption_coco_format.json`` hold): one image per ``image_id``, one annotation per
    caption with ids 1, 2, ... in order."""
    _check_unique_ids(images)
    annotations = [{"image_id": im.image_id, "id": 0, "caption": c} for im in images for c in im.captions]
    for k, ann in enumerate(annotations, 1):
        ann["id"] = k
    return {"info": {}, "licenses": [], "type": "captions",
            "images": [{"id": im.image_id} for im in images], "annotations": annotations}


# =============================================================================================
# Corpora
# =============================================================================================

def normalize_coco(sentence: str) -> str:
    """``coco_train_captions.py``'s normalization: drop one trailing punctuation character, append
    ".", upper-case the first character. Applied to ``sentence`` as given (readers strip
    whitespace first; the reference does not, so "A dog. " becomes "A dog. ." there)."""
    if sentence and sentence[-1] in PUNCTUATION:
        sentence = sentence[:-1]
    sentence += "."
    return str.upper(sentence[0]) + sentence[1:]


def gcc_tokens(text: str) -> list[str]:
    """``gcc_external_captions.py``'s cleaning of one caption into tokens: split on whitespace, drop
    a leading and a trailing punctuation token, cut at the first "." token. (The reference fails on
    a caption that is only punctuation; here it gives no tokens.)"""
    tokens = text.split()
    if tokens and tokens[0] in PUNCTUATION:
        tokens = tokens[1:]
    if tokens and tokens[-1] in PUNCTUATION:
        tokens = tokens[:-1]
    if "." in tokens:
        tokens = tokens[:tokens.index(".")]
    return tokens


def gcc_filter(texts: Iterable[str], *, reference_seeding: bool = True,
               seed: int = 0) -> tuple[list[str], dict[str, int]]:
    """``gcc_external_captions.py``'s filter: clean with ``gcc_tokens``; drop captions of <= 6 or
    >= 20 tokens; keep those of 16..19 tokens with probability 0.3; upper-case the first character
    and append ".". Returns (sentences, drop counts ``too_short``, ``too_long``, ``sampled_out``).

    ``reference_seeding=True`` is the reference's behaviour: it calls ``np.random.seed(0)`` inside
    the loop before each draw, so every draw is the same number (0.5488 for seed 0, >= 0.3) and the
    16..19-token captions are all dropped (for a seed whose first draw is < 0.3, all kept).
    ``reference_seeding=False`` draws once per such caption from one ``RandomState(seed)``, as the
    reference would had it seeded once before the loop. Does not touch numpy's global state.
    """
    rng = np.random.RandomState(seed)
    reference_draw = float(np.random.RandomState(seed).rand())
    kept: list[str] = []
    dropped = {"too_short": 0, "too_long": 0, "sampled_out": 0}
    for text in texts:
        tokens = gcc_tokens(text)
        n = len(tokens)
        if n <= GCC_MIN_EXCLUSIVE:
            dropped["too_short"] += 1
            continue
        if n >= GCC_MAX_EXCLUSIVE:
            dropped["too_long"] += 1
            continue
        if n > GCC_SAMPLED_ABOVE:
            draw = reference_draw if reference_seeding else float(rng.rand())
            if draw >= GCC_KEEP_PROBABILITY:
                dropped["sampled_out"] += 1
                continue
        caption = " ".join(tokens)
        kept.append(str.upper(caption[0]) + caption[1:] + ".")
    return kept, dropped


def shuffle_like_reference(sentences: Sequence[str], seed: int = 1024) -> list[str]:
    """A copy of ``sentences`` in the order ``np.random.seed(seed); np.random.shuffle(list)`` gives
    (numpy's legacy RandomState), without touching numpy's global state."""
    out = list(sentences)
    np.random.RandomState(seed).shuffle(out)
    return out


def _apply_style(texts: Sequence[str], style: str, gcc_reference_seeding: bool,
                 gcc_seed: int) -> tuple[list[str], dict[str, int]]:
    if style == "plain":
        return list(texts), {}
    if style == "coco":
        return [normalize_coco(t) for t in texts], {}
    if style == "gcc":
        return gcc_filter(texts, reference_seeding=gcc_reference_seeding, seed=gcc_seed)
    raise CaptionDataError(f"unknown corpus style {style!r}; styles are {list(CORPUS_STYLES)}")


def _describe_drops(style: str, dropped: dict[str, int]) -> str:
    if not dropped:
        return f"style {style!r} drops nothing"
    parts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in dropped.items())
    return f"style {style!r} dropped {sum(dropped.values())} ({parts})"


def _read_lines(path: str, first_field: bool) -> tuple[list[str], int, int]:
    """Stripped non-blank lines of a UTF-8 file (the text before the first tab if ``first_field``),
    the number of lines, and the number of blank ones."""
    texts, blank, bad, total = [], 0, [], 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            total = number
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append(f"line {number}: {e.reason} at byte {e.start}")
                continue
            if number == 1:
                line = line.removeprefix("\ufeff")
            if first_field:
                line = line.split("\t", 1)[0]
            line = line.strip()
            if line:
                texts.append(line)
            else:
                blank += 1
    if bad:
        raise CaptionDataError(f"{path}: {len(bad)} line(s) are not UTF-8: {_few(bad)}")
    return texts, total, blank


def read_corpus(path: str | os.PathLike, *, style: str = "plain", shuffle: bool = False, seed: int = 1024,
                gcc_reference_seeding: bool = True, gcc_seed: int = 0) -> list[str]:
    """A text corpus: one sentence per line of a UTF-8 file, whitespace-stripped, blank lines
    skipped (and counted in a log line).

    ``style``: "plain" (as read), "coco" (``normalize_coco``), "gcc" (``gcc_filter`` with
    ``gcc_reference_seeding`` and ``gcc_seed``; only the text before the first tab of a line is
    read, so Conceptual Captions' ``Train_GCC-training.tsv`` (caption<TAB>url) is read as it is).
    ``shuffle``: ``shuffle_like_reference(sentences, seed)`` after styling, as the reference does.
    No sentence left is an error.
    """
    path = os.fspath(path)
    if style not in CORPUS_STYLES:
        raise CaptionDataError(f"{path}: unknown corpus style {style!r}; styles are {list(CORPUS_STYLES)}")
    texts, total, blank = _read_lines(path, first_field=style == "gcc")
    sentences, dropped = _apply_style(texts, style, gcc_reference_seeding, gcc_seed)
    drops = _describe_drops(style, dropped)
    if not sentences:
        raise CaptionDataError(f"{path}: empty corpus: {total} lines read, {blank} blank, {drops}")
    logging.info("%s: %d sentences from %d lines (%d blank lines skipped; %s)", path, len(sentences), total,
                 blank, drops)
    return shuffle_like_reference(sentences, seed) if shuffle else sentences


def corpus_from_karpathy(images: Sequence[CaptionImage], *, style: str = "coco", shuffle: bool = False,
                         seed: int = 1024, gcc_reference_seeding: bool = True, gcc_seed: int = 0) -> list[str]:
    """The captions of training images as a corpus (the COCO <-> COCO setting: the reference's
    corpus is the train captions, ``normalize_coco``-ed and shuffled with seed 1024).

    Captions are whitespace-stripped and styled as in ``read_corpus``, image by image in order.
    Every image must have split "train", so no val/test caption leaks into the corpus. The
    reference reads its captions in another file's order, so a shuffled corpus holds the same
    sentences as the reference's but not in the same order.
    """
    not_train = collections.Counter(im.split for im in images if im.split != "train")
    if not_train:
        raise CaptionDataError(f"corpus_from_karpathy: a corpus is made of training captions only, got "
                               f"non-train images {dict(not_train)}; select them with splits='train'")
    texts = [c.strip() for im in images for c in im.captions]
    blank = sum(not t for t in texts)
    texts = [t for t in texts if t]
    sentences, dropped = _apply_style(texts, style, gcc_reference_seeding, gcc_seed)
    drops = _describe_drops(style, dropped)
    if not sentences:
        raise CaptionDataError(f"corpus_from_karpathy: empty corpus: {len(images)} images, "
                               f"{len(texts) + blank} captions, {blank} blank, {drops}")
    logging.info("corpus_from_karpathy: %d sentences from the captions of %d images (%d blank skipped; %s)",
                 len(sentences), len(images), blank, drops)
    return shuffle_like_reference(sentences, seed) if shuffle else sentences


# =============================================================================================
# Synthetic captioning set (the demo)
# =============================================================================================

def _synthetic_species(params: dict[str, Any]) -> list[synthetic.Species]:
    first = int(params.get("first_class", 0))
    return synthetic.species_list(first + int(params["num_classes"]), int(params.get("species_per_genus", 4)))[first:]


def synthetic_caption_images(dataset: str | os.PathLike | synthetic.SyntheticDataset,
                             split: str) -> list[CaptionImage]:
    """The images of one split of a dataset written by ``synthetic.write_dataset``, with captions
    naming what was drawn; ``image_id`` is the file name relative to ``images/``.

    Train captions are the dataset's ``captions_top{n}.json``. The generator writes captions for
    train images only, so val/test captions (n per image, for references) are made here with
    ``synthetic.image_captions`` from each image's recorded scene (``attributes.json``), with a
    generator seeded by the dataset seed and the file name: deterministic, and they describe the
    image as the train captions do.
    """
    root = dataset.root if isinstance(dataset, synthetic.SyntheticDataset) else os.fspath(dataset)
    manifest_path = os.path.join(root, synthetic.MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CaptionDataError(f"{root}: no {synthetic.MANIFEST}: not a (complete) synthetic dataset")
    if split not in synthetic.SPLIT_NAMES:
        raise CaptionDataError(f"{root}: unknown split {split!r}; synthetic splits are {list(synthetic.SPLIT_NAMES)}")
    params = _load_json(manifest_path)["params"]
    num_captions = int(params["num_captions"])
    species = _synthetic_species(params)
    rows = [r for r in read_metadata(os.path.join(root, "metadata.csv")) if r.split == split]
    if not rows:
        raise CaptionDataError(f"{root}/metadata.csv: split {split!r} has no images")
    wrong = [f"line {r.line}: label {r.label} species {r.species!r}" for r in rows
             if not 0 <= r.label < len(species) or species[r.label].name != r.species]
    if wrong:
        raise CaptionDataError(f"{root}/metadata.csv: {len(wrong)} row(s) do not match the manifest's species: "
                               f"{_few(wrong)}")

    if split == "train":
        captions_path = os.path.join(root, f"captions_top{num_captions}.json")
        written = _load_json(captions_path)
        missing = [r.filename for r in rows if not written.get(r.filename)]
        if missing:
            raise CaptionDataError(f"{captions_path}: {len(missing)} train image(s) have no captions: {_few(missing)}")
        captions = {r.filename: tuple(written[r.filename]) for r in rows}
    else:
        attributes_path = os.path.join(root, "attributes.json")
        scenes = _load_json(attributes_path)["images"]
        missing = [r.filename for r in rows if r.filename not in scenes]
        if missing:
            raise CaptionDataError(f"{attributes_path}: {len(missing)} image(s) have no scene: {_few(missing)}")
        captions = {r.filename: tuple(synthetic.image_captions(
            species[r.label], scenes[r.filename], num_captions,
            np.random.default_rng([int(params["seed"]), *r.filename.encode()]))) for r in rows}

    images = [CaptionImage(image_id=r.filename, path=os.path.join(root, "images", *r.filename.split("/")),
                           captions=captions[r.filename], split=split) for r in rows]
    logging.info("%s: %d synthetic %s images with %d captions each", root, len(images), split, num_captions)
    return images
