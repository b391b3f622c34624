"""TFDS sources: record layout, class names, captions join, errors, pickling and grain pipelines for
caltech_birds2011, oxford_flowers102, cars196 and imagenet2012.

The datasets are tiny but real: each is prepared in a temporary data_dir, in array_record format,
by the dataset's own TFDS builder with only its example generation replaced (the features, and so
the serialized layout, are TFDS's), and is read through the same ``tfds.data_source`` path as a
downloaded dataset. ``tfds.testing.mock_data`` cannot stand in here: with decoders (``SkipDecoding``)
its fake examples are encoded with TensorFlow (``tf.image.encode_png``), which is not installed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import pickle

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.datasets.oxford_flowers102 import oxford_flowers102_dataset_builder as flowers_builder
from tensorflow_datasets.image_classification import caltech_birds, cars196

from jaxgist.data import images, pipeline, tfds_source
from jaxgist.data.sources import DataError, class_key
from jaxgist.data.tfds_source import TfdsLayout, TfdsSource, match_caption_keys, readable_class_name
from jaxgist.models.clip import tokenizer

CUB = tfds_source._CUB_CLASSES
NAMES = ("caltech_birds2011", "oxford_flowers102", "cars196", "imagenet2012")


# ---------------------------------------------------------------------------------------------
# Tiny prepared datasets
# ---------------------------------------------------------------------------------------------

def encode(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def draw(rng, gray=False) -> np.ndarray:
    h, w = rng.integers(12, 40, size=2)
    return rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)


# Real CUB images (as CUB's images.txt and GIST's metadata name them) and their labels. TFDS's train
# split is CUB's, which GIST divides into its train and val splits: the last train file here is in
# GIST's val split, so GIST's captions file has no captions for it.
CUB_FILES = {
    "train": [(0, "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg"),
              (1, "002.Laysan_Albatross/Laysan_Albatross_0003_1033.jpg"),
              (199, "200.Common_Yellowthroat/Common_Yellowthroat_0104_190489.jpg"),
              (37, "038.Great_Crested_Flycatcher/Great_Crested_Flycatcher_0004_29701.jpg"),
              (0, "001.Black_footed_Albatross/Black_Footed_Albatross_0014_89.jpg"),
              (1, "002.Laysan_Albatross/Laysan_Albatross_0044_784.jpg"),
              (199, "200.Common_Yellowthroat/Common_Yellowthroat_0090_190503.jpg"),
              (37, "038.Great_Crested_Flycatcher/Great_Crested_Flycatcher_0050_29786.jpg")],
    "test": [(0, "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"),
             (1, "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg"),
             (199, "200.Common_Yellowthroat/Common_Yellowthroat_0020_190720.jpg"),
             (37, "038.Great_Crested_Flycatcher/Great_Crested_Flycatcher_0028_29696.jpg")],
}
GIST_VAL_FILE = CUB_FILES["train"][-1][1]


def prepare(data_dir, builder_cls, examples: dict[str, list[dict]]) -> None:
    """Writes ``examples`` (split -> feature dicts) as a prepared array_record dataset."""

    class Fake(builder_cls, skip_registration=True):
        name = builder_cls.name
        pkg_dir_path = builder_cls._get_pkg_dir_path()  # the dataset's metadata files (README, citation)

        def _split_generators(self, dl_manager):
            return {split: ((str(i), ex) for i, ex in enumerate(exs)) for split, exs in examples.items()}

    Fake(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))


# What each prepared example holds, for the tests to compare against: filename -> (label, pixels).
EXPECTED: dict[str, dict[str, dict[str, tuple[int, np.ndarray]]]] = {}


def birds(rng):
    out = {}
    for split, files in CUB_FILES.items():
        exs = []
        for k, (label, name) in enumerate(files):
            pixels = draw(rng, gray=k == 3)  # CUB has a few grayscale photos
            mask = rng.integers(0, 2, pixels.shape[:2], dtype=np.uint8) * 255
            exs.append({"image": encode(pixels), "image/filename": f"CUB_200_2011/images/{name}",
                        "label": label, "label_name": CUB[label].lower(),
                        "bbox": tfds.features.BBox(0.1, 0.2, 0.5, 0.6), "segmentation_mask": encode(mask)})
            EXPECTED.setdefault("caltech_birds2011", {}).setdefault(split, {})[name] = (label, pixels)
        out[split] = exs
    return out


def flowers(rng):
    out = {}
    image_id = 1
    for split, n in (("train", 6), ("validation", 3), ("test", 3)):
        exs = []
        for k in range(n):
            label = (0, 59, 101)[k % 3]  # 59 is TFDS's "pink-yellow dahlia?"
            name = f"image_{image_id:05d}.jpg"
            image_id += 1
            pixels = draw(rng)
            exs.append({"image": encode(pixels), "label": label, "file_name": name})
            EXPECTED.setdefault("oxford_flowers102", {}).setdefault(split, {})[name] = (label, pixels)
        out[split] = exs
    return out


def cars(rng):
    out = {}
    for split, n in (("train", 5), ("test", 4)):
        exs = []
        for k in range(n):  # train and test both number their files from 00001
            label = (0, 195, 7)[k % 3]
            pixels = draw(rng)
            exs.append({"image": encode(pixels), "label": label, "id": f"{k + 1:05d}",
                        "bbox": tfds.features.BBox(0.0, 0.0, 1.0, 1.0)})
            name = f"cars_{split}/{k + 1:05d}.jpg"
            EXPECTED.setdefault("cars196", {}).setdefault(split, {})[name] = (label, pixels)
        out[split] = exs
    return out


def imagenet(rng):
    out = {}
    for split, n in (("train", 4), ("validation", 3)):
        exs = []
        for k in range(n):
            label = (0, 999, 417)[k % 3]
            name = (f"n{label:08d}_{k}.JPEG" if split == "train" else f"ILSVRC2012_val_{k + 1:08d}.JPEG")
            pixels = draw(rng)
            exs.append({"image": encode(pixels), "label": label, "file_name": name})
            EXPECTED.setdefault("imagenet2012", {}).setdefault(split, {})[name] = (label, pixels)
        out[split] = exs
    return out


_rng = np.random.default_rng(0)
EXAMPLES = {"caltech_birds2011": (caltech_birds.CaltechBirds2011, birds(_rng)),
            "oxford_flowers102": (flowers_builder.Builder, flowers(_rng)),
            "cars196": (cars196.Cars196, cars(_rng)),
            "imagenet2012": (tfds.builder_cls("imagenet2012"), imagenet(_rng))}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    for builder_cls, examples in EXAMPLES.values():
        prepare(root, builder_cls, examples)
    return root


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load()


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------------------------------
# Records and class names
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_records_have_the_source_layout_and_the_images(data_dir, name):
    src = TfdsSource(name, "train", data_dir=data_dir)
    expected = EXPECTED[name]["train"]
    assert len(src) == len(expected) == src.splits["train"]
    assert sorted(src.filenames) == sorted(expected)
    for i, record in enumerate(src):
        assert set(record) == {"index", "filename", "path", "label", "species", "split", "image_bytes"}
        assert record["index"] == i and record["split"] == "train"
        assert record["path"] == f"tfds://{name}/train/{record['filename']}"
        label, pixels = expected[record["filename"]]
        assert record["label"] == label and 0 <= label < src.num_classes
        assert record["species"] == src.class_names[label]
        assert isinstance(record["image_bytes"], bytes)
        image = images.decode_image(record["image_bytes"], name=record["path"])
        assert image.dtype == np.uint8 and image.shape == pixels.shape[:2] + (3,)
        rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=-1)  # gray -> RGB
        np.testing.assert_array_equal(image, rgb)
    assert src.labels.dtype == np.int32 and src.labels.tolist() == [r["label"] for r in src]
    assert src.paths == [r["path"] for r in src]
    assert src[-1] == src[len(src) - 1]
    with pytest.raises(IndexError):
        src[len(src)]
    assert repr(src).startswith(f"TfdsSource({name!r}, split='train'") and f"{len(src)} records" in repr(src)


def test_class_names_are_readable():
    assert readable_class_name("001.Black_footed_Albatross") == "Black footed Albatross"
    assert readable_class_name("Chuck_will_Widow") == "Chuck will Widow"
    assert readable_class_name(" pink  primrose ") == "pink primrose"
    assert readable_class_name("Bugatti Veyron 16.4 Coupe 2009") == "Bugatti Veyron 16.4 Coupe 2009"


def test_class_names_of_each_dataset(data_dir):
    birds_src, flowers_src, cars_src = (TfdsSource(n, "test", data_dir=data_dir) for n in NAMES[:3])
    assert birds_src.num_classes == 200 and len(set(birds_src.class_names)) == 200
    assert birds_src.class_names[0] == "Black footed Albatross"
    assert birds_src.class_names[199] == "Common Yellowthroat"
    assert flowers_src.num_classes == 102 and flowers_src.class_names[0] == "pink primrose"
    assert flowers_src.class_names[59] == "pink-yellow dahlia"
    assert cars_src.num_classes == 196 and cars_src.class_names[0] == "AM General Hummer SUV 2000"
    imagenet_src = TfdsSource("imagenet2012", "validation", data_dir=data_dir)
    assert imagenet_src.num_classes == 1000 and imagenet_src.class_names[0] == "n01440764"
    assert imagenet_src.filenames[0] == "ILSVRC2012_val_00000001.JPEG" and imagenet_src[0]["split"] == "val"
    assert cars_src.class_names[-1] == "smart fortwo Convertible 2012"


def test_class_names_agree_with_gist(data_dir, shared_data):
    """CUB's names are GIST's species by label; the flowers are GIST's classes (in another order)."""
    with open(shared_data / "gist" / "CUB" / "metadata.csv", newline="") as f:
        species = {int(r["label"]): r["species"] for r in csv.DictReader(f)}
    birds_src = TfdsSource("caltech_birds2011", "test", data_dir=data_dir)
    assert birds_src.class_names == [species[i] for i in range(200)]
    gist_flowers = (shared_data / "gist" / "flower" / "classes.txt").read_text().split("\n")
    names = TfdsSource("oxford_flowers102", "test", data_dir=data_dir).class_names
    assert sorted(names) == sorted(n.strip() for n in gist_flowers if n.strip())
    assert len({class_key(n) for n in names}) == 102


