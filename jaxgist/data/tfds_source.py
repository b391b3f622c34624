"""TFDS data sources: fine-grained classification datasets of TensorFlow Datasets read at random from
their prepared array_record files with ``tfds.data_source`` (TensorFlow is not needed).

    src = tfds_source.TfdsSource("caltech_birds2011", "train", data_dir=DIR, captions=None)
    record = src[0]   # jaxgist.data.sources' record + "image_bytes" (the file's JPEG/PNG bytes)

Record fields as in ``jaxgist.data.sources``: ``filename`` the image's name in the original release
(see ``DATASETS``), ``path`` ``"tfds://<dataset>/<split>/<filename>"`` (a name, not a file), ``label``
the TFDS label, ``species`` its ``readable_class_name``, ``split`` "train", "val" (TFDS "validation") or
"test", ``captions`` only when a captions file is given. Labels and file names are read once, when a
source is built; image bytes, undecoded (TFDS's ``SkipDecoding``), only when a record is asked for, and
``jaxgist.data.pipeline`` decodes them with ``images.decode_image`` like every other image. Supported:
the keys of ``DATASETS``, prepared in array_record format first, e.g. where network is available:

    tfds build caltech_birds2011 --data_dir=DIR --file_format=array_record
"""

from __future__ import annotations

import collections
import dataclasses
import os
import posixpath
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from jaxgist.data.sources import DataError, _few, _RecordSource, check_caption_options, read_captions

# The 200 class folder names of CUB-200-2011 (its classes.txt, without the "001." numbers), in label
# order. TFDS's caltech_birds2011 label feature has only a class count, so its names are "0".."199".
_CUB_CLASSES = tuple("""
    Black_footed_Albatross Laysan_Albatross Sooty_Albatross Groove_billed_Ani Crested_Auklet
    Least_Auklet Parakeet_Auklet Rhinoceros_Auklet Brewer_Blackbird Red_winged_Blackbird
    Rusty_Blackbird Yellow_headed_Blackbird Bobolink Indigo_Bunting Lazuli_Bunting Painted_Bunting
    Cardinal Spotted_Catbird Gray_Catbird Yellow_breasted_Chat Eastern_Towhee Chuck_will_Widow
    Brandt_Cormorant Red_faced_Cormorant Pelagic_Cormorant Bronzed_Cowbird Shiny_Cowbird
    Brown_Creeper American_Crow Fish_Crow Black_billed_Cuckoo Mangrove_Cuckoo Yellow_billed_Cuckoo
    Gray_crowned_Rosy_Finch Purple_Finch Northern_Flicker Acadian_Flycatcher
    Great_Crested_Flycatcher Least_Flycatcher Olive_sided_Flycatcher Scissor_tailed_Flycatcher
    Vermilion_Flycatcher Yellow_bellied_Flycatcher Frigatebird Northern_Fulmar Gadwall
    American_Goldfinch European_Goldfinch Boat_tailed_Grackle Eared_Grebe Horned_Grebe
    Pied_billed_Grebe Western_Grebe Blue_Grosbeak Evening_Grosbeak Pine_Grosbeak
    Rose_breasted_Grosbeak Pigeon_Guillemot California_Gull Glaucous_winged_Gull Heermann_Gull
    Herring_Gull Ivory_Gull Ring_billed_Gull Slaty_backed_Gull Western_Gull Anna_Hummingbird
    Ruby_throated_Hummingbird Rufous_Hummingbird Green_Violetear Long_tailed_Jaeger Pomarine_Jaeger
    Blue_Jay Florida_Jay Green_Jay Dark_eyed_Junco Tropical_Kingbird Gray_Kingbird Belted_Kingfisher
    Green_Kingfisher Pied_Kingfisher Ringed_Kingfisher White_breasted_Kingfisher
    Red_legged_Kittiwake Horned_Lark Pacific_Loon Mallard Western_Meadowlark Hooded_Merganser
    Red_breasted_Merganser Mockingbird Nighthawk Clark_Nutcracker White_breasted_Nuthatch
    Baltimore_Oriole Hooded_Oriole Orchard_Oriole Scott_Oriole Ovenbird Brown_Pelican White_Pelican
    Western_Wood_Pewee Sayornis American_Pipit Whip_poor_Will Horned_Puffin Common_Raven
    White_necked_Raven American_Redstart Geococcyx Loggerhead_Shrike Great_Grey_Shrike Baird_Sparrow
    Black_throated_Sparrow Brewer_Sparrow Chipping_Sparrow Clay_colored_Sparrow House_Sparrow
    Field_Sparrow Fox_Sparrow Grasshopper_Sparrow Harris_Sparrow Henslow_Sparrow Le_Conte_Sparrow
    Lincoln_Sparrow Nelson_Sharp_tailed_Sparrow Savannah_Sparrow Seaside_Sparrow Song_Sparrow
    Tree_Sparrow Vesper_Sparrow White_crowned_Sparrow White_throated_Sparrow Cape_Glossy_Starling
    Bank_Swallow Barn_Swallow Cliff_Swallow Tree_Swallow Scarlet_Tanager Summer_Tanager Artic_Tern
    Black_Tern Caspian_Tern Common_Tern Elegant_Tern Forsters_Tern Least_Tern Green_tailed_Towhee
    Brown_Thrasher Sage_Thrasher Black_capped_Vireo Blue_headed_Vireo Philadelphia_Vireo
    Red_eyed_Vireo Warbling_Vireo White_eyed_Vireo Yellow_throated_Vireo Bay_breasted_Warbler
    Black_and_white_Warbler Black_throated_Blue_Warbler Blue_winged_Warbler Canada_Warbler
    Cape_May_Warbler Cerulean_Warbler Chestnut_sided_Warbler Golden_winged_Warbler Hooded_Warbler
    Kentucky_Warbler Magnolia_Warbler Mourning_Warbler Myrtle_Warbler Nashville_Warbler
    Orange_crowned_Warbler Palm_Warbler Pine_Warbler Prairie_Warbler Prothonotary_Warbler
    Swainson_Warbler Tennessee_Warbler Wilson_Warbler Worm_eating_Warbler Yellow_Warbler
    Northern_Waterthrush Louisiana_Waterthrush Bohemian_Waxwing Cedar_Waxwing
    American_Three_toed_Woodpecker Pileated_Woodpecker Red_bellied_Woodpecker
    Red_cockaded_Woodpecker Red_headed_Woodpecker Downy_Woodpecker Bewick_Wren Cactus_Wren
    Carolina_Wren House_Wren Marsh_Wren Rock_Wren Winter_Wren Common_Yellowthroat
""".split())

