"""Caption data for CgT-GAN: Karpathy split files, COCO-format ground truth, text corpora (the
reference's COCO and GCC preprocessing), and the synthetic captioning set."""

from __future__ import annotations

import json
import logging
import os
import string

import numpy as np
import pytest
from PIL import Image

from jaxgist.data import captions, synthetic
from jaxgist.data.captions import CaptionDataError, CaptionImage

# ---------------------------------------------------------------------------------------------
# Karpathy split files
# ---------------------------------------------------------------------------------------------


def sentence(raw):
    return {"raw": raw, "tokens": raw.lower().strip(" .").split()}


def coco_entry(cocoid, split, n=2):
    folder = "train2014" if split == "train" else "val2014"
    return {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "split": split, "imgid": cocoid % 97,
            "cocoid": cocoid, "sentids": list(range(n)),
            "sentences": [sentence(f"Caption {k} of image {cocoid}.") for k in range(n)]}


def flickr_entry(stem, split, n=5):
    return {"filename": f"{stem}.jpg", "split": split, "imgid": 3, "sentids": list(range(n)),
            "sentences": [sentence(f"Flickr caption {k} of {stem} .") for k in range(n)]}


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def coco_file(tmp_path):
    entries = [coco_entry(11, "train"), coco_entry(22, "restval"), coco_entry(33, "val"), coco_entry(44, "test"),
               coco_entry(55, "train", n=3), coco_entry(66, "restval")]
    return write_json(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": entries})


def test_coco_train_is_train_plus_restval_with_coco_ids_and_paths(coco_file, tmp_path):
    root = tmp_path / "coco"
    images = captions.read_karpathy(coco_file, root)
    assert [im.image_id for im in images] == [11, 22, 55, 66]
    assert {im.split for im in images} == {"train"}
    assert images[0].path == os.path.join(root, "train2014", "COCO_train2014_000000000011.jpg")
    assert images[1].path == os.path.join(root, "val2014", "COCO_val2014_000000000022.jpg")
    assert images[2].captions == ("Caption 0 of image 55.", "Caption 1 of image 55.", "Caption 2 of image 55.")

    # restval kept apart: "train" is Karpathy's train only, "restval" selectable.
    apart = captions.read_karpathy(coco_file, root, splits="train", restval_as_train=False)
    assert [im.image_id for im in apart] == [11, 55]
    restval = captions.read_karpathy(coco_file, root, splits=["restval"], restval_as_train=False)
    assert [(im.image_id, im.split) for im in restval] == [(22, "restval"), (66, "restval")]

    evaluation = captions.read_karpathy(coco_file, root, splits=("val", "test"))
    assert [(im.image_id, im.split) for im in evaluation] == [(33, "val"), (44, "test")]

    with pytest.raises(CaptionDataError, match="restval_as_train"):
        captions.read_karpathy(coco_file, root, splits=("train", "restval"))
    with pytest.raises(CaptionDataError, match=r"dataset_coco.json: unknown split\(s\) \['validation'\]"):
        captions.read_karpathy(coco_file, root, splits="validation")


def test_flickr_ids_are_file_stems_and_paths_have_no_filepath(tmp_path):
    entries = [flickr_entry("1000092795", "train"), flickr_entry("1001465944", "val"),
               flickr_entry("2513260012_03d33305cf", "train"), flickr_entry("36979", "test")]
    path = write_json(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": entries})
    root = tmp_path / "flickr30k_images"
    train = captions.read_karpathy(path, root)
    assert [im.image_id for im in train] == [1000092795, "2513260012_03d33305cf"]
    assert train[0].path == os.path.join(root, "1000092795.jpg")
    assert len(train[0].captions) == 5 and train[0].captions[4] == "Flickr caption 4 of 1000092795 ."
    assert [im.image_id for im in captions.read_karpathy(path, root, splits="test")] == [36979]
    # Flickr30k has no restval: asking for it alone finds nothing.
    with pytest.raises(CaptionDataError, match=r"\['restval'\] have no images"):
        captions.read_karpathy(path, root, splits="restval", restval_as_train=False)


def test_missing_image_files_are_reported_all_at_once(coco_file, tmp_path):
    root = tmp_path / "coco"
    images = captions.read_karpathy(coco_file, root, splits=("train", "val", "test"))
    for im in images[:2]:  # two of six exist
        os.makedirs(os.path.dirname(im.path), exist_ok=True)
        Image.new("RGB", (4, 4), (10, 200, 30)).save(im.path)
    with pytest.raises(CaptionDataError, match="4 of 6 image files are missing") as e:
        captions.read_karpathy(coco_file, root, splits=("train", "val", "test"), check_files=True)
    for im in images[2:]:
        assert im.path in str(e.value)
    assert images[0].path not in str(e.value)

    for im in images[2:]:
        os.makedirs(os.path.dirname(im.path), exist_ok=True)
        Image.new("RGB", (4, 4)).save(im.path)
    assert captions.read_karpathy(coco_file, root, splits=("train", "val", "test"), check_files=True) == images

    many = [CaptionImage(k, str(tmp_path / f"no_{k}.jpg"), ("x",), "val") for k in range(12)]
    with pytest.raises(CaptionDataError, match=r"12 of 12 .*no_4\.jpg; \.\.\. \(7 more\)"):
        captions.check_image_files(many)


def test_malformed_entries_are_all_named(tmp_path):
    entries = [coco_entry(1, "train"),
               {k: v for k, v in coco_entry(2, "train").items() if k != "filename"},
               {k: v for k, v in coco_entry(3, "val").items() if k != "sentences"},
               {**coco_entry(4, "test"), "sentences": [{"tokens": ["a"]}, sentence("ok"), {"raw": "  "}]},
               {**coco_entry(5, "train"), "split": "holdout"},
               {k: v for k, v in coco_entry(6, "train").items() if k != "cocoid"},
               "not an entry"]
    path = write_json(tmp_path / "bad.json", {"dataset": "coco", "images": entries})
    with pytest.raises(CaptionDataError) as e:
        captions.read_karpathy(path, tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: 6 malformed entries")
    assert "images[1]: no 'filename'" in msg
    assert "images[2] ('COCO_val2014_000000000003.jpg'): no 'sentences'" in msg
    assert "images[3] ('COCO_val2014_000000000004.jpg'): sentence(s) [0, 2] have no non-empty 'raw'" in msg
    assert "images[4] ('COCO_train2014_000000000005.jpg'): split 'holdout'" in msg
    assert "images[5] ('COCO_train2014_000000000006.jpg'): no integer 'cocoid'" in msg
    assert "images[6]: not an object but str" not in msg  # the sixth is past the first five shown
    assert "(1 more)" in msg

    with pytest.raises(CaptionDataError, match="no 'images' list"):
        captions.read_karpathy(write_json(tmp_path / "x.json", {"dataset": "coco", "annotations": []}), tmp_path)
    dup = write_json(tmp_path / "dup.json", {"images": [flickr_entry("7", "train"), flickr_entry("007", "val")]})
    with pytest.raises(CaptionDataError, match=r"duplicate image id.*id 7 in images\[0\] and images\[1\]"):
        captions.read_karpathy(dup, tmp_path)
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(CaptionDataError, match="broken.json: not valid JSON"):
        captions.read_karpathy(tmp_path / "broken.json", tmp_path)


# ---------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------

def test_coco_ground_truth_and_references(coco_file, tmp_path):
    images = captions.read_karpathy(coco_file, tmp_path, splits=("val", "test", "train"))
    gt = captions.coco_ground_truth(images)
    assert gt["type"] == "captions" and gt["info"] == {} and gt["licenses"] == []
    assert [im["id"] for im in gt["images"]] == [11, 22, 33, 44, 55, 66]
    assert [a["id"] for a in gt["annotations"]] == list(range(1, 14))
    assert gt["annotations"][6] == {"image_id": 44, "id": 7, "caption": "Caption 0 of image 44."}
    refs = captions.references(images)
    assert refs[55] == ["Caption 0 of image 55.", "Caption 1 of image 55.", "Caption 2 of image 55."]
    assert sum(map(len, refs.values())) == len(gt["annotations"])
    with pytest.raises(CaptionDataError, match="33 x2"):
        captions.coco_ground_truth(images + images[2:3])

    coco_module = pytest.importorskip("pycocotools.coco")
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt), encoding="utf-8")
    coco = coco_module.COCO(str(path))
    assert sorted(coco.getImgIds()) == [11, 22, 33, 44, 55, 66]
    assert [coco.anns[i]["caption"] for i in coco.getAnnIds(imgIds=[55])] == refs[55]
    results = coco.loadRes([{"image_id": 33, "caption": "a thing"}, {"image_id": 44, "caption": "another"}])
    assert sorted(results.getImgIds()) == [33, 44]


# ---------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------

def write_lines(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def test_coco_style_normalization(tmp_path):
    cases = {
        "a dog runs on the grass.": "A dog runs on the grass.",
        "a dog runs on the grass": "A dog runs on the grass.",
        "Two cats sleep!": "Two cats sleep.",
        "what is this?": "What is this.",
        "ends with two dots..": "Ends with two dots..",
        "a man with a hat ,": "A man with a hat .",
        "élan on a bike": "Élan on a bike.",
        "3 birds": "3 birds.",
    }
    for raw, expected in cases.items():
        assert captions.normalize_coco(raw) == expected, raw
    path = write_lines(tmp_path / "corpus.txt", ["  a dog runs on the grass  ", "", "Two cats sleep!"])
    assert captions.read_corpus(path, style="coco") == ["A dog runs on the grass.", "Two cats sleep."]
    assert captions.read_corpus(path) == ["a dog runs on the grass", "Two cats sleep!"]


def reference_gcc_loop(tsv_path, seed_inside_loop=True):
    """gcc_external_captions.py's loop, transcribed (numpy's global state is restored afterwards)."""
    additional_punc = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                       ".", "?", "!", ",", ":", "-", "--", "...", ";"}
    punc_set = additional_punc | set(string.punctuation)
    f = open(tsv_path, encoding="utf-8", errors="ignore")
    discriptions = [line.split("\t")[0] for line in f]
    f.close()
    state = np.random.get_state()
    if not seed_inside_loop:
        np.random.seed(0)
    sentences = []
    try:
        for discription_ in discriptions:
            discription = discription_.split()
            if discription[0] in punc_set:
                discription = discription[1:]
            if discription[-1] in punc_set:
                discription = discription[:-1]
            discription.append('.')
            end = discription.index('.')
            discription = discription[:end]
            length = len(discription)
            if seed_inside_loop:
                np.random.seed(0)
            if length <= 6:
                continue
            elif length > 15 and length < 20:
                rand = np.random.rand()
                if rand >= 0.3:
                    continue
            elif length >= 20:
                continue
            caption = ' '.join(discription)
            caption = str.upper(caption[0]) + caption[1:]
            caption += '.'
            sentences.append(caption)
    finally:
        np.random.set_state(state)
    return sentences


def generated_gcc_lines(n=200, seed=3):
    """Conceptual-Captions-like TSV lines: varied lengths, punctuation at the ends and inside,
    some with a " . " that cuts the caption, each followed by a tab and a URL."""
    rng = np.random.default_rng(seed)
    words = ["actor", "attends", "the", "premiere", "of", "a", "film", "in", "city", "person", "walks", "dog",
             "beach", "sunset", "over", "mountains", "with", "clouds", "red", "car", "parked", "street", "old"]
    punct = [",", ".", "!", "?", ":", ";", "-", "--", "...", "''", "``", "'", "-LRB-", "(", ")"]
    lines = []
    for i in range(n):
        tokens = [str(w) for w in rng.choice(words, size=int(rng.integers(1, 26)))]
        if rng.random() < 0.15:
            tokens.insert(int(rng.integers(0, len(tokens) + 1)), ".")
        if rng.random() < 0.2:
            tokens.insert(int(rng.integers(1, len(tokens) + 1)), str(rng.choice(punct)))
        if rng.random() < 0.3:
            tokens.insert(0, str(rng.choice(punct)))
        if rng.random() < 0.4:
            tokens.append(str(rng.choice(punct)))
        lines.append(" ".join(tokens) + f"\thttp://example.com/{i}.jpg")
    return lines


def test_gcc_filter_matches_the_reference_loop_including_its_seeding(tmp_path):
    path = write_lines(tmp_path / "gcc.tsv", generated_gcc_lines())
    lengths = [len(captions.gcc_tokens(line.split("\t")[0])) for line in generated_gcc_lines()]
    assert sum(n <= 6 for n in lengths) > 20 and sum(n >= 20 for n in lengths) > 10
    assert sum(15 < n < 20 for n in lengths) > 20 and sum(6 < n <= 15 for n in lengths) > 40

    expected = reference_gcc_loop(path)
    assert captions.read_corpus(path, style="gcc") == expected
    # seed 0: the one draw is 0.5488 >= 0.3, so the reference keeps no sentence of 16..19 tokens.
    assert np.random.RandomState(0).rand() >= 0.3
    assert all(len(s.split()) <= 15 for s in expected)

    # An honest draw per sentence keeps some 16..19-token sentences and drops others.
    honest = captions.read_corpus(path, style="gcc", gcc_reference_seeding=False)
    assert honest == reference_gcc_loop(path, seed_inside_loop=False)
    band = [len(s.split()) for s in honest if len(s.split()) > 15]
    assert 0 < len(band) < sum(15 < n < 20 for n in lengths)

    # A seed whose first draw is < 0.3 keeps them all under the reference's seeding.
    seed = next(s for s in range(100) if np.random.RandomState(s).rand() < 0.3)
    kept, dropped = captions.gcc_filter([line.split("\t")[0] for line in generated_gcc_lines()], seed=seed)
    assert sum(len(s.split()) > 15 for s in kept) == sum(15 < n < 20 for n in lengths)
    assert dropped["sampled_out"] == 0 and dropped["too_short"] == sum(n <= 6 for n in lengths)


def test_gcc_filter_cleans_ends_and_cuts_at_the_first_period():
    kept, dropped = captions.gcc_filter([
        ", actor attends the premiere of the film .",
        "-LRB- the old red car parked in the street today -RRB-",
        "person walks the dog on the beach . and then goes home to sleep",
        "dog walks . on the beach at sunset with friends",
        "only six tokens here in total",
        ",",
    ])
    assert kept == ["Actor attends the premiere of the film.", "The old red car parked in the street today.",
                    "Person walks the dog on the beach."]
    assert dropped == {"too_short": 3, "too_long": 0, "sampled_out": 0}


def test_shuffle_is_numpys_legacy_permutation(tmp_path):
    lines = [f"sentence number {i}" for i in range(57)]
    path = write_lines(tmp_path / "c.txt", lines)
    expected = list(lines)
    state = np.random.get_state()
    np.random.seed(1024)
    np.random.shuffle(expected)
    np.random.set_state(state)
    before = np.random.get_state()[1].copy()
    shuffled = captions.read_corpus(path, shuffle=True)
    assert shuffled == expected and shuffled != lines
    assert np.array_equal(np.random.get_state()[1], before)  # global state untouched
    assert captions.read_corpus(path, shuffle=True, seed=7) != expected


def test_blank_lines_are_counted_and_an_empty_corpus_is_an_error(tmp_path, caplog):
    path = write_lines(tmp_path / "c.txt", ["first sentence", "", "   ", "second sentence", "\t", ""])
    with caplog.at_level(logging.INFO, logger="absl"):
        assert captions.read_corpus(path) == ["first sentence", "second sentence"]
    assert f"{path}: 2 sentences from 6 lines (4 blank lines skipped" in caplog.text

    short = write_lines(tmp_path / "short.tsv", ["a dog", "", "two cats sleep\turl", "one more short one ."])
    with pytest.raises(CaptionDataError, match=r"short.tsv: empty corpus: 4 lines read, 1 blank, style 'gcc' "
                                               r"dropped 3 \(too short 3, too long 0, sampled out 0\)"):
        captions.read_corpus(short, style="gcc")
    blank = write_lines(tmp_path / "blank.txt", ["", " "])
    with pytest.raises(CaptionDataError, match="blank.txt: empty corpus: 2 lines read, 2 blank"):
        captions.read_corpus(blank)
    with pytest.raises(CaptionDataError, match="unknown corpus style 'cc3m'"):
        captions.read_corpus(path, style="cc3m")

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nbad \xff line\nfine again\n\xfe\n")
    with pytest.raises(CaptionDataError, match=r"bad.txt: 2 line\(s\) are not UTF-8: line 2: .*; line 4"):
        captions.read_corpus(bad)


def test_corpus_from_karpathy_uses_training_captions_only(coco_file, tmp_path):
    train = captions.read_karpathy(coco_file, tmp_path)
    corpus = captions.corpus_from_karpathy(train)
    assert len(corpus) == 9 and corpus[0] == "Caption 0 of image 11."
    assert captions.corpus_from_karpathy(train, shuffle=True) == captions.shuffle_like_reference(corpus, 1024)
    assert captions.corpus_from_karpathy(train, style="plain")[0] == "Caption 0 of image 11."
    everything = captions.read_karpathy(coco_file, tmp_path, splits=("train", "val", "test"))
    with pytest.raises(CaptionDataError, match=r"non-train images \{'val': 1, 'test': 1\}"):
        captions.corpus_from_karpathy(everything)
    with pytest.raises(CaptionDataError, match="empty corpus"):
        captions.corpus_from_karpathy(train, style="gcc")


# ---------------------------------------------------------------------------------------------
# Synthetic captioning set
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def birds(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("birds") / "ds", num_classes=2, train_per_class=2,
                                   val_per_class=2, test_per_class=1, image_size=32, num_captions=3, shots=())


def test_synthetic_caption_images(birds):
    train = captions.synthetic_caption_images(birds, "train")
    with open(birds.captions, encoding="utf-8") as f:
        written = json.load(f)
    assert [im.image_id for im in train] == list(written)
    assert all(list(im.captions) == written[im.image_id] and im.split == "train" for im in train)
    assert all(os.path.isfile(im.path) and im.path.endswith(im.image_id) for im in train)

    val = captions.synthetic_caption_images(birds.root, "val")
    assert len(val) == 4 and all(len(im.captions) == 3 and im.split == "val" for im in val)
    with open(birds.attributes, encoding="utf-8") as f:
        scenes = json.load(f)["images"]
    mentions = 0
    for im in val:  # every caption names the species; those naming a background name the image's
        species = birds.class_names[int(im.image_id[:3]) - 1].lower()  # "002.Short_tailed_Finch/..."
        assert all(species in c.lower() for c in im.captions), im
        for c in im.captions:
            named = [b for b in synthetic.BACKGROUNDS if f"{b} back" in c]
            assert named in ([], [scenes[im.image_id]["background"]]), (c, scenes[im.image_id])
            mentions += bool(named)
    assert mentions >= 3
    assert captions.synthetic_caption_images(birds, "val") == val  # deterministic
    assert {im.image_id for im in val}.isdisjoint(im.image_id for im in train)

    test = captions.synthetic_caption_images(birds, "test")
    gt = captions.coco_ground_truth(test)
    assert [i["id"] for i in gt["images"]] == [im.image_id for im in test] and len(gt["annotations"]) == 6
    assert captions.references(test)[test[0].image_id] == list(test[0].captions)
    with pytest.raises(CaptionDataError, match="unknown split 'restval'"):
        captions.synthetic_caption_images(birds, "restval")
    with pytest.raises(CaptionDataError, match="no manifest.json"):
        captions.synthetic_caption_images(birds.image_dir, "val")

    coco_module = pytest.importorskip("pycocotools.coco")
    coco = coco_module.COCO()
    coco.dataset = gt
    coco.createIndex()
    assert len(coco.getAnnIds(imgIds=[test[0].image_id])) == 3
