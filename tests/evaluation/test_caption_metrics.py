"""COCO caption metrics: parity with pycocoevalcap's COCOEvalCap (SPICE left out), subsets, SPICE skipping,
input errors, COCO files."""

import json
import shutil
import subprocess

import numpy as np
import pytest

from jaxgist.evaluation import caption_metrics as cm

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="no java on PATH (the PTB tokenizer and METEOR need openjdk-17-jre-headless)")

# Six images, five hand-written references each (capitals, punctuation, a contraction, a hyphen), and
# predictions of varying quality; int ids as in COCO.
REFERENCES = {
    101: ["A brown dog runs across the grassy field.", "A dog is running on the grass!",
          "The dog sprints through a green park, chasing a ball.", "A brown puppy running outside.",
          "Dog running in a field; it's sunny."],
    205: ["Two men ride bicycles down a city street.", "Cyclists riding along the road in town.",
          "Two people on bikes pass parked cars.", "A pair of bicyclists on an urban street.",
          "Men cycling past shops -- downtown."],
    317: ["A plate of pasta with tomato sauce and basil.", "Spaghetti topped with red sauce on a white plate.",
          "A bowl of noodles, sauce and herbs.", "Pasta dinner served on a table.",
          "A close-up of spaghetti with tomato sauce."],
    422: ["A cat sleeps on a windowsill in the sun.", "The grey cat is napping by the window.",
          "A kitten curled up near a window.", "Cat lying on the sill, eyes closed.",
          "A sleepy cat in the sunlight."],
    538: ["A red double-decker bus drives through London.", "A big red bus on a busy street.",
          "The bus is driving past a crowd of people.", "A double decker bus in the city.",
          "Red bus, London street, cloudy day."],
    646: ["A child flies a kite on the beach.", "A young girl holding a kite string by the ocean.",
          "Kite flying at the seaside!", "A kid with a colorful kite near the water.",
          "The child runs on sand with a kite."],
}
PREDICTIONS = {
    101: "A dog running through the grass.",
    205: "Two men riding bikes on a street.",
    317: "A plate of spaghetti with sauce.",
    422: "A cat sleeping near a window!",
    538: "A red bus driving down a street in London.",
    646: "A person standing on a beach, holding a kite.",
}
FAST = ("BLEU", "ROUGE_L", "CIDEr")
SCORE_KEYS = {"BLEU": cm.BLEU_KEYS, "METEOR": ("METEOR",), "ROUGE_L": ("ROUGE_L",), "CIDEr": ("CIDEr",)}


class _NotRun:
    """Stands in for a pycocoevalcap scorer that the reference run must not start (SPICE, or METEOR)."""

    def __init__(self, *args, **kwargs):
        pass

    def method(self):
        return "not run"

    def compute_score(self, gts, res):
        return float("nan"), [float("nan")] * len(gts)


def _reference(tmp_path, monkeypatch, references, predictions, *, meteor):
    """pycocoevalcap's own evaluation: COCO ground truth and results files, COCO + loadRes, COCOEvalCap with
    params['image_id'] = cocoRes.getImgIds() (the predicted images), SPICE (and METEOR unless ``meteor``)
    replaced by a scorer that runs nothing. Returns (eval, imgToEval)."""
    import pycocoevalcap.eval
    from pycocotools.coco import COCO

    monkeypatch.setattr(pycocoevalcap.eval, "Spice", _NotRun)
    if not meteor:
        monkeypatch.setattr(pycocoevalcap.eval, "Meteor", _NotRun)
    gt = {"images": [{"id": i} for i in references], "annotations": []}
    for image_id, captions in references.items():
        for caption in captions:
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "caption": caption})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    cm.write_coco_results(tmp_path / "results.json", predictions)  # our writer feeds the reference's reader
    coco = COCO(str(tmp_path / "gt.json"))
    coco_res = coco.loadRes(str(tmp_path / "results.json"))
    evaluator = pycocoevalcap.eval.COCOEvalCap(coco, coco_res)
    evaluator.params["image_id"] = coco_res.getImgIds()
    evaluator.evaluate()
    return evaluator.eval, evaluator.imgToEval