def test_several_splits_and_slices(data_dir):
    src = TfdsSource("oxford_flowers102", ["train", "validation"], data_dir=data_dir)
    assert len(src) == 9 and [r["index"] for r in src] == list(range(9))
    assert [r["split"] for r in src] == ["train"] * 6 + ["val"] * 3
    val = sorted(r["filename"] for r in src if r["split"] == "val")
    assert val == sorted(EXPECTED["oxford_flowers102"]["validation"])
    assert src.splits == {"test": 3, "train": 6, "validation": 3}
    half = TfdsSource("oxford_flowers102", "train[:50%]", data_dir=data_dir)
    assert len(half) == 3 and {r["split"] for r in half} == {"train"}
    assert set(half.filenames) <= set(EXPECTED["oxford_flowers102"]["train"])
    both = TfdsSource("cars196", ["train", "test"], data_dir=data_dir)
    assert len(set(both.filenames)) == 9  # the release's folders keep train and test names apart


def test_scan_logs_progress(data_dir, monkeypatch, caplog):
    monkeypatch.setattr(tfds_source, "_SCAN_CHUNK", 2)
    monkeypatch.setattr(tfds_source, "_LOG_SECONDS", 0.0)
    with caplog.at_level(logging.INFO):
        TfdsSource("caltech_birds2011", "train", data_dir=data_dir)
    progress = [r.getMessage() for r in caplog.records if "read labels and file names of" in r.getMessage()]
    assert len(progress) == 3 and "2/8 train examples" in progress[0]


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

