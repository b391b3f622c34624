"""Random-access data sources: GIST-format metadata (CSV + image directory + matched captions) and
image folders (one folder per class), plus the reader of class descriptions.

A source has ``__len__`` and ``__getitem__(i) -> dict`` and so can be handed to
``grain.MapDataset.source(...)`` as it is. Records carry file paths, not pixels (decoding is
``jaxgist.data.images``' job):

    {"index": int,         # position in this source (0 .. len - 1)
     "filename": str,      # as written in the metadata (may contain subdirectories)
     "path": str,          # image_dir / filename
     "label": int,
     "species": str,       # the class name
     "split": str,         # "train", "val", "test", ...
     "captions": [str]}    # only when a captions file is given

Everything is checked when a source is built, and each problem is reported with the file and the
1-based CSV line (or JSON key) it comes from, so a bad file fails at once rather than mid-training.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from absl import logging

REQUIRED_COLUMNS = ("filename", "label", "species", "split")
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# How many offending items an error message lists before "...".
_SHOW = 5


class DataError(ValueError):
    """Malformed or inconsistent dataset files (metadata, captions, descriptions, folders)."""


def _few(items: Sequence[Any], n: int = _SHOW) -> str:
    shown = ", ".join(repr(x) if isinstance(x, str) else str(x) for x in list(items)[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------
# Metadata CSV
# ---------------------------------------------------------------------------------------------

class MetadataRow(NamedTuple):
    """One row of a GIST metadata CSV; ``line`` is the 1-based line of the file the row starts on."""

    filename: str
    label: int
    species: str
    split: str
    line: int


def read_metadata(path: str | os.PathLike) -> list[MetadataRow]:
    """Rows of a GIST metadata CSV, in file order.

    Required columns: ``filename``, ``label``, ``species``, ``split``, in any order; other columns
    (IDs, pandas' unnamed index columns, dataset-specific fields) are ignored. Labels must be
    non-negative integers; filenames non-empty, relative and unique.
    """
    path = os.fspath(path)
    rows: list[MetadataRow] = []
    seen: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: metadata file is empty (no header row)") from None
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path}: metadata is missing required column(s) {missing}; "
                            f"columns found: {header}")
        col = {c: header.index(c) for c in REQUIRED_COLUMNS}
        width = max(col.values()) + 1
        while True:
            line = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise DataError(f"{path}, line {line}: unreadable CSV row: {e}") from None
            if not fields or all(not x.strip() for x in fields):
                continue  # blank line
            if len(fields) < width:
                raise DataError(f"{path}, line {line}: row has {len(fields)} field(s), the header "
                                f"has {len(header)}")
            filename = fields[col["filename"]].strip()
            species = fields[col["species"]].strip()
            split = fields[col["split"]].strip()
            raw_label = fields[col["label"]].strip()
            try:
                label = int(raw_label)
            except ValueError:
                raise DataError(f"{path}, line {line}: label {raw_label!r} is not an integer") from None
            if label < 0:
                raise DataError(f"{path}, line {line}: label {label} is negative")
            if not filename:
                raise DataError(f"{path}, line {line}: empty filename")
            if os.path.isabs(filename):
                raise DataError(f"{path}, line {line}: filename {filename!r} is absolute; filenames "
                                f"must be relative to the image directory")
            if not species:
                raise DataError(f"{path}, line {line}: empty species for label {label}")
            if not split:
                raise DataError(f"{path}, line {line}: empty split")
            if filename in seen:
                raise DataError(f"{path}, line {line}: filename {filename!r} already appears on "
                                f"line {seen[filename]}")
            seen[filename] = line
            rows.append(MetadataRow(filename, label, species, split, line))
    if not rows:
        raise DataError(f"{path}: metadata has a header but no rows")
    return rows


def class_names_from_metadata(rows: Sequence[MetadataRow], path: str, num_classes: int | None = None) -> list[str]:
    """Species by label over all ``rows``; checks that labels and species names agree one to one
    and that every label in ``[0, num_classes)`` has a row (``num_classes`` defaults to max + 1)."""
    species_of: dict[int, tuple[str, int]] = {}
    conflicts = []
    for r in rows:
        if r.label not in species_of:
            species_of[r.label] = (r.species, r.line)
        elif species_of[r.label][0] != r.species:
            first, first_line = species_of[r.label]
            conflicts.append(f"label {r.label} is {first!r} on line {first_line} but {r.species!r} "
                             f"on line {r.line}")
    if conflicts:
        raise DataError(f"{path}: {len(conflicts)} row(s) give a label a second species name: "
                        + "; ".join(conflicts[:_SHOW]) + (" ..." if len(conflicts) > _SHOW else ""))
    labels_of: dict[str, list[int]] = collections.defaultdict(list)
    for label, (name, _) in species_of.items():
        labels_of[name].append(label)
    shared = {n: sorted(ls) for n, ls in labels_of.items() if len(ls) > 1}
    if shared:
        raise DataError(f"{path}: species name(s) used by more than one label: "
                        + "; ".join(f"{n!r} -> labels {ls}" for n, ls in list(shared.items())[:_SHOW]))
    top = max(species_of)
    if num_classes is None:
        num_classes = top + 1
    elif top >= num_classes:
        bad = next(r for r in rows if r.label >= num_classes)
        raise DataError(f"{path}, line {bad.line}: label {bad.label} is outside [0, {num_classes}) "
                        f"(num_classes={num_classes})")
    absent = [i for i in range(num_classes) if i not in species_of]
    if absent:
        top_line = species_of[top][1]
        raise DataError(f"{path}: {len(absent)} of {num_classes} labels have no row, so their class "
                        f"names are unknown: {_few(absent)} (the highest label, {top} on line {top_line}, sets "
                        f"the number of classes: is it a typo?)")
    return [species_of[i][0] for i in range(num_classes)]


# ---------------------------------------------------------------------------------------------
# Captions and descriptions (JSON)
# ---------------------------------------------------------------------------------------------

def _read_json_object(path: str, what: str) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: {what} file is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: {what} file must be a JSON object, found a {type(data).__name__}")
    return data


def _check_string_lists(data: Mapping[str, Any], path: str, what: str, value_name: str) -> None:
    for key, value in data.items():
        if not isinstance(value, list):
            raise DataError(f"{path}: {what} key {key!r} maps to a {type(value).__name__}, expected a "
                            f"list of {value_name} strings")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise DataError(f"{path}: {what} key {key!r} item {i} is a {type(item).__name__} "
                                f"({item!r:.60}), expected a string")


def read_image_descriptions(path: str | os.PathLike) -> dict[str, str]:
    """An image descriptions JSON: ``{filename: description}`` (one text per image, any split)."""
    path = os.fspath(path)
    data = _read_json_object(path, "image descriptions")
    bad = [k for k, v in data.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise DataError(f"{path}: {len(bad)} key(s) do not map to a non-empty description string, e.g. {bad[:3]}")
    return data


def read_captions(path: str | os.PathLike) -> dict[str, list[str]]:
    """A captions JSON: ``{filename: [caption, ...]}`` (matched captions, best first)."""
    path = os.fspath(path)
    data = _read_json_object(path, "captions")
    _check_string_lists(data, path, "captions", "caption")
    return data


def class_key(name: str) -> str:
    """The key under which a class's descriptions are looked up.

    Unicode NFKC, lowercase, every run of characters that are not letters or digits replaced by a
    single "-", and "-" stripped from both ends. So CUB's description keys
    ("black-footed-albatross\\n") and its species names ("Black footed Albatross") both become
    "black-footed-albatross", and Fitzpatrick's "drug induced pigmentary changes" becomes
    "drug-induced-pigmentary-changes".
    """
    return re.sub(r"[\W_]+", "-", unicodedata.normalize("NFKC", name).lower()).strip("-")


def read_descriptions(path: str | os.PathLike, class_names: Sequence[str]) -> list[list[str]]:
    """Class descriptions by label: ``result[label]`` is the list of description strings for
    ``class_names[label]``.

    The JSON maps class keys to lists of strings. Keys and class names are matched after
    ``class_key`` normalization. It is an error (listing every offender at once) for a key to
    match no class, for two keys (or two class names) to normalize to the same key, for a class to
    have no descriptions, or for a key to map to an empty list.
    """
    path = os.fspath(path)
    data = _read_json_object(path, "descriptions")
    _check_string_lists(data, path, "descriptions", "description")
    label_of: dict[str, int] = {}
    for label, name in enumerate(class_names):
        k = class_key(name)
        if k in label_of:
            raise DataError(f"class names {class_names[label_of[k]]!r} (label {label_of[k]}) and {name!r} "
                            f"(label {label}) both normalize to {k!r}")
        label_of[k] = label
    result: list[list[str] | None] = [None] * len(class_names)
    source_key: dict[int, str] = {}
    unknown, empty, duplicate = [], [], []
    for key, descriptions in data.items():
        label = label_of.get(class_key(key))
        if label is None:
            unknown.append(key)
        elif label in source_key:
            duplicate.append(f"{source_key[label]!r} and {key!r} -> {class_names[label]!r}")
        elif not descriptions:
            empty.append(key)
        else:
            source_key[label] = key
            result[label] = list(descriptions)
    described = {label_of[class_key(k)] for k in data if class_key(k) in label_of}
    missing = [f"{i}: {name!r}" for i, name in enumerate(class_names) if i not in described]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} key(s) match no class name: {_few(unknown)}")
    if duplicate:
        problems.append(f"{len(duplicate)} key(s) name a class already described: {'; '.join(duplicate[:_SHOW])}")
    if empty:
        problems.append(f"{len(empty)} key(s) have an empty list: {_few(empty)}")
    if missing:
        problems.append(f"{len(missing)} label(s) have no descriptions: {', '.join(missing[:_SHOW])}"
                        + (" ..." if len(missing) > _SHOW else ""))
    if problems:
        raise DataError(f"{path}: descriptions do not match the {len(class_names)} classes (keys are "
                        f"compared after class_key normalization): " + "; ".join(problems))
    return result  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

class _RecordSource:
    """Shared random access over a list of records (plain, picklable data)."""

    _records: list[dict[str, Any]]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        n = len(self._records)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for a source of {n} records")
        record = dict(self._records[index % n])
        if "captions" in record:
            record["captions"] = list(record["captions"])
        return record

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> np.ndarray:
        """int32 [len(self)]: the label of each record."""
        return np.fromiter((r["label"] for r in self._records), np.int32, len(self._records))

    @property
    def filenames(self) -> list[str]:
        return [r["filename"] for r in self._records]

    @property
    def paths(self) -> list[str]:
        return [r["path"] for r in self._records]


def check_caption_options(captions, num_captions: int | None, missing_captions: str) -> None:
    """The caption arguments every source with captions takes, checked alike."""
    if missing_captions not in ("error", "skip"):
        raise ValueError(f"missing_captions must be 'error' or 'skip', got {missing_captions!r}")
    if num_captions is not None and num_captions < 1:
        raise ValueError(f"num_captions must be >= 1 or None, got {num_captions}")
    if num_captions is not None and captions is None:
        raise ValueError("num_captions is set but no captions file is given")


def _check_files_exist(paths: Iterable[str], where: str) -> None:
    paths = list(paths)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{where}: {len(missing)} of {len(paths)} image file(s) do not exist, "
                                f"e.g. {_few(missing)}")


class GistSource(_RecordSource):
    """Records of a GIST-format dataset: metadata CSV, image directory, optional matched captions.

    Args:
      metadata: the metadata CSV (columns ``filename``, ``label``, ``species``, ``split``; others
        ignored). Few-shot variants (``metadata_5shot.csv``) work the same way.
      image_dir: the directory that ``filename`` is relative to.
      split: None (every row), one split name, or a list of them.
      captions: a JSON of ``filename -> [caption, ...]``. Every selected ``train`` row must have
        captions (see ``missing_captions``); rows of other splits get theirs when present and an
        empty list otherwise. Captions of files not in the selection are ignored (counted in
        ``unused_captions``).
      num_captions: keep the first ``num_captions`` captions of each file; a file with captions
        but fewer than that is an error. None keeps them all.
      num_classes: the size of the label space; default max label + 1. Class names come from all
        rows of the metadata, before split selection, so a few-shot subset keeps the full label
        space.
      check_files: verify that every selected image file exists.
      missing_captions: "error" (default): a selected train row without captions is an error;
        "skip": such rows are dropped, logged and listed in ``skipped``.

    Attributes: ``class_names``, ``num_classes``, ``labels`` (int32 per record), ``splits`` (rows
    per split in the whole metadata file), ``skipped`` (filenames dropped for lack of captions),
    ``unused_captions`` (caption keys that match no selected row).
    """

    def __init__(self, metadata: str | os.PathLike, image_dir: str | os.PathLike,
                 split: str | Sequence[str] | None = None, captions: str | os.PathLike | None = None,
                 num_captions: int | None = None, num_classes: int | None = None,
                 check_files: bool = False, missing_captions: str = "error"):
        self.metadata = os.fspath(metadata)
        self.image_dir = os.fspath(image_dir)
        check_caption_options(captions, num_captions, missing_captions)

        rows = read_metadata(self.metadata)
        self.class_names = class_names_from_metadata(rows, self.metadata, num_classes)
        self.splits = dict(sorted(collections.Counter(r.split for r in rows).items()))
        if split is None:
            self.split: tuple[str, ...] | None = None
            selected = rows
        else:
            self.split = (split,) if isinstance(split, str) else tuple(split)
            if not self.split:
                raise ValueError("split is an empty list")
            empty = [s for s in self.split if s not in self.splits]
            if empty:
                raise DataError(f"{self.metadata}: split(s) {empty} have no rows; rows per split: "
                                f"{self.splits}")
            wanted = set(self.split)
            selected = [r for r in rows if r.split in wanted]

        self.captions_file = None if captions is None else os.fspath(captions)
        self.skipped: list[str] = []
        self.unused_captions = 0
        caption_map = None
        if self.captions_file is not None:
            caption_map = read_captions(self.captions_file)
            selected = self._join_captions(selected, caption_map, num_captions, missing_captions)
            names = {r.filename for r in selected}
            self.unused_captions = sum(1 for k in caption_map if k not in names)
        if not selected:
            raise DataError(f"{self.metadata}: no rows left for split {self.split} after dropping "
                            f"{len(self.skipped)} without captions")

        self._records = []
        for i, r in enumerate(selected):
            record = {"index": i, "filename": r.filename, "path": os.path.join(self.image_dir, r.filename),
                      "label": r.label, "species": r.species, "split": r.split}
            if caption_map is not None:
                record["captions"] = list(caption_map.get(r.filename, [])[:num_captions])
            self._records.append(record)
        if check_files:
            _check_files_exist((r["path"] for r in self._records),
                               f"{self.metadata} (image_dir {self.image_dir})")

    def _join_captions(self, rows: list[MetadataRow], caption_map: Mapping[str, list[str]],
                       num_captions: int | None, policy: str) -> list[MetadataRow]:
        where = f"{self.captions_file} (for {self.metadata})"
        missing = [r for r in rows if r.split == "train" and r.filename not in caption_map]
        if missing and policy == "error":
            example_key = next(iter(caption_map), None)
            raise DataError(f"{where}: {len(missing)} train file(s) have no captions, e.g. "
                            + ", ".join(f"{r.filename!r} (line {r.line})" for r in missing[:_SHOW])
                            + (f"; the captions file's keys look like {example_key!r}" if example_key else "")
                            + "; to drop them set --config.data.missing_captions=skip (missing_captions='skip' in Python)")
        if num_captions is not None:
            short = [(r, len(caption_map[r.filename])) for r in rows
                     if r.filename in caption_map and len(caption_map[r.filename]) < num_captions]
            if short:
                raise DataError(f"{where}: {len(short)} file(s) have fewer than num_captions={num_captions} "
                                f"captions, e.g. " + ", ".join(f"{r.filename!r} has {n}" for r, n in short[:_SHOW]))
        if missing:
            self.skipped = [r.filename for r in missing]
            logging.warning("%s: skipping %d of %d train file(s) that have no captions, e.g. %s",
                            where, len(missing), sum(r.split == "train" for r in rows), _few(self.skipped))
            dropped = set(self.skipped)
            rows = [r for r in rows if r.filename not in dropped]
        return rows

    def __repr__(self) -> str:
        return (f"GistSource({self.metadata!r}, split={self.split}, {len(self)} records, "
                f"{self.num_classes} classes)")


class ImageFolderSource(_RecordSource):
    """Records of an image folder with one subdirectory per class: ``root/<class>/**/<image>``.

    Class names are the subdirectory names, sorted; labels are their positions. Images are the
    files (found recursively, sorted) whose extension is in ``extensions`` (case-insensitive).
    Hidden entries (names starting with ".") and files directly in ``root`` are ignored. An empty
    root or a class folder without images is an error. ``split``, when given, is put in every
    record.
    """

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 split: str | None = None):
        self.root = os.fspath(root)
        self.split = split
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder root {self.root} does not exist or is not a directory")
        self.class_names = sorted(e.name for e in os.scandir(self.root)
                                  if e.is_dir() and not e.name.startswith("."))
        if not self.class_names:
            raise DataError(f"{self.root}: no class folders (expected one subdirectory per class)")
        self._records = []
        empty = []
        for label, name in enumerate(self.class_names):
            files = self._images(os.path.join(self.root, name))
            if not files:
                empty.append(name)
            for rel in files:
                filename = f"{name}/{rel}"
                record = {"index": len(self._records), "filename": filename,
                          "path": os.path.join(self.root, name, *rel.split("/")),
                          "label": label, "species": name}
                if split is not None:
                    record["split"] = split
                self._records.append(record)
        if empty:
            raise DataError(f"{self.root}: {len(empty)} of {len(self.class_names)} class folder(s) have "
                            f"no images with extensions {self.extensions}: {_few(empty)}")
        self.splits = {split: len(self._records)} if split is not None else {}

    def _images(self, folder: str) -> list[str]:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, folder)
            for fn in sorted(filenames):
                if not fn.startswith(".") and os.path.splitext(fn)[1].lower() in self.extensions:
                    found.append(fn if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{fn}")
        return sorted(found)

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.root!r}, {len(self)} records, {self.num_classes} classes)"