def _assert_parity(ours, ref_eval, ref_per_image, metrics):
    keys = [k for m in metrics for k in SCORE_KEYS[m]]
    for key in keys:
        assert np.isfinite(ours[key]), key
        assert ours[key] == pytest.approx(float(ref_eval[key]), abs=1e-9, rel=0), key
        assert set(ours["per_image"][key]) == set(ref_per_image)
        for image_id, score in ours["per_image"][key].items():
            assert score == pytest.approx(float(ref_per_image[image_id][key]), abs=1e-9, rel=0), (key, image_id)


def _no_spice_files(monkeypatch):
    monkeypatch.setattr(cm, "_spice_missing_files", lambda: [f for f in cm.SPICE_JARS if "corenlp" in f])


# ------------------------------------------------------------------------------------------------ parity

@pytest.mark.slow
@needs_java
def test_all_metrics_match_coco_eval_cap(tmp_path, monkeypatch):
    _no_spice_files(monkeypatch)  # the same answer whether or not CoreNLP is installed here
    ours = cm.score_captions(REFERENCES, PREDICTIONS, per_image=True)
    ref_eval, ref_per_image = _reference(tmp_path, monkeypatch, REFERENCES, PREDICTIONS, meteor=True)
    _assert_parity(ours, ref_eval, ref_per_image, ("BLEU", "METEOR", "ROUGE_L", "CIDEr"))
    assert "SPICE" not in ours and "SPICE" in ours["skipped"]
    assert ours["num_images"] == len(PREDICTIONS)
    assert 0 < ours["METEOR"] < 1 and ours["CIDEr"] > 0.3  # a real score, not a degenerate one


@needs_java
def test_bleu_rouge_cider_match_coco_eval_cap_including_an_empty_prediction(tmp_path, monkeypatch):
    predictions = {**PREDICTIONS, 422: ""}  # an empty caption is scored as it is
    ours = cm.score_captions(REFERENCES, predictions, metrics=FAST, per_image=True)
    ref_eval, ref_per_image = _reference(tmp_path, monkeypatch, REFERENCES, predictions, meteor=False)
    _assert_parity(ours, ref_eval, ref_per_image, FAST)
    assert set(ours) == set(cm.BLEU_KEYS) | {"ROUGE_L", "CIDEr", "skipped", "num_images", "per_image"}
    assert ours["skipped"] == {}
    assert ours["per_image"]["CIDEr"][422] == 0.0 and ours["per_image"]["CIDEr"][101] > 0
    assert np.mean(list(ours["per_image"]["CIDEr"].values())) == pytest.approx(ours["CIDEr"], abs=1e-12)


@needs_java
def test_a_subset_of_images_is_scored_on_that_subset(tmp_path, monkeypatch):
    subset = {i: PREDICTIONS[i] for i in (317, 101, 646)}
    ours = cm.score_captions(REFERENCES, subset, metrics=FAST, per_image=True)
    ref_eval, ref_per_image = _reference(tmp_path, monkeypatch, REFERENCES, subset, meteor=False)
    _assert_parity(ours, ref_eval, ref_per_image, FAST)
    assert ours["num_images"] == 3 and set(ours["per_image"]["CIDEr"]) == set(subset)
    # The other images' references play no part (CIDEr's document frequencies come from the subset alone) ...
    alone = cm.score_captions({i: REFERENCES[i] for i in subset}, subset, metrics=FAST)
    for key in (*cm.BLEU_KEYS, "ROUGE_L", "CIDEr"):
        assert ours[key] == alone[key], key
    # ... and CIDEr depends on the set scored: image 101's score differs from the full set's.
    full = cm.score_captions(REFERENCES, PREDICTIONS, metrics=("CIDEr",), per_image=True)
    assert full["per_image"]["CIDEr"][101] != pytest.approx(ours["per_image"]["CIDEr"][101], rel=1e-6)