def captions_for(filenames, n=3):
    return {f: [f"caption {c} of {f}" for c in range(n)] for f in filenames}


def test_captions_join_by_file_name(data_dir, tmp_path):
    train, test = EXPECTED["caltech_birds2011"]["train"], EXPECTED["caltech_birds2011"]["test"]
    one_test = list(test)[0]  # test files need no captions; this one has some
    captions = captions_for([*train, one_test, "201.Nowhere/Nowhere_0001.jpg"])
    path = write_json(tmp_path / "captions.json", captions)
    src = TfdsSource("caltech_birds2011", ["train", "test"], data_dir=data_dir, captions=path, num_captions=2)
    assert len(src) == 12 and src.unused_captions == 1 and src.skipped == []
    for record in src:
        if record["split"] == "train" or record["filename"] == one_test:
            assert record["captions"] == [f"caption {c} of {record['filename']}" for c in range(2)]
        else:
            assert record["captions"] == []
    full = TfdsSource("caltech_birds2011", "train", data_dir=data_dir, captions=path)
    assert all(len(r["captions"]) == 3 for r in full)


def test_captions_of_the_real_gist_file_join_cub(data_dir, shared_data):
    """GIST's CUB captions are keyed like CUB's images.txt: they join TFDS's archive paths, except
    for the TFDS train image that GIST holds out as validation."""
    path = shared_data / "gist" / "CUB" / "captions_top5.json"
    real = json.loads(path.read_text())
    with pytest.raises(DataError, match=rf"1 train file\(s\) have no captions, e.g. '{GIST_VAL_FILE}'"):
        TfdsSource("caltech_birds2011", "train", data_dir=data_dir, captions=path)
    src = TfdsSource("caltech_birds2011", "train", data_dir=data_dir, captions=path, num_captions=5,
                     missing_captions="skip")
    assert len(src) == 7 and src.skipped == [GIST_VAL_FILE]
    assert all(r["captions"] == real[r["filename"]] for r in src)
    assert src.unused_captions == len(real) - 7