_VAL_SPLITS = {"validation": "val"}  # TFDS split name -> the record's "split"
_SCAN_CHUNK = 512  # examples read per batch when labels and file names are scanned
_LOG_SECONDS = 10.0  # the scan logs its progress at most this often


@dataclasses.dataclass(frozen=True)
class TfdsLayout:
    """Where a TFDS dataset keeps what a record needs, and how its names become record fields.

    Attributes:
      image: the ``tfds.features.Image`` feature with the image (read undecoded).
      label: the ``tfds.features.ClassLabel`` feature.
      file_name: the ``Text`` feature naming each image's file, or None. Without it (or when a
        prepared version lacks it) records are named "<split>/<position>" and captions cannot be
        joined.
      keep_parts: keep only the last this many "/"-separated parts of the file name (drops the
        top folders of the archive the dataset was built from); None keeps it whole.
      file_name_format: the record's filename, made from the (shortened) file name ``{name}`` and
        the TFDS split ``{split}``.
      class_names: the raw class names, for a label feature that has only a class count.
      renames: corrections of raw class names, applied before ``readable_class_name``.
    """

    image: str = "image"
    label: str = "label"
    file_name: str | None = None
    keep_parts: int | None = None
    file_name_format: str = "{name}"
    class_names: tuple[str, ...] | None = None
    renames: Mapping[str, str] = dataclasses.field(default_factory=dict)