@needs_java
def test_pretokenized_text_without_ptb_gives_the_same_scores():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs_tok = PTBTokenizer().tokenize({i: [{"caption": c} for c in caps] for i, caps in REFERENCES.items()})
    preds_tok = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in PREDICTIONS.items()})
    preds_tok = {i: caps[0] for i, caps in preds_tok.items()}
    assert preds_tok[101] == "a dog running through the grass"  # punctuation gone, lower case
    tokenized = cm.score_captions(REFERENCES, PREDICTIONS, metrics=FAST)
    pre = cm.score_captions(refs_tok, {i: preds_tok[i].upper() for i in PREDICTIONS}, metrics=FAST, tokenize=False)
    for key in (*cm.BLEU_KEYS, "ROUGE_L", "CIDEr"):
        assert pre[key] == pytest.approx(tokenized[key], abs=1e-12), key
    # Without PTB, punctuation stays a part of the word: the raw text scores lower.
    raw = cm.score_captions(REFERENCES, PREDICTIONS, metrics=("CIDEr",), tokenize=False)
    assert raw["CIDEr"] < tokenized["CIDEr"]


@needs_java
def test_line_breaks_inside_a_caption_do_not_shift_the_others():
    # Java's tokenizer splits lines on \r and \u2028 (pycocoevalcap only replaces \n): every later caption
    # would move to the wrong image.
    broken = {**PREDICTIONS, 101: "A dog running\u2028through the\rgrass."}
    refs = {**REFERENCES, 205: ["Two men ride\r\nbicycles down a city street."] + REFERENCES[205][1:]}
    got = cm.score_captions(refs, broken, metrics=FAST, per_image=True)
    want = cm.score_captions(REFERENCES, PREDICTIONS, metrics=FAST, per_image=True)
    for key in want["per_image"]:
        assert got["per_image"][key] == pytest.approx(want["per_image"][key], abs=1e-12), key


# ------------------------------------------------------------------------------------------------ SPICE

def test_spice_is_skipped_with_a_reason_when_corenlp_is_missing(monkeypatch):
    _no_spice_files(monkeypatch)
    import pycocoevalcap.spice.get_stanford_models as downloader

    monkeypatch.setattr(downloader, "urlretrieve", lambda *a, **k: pytest.fail("SPICE tried to download CoreNLP"))
    monkeypatch.setattr(cm._spice_module, "Spice", lambda: pytest.fail("SPICE was started without its files"))
    out = cm.score_captions(REFERENCES, PREDICTIONS, metrics=("CIDEr", "SPICE"), tokenize=False)
    assert "SPICE" not in out and out["CIDEr"] > 0
    assert set(out["skipped"]) == {"SPICE"}
    assert "stanford-corenlp-3.6.0.jar" in out["skipped"]["SPICE"]
    assert "stanford-corenlp-3.6.0-models.jar" in out["skipped"]["SPICE"]