def test_captions_fall_back_to_basenames(data_dir, tmp_path):
    names = list(EXPECTED["oxford_flowers102"]["train"])
    path = write_json(tmp_path / "captions.json", captions_for([f"jpg/{n}" for n in names]))
    src = TfdsSource("oxford_flowers102", "train", data_dir=data_dir, captions=path)
    assert all(r["captions"][0] == f"caption 0 of jpg/{r['filename']}" for r in src)
    # CUB's file names without their class folder
    bare = {n.split("/")[-1]: c for n, c in captions_for(EXPECTED["caltech_birds2011"]["train"]).items()}
    src = TfdsSource("caltech_birds2011", "train", data_dir=data_dir,
                     captions=write_json(tmp_path / "bare.json", bare))
    assert all(r["captions"] == bare[r["filename"].split("/")[-1]] for r in src)


def test_ambiguous_basenames_are_an_error(data_dir, tmp_path):
    names = list(EXPECTED["oxford_flowers102"]["train"])
    keys = [f"a/{n}" for n in names] + [f"b/{names[0]}"]
    path = write_json(tmp_path / "captions.json", captions_for(keys))
    with pytest.raises(DataError, match=rf"captions.json.*basename with several keys.*'{names[0]}'"):
        TfdsSource("oxford_flowers102", "train", data_dir=data_dir, captions=path)
    # cars: "00001.jpg" is the basename of a train and of a test file
    path = write_json(tmp_path / "cars.json", captions_for([f"{k:05d}.jpg" for k in range(1, 6)]))
    with pytest.raises(DataError, match=r"'00001.jpg' <- 'cars_train/00001.jpg', 'cars_test/00001.jpg'"):
        TfdsSource("cars196", ["train", "test"], data_dir=data_dir, captions=path)
    assert TfdsSource("cars196", "train", data_dir=data_dir, captions=path)[0]["captions"]