DATASETS: dict[str, TfdsLayout] = {
    # "image/filename" is the path inside CUB_200_2011.tgz,
    # "CUB_200_2011/images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"; its last
    # two parts are the name used by CUB's images.txt and GIST's metadata.
    "caltech_birds2011": TfdsLayout(file_name="image/filename", keep_parts=2, class_names=_CUB_CLASSES),
    # "file_name" is the name in 102flowers.tgz, "image_00190.jpg", as in GIST's metadata. TFDS
    # writes one class as "pink-yellow dahlia?".
    "oxford_flowers102": TfdsLayout(file_name="file_name",
                                    renames={"pink-yellow dahlia?": "pink-yellow dahlia"}),
    # "id" is the file name without ".jpg" ("00001", versions >= 2.1.0). Train and test images reuse
    # the same numbers, so the filename keeps the release's folder: "cars_train/00001.jpg".
    "cars196": TfdsLayout(file_name="id", file_name_format="cars_{split}/{name}.jpg"),
    # "file_name" is the archive's name, "n01440764_10026.JPEG" (train) or "ILSVRC2012_val_00000001.JPEG"
    # (validation); class names are the WordNet ids ("n01440764").
    "imagenet2012": TfdsLayout(file_name="file_name"),
}


def readable_class_name(name: str) -> str:
    """A class name as people write it: a leading number with its dot dropped, underscores read as
    spaces, runs of whitespace collapsed. "001.Black_footed_Albatross" -> "Black footed Albatross"
    (exactly GIST's species names for CUB); "pink primrose" and "AM General Hummer SUV 2000" stay
    as they are."""
    name = re.sub(r"^\s*\d+\.", "", name)
    return " ".join(name.replace("_", " ").split())


def match_caption_keys(filenames: Sequence[str], keys: Iterable[str], where: str) -> list[str | None]:
    """The captions key of each file name, or None where it has none.

    A file name matches the key equal to it; failing that, the one key with the same basename (last
    "/"-separated part), so "Black_Footed_Albatross_0046_18.jpg" and
    "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg" find each other. It is an error
    (listing the cases, with ``where`` in the message) for a basename needed this way to belong to
    more than one key, or for a key to be matched by more than one file name.
    """
    keys = list(keys)
    exact = set(keys)
    by_base: dict[str, list[str]] = collections.defaultdict(list)
    for key in keys:
        by_base[posixpath.basename(key)].append(key)
    matched: list[str | None] = []
    ambiguous = []
    for name in filenames:
        if name in exact:
            matched.append(name)
            continue
        candidates = by_base.get(posixpath.basename(name), [])
        matched.append(candidates[0] if len(candidates) == 1 else None)
        if len(candidates) > 1:
            ambiguous.append(f"{name!r} -> {_few(candidates, 3)}")
    claimed: dict[str, list[str]] = collections.defaultdict(list)
    for name, key in zip(filenames, matched):
        if key is not None:
            claimed[key].append(name)
    shared = [f"{key!r} <- {_few(names, 3)}" for key, names in claimed.items() if len(names) > 1]
    problems = []
    if ambiguous:
        problems.append(f"{len(ambiguous)} file name(s) match no key exactly and share their basename "
                        f"with several keys: " + "; ".join(ambiguous[:5]))
    if shared:
        problems.append(f"{len(shared)} key(s) are matched by several file names: " + "; ".join(shared[:5]))
    if problems:
        raise DataError(f"{where}: captions cannot be joined unambiguously by file name: "
                        + "; ".join(problems))
    return matched


def _base_name(name: str) -> str:
    """The registered dataset name in "cars196:2.1.0" or "name/config:1.0.0"."""
    return name.split(":")[0].split("/")[0].strip()


def _base_split(spec: str) -> str:
    """The split's name without a slice: "train" for "train[:10%]"."""
    return spec.split("[")[0].strip()


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _image_bytes(value: Any, path: str) -> bytes:
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if not isinstance(value, bytes):
        raise DataError(f"{path}: expected encoded image bytes, the data source gave a "
                        f"{type(value).__name__} (is the image feature being decoded?)")
    return bytes(value)


