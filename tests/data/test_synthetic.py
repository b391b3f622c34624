"""The synthetic fine-grained bird dataset: taxonomy, drawing, captions, the GIST files on disk."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxgist.data import images, synthetic
from jaxgist.data.sources import GistSource, class_key, read_descriptions

# 8 classes = 2 genera of 4 species.
PARAMS = dict(num_classes=8, train_per_class=6, val_per_class=2, test_per_class=3, image_size=64, seed=0,
              num_captions=5, shots=(1, 3, 5))
REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("birds") / "ds", **PARAMS)


def files_of(root) -> dict[str, bytes]:
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Taxonomy
# ---------------------------------------------------------------------------------------------

def test_species_are_fine_grained_and_stable():
    species = synthetic.species_list(synthetic.max_classes(4), 4)
    assert len({sp.name for sp in species}) == len(species)
    assert len({class_key(sp.name) for sp in species}) == len(species)
    for a, b in itertools.combinations(species, 2):
        d = synthetic.attribute_distance(a, b)
        if a.genus == b.genus:
            assert 1 <= d <= 2, (a.name, b.name)
        else:
            assert d >= 2, (a.name, b.name)
    # Each non-common species departs from its genus's common species exactly where it says.
    for genus in itertools.groupby(species, key=lambda sp: sp.genus):
        common, *others = genus[1]
        assert common.name.startswith("Common ") and common.distinguishing == ()
        for sp in others:
            (changed,) = sp.distinguishing
            assert synthetic.attribute_distance(common, sp) == 1
            field = {"crest": "crest", "wing": "wing_colour", "pattern": "pattern", "beak": "beak_colour",
                     "tail": "tail", "head": "head_colour"}[changed]
            assert getattr(sp, field) != getattr(common, field)
    # Prefixes are stable, and a genus is the same whatever its size.
    assert synthetic.species_list(5) == synthetic.species_list(20)[:5]
    assert synthetic.species_list(6, species_per_genus=2)[::2] == synthetic.species_list(12, 4)[::4][:3]
    with pytest.raises(ValueError, match="num_classes"):
        synthetic.species_list(synthetic.max_classes(4) + 1)


def test_a_species_differs_from_its_genus_only_in_a_small_region():
    common, *others = synthetic.species_list(4)
    for sp in others:
        a, scene_a = synthetic.render(common, 96, np.random.default_rng(7))
        b, scene_b = synthetic.render(sp, 96, np.random.default_rng(7))
        assert scene_a == scene_b
        changed = np.mean(np.any(a != b, axis=-1))
        assert 0.001 < changed < 0.2, (sp.name, changed)


# ---------------------------------------------------------------------------------------------
# Files on disk
# ---------------------------------------------------------------------------------------------

def test_gist_source_and_descriptions_read_it(dataset):
    counts = {"train": 6, "val": 2, "test": 3}
    for split, n in counts.items():
        source = GistSource(dataset.metadata, dataset.image_dir, split=split, captions=dataset.captions,
                            num_captions=5, check_files=True)
        assert len(source) == 8 * n
        assert source.class_names == list(dataset.class_names)
        assert np.bincount(source.labels).tolist() == [n] * 8
        if split == "train":
            assert all(len(r["captions"]) == 5 for r in source)
            assert source.unused_captions == 0
        else:
            assert all(r["captions"] == [] for r in source)
    descriptions = read_descriptions(dataset.descriptions, source.class_names)
    assert [len(d) for d in descriptions] == [6] * 8
    for name, descs in zip(dataset.class_names, descriptions):
        assert all(name in d for d in descs[:4])  # most descriptions name their class

    # CUB's conventions: "001.Common_Finch/Common_Finch_0001.jpg", classes.txt "1 001.Common_Finch".
    rows = read_rows(dataset.metadata)
    assert list(rows[0]) == ["filename", "label", "species", "split"]
    assert re.fullmatch(r"001\.Common_[A-Za-z]+/Common_[A-Za-z]+_0001\.jpg", rows[0]["filename"])
    classes = pathlib.Path(dataset.classes).read_text().splitlines()
    assert classes == [f"{i + 1} {synthetic.folder_name(i, n)}" for i, n in enumerate(dataset.class_names)]
    assert all(r["filename"].startswith(synthetic.folder_name(int(r["label"]), r["species"]) + "/") for r in rows)
    assert os.path.basename(dataset.captions) == "captions_top5.json"
    assert os.path.basename(dataset.descriptions) == "long_captions.json"
    with open(dataset.captions) as f:
        assert set(json.load(f)) == {r["filename"] for r in rows if r["split"] == "train"}


def test_coder_knowledge_file(dataset, tmp_path):
    """coder_knowledge.json: the classes in label order with their drawn attributes, pairs within a genus
    (its content against the CODER loader: tests/heads/test_coder.py)."""
    assert os.path.basename(dataset.coder_knowledge) == "coder_knowledge.json"
    with open(dataset.coder_knowledge) as f:
        knowledge = json.load(f)
    assert set(knowledge) == {"version", "templates", "classes", "pairs"} and knowledge["version"] == 1
    assert [c["name"] for c in knowledge["classes"]] == list(dataset.class_names)
    species = synthetic.species_list(8)
    for sp, c in zip(species, knowledge["classes"]):
        assert len(c["attributes"]) == 7 and c["synonyms"][0].startswith(sp.genus.lower() + " with ")
        assert f"{sp.wing_colour} wings" in c["attributes"]
        assert sorted(c["analogous"]) == sorted(o.name for o in species if o.genus == sp.genus and o != sp)
    assert set(knowledge["pairs"]) == {f"{i},{j}" for i in range(8) for j in range(8)
                                       if i != j and species[i].genus == species[j].genus}
    # A dataset written before datasets carried the file gets it when reused.
    params = dict(num_classes=2, train_per_class=1, val_per_class=0, test_per_class=0, image_size=32, shots=())
    old = synthetic.write_dataset(tmp_path / "old", **params)
    expected = pathlib.Path(old.coder_knowledge).read_bytes()
    os.remove(old.coder_knowledge)
    again = synthetic.write_dataset(tmp_path / "old", **params)
    assert not again.created and pathlib.Path(again.coder_knowledge).read_bytes() == expected
    assert sorted(p.name for p in (tmp_path / "old").iterdir() if ".tmp" in p.name) == []


def test_few_shot_metadata(dataset):
    full = read_rows(dataset.metadata)
    chosen = {}
    for k, path in dataset.few_shot.items():
        assert os.path.basename(path) == f"metadata_{k}shot.csv"
        rows = read_rows(path)
        assert [r for r in rows if r["split"] != "train"] == [r for r in full if r["split"] != "train"]
        source = GistSource(path, dataset.image_dir, split="train", captions=dataset.captions, num_captions=5,
                            check_files=True)
        assert np.bincount(source.labels).tolist() == [k] * 8
        assert source.num_classes == 8
        chosen[k] = set(source.filenames)
    assert chosen[1] < chosen[3] < chosen[5]


def test_images_decode(dataset):
    source = GistSource(dataset.metadata, dataset.image_dir)
    for path in source.paths:
        assert path.endswith(".jpg")
        pixels = images.load_image(path)
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert dataset.num_images == len(source) == 8 * 11


COLOUR_WORDS = set(synthetic.PALETTE)


def test_captions_describe_what_each_image_shows(dataset):
    with open(dataset.captions) as f:
        captions = json.load(f)
    with open(dataset.attributes) as f:
        attributes = json.load(f)
    assert set(attributes["images"]) == {r["filename"] for r in read_rows(dataset.metadata)}
    for filename, caps in captions.items():
        species = filename.split("/")[0].split(".", 1)[1].replace("_", " ")
        name = next(n for n in attributes["classes"] if n.replace("-", " ") == species)
        sp, scene = attributes["classes"][name], attributes["images"][filename]
        assert len(caps) == 5 and len(set(caps)) == 5
        background_words = set(scene["background"].split())
        shown = {sp["body_colour"], sp["head_colour"], sp["wing_colour"], sp["beak_colour"]} | (
            {sp["pattern_colour"]} if sp["pattern"] != "plain" else set()) | ({sp["crest"]} if sp["crest"] else set())
        for cap in caps:
            words = set(re.findall(r"[a-z]+", cap))
            assert name.lower() in cap
            # Every part colour is named, and no colour is named that the image does not show.
            assert shown <= words, (cap, shown)
            assert words & COLOUR_WORDS <= shown | background_words, cap
            assert f"{sp['wing_colour']} wing" in cap and f"{sp['beak_colour']} b" in cap
            assert (f"{sp['crest']} crest" in cap) if sp["crest"] else ("no crest" in cap or "without a crest" in cap)
            assert f"{sp['head_colour']} head" in cap or f"head the same {sp['head_colour']}" in cap
            assert sp["tail"] in words and ({"short", "long"} - {sp["tail"]}).isdisjoint(words)
            pattern_word = {"striped": "stripe", "spotted": "spot", "checkered": "checker"}
            assert all((word in cap) == (p == sp["pattern"]) for p, word in pattern_word.items()), cap
            # The scene: which way it faces, its perch, its background, when the caption says so.
            other_side = {"left": "right", "right": "left"}[scene["facing"]]
            assert other_side not in words
            if "facing" in words or "looking" in words:
                assert scene["facing"] in words
            assert scene["perched"] or "branch" not in words
            if "background" in words or "backdrop" in words:
                assert f"{scene['texture']} {scene['background']} back" in cap
        assert any(scene["facing"] in c for c in caps)
        assert any("branch" in c for c in caps) == scene["perched"]


# ---------------------------------------------------------------------------------------------
# Determinism, reuse, parameters
# ---------------------------------------------------------------------------------------------

def test_same_seed_same_bytes_other_seed_other_images(dataset, tmp_path):
    again = synthetic.write_dataset(tmp_path / "again", **PARAMS)
    assert again.created
    assert files_of(dataset.root) == files_of(again.root)

    other = synthetic.write_dataset(tmp_path / "other", **{**PARAMS, "seed": 1})
    a, b = files_of(dataset.root), files_of(other.root)
    assert a.keys() == b.keys()
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != b[k] for k in jpgs)
    assert a["metadata.csv"] == b["metadata.csv"] and a["long_captions.json"] == b["long_captions.json"]
    assert a["captions_top5.json"] != b["captions_top5.json"]


def test_same_bytes_in_another_process(tmp_path):
    params = dict(num_classes=3, train_per_class=2, val_per_class=1, test_per_class=1, image_size=32, seed=5,
                  shots=(1, 2))
    here = synthetic.write_dataset(tmp_path / "here", **params)
    code = ("import sys; from jaxgist.data import synthetic; "
            f"synthetic.write_dataset(sys.argv[1], **{params!r})")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], check=True, env=env, cwd=REPO)
    assert files_of(here.root) == files_of(tmp_path / "there")


def test_reuse_mismatch_overwrite_and_foreign_dirs(tmp_path):
    params = dict(num_classes=2, train_per_class=2, val_per_class=1, test_per_class=1, image_size=32, shots=(1,))
    first = synthetic.write_dataset(tmp_path / "ds", **params)
    stamp = os.stat(first.metadata).st_mtime_ns
    second = synthetic.write_dataset(tmp_path / "ds", **params)
    assert first.created and not second.created
    assert second == dataclasses.replace(first, created=False)
    assert os.stat(first.metadata).st_mtime_ns == stamp

    with pytest.raises(ValueError, match=r"other parameters.*'seed': \(0, 1\)"):
        synthetic.write_dataset(tmp_path / "ds", **params, seed=1)
    third = synthetic.write_dataset(tmp_path / "ds", **params, seed=1, overwrite=True)
    assert third.created
    with open(third.manifest) as f:
        assert json.load(f)["params"]["seed"] == 1

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing"):
        synthetic.write_dataset(foreign, **params, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert synthetic.write_dataset(empty, **params).created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "empty", "foreign"]  # no temporary leftovers

    with pytest.raises(ValueError, match="shots"):
        synthetic.write_dataset(tmp_path / "bad", **{**params, "shots": (3,)})
    assert not (tmp_path / "bad").exists()


def test_command_line(tmp_path):
    out = tmp_path / "cli"
    args = [sys.executable, "-m", "jaxgist.data.synthetic", "--out", str(out), "--num_classes", "3",
            "--train_per_class", "2", "--val_per_class", "1", "--test_per_class", "1", "--image_size", "32",
            "--shots", "1,2"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, check=True)
    assert "wrote" in result.stdout and "--config.data.metadata=" in result.stdout
    assert {"metadata.csv", "metadata_1shot.csv", "metadata_2shot.csv", "captions_top5.json",
            "long_captions.json", "classes.txt", "manifest.json"} <= {p.name for p in out.iterdir()}
    result = subprocess.run(args[:-2] + ["--shots", "1"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0 and "other parameters" in result.stderr


# ---------------------------------------------------------------------------------------------
# Learnability
# ---------------------------------------------------------------------------------------------

def colour_histograms(pixels: np.ndarray, bins: int = 4) -> np.ndarray:
    q = pixels.astype(np.int64) * bins // 256
    cell = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    return np.stack([np.bincount(c.ravel(), minlength=bins**3) for c in cell]) / cell[0].size


def test_classes_are_learnable_but_not_from_mean_colour(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ds = synthetic.write_dataset(tmp_path / "learn", num_classes=8, train_per_class=30, val_per_class=0,
                                 test_per_class=20, image_size=64, seed=0, shots=())

    def load(split):
        source = GistSource(ds.metadata, ds.image_dir, split=split)
        return np.stack([images.load_image(p) for p in source.paths]), source.labels

    (x_train, y_train), (x_test, y_test) = load("train"), load("test")
    genus = np.arange(8) // 4  # two genera of four species

    def accuracy(features):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        model.fit(features(x_train), y_train)
        predicted = model.predict(features(x_test))
        return np.mean(predicted == y_test), np.mean(genus[predicted] == genus[y_test])

    species_acc, genus_acc = accuracy(colour_histograms)
    mean_acc, _ = accuracy(lambda x: x.reshape(len(x), -1, 3).mean(axis=1))
    chance = 1 / 8
    assert genus_acc > 0.85  # genera differ in several attributes: easy
    assert 2.4 * chance < species_acc < 0.9  # species of a genus differ in one: well above chance, not trivial
    assert mean_acc < species_acc and mean_acc < 0.4  # the mean colour says little


def test_first_class_selects_a_disjoint_range_of_species(tmp_path):
    a = synthetic.write_dataset(tmp_path / "a", num_classes=3, train_per_class=1, val_per_class=0,
                                test_per_class=0, image_size=32, shots=())
    b = synthetic.write_dataset(tmp_path / "b", num_classes=3, train_per_class=1, val_per_class=0,
                                test_per_class=0, image_size=32, shots=(), first_class=3)
    assert not set(a.class_names) & set(b.class_names)
    assert list(b.class_names) == [sp.name for sp in synthetic.species_list(6)[3:]]