def test_match_caption_keys():
    keys = ["x/a.jpg", "y/b.jpg", "c.jpg", "p/d.jpg", "q/d.jpg"]
    got = match_caption_keys(["x/a.jpg", "z/b.jpg", "w/c.jpg", "e.jpg"], keys, "f")
    assert got == ["x/a.jpg", "y/b.jpg", "c.jpg", None]
    assert match_caption_keys(["p/d.jpg", "q/d.jpg"], keys, "f") == ["p/d.jpg", "q/d.jpg"]
    with pytest.raises(DataError, match="f: .*'r/d.jpg' -> 'p/d.jpg', 'q/d.jpg'"):
        match_caption_keys(["r/d.jpg"], keys, "f")


def test_train_files_without_captions_are_an_error_or_skipped(data_dir, tmp_path):
    train = sorted(EXPECTED["caltech_birds2011"]["train"])
    path = write_json(tmp_path / "captions.json", captions_for(train[2:]))
    with pytest.raises(DataError, match=r"captions.json .*2 train file\(s\) have no captions") as error:
        TfdsSource("caltech_birds2011", "train", data_dir=data_dir, captions=path)
    assert all(f"{n!r} (train example " in str(error.value) for n in train[:2])
    assert "missing_captions='skip'" in str(error.value)
    src = TfdsSource("caltech_birds2011", ["train", "test"], data_dir=data_dir, captions=path,
                     missing_captions="skip")
    assert sorted(src.skipped) == train[:2] and len(src) == 6 + 4
    assert [r["index"] for r in src] == list(range(10)) and not set(src.filenames) & set(train[:2])
    assert src[0]["image_bytes"] != src[1]["image_bytes"]
    for record in src:
        label, _ = EXPECTED["caltech_birds2011"][record["split"]][record["filename"]]
        assert record["label"] == label  # records still point at their own examples


def test_fewer_captions_than_num_captions_is_an_error(data_dir, tmp_path):
    captions = captions_for(EXPECTED["cars196"]["train"])
    captions["cars_train/00002.jpg"] = ["only one"]
    path = write_json(tmp_path / "captions.json", captions)
    with pytest.raises(DataError, match=r"1 file\(s\) have fewer than num_captions=2.*'cars_train/00002.jpg'"):
        TfdsSource("cars196", "train", data_dir=data_dir, captions=path, num_captions=2)
    assert len(TfdsSource("cars196", "train", data_dir=data_dir, captions=path, num_captions=1)) == 5