def _prepared_builder(name: str, data_dir: str | None):
    """The TFDS builder of a dataset prepared in ``data_dir`` (TFDS's default directory when None)."""
    base = _base_name(name)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (AssertionError, ValueError) as e:  # e.g. a version TFDS cannot read
        raise ValueError(f"TFDS cannot open dataset {name!r}: {e}") from e
    if builder.is_prepared():
        return builder
    root = os.fspath(builder.data_dir_root)
    folder = os.path.join(root, base)
    present = []
    if os.path.isdir(folder):
        present = sorted(d.name for d in os.scandir(folder) if re.fullmatch(r"\d+\.\d+\.\d+", d.name))
    found = f" ({folder} holds version(s) {present})" if present else ""
    raise FileNotFoundError(
        f"TFDS dataset {name!r} version {builder.version} is not prepared in data_dir {root}: no dataset "
        f"at {builder.data_dir}{found}. Prepare it where network is available with `tfds build {base} "
        f"--data_dir={root} --file_format=array_record` (or tfds.builder({base!r}, data_dir=..., "
        f"file_format='array_record').download_and_prepare()) and copy {folder} here, or pass the "
        f"data_dir that holds {base}/.")


class _Row(NamedTuple):
    """One example of a selected split: where it is and what the metadata scan read."""

    part: int  # which of the source's splits
    offset: int  # position in that split
    filename: str
    label: int
    split: str  # the record's split name


