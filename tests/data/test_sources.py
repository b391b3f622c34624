"""GIST metadata / image-folder sources: the four real GIST datasets and every kind of bad input."""

from __future__ import annotations

import collections
import csv
import json
import pickle
import re

import grain
import numpy as np
import pytest

from jaxgist.data.sources import DataError, GistSource, ImageFolderSource, class_key, read_descriptions

# ---------------------------------------------------------------------------------------------
# The real GIST metadata
# ---------------------------------------------------------------------------------------------

DATASETS = ("CUB", "flower", "aircraft", "fitzpatrick40")
VARIANTS = ("metadata", "metadata_1shot", "metadata_3shot", "metadata_5shot")
SHOTS = {"metadata_1shot": 1, "metadata_3shot": 3, "metadata_5shot": 5}
NUM_CLASSES = {"CUB": 200, "flower": 102, "aircraft": 100, "fitzpatrick40": 40}
# Rows per split of the full metadata.csv (few-shot files share val and test, and have
# shots * num_classes train rows).
SPLITS = {
    "CUB": {"train": 5394, "val": 600, "test": 5794},
    "flower": {"train": 4093, "val": 1633, "test": 2463},
    "aircraft": {"train": 3334, "val": 3333, "test": 3333},
    "fitzpatrick40": {"train": 2115, "val": 222, "test": 272},
}


def expected_splits(dataset: str, variant: str) -> dict[str, int]:
    counts = dict(SPLITS[dataset])
    if variant in SHOTS:
        counts["train"] = SHOTS[variant] * NUM_CLASSES[dataset]
    return counts