def test_captions_need_file_names(data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(tfds_source.DATASETS, "cars196", TfdsLayout(file_name=None))
    src = TfdsSource("cars196", "train", data_dir=data_dir)
    assert src.filenames == [f"train/{i}" for i in range(5)]
    path = write_json(tmp_path / "captions.json", captions_for(EXPECTED["cars196"]["train"]))
    with pytest.raises(DataError, match=r"captions.json: captions are joined by image file name, but "
                                        r"TFDS cars196 .* has no file name feature"):
        TfdsSource("cars196", "train", data_dir=data_dir, captions=path)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_unknown_dataset_lists_the_supported_ones(data_dir):
    supported = "caltech_birds2011, cars196, imagenet2012, oxford_flowers102"
    with pytest.raises(ValueError, match=f"'mnist' is not supported; supported: {supported}"):
        TfdsSource("mnist", "train", data_dir=data_dir)


def test_unprepared_dataset_names_data_dir_and_how_to_prepare(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"'cars196' version 2.1.0 is not prepared in data_dir "
                                                rf"{tmp_path}.*tfds build cars196 .*array_record"):
        TfdsSource("cars196", "train", data_dir=tmp_path)
    (tmp_path / "cars196" / "2.0.0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"holds version\(s\) \['2.0.0'\]"):
        TfdsSource("cars196", "train", data_dir=tmp_path)


def test_unprepared_split_and_bad_arguments(data_dir, tmp_path):
    with pytest.raises(DataError, match=r"TFDS caltech_birds2011 \(version 0.2.0\) in .*split\(s\) "
                                        r"\['validation'\] are not prepared.*'test': 4, 'train': 8"):
        TfdsSource("caltech_birds2011", "validation", data_dir=data_dir)
    with pytest.raises(ValueError, match="list of splits"):
        TfdsSource("oxford_flowers102", "train+validation", data_dir=data_dir)
    with pytest.raises(ValueError, match="missing_captions"):
        TfdsSource("cars196", "train", data_dir=data_dir, missing_captions="drop")
    with pytest.raises(ValueError, match="no captions file"):
        TfdsSource("cars196", "train", data_dir=data_dir, num_captions=2)
    with pytest.raises(ValueError, match="empty"):
        TfdsSource("cars196", [], data_dir=data_dir)


# ---------------------------------------------------------------------------------------------
# Pickling and pipelines
# ---------------------------------------------------------------------------------------------

def test_pickles_without_images_and_reopens(data_dir):
    src = TfdsSource("caltech_birds2011", "train", data_dir=data_dir)
    before = pickle.dumps(src)
    src[3]  # opens the TFDS data source
    after = pickle.dumps(src)
    assert len(after) == len(before) < 20_000  # the open TFDS source is not pickled; no image bytes
    copy = pickle.loads(after)
    assert copy._sources is None and copy[3] == src[3] and copy.labels.tolist() == src.labels.tolist()


def test_grain_reads_it_in_any_order(data_dir):
    src = TfdsSource("oxford_flowers102", ["train", "validation", "test"], data_dir=data_dir)
    ds = grain.MapDataset.source(src).shuffle(seed=0)
    records = [ds[i] for i in range(len(src))]
    assert sorted(r["index"] for r in records) == list(range(12))
    assert all(src[r["index"]] == r for r in records)


@pytest.mark.parametrize("name", NAMES)
def test_eval_dataset_runs_on_it(data_dir, name):
    src = TfdsSource(name, "validation" if name == "imagenet2012" else "test", data_dir=data_dir)
    batches = list(pipeline.eval_dataset(src, image_size=32, batch_size=4))
    assert [len(b["label"]) for b in batches] == [min(4, len(src) - i) for i in range(0, len(src), 4)]
    for b in batches:
        assert b["image"].shape == (len(b["label"]), 32, 32, 3) and b["image"].dtype == np.float32
    assert np.concatenate([b["label"] for b in batches]).tolist() == src.labels.tolist()
    assert np.concatenate([b["index"] for b in batches]).tolist() == list(range(len(src)))


def test_train_dataset_runs_on_it_in_worker_processes(data_dir, tok, tmp_path):
    path = write_json(tmp_path / "captions.json", captions_for(EXPECTED["caltech_birds2011"]["train"]))
    src = TfdsSource("caltech_birds2011", "train", data_dir=data_dir, captions=path, num_captions=2)
    args = dict(image_size=32, tokenize=tok, global_batch=4, num_captions=2, seed=0)
    it = iter(pipeline.train_dataset(src, **args))
    batches = [next(it) for _ in range(5)]  # more than one epoch of 8 images x 2 captions
    batch = batches[0]
    assert batch["image"].shape == (4, 32, 32, 3) and batch["ids"].shape == (4, 77)
    for ids, label, pair in zip(batch["ids"], batch["label"], batch["pair"]):
        record = src[pair // 2]
        assert label == record["label"]
        np.testing.assert_array_equal(ids, tok([f"{record['species']}: {record['captions'][pair % 2]}"])[0])
    it = iter(pipeline.train_dataset(src, **args, workers=1))
    for want in batches[:2]:
        got = next(it)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