class TfdsSource(_RecordSource):
    """Records of a prepared TFDS image classification dataset (one of ``DATASETS``).

    Args:
      name: the TFDS name, optionally with a version ("cars196", "caltech_birds2011:0.2.0").
      split: a TFDS split ("train", "test", "validation"), possibly sliced ("train[:10%]"), or a
        list of them; records keep their split ("validation" becomes "val").
      data_dir: the folder that holds ``<name>/<version>/``; None for TFDS's default
        (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      captions: a JSON of ``filename -> [caption, ...]``, joined by image file name (see
        ``match_caption_keys``). Every ``train`` record must have captions (see
        ``missing_captions``); records of other splits get theirs when present and an empty list
        otherwise. Needs a dataset with file names.
      num_captions: keep the first ``num_captions`` captions of each file; a file with captions but
        fewer than that is an error. None keeps them all.
      missing_captions: "error" (default): a train record without captions is an error; "skip":
        such records are dropped, logged and listed in ``skipped``.

    Building a source reads every example's label and file name once (one pass over the selected
    splits, images left undecoded); ``__getitem__`` then reads one example and returns its record
    with "image_bytes". The TFDS data source is opened lazily, so a pickled source (a grain worker's
    copy) opens its own.

    Attributes: ``class_names``, ``num_classes``, ``labels``, ``filenames``, ``paths``, ``data_dir``
    (resolved), ``version``, ``splits`` (examples per TFDS split of the prepared dataset),
    ``skipped``, ``unused_captions`` (caption keys that match no record).
    """

    def __init__(self, name: str, split: str | Sequence[str], *, data_dir: str | os.PathLike | None = None,
                 captions: str | os.PathLike | None = None, num_captions: int | None = None,
                 missing_captions: str = "error"):
        check_caption_options(captions, num_captions, missing_captions)
        self.name = name
        self.dataset = _base_name(name)
        if self.dataset not in DATASETS:
            raise ValueError(f"TFDS dataset {name!r} is not supported; supported: "
                             f"{', '.join(sorted(DATASETS))} (a new one needs its TfdsLayout in "
                             f"jaxgist.data.tfds_source.DATASETS)")
        self.layout = DATASETS[self.dataset]
        self.split = (split,) if isinstance(split, str) else tuple(split)
        if not self.split:
            raise ValueError("split is an empty list")
        joined = [s for s in self.split if "+" in s]
        if joined:
            raise ValueError(f"split {joined[0]!r}: give a list of splits instead of joining them with '+'")

        builder = _prepared_builder(name, None if data_dir is None else os.fspath(data_dir))
        self.data_dir = os.fspath(builder.data_dir_root)
        self.version = str(builder.version)
        info = builder.info
        self.splits = {s: info.splits[s].num_examples for s in sorted(info.splits)}
        unknown = [s for s in self.split if _base_split(s) not in self.splits]
        if unknown:
            raise DataError(f"{self._where}: split(s) {unknown} are not prepared; prepared splits (examples): "
                            f"{self.splits}")
        features = info.features
        self._image_keys = tuple(k for k, f in features.items() if isinstance(f, tfds.features.Image))
        self.class_names = self._read_class_names(features)
        self._file_key = self.layout.file_name if self.layout.file_name in features else None
        self.captions_file = None if captions is None else os.fspath(captions)
        if self.captions_file is not None and self._file_key is None:
            raise DataError(f"{self.captions_file}: captions are joined by image file name, but {self._where} "
                            f"has no file name feature ({self.layout.file_name!r} is not among its features "
                            f"{sorted(features)})")

        self._sources: list | None = None
        rows = [row for part in range(len(self.split)) for row in self._scan(part)]
        self.skipped: list[str] = []
        self.unused_captions = 0
        captions_of = None
        if self.captions_file is not None:
            rows, captions_of = self._join_captions(rows, num_captions, missing_captions)
        if not rows:
            raise DataError(f"{self._where}: no examples left in split(s) {list(self.split)} after dropping "
                            f"{len(self.skipped)} without captions")

        self._records = []
        for i, row in enumerate(rows):
            record = {"index": i, "filename": row.filename,
                      "path": f"tfds://{self.dataset}/{self.split[row.part]}/{row.filename}",
                      "label": row.label, "species": self.class_names[row.label], "split": row.split}
            if captions_of is not None:
                record["captions"] = captions_of[i]
            self._records.append(record)
        self._part = np.array([r.part for r in rows], np.int32)
        self._offset = np.array([r.offset for r in rows], np.int64)

    @property
    def _where(self) -> str:
        return f"TFDS {self.name} (version {self.version}) in {self.data_dir}"

    def _read_class_names(self, features) -> list[str]:
        label = features[self.layout.label] if self.layout.label in features else None
        if not isinstance(label, tfds.features.ClassLabel):
            raise DataError(f"{self._where}: feature {self.layout.label!r} is {type(label).__name__}, "
                            f"expected a ClassLabel; features: {sorted(features)}")
        if self.layout.image not in self._image_keys:
            raise DataError(f"{self._where}: feature {self.layout.image!r} is not an Image feature; "
                            f"image features: {list(self._image_keys)}")
        raw = self.layout.class_names or label.names
        if len(raw) != label.num_classes:
            raise DataError(f"{self._where}: {len(raw)} class names for {label.num_classes} classes")
        names = [readable_class_name(self.layout.renames.get(n, n)) for n in raw]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated or not all(names):
            raise DataError(f"{self._where}: class names are empty or repeated: {_few(repeated)}")
        return names

    # -- reading ---------------------------------------------------------------------------------

    def _open(self, spec: str):
        decoders = {key: tfds.decode.SkipDecoding() for key in self._image_keys}
        try:
            return tfds.data_source(self.name, split=spec, data_dir=self.data_dir, download=False,
                                    decoders=decoders)
        except NotImplementedError as e:  # prepared in a format without random access (TFRecord)
            raise DataError(f"{self._where}: split {spec!r} cannot be read at random; prepare the dataset "
                            f"with --file_format=array_record: {e}") from e
        except ValueError as e:  # e.g. a slice TFDS cannot resolve
            raise DataError(f"{self._where}: cannot open split {spec!r}: {e}") from e

    def _source(self, part: int):
        """The TFDS data source of ``self.split[part]``, opened on first use in this process."""
        if self._sources is None:
            self._sources = [None] * len(self.split)
        if self._sources[part] is None:
            self._sources[part] = self._open(self.split[part])
        return self._sources[part]

    def _scan(self, part: int) -> list[_Row]:
        """Labels and file names of every example of ``self.split[part]``, in order."""
        spec = self.split[part]
        tfds_split = _base_split(spec)
        record_split = _VAL_SPLITS.get(tfds_split, tfds_split)
        source = self._source(part)
        n = len(source)
        num_classes = len(self.class_names)
        rows = []
        start_time = last_log = time.monotonic()
        for start in range(0, n, _SCAN_CHUNK):
            stop = min(n, start + _SCAN_CHUNK)
            for offset, example in zip(range(start, stop), source.__getitems__(list(range(start, stop)))):
                label = int(example[self.layout.label])
                if not 0 <= label < num_classes:
                    raise DataError(f"{self._where}, split {spec!r}, example {offset}: label {label} is "
                                    f"outside [0, {num_classes})")
                rows.append(_Row(part, offset, self._filename(example, tfds_split, spec, offset), label,
                                 record_split))
            now = time.monotonic()
            if now - last_log >= _LOG_SECONDS and stop < n:
                logging.info("%s: read labels and file names of %d/%d %s examples (%.0f/s)", self._where,
                             stop, n, spec, stop / (now - start_time))
                last_log = now
        logging.info("%s: %d %s examples (labels and file names read in %.1f s)", self._where, n, spec,
                     time.monotonic() - start_time)
        return rows

    def _filename(self, example: Mapping[str, Any], tfds_split: str, spec: str, offset: int) -> str:
        if self._file_key is None:
            return f"{spec}/{offset}"
        name = _text(example[self._file_key])
        if self.layout.keep_parts:
            name = "/".join(name.split("/")[-self.layout.keep_parts:])
        return self.layout.file_name_format.format(name=name, split=tfds_split)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = super().__getitem__(index)
        i = record["index"]
        example = self._source(int(self._part[i]))[int(self._offset[i])]
        record["image_bytes"] = _image_bytes(example[self.layout.image], record["path"])
        return record

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_sources"] = None  # each process opens its own
        return state

    # -- captions --------------------------------------------------------------------------------

    def _join_captions(self, rows: list[_Row], num_captions: int | None,
                       policy: str) -> tuple[list[_Row], list[list[str]]]:
        where = f"{self.captions_file} (for {self._where}, split {list(self.split)})"
        caption_map = read_captions(self.captions_file)
        keys = match_caption_keys([r.filename for r in rows], caption_map, where)
        by_basename = sum(1 for r, k in zip(rows, keys) if k is not None and k != r.filename)
        if by_basename:
            logging.info("%s: %d of %d file names matched a caption key by basename only", where,
                         by_basename, len(rows))

        def named(r: _Row) -> str:
            return f"{r.filename!r} ({self.split[r.part]} example {r.offset})"

        missing = [r for r, k in zip(rows, keys) if k is None and r.split == "train"]
        if missing and policy == "error":
            raise DataError(f"{where}: {len(missing)} train file(s) have no captions, e.g. "
                            + ", ".join(named(r) for r in missing[:5])
                            + "; to drop them set --config.data.missing_captions=skip (missing_captions='skip' in Python)")
        if num_captions is not None:
            short = [(r, len(caption_map[k])) for r, k in zip(rows, keys)
                     if k is not None and len(caption_map[k]) < num_captions]
            if short:
                raise DataError(f"{where}: {len(short)} file(s) have fewer than num_captions={num_captions} "
                                f"captions, e.g. " + ", ".join(f"{named(r)} has {n}" for r, n in short[:5]))
        self.unused_captions = len(caption_map) - len({k for k in keys if k is not None})
        if missing:
            self.skipped = [r.filename for r in missing]
            logging.warning("%s: skipping %d of %d train file(s) that have no captions, e.g. %s", where,
                            len(missing), sum(r.split == "train" for r in rows), _few(self.skipped))
        kept = [(r, k) for r, k in zip(rows, keys) if not (k is None and r.split == "train")]
        return ([r for r, _ in kept],
                [list(caption_map[k][:num_captions]) if k is not None else [] for _, k in kept])

    def __repr__(self) -> str:
        split = self.split[0] if len(self.split) == 1 else list(self.split)
        return (f"TfdsSource({self.name!r}, split={split!r}, data_dir={self.data_dir!r}, {len(self)} records, "
                f"{self.num_classes} classes)")