def test_spice_results_are_read_when_it_runs(monkeypatch):
    calls = []

    class FakeSpice:  # SPICE's output shape: a mean, then per image (sorted keys) a dict of category scores
        def compute_score(self, gts, res):
            calls.append((gts, res))
            ids = sorted(gts)
            per = [{"All": {"f": 0.1 * (k + 1), "pr": 0.5, "re": 0.5}, "Object": {"f": 0.0}} for k in ids]
            return float(np.mean([p["All"]["f"] for p in per])), per

    monkeypatch.setattr(cm, "_spice_missing_files", lambda: [])
    monkeypatch.setattr(cm.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(cm._spice_module, "Spice", FakeSpice)
    preds = {"b": "a cat", 7: "a dog"}  # mixed id types: SPICE sorts keys, so it gets positions
    out = cm.score_captions({7: ["a dog"], "b": ["a cat"]}, preds, metrics=("SPICE",), tokenize=False,
                            per_image=True)
    assert len(calls) == 1 and sorted(calls[0][0]) == [0, 1]
    assert out["SPICE"] == pytest.approx(0.15) and out["skipped"] == {}
    assert out["per_image"]["SPICE"] == pytest.approx({"b": 0.1, 7: 0.2})


def test_a_failing_spice_is_reported_as_skipped(monkeypatch):
    class BrokenSpice:
        def compute_score(self, gts, res):
            raise subprocess.CalledProcessError(1, ["java", "-jar", "spice-1.0.jar"])

    monkeypatch.setattr(cm, "_spice_missing_files", lambda: [])
    monkeypatch.setattr(cm.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(cm._spice_module, "Spice", BrokenSpice)
    out = cm.score_captions(REFERENCES, PREDICTIONS, metrics=("CIDEr", "SPICE"), tokenize=False)
    assert "SPICE" not in out and "CIDEr" in out
    assert "SPICE failed" in out["skipped"]["SPICE"] and "spice-1.0.jar" in out["skipped"]["SPICE"]


# ------------------------------------------------------------------------------------------------ errors

def test_predictions_without_references_are_named():
    preds = {**PREDICTIONS, **{9000 + k: "a thing" for k in range(7)}}
    with pytest.raises(cm.CaptionMetricsError, match=r"9000, 9001, 9002, 9003, 9004, \.\.\. \(7 in all\)"):
        cm.score_captions(REFERENCES, preds, tokenize=False, metrics=FAST)
    with pytest.raises(cm.CaptionMetricsError, match=r"'101'.*have no references.*\['int'\].*\['str'\]"):
        cm.score_captions(REFERENCES, {"101": "a dog"}, tokenize=False, metrics=FAST)


def test_bad_references_and_predictions_are_errors():
    with pytest.raises(cm.CaptionMetricsError, match=r"422.*empty list of references"):
        cm.score_captions({**REFERENCES, 422: []}, PREDICTIONS, tokenize=False, metrics=FAST)
    with pytest.raises(cm.CaptionMetricsError, match=r"lists of strings.*205"):
        cm.score_captions({**REFERENCES, 205: "one caption"}, PREDICTIONS, tokenize=False, metrics=FAST)
    with pytest.raises(cm.CaptionMetricsError, match=r"538, 646.*\['NoneType', 'list'\]"):
        cm.score_captions(REFERENCES, {**PREDICTIONS, 538: None, 646: ["a kite"]}, tokenize=False)
    with pytest.raises(cm.CaptionMetricsError, match="no predictions"):
        cm.score_captions(REFERENCES, {}, tokenize=False)
    assert issubclass(cm.CaptionMetricsError, ValueError)


def test_metric_names_are_checked():
    with pytest.raises(cm.CaptionMetricsError, match=r"\['BLEU5', 'WER'\].*valid: \['BLEU', 'METEOR', 'ROUGE_L', "
                                                     r"'CIDEr', 'SPICE'\]"):
        cm.score_captions(REFERENCES, PREDICTIONS, metrics=("CIDEr", "BLEU5", "WER"), tokenize=False)
    with pytest.raises(cm.CaptionMetricsError, match="no metrics"):
        cm.score_captions(REFERENCES, PREDICTIONS, metrics=(), tokenize=False)
    out = cm.score_captions(REFERENCES, PREDICTIONS, metrics="cider", tokenize=False)  # one name, any case
    assert set(out) == {"CIDEr", "skipped", "num_images"}


def test_missing_java_is_a_clear_error_and_tokenize_false_does_without_it(monkeypatch):
    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    with pytest.raises(cm.CaptionMetricsError, match=r"PTB tokenization.*Java 17.*openjdk-17-jre-headless") as e:
        cm.score_captions(REFERENCES, PREDICTIONS, metrics=FAST)
    assert "METEOR" not in str(e.value).split(":")[0]
    with pytest.raises(cm.CaptionMetricsError, match=r"^METEOR needs Java.*openjdk-17-jre-headless"):
        cm.score_captions(REFERENCES, PREDICTIONS, metrics=("METEOR", "CIDEr"), tokenize=False)
    _no_spice_files(monkeypatch)
    out = cm.score_captions(REFERENCES, PREDICTIONS, tokenize=False, metrics=FAST + ("SPICE",))
    assert out["CIDEr"] > 0 and "SPICE" in out["skipped"]
    monkeypatch.setattr(cm, "_spice_missing_files", lambda: [])
    out = cm.score_captions(REFERENCES, PREDICTIONS, tokenize=False, metrics=("SPICE",))
    assert "java" in out["skipped"]["SPICE"]


def test_without_ptb_text_is_lower_cased_and_split_on_whitespace():
    refs = {1: ["a dog on grass", "a brown dog"], 2: ["two cats", "cats sleeping on a bed"]}
    lower = cm.score_captions(refs, {1: "a dog on grass", 2: "two cats sleeping"}, metrics=FAST, tokenize=False)
    messy = cm.score_captions(refs, {1: " A  DOG\ton\nGrass ", 2: "Two Cats SLEEPING"}, metrics=FAST, tokenize=False)
    assert {k: messy[k] for k in lower} == lower
    assert lower["CIDEr"] > 0 and lower["Bleu_1"] > 0.5


# ------------------------------------------------------------------------------------------------ COCO files

def test_results_file_round_trip_and_duplicates(tmp_path):
    preds = {1: "A dog.", "COCO_val_2": "café — «quoted»", np.int64(3): ""}
    path = cm.write_coco_results(tmp_path / "out" / "results.json", preds)
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert rows == [{"image_id": 1, "caption": "A dog."}, {"image_id": "COCO_val_2", "caption": "café — «quoted»"},
                    {"image_id": 3, "caption": ""}]
    assert cm.read_coco_results(path) == {1: "A dog.", "COCO_val_2": "café — «quoted»", 3: ""}
    rows += [{"image_id": 1, "caption": "again"}, {"image_id": 3, "caption": "again"},
             {"image_id": 1, "caption": "thrice"}]
    (tmp_path / "dup.json").write_text(json.dumps(rows))
    with pytest.raises(cm.CaptionMetricsError, match=r"dup\.json.*image id\(s\) 1, 3 have more than one caption"):
        cm.read_coco_results(tmp_path / "dup.json")
    with pytest.raises(cm.CaptionMetricsError, match="not a string"):
        cm.write_coco_results(tmp_path / "bad.json", {1: None})
    assert not (tmp_path / "bad.json").exists()


def test_malformed_results_files_name_the_entry(tmp_path):
    cases = {"obj.json": ({"image_id": 1, "caption": "x"}, r"obj\.json.*expected a list"),
             "nocap.json": ([{"image_id": 1, "caption": "x"}, {"image_id": 2}], r"nocap\.json: entry \[1\]"),
             "boolid.json": ([{"image_id": True, "caption": "x"}], r"boolid\.json: entry \[0\]")}
    for name, (content, pattern) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(cm.CaptionMetricsError, match=pattern):
            cm.read_coco_results(tmp_path / name)
    (tmp_path / "trunc.json").write_text('[{"image_id": 1, "capt')
    with pytest.raises(cm.CaptionMetricsError, match=r"trunc\.json: not valid JSON"):
        cm.read_coco_results(tmp_path / "trunc.json")


def test_read_coco_references(tmp_path):
    gt = {"info": {}, "licenses": [],
          "images": [{"id": 5, "file_name": "a.jpg"}, {"id": 2}, {"id": 9}],
          "annotations": [{"id": 1, "image_id": 2, "caption": "B one."}, {"id": 2, "image_id": 5, "caption": "A one."},
                          {"id": 3, "image_id": 2, "caption": "B two."}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    refs = cm.read_coco_references(tmp_path / "gt.json")
    assert refs == {5: ["A one."], 2: ["B one.", "B two."]}  # image 9 has no captions: left out
    assert list(refs) == [5, 2]
    # A prediction for the image without captions is then an error naming it.
    with pytest.raises(cm.CaptionMetricsError, match="9.*no references"):
        cm.score_captions(refs, {9: "x"}, tokenize=False, metrics=FAST)

    no_images = {"annotations": gt["annotations"]}
    (tmp_path / "ann_only.json").write_text(json.dumps(no_images))
    assert cm.read_coco_references(tmp_path / "ann_only.json") == {2: ["B one.", "B two."], 5: ["A one."]}

    bad = {"stray.json": (dict(gt, annotations=gt["annotations"] + [{"image_id": 77, "caption": "x"}]),
                          r"stray\.json: annotations\[3\] is for image_id 77"),
           "nocap.json": (dict(gt, annotations=[{"image_id": 2, "caption": 3}]), r"nocap\.json: annotations\[0\]"),
           "badimg.json": (dict(gt, images=[{"id": 5}, {"file_name": "x.jpg"}]), r"badimg\.json: images\[1\]"),
           "list.json": ([], r"list\.json: expected a COCO captions file")}
    for name, (content, pattern) in bad.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(cm.CaptionMetricsError, match=pattern):
            cm.read_coco_references(tmp_path / name)