@pytest.fixture(scope="module")
def gist(shared_data):
    return shared_data / "gist"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_real_metadata_counts(gist, dataset, variant):
    src = GistSource(gist / dataset / f"{variant}.csv", "images")
    want = expected_splits(dataset, variant)
    assert src.splits == dict(sorted(want.items()))
    assert len(src) == sum(want.values())
    assert src.num_classes == NUM_CLASSES[dataset]
    assert len(src.class_names) == len(set(src.class_names)) == NUM_CLASSES[dataset]
    assert set(np.unique(src.labels)) == set(range(NUM_CLASSES[dataset]))
    for split, n in want.items():
        sub = GistSource(gist / dataset / f"{variant}.csv", "images", split=split)
        assert len(sub) == n
        assert {r["split"] for r in sub} == {split}
        assert sub.class_names == src.class_names  # full label space, whatever the selection
    both = GistSource(gist / dataset / f"{variant}.csv", "images", split=["val", "test"])
    assert len(both) == want["val"] + want["test"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_real_labels_agree_with_an_independent_read(gist, dataset):
    """Counts recomputed with csv.DictReader, independently of the source's own parser."""
    with open(gist / dataset / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    src = GistSource(gist / dataset / "metadata.csv", "images")
    assert len(src) == len(rows)
    assert len({int(r["label"]) for r in rows}) == src.num_classes == NUM_CLASSES[dataset]
    assert [r["filename"] for r in rows] == src.filenames
    assert src.labels.tolist() == [int(r["label"]) for r in rows]
    assert collections.Counter(r["split"] for r in rows) == collections.Counter(src.splits)


@pytest.mark.parametrize("dataset", ("CUB", "flower", "aircraft"))
def test_real_class_names_match_classes_txt(gist, dataset):
    lines = (gist / dataset / "classes.txt").read_text().splitlines()
    if dataset == "CUB":  # "1 001.Black_footed_Albatross" -> "Black footed Albatross"
        lines = [line.split(" ", 1)[1].split(".", 1)[1].replace("_", " ") for line in lines]
    src = GistSource(gist / dataset / "metadata.csv", "images")
    assert src.class_names == lines


@pytest.mark.parametrize("variant", ("metadata_1shot", "metadata_3shot", "metadata_5shot"))
@pytest.mark.parametrize("dataset", DATASETS)
def test_real_few_shot_train_has_k_per_class(gist, dataset, variant):
    k = SHOTS[variant]
    few = GistSource(gist / dataset / f"{variant}.csv", "images", split="train")
    assert np.bincount(few.labels, minlength=few.num_classes).tolist() == [k] * NUM_CLASSES[dataset]
    full_train = GistSource(gist / dataset / "metadata.csv", "images", split="train")
    assert set(few.filenames) <= set(full_train.filenames)
    assert few.class_names == full_train.class_names
    for split in ("val", "test"):
        a = GistSource(gist / dataset / f"{variant}.csv", "images", split=split)
        b = GistSource(gist / dataset / "metadata.csv", "images", split=split)
        assert a.filenames == b.filenames


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_real_captions_join_every_train_file(gist, dataset, variant):
    caption_file = gist / dataset / "captions_top5.json"
    src = GistSource(gist / dataset / f"{variant}.csv", "images", split="train", captions=caption_file,
                     num_captions=5)
    assert src.skipped == []
    assert len(src) == expected_splits(dataset, variant)["train"]
    table = json.loads(caption_file.read_text())
    for record in (src[0], src[len(src) // 2], src[len(src) - 1]):
        assert record["captions"] == table[record["filename"]]
    assert all(len(r["captions"]) == 5 and all(r["captions"]) for r in src)
    three = GistSource(gist / dataset / f"{variant}.csv", "images", split="train", captions=caption_file,
                       num_captions=3)
    assert three[0]["captions"] == table[three[0]["filename"]][:3]


def test_real_captions_cover_train_only(gist):
    """Captions exist for train files; val/test records get an empty list. Fitzpatrick40's captions
    file also holds 223 files that are in no metadata row (ignored, counted)."""
    unused = {}
    for dataset in DATASETS:
        src = GistSource(gist / dataset / "metadata.csv", "images", captions=gist / dataset / "captions_top5.json")
        assert all((len(r["captions"]) == 5) == (r["split"] == "train") for r in src)
        unused[dataset] = src.unused_captions
    assert unused == {"CUB": 0, "flower": 0, "aircraft": 0, "fitzpatrick40": 223}


def test_real_fitzpatrick_paths_keep_subdirectories(gist, tmp_path):
    src = GistSource(gist / "fitzpatrick40" / "metadata_1shot.csv", tmp_path, split="train")
    assert all(r["filename"].startswith("data/finalfitz17k/") for r in src)
    assert src[0]["path"] == str(tmp_path / src[0]["filename"])
    for r in src:  # the images are not shipped: make empty stand-ins
        (tmp_path / r["filename"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / r["filename"]).touch()
    assert len(GistSource(gist / "fitzpatrick40" / "metadata_1shot.csv", tmp_path, split="train",
                          check_files=True)) == 40
    (tmp_path / src[3]["filename"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 40 image file\(s\) do not exist") as err:
        GistSource(gist / "fitzpatrick40" / "metadata_1shot.csv", tmp_path, split="train", check_files=True)
    assert src[3]["filename"] in str(err.value)


def test_real_descriptions_cub(gist):
    src = GistSource(gist / "CUB" / "metadata.csv", "images")
    desc = read_descriptions(gist / "CUB" / "long_captions.json", src.class_names)
    assert len(desc) == 200
    assert [len(d) for d in desc] == [6] * 200
    raw = json.loads((gist / "CUB" / "long_captions.json").read_text())
    assert desc[0] == raw["black-footed-albatross\n"]  # keys carry a trailing newline
    assert "Black-footed Albatross" in desc[0][0]
    label = src.class_names.index("Sooty Albatross")
    assert desc[label] == raw["sooty-albatross\n"]


def test_real_descriptions_fitzpatrick40(gist):
    src = GistSource(gist / "fitzpatrick40" / "metadata.csv", "images")
    desc = read_descriptions(gist / "fitzpatrick40" / "long_captions.json", src.class_names)
    raw = json.loads((gist / "fitzpatrick40" / "long_captions.json").read_text())
    assert len(desc) == 40 and all(len(d) >= 1 for d in desc)
    assert sum(map(len, desc)) == sum(map(len, raw.values()))
    for label, name in enumerate(src.class_names):
        assert desc[label] == raw[name]  # keys are the species names verbatim


def test_real_source_works_with_grain_and_pickle(gist):
    src = GistSource(gist / "flower" / "metadata_1shot.csv", "images", split="train",
                     captions=gist / "flower" / "captions_top5.json", num_captions=2)
    ds = grain.MapDataset.source(src).shuffle(seed=0)
    records = [ds[i] for i in range(len(src))]
    assert sorted(r["index"] for r in records) == list(range(102))
    assert all(src[r["index"]] == r for r in records)
    assert pickle.loads(pickle.dumps(src))[7] == src[7]
    assert src[-1] == src[len(src) - 1]
    with pytest.raises(IndexError):
        src[len(src)]


# ---------------------------------------------------------------------------------------------
# Bad inputs (small files written to tmp_path)
# ---------------------------------------------------------------------------------------------

HEADER = ["filename", "label", "species", "split"]
GOOD_ROWS = [
    ["a/1.jpg", "0", "red circle", "train"],
    ["a/2.jpg", "0", "red circle", "test"],
    ["b/1.jpg", "1", "blue square", "train"],
    ["b/2.jpg", "1", "blue square", "val"],
]


def write_csv(path, rows, header=HEADER):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def message(excinfo) -> str:
    return str(excinfo.value)


def test_extra_columns_are_ignored_and_order_is_free(tmp_path):
    header = ["", "Unnamed: 0.1", "split", "species", "notes", "label", "filename"]
    rows = [[str(i), str(i), r[3], r[2], "x, \"quoted\"", r[1], r[0]] for i, r in enumerate(GOOD_ROWS)]
    src = GistSource(write_csv(tmp_path / "m.csv", rows, header), tmp_path / "img")
    assert src.class_names == ["red circle", "blue square"]
    assert src.splits == {"test": 1, "train": 2, "val": 1}
    assert src[2] == {"index": 2, "filename": "b/1.jpg", "path": str(tmp_path / "img" / "b" / "1.jpg"),
                      "label": 1, "species": "blue square", "split": "train"}


def test_missing_column_lists_columns_found(tmp_path):
    path = write_csv(tmp_path / "m.csv", [r[:3] for r in GOOD_ROWS], ["filename", "label", "species"])
    with pytest.raises(DataError) as e:
        GistSource(path, tmp_path)
    assert str(path) in message(e)
    assert "['split']" in message(e) and "columns found: ['filename', 'label', 'species']" in message(e)


def test_non_integer_label_names_the_line(tmp_path):
    rows = GOOD_ROWS[:2] + [["b/1.jpg", "one", "blue square", "train"]]
    path = write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(DataError, match=r"line 4: label 'one' is not an integer") as e:
        GistSource(path, tmp_path)
    assert str(path) in message(e)


def test_line_numbers_count_physical_lines(tmp_path):
    """A quoted field spanning two lines shifts the following rows' line numbers."""
    header = HEADER + ["notes"]
    rows = [GOOD_ROWS[0] + ["two\nlines"], ["b/1.jpg", "1.5", "blue square", "train", ""]]
    path = write_csv(tmp_path / "m.csv", rows, header)
    with pytest.raises(DataError, match=r"m\.csv, line 4: label '1\.5' is not an integer"):
        GistSource(path, tmp_path)


def test_negative_label(tmp_path):
    rows = GOOD_ROWS + [["c/1.jpg", "-1", "green ring", "train"]]
    path = write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(DataError, match=r"m\.csv, line 6: label -1 is negative"):
        GistSource(path, tmp_path)


def test_label_outside_num_classes(tmp_path):
    path = write_csv(tmp_path / "m.csv", GOOD_ROWS)
    assert GistSource(path, tmp_path, num_classes=2).num_classes == 2
    with pytest.raises(DataError, match=r"m\.csv, line 4: label 1 is outside \[0, 1\)"):
        GistSource(path, tmp_path, num_classes=1)
    with pytest.raises(DataError, match=r"1 of 3 labels have no row.*: 2"):
        GistSource(path, tmp_path, num_classes=3)


def test_label_with_two_species_names(tmp_path):
    rows = GOOD_ROWS + [["b/3.jpg", "1", "blue squares", "train"]]
    path = write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(DataError) as e:
        GistSource(path, tmp_path)
    assert str(path) in message(e)
    assert "label 1 is 'blue square' on line 4 but 'blue squares' on line 6" in message(e)


def test_species_shared_by_two_labels(tmp_path):
    rows = GOOD_ROWS + [["c/1.jpg", "2", "red circle", "train"]]
    with pytest.raises(DataError, match=r"'red circle' -> labels \[0, 2\]"):
        GistSource(write_csv(tmp_path / "m.csv", rows), tmp_path)


def test_gap_in_labels(tmp_path):
    rows = GOOD_ROWS + [["d/1.jpg", "3", "black cross", "train"]]
    with pytest.raises(DataError, match=r"m\.csv: 1 of 4 labels have no row.*: 2"):
        GistSource(write_csv(tmp_path / "m.csv", rows), tmp_path)


def test_duplicate_filename(tmp_path):
    rows = GOOD_ROWS + [["a/1.jpg", "0", "red circle", "val"]]
    with pytest.raises(DataError, match=r"m\.csv, line 6: filename 'a/1\.jpg' already appears on line 2"):
        GistSource(write_csv(tmp_path / "m.csv", rows), tmp_path)


def test_empty_metadata(tmp_path):
    header_only = write_csv(tmp_path / "header_only.csv", [])
    with pytest.raises(DataError, match=r"header_only\.csv: metadata has a header but no rows"):
        GistSource(header_only, tmp_path)
    blank = tmp_path / "blank.csv"
    blank.write_text("")
    with pytest.raises(DataError, match=r"blank\.csv: metadata file is empty"):
        GistSource(blank, tmp_path)


def test_empty_selected_split(tmp_path):
    path = write_csv(tmp_path / "m.csv", GOOD_ROWS)
    with pytest.raises(DataError) as e:
        GistSource(path, tmp_path, split="validation")
    assert str(path) in message(e)
    assert "['validation'] have no rows" in message(e) and "'val': 1" in message(e)


def test_captions_not_an_object(tmp_path):
    meta = write_csv(tmp_path / "m.csv", GOOD_ROWS)
    caps = write_json(tmp_path / "caps.json", [["a/1.jpg", ["x"]]])
    with pytest.raises(DataError, match=r"caps\.json: captions file must be a JSON object, found a list"):
        GistSource(meta, tmp_path, captions=caps)


def test_captions_value_not_a_list_names_the_key(tmp_path):
    meta = write_csv(tmp_path / "m.csv", GOOD_ROWS)
    caps = write_json(tmp_path / "caps.json", {"a/1.jpg": ["fine"], "b/1.jpg": "a lone string"})
    with pytest.raises(DataError, match=r"caps\.json: captions key 'b/1\.jpg' maps to a str, expected a list"):
        GistSource(meta, tmp_path, captions=caps)


def test_captions_item_not_a_string_names_the_key(tmp_path):
    meta = write_csv(tmp_path / "m.csv", GOOD_ROWS)
    caps = write_json(tmp_path / "caps.json", {"a/1.jpg": ["fine"], "b/1.jpg": ["ok", 7]})
    with pytest.raises(DataError, match=r"caps\.json: captions key 'b/1\.jpg' item 1 is a int"):
        GistSource(meta, tmp_path, captions=caps)


def test_captions_invalid_json(tmp_path):
    meta = write_csv(tmp_path / "m.csv", GOOD_ROWS)
    caps = tmp_path / "caps.json"
    caps.write_text('{"a/1.jpg": [')
    with pytest.raises(DataError, match=r"caps\.json: captions file is not valid JSON"):
        GistSource(meta, tmp_path, captions=caps)


def test_train_file_without_captions_errors_by_default(tmp_path):
    rows = GOOD_ROWS + [[f"c/{i}.jpg", "2", "green ring", "train"] for i in range(7)]
    meta = write_csv(tmp_path / "m.csv", rows)
    caps = write_json(tmp_path / "caps.json", {"a/1.jpg": ["x", "y"], "c/3.jpg": ["z", "w"]})
    with pytest.raises(DataError) as e:
        GistSource(meta, tmp_path, captions=caps)
    text = message(e)
    assert str(caps) in text and str(meta) in text
    assert "7 train file(s) have no captions" in text
    assert "'b/1.jpg' (line 4)" in text and "'c/0.jpg' (line 6)" in text
    assert "c/3.jpg" not in text and "missing_captions='skip'" in text
    # val/test rows without captions are fine: only the selected train rows must have them.
    assert len(GistSource(meta, tmp_path, captions=caps, split=["val", "test"])) == 2


def test_train_file_without_captions_skip_policy(tmp_path):
    rows = GOOD_ROWS + [["c/1.jpg", "2", "green ring", "train"]]
    meta = write_csv(tmp_path / "m.csv", rows)
    caps = write_json(tmp_path / "caps.json", {"a/1.jpg": ["x", "y"], "c/1.jpg": ["z", "w"]})
    src = GistSource(meta, tmp_path, captions=caps, split="train", missing_captions="skip")
    assert src.skipped == ["b/1.jpg"]
    assert [r["filename"] for r in src] == ["a/1.jpg", "c/1.jpg"]
    assert [r["index"] for r in src] == [0, 1]
    assert src.num_classes == 3  # the label space does not shrink
    with pytest.raises(ValueError, match="missing_captions"):
        GistSource(meta, tmp_path, captions=caps, missing_captions="ignore")


def test_fewer_captions_than_num_captions(tmp_path):
    meta = write_csv(tmp_path / "m.csv", GOOD_ROWS)
    caps = write_json(tmp_path / "caps.json", {"a/1.jpg": ["x", "y", "z"], "b/1.jpg": ["only one"]})
    assert GistSource(meta, tmp_path, captions=caps, num_captions=1, split="train")[1]["captions"] == ["only one"]
    with pytest.raises(DataError) as e:
        GistSource(meta, tmp_path, captions=caps, num_captions=2)
    assert str(caps) in message(e)
    assert "1 file(s) have fewer than num_captions=2" in message(e) and "'b/1.jpg' has 1" in message(e)


def test_check_files_reports_missing_images(tmp_path):
    meta = write_csv(tmp_path / "m.csv", GOOD_ROWS)
    img = tmp_path / "img"
    (img / "a").mkdir(parents=True)
    (img / "a" / "1.jpg").touch()
    with pytest.raises(FileNotFoundError) as e:
        GistSource(meta, img, check_files=True)
    assert "3 of 4 image file(s) do not exist" in message(e)
    assert str(img / "b" / "1.jpg") in message(e) and str(meta) in message(e)
    assert len(GistSource(meta, img, split="train", check_files=False)) == 2


def test_records_are_copies(tmp_path):
    meta = write_csv(tmp_path / "m.csv", GOOD_ROWS)
    caps = write_json(tmp_path / "caps.json", {"a/1.jpg": ["x"], "b/1.jpg": ["y"]})
    src = GistSource(meta, tmp_path, captions=caps)
    r = src[0]
    r["label"] = 99
    r["captions"].append("z")
    assert src[0]["label"] == 0 and src[0]["captions"] == ["x"]


# ---------------------------------------------------------------------------------------------
# Descriptions
# ---------------------------------------------------------------------------------------------

def test_class_key_normalization():
    assert class_key("Black footed Albatross") == "black-footed-albatross"
    assert class_key("black-footed-albatross\n") == "black-footed-albatross"
    assert class_key("Chuck_will's  Widow") == "chuck-will-s-widow"
    assert class_key("707-320") == "707-320"
    assert class_key("Café  au-lait spots") == "café-au-lait-spots"


def test_descriptions_keys_and_labels_that_do_not_match(tmp_path):
    path = write_json(tmp_path / "desc.json", {"red-circle": ["round"], "green-ring": ["hollow"]})
    with pytest.raises(DataError) as e:
        read_descriptions(path, ["red circle", "blue square"])
    text = message(e)
    assert str(path) in text
    assert "1 key(s) match no class name: 'green-ring'" in text
    assert "1 label(s) have no descriptions: 1: 'blue square'" in text


def test_descriptions_maps_by_label(tmp_path):
    path = write_json(tmp_path / "desc.json", {"Blue_Square\n": ["b1", "b2"], "red circle": ["r"]})
    assert read_descriptions(path, ["red circle", "blue square"]) == [["r"], ["b1", "b2"]]


def test_descriptions_empty_list_and_duplicate_keys(tmp_path):
    path = write_json(tmp_path / "desc.json", {"red circle": [], "blue square": ["b"], "Blue-Square": ["c"]})
    with pytest.raises(DataError) as e:
        read_descriptions(path, ["red circle", "blue square"])
    assert "key(s) have an empty list: 'red circle'" in message(e)
    assert "'blue square' and 'Blue-Square' -> 'blue square'" in message(e)


def test_descriptions_bad_value_names_the_key(tmp_path):
    path = write_json(tmp_path / "desc.json", {"red circle": ["r"], "blue square": {"text": "b"}})
    with pytest.raises(DataError, match=r"desc\.json: descriptions key 'blue square' maps to a dict"):
        read_descriptions(path, ["red circle", "blue square"])


def test_descriptions_class_names_that_collide(tmp_path):
    path = write_json(tmp_path / "desc.json", {"red-circle": ["r"]})
    with pytest.raises(DataError, match=r"'red circle' \(label 0\) and 'Red-Circle' \(label 1\) both normalize"):
        read_descriptions(path, ["red circle", "Red-Circle"])


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------

def make_folder(root, layout):
    for rel in layout:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    return root


def test_image_folder_records(tmp_path):
    root = make_folder(tmp_path / "train", [
        "zebra/1.JPG", "zebra/sub/2.png", "zebra/notes.txt", "zebra/.hidden.jpg",
        "ant/b.jpeg", "ant/a.jpg", ".cache/x.jpg", "README.md",
    ])
    src = ImageFolderSource(root, split="train")
    assert src.class_names == ["ant", "zebra"] and src.num_classes == 2
    assert src.filenames == ["ant/a.jpg", "ant/b.jpeg", "zebra/1.JPG", "zebra/sub/2.png"]
    assert src.labels.tolist() == [0, 0, 1, 1]
    assert src[3] == {"index": 3, "filename": "zebra/sub/2.png", "path": str(root / "zebra" / "sub" / "2.png"),
                      "label": 1, "species": "zebra", "split": "train"}
    assert "split" not in ImageFolderSource(root)[0]
    assert len(grain.MapDataset.source(src)) == 4


def test_image_folder_extensions(tmp_path):
    root = make_folder(tmp_path, ["a/1.png", "a/2.jpg", "b/3.PNG"])
    assert ImageFolderSource(root, extensions=("png",)).filenames == ["a/1.png", "b/3.PNG"]


def test_image_folder_empty_root(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "stray.jpg").touch()
    with pytest.raises(DataError, match=r"root: no class folders"):
        ImageFolderSource(tmp_path / "root")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSource(tmp_path / "nowhere")


def test_image_folder_class_without_images(tmp_path):
    root = make_folder(tmp_path, ["a/1.jpg", "b/readme.txt", "c/2.png"])
    (root / "d").mkdir()
    with pytest.raises(DataError) as e:
        ImageFolderSource(root)
    assert re.search(r"2 of 4 class folder\(s\) have no images .*'b', 'd'", message(e))
    assert str(root) in message(e)


def test_small_data_errors_point_at_the_line_and_an_example(tmp_path):
    """A label typo names its line; files without captions are shown beside a key of the captions file."""
    meta = tmp_path / "m.csv"
    meta.write_text("filename,label,species,split\na.jpg,0,x,train\nb.jpg,7,y,train\n")
    with pytest.raises(DataError, match=r"the highest label, 7 on line 3, sets the number of classes"):
        GistSource(meta, tmp_path)
    meta.write_text("filename,label,species,split\nbirds/a.jpg,0,x,train\nbirds/b.jpg,1,y,train\n")
    caps = tmp_path / "c.json"
    caps.write_text(json.dumps({"/data/CUB/images/birds/a.jpg": ["a bird"], "/data/CUB/images/birds/b.jpg": ["b"]}))
    with pytest.raises(DataError, match=r"keys look like '/data/CUB/images/birds/a.jpg'.*missing_captions=skip"):
        GistSource(meta, tmp_path, captions=caps, num_captions=1)
