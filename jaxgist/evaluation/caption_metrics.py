"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) as pycocoevalcap computes them, for
CgT-GAN's evaluation and anything else that writes one caption per image.

    refs = caption_metrics.read_coco_references("captions_val2014.json")    # {image_id: [caption, ...]}
    scores = caption_metrics.score_captions(refs, {image_id: "a dog on a couch", ...})
    # {"Bleu_1": .., "Bleu_4": .., "METEOR": .., "ROUGE_L": .., "CIDEr": .., "skipped": {"SPICE": why}, "num_images": N}
    caption_metrics.write_coco_results(path, predictions)   # COCO's results file: [{"image_id", "caption"}, ...]

The numbers are those of ``pycocoevalcap.eval.COCOEvalCap`` with ``params['image_id']`` set to the
predicted images (as the COCO caption evaluation does with ``cocoRes.getImgIds()``): only images with a
prediction are scored, and CIDEr's document frequencies come from their references alone. BLEU is
corpus-level (``Bleu(4).compute_score``, "closest" reference length); the others are the mean of the
per-image scores.

``COCOEvalCap.evaluate()`` itself is not used: it always builds SPICE, whose first use downloads Stanford
CoreNLP (and fails offline). The scorers are called one by one instead: the PTB tokenizer (Java) on the
references and on the predictions, then ``Bleu(4)``, ``Meteor()`` (Java; the jar takes 5-20 s to start),
``Rouge()``, ``Cider()``, and ``Spice()`` only when CoreNLP's jars are already in pycocoevalcap's
``spice/lib`` folder; otherwise SPICE is reported under ``"skipped"`` with the reason, and nothing is
downloaded. A SPICE run that fails (it needs several GB of memory) is reported the same way rather than
losing the other metrics. Java 17 (``openjdk-17-jre-headless``) is needed for tokenization, METEOR and
SPICE; ``tokenize=False`` skips the tokenizer for text that is already tokenized (then text is only
lower-cased and split on whitespace: punctuation stays, unlike PTB's, which removes it).

One difference from pycocoevalcap, on purpose: line breaks inside a caption (``\\r``, ``\\u2028``, form
feed, ... anything ``str.splitlines`` splits on) become spaces before tokenization. pycocoevalcap only
replaces ``\\n``, and Java's tokenizer splits on the others, which silently shifts every later caption onto
the wrong image.

Quirks of pycocoevalcap 1.2 kept as they are: an empty prediction is scored as it is (0 for most metrics),
but ROUGE-L gives 1.0 to an empty prediction whose references include an empty one (e.g. a reference that
was only punctuation before tokenization); the tokenizer and SPICE write temporary files inside
pycocoevalcap's package folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import spice as _spice_module
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from jaxgist.core import files

__all__ = ["METRICS", "CaptionMetricsError", "score_captions", "read_coco_references", "write_coco_results",
           "read_coco_results"]

# The metric names score_captions accepts (case-insensitive), in the order they are computed.
METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
BLEU_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")

# The files pycocoevalcap's spice/get_stanford_models.py downloads when they are missing.
SPICE_DIR = os.path.dirname(os.path.abspath(_spice_module.__file__))
SPICE_JARS = ("spice-1.0.jar", os.path.join("lib", "stanford-corenlp-3.6.0.jar"),
              os.path.join("lib", "stanford-corenlp-3.6.0-models.jar"))

_JAVA_HINT = "Java 17 is needed (Debian/Ubuntu: apt-get install openjdk-17-jre-headless)"
_SHOWN_IDS = 5  # ids named in an error message before "... (N in all)"


class CaptionMetricsError(ValueError):
    """Bad references or predictions (named in the message), or a missing requirement (Java)."""


# ----------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------

def score_captions(references: Mapping[Any, Sequence[str]], predictions: Mapping[Any, str], *,
                   metrics: Sequence[str] = METRICS, tokenize: bool = True,
                   per_image: bool = False) -> dict:
    """Scores one predicted caption per image against that image's reference captions.

    Args:
      references: image id (int or str) to its reference captions (a non-empty list of strings, checked
        for every image). Images without a prediction are not scored and do not affect the scores.
      predictions: image id to its predicted caption (a string; an empty one is scored as it is). Every id
        must have references.
      metrics: any of ``METRICS`` (case-insensitive); "BLEU" gives Bleu_1..Bleu_4.
      tokenize: PTB-tokenize (Java) references and predictions first, as the COCO evaluation does: lower
        case, punctuation removed. ``False``: the text is only lower-cased and split on whitespace.
      per_image: also return ``"per_image": {metric: {image_id: score}}`` for every metric computed
        (BLEU's per-image values are pycocoevalcap's sentence-level ones; SPICE's is its "All" F-score).

    Returns:
      ``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"}`` (those asked for and run) as floats,
      ``"skipped": {metric: reason}`` (SPICE when its files or Java are missing, or it failed), and
      ``"num_images"``: the number of images scored (those with a prediction).
    """
    wanted = _check_metrics(metrics)
    ids = _check_inputs(references, predictions)
    java = shutil.which("java")
    if java is None:
        needs = ["PTB tokenization (tokenize=True)"] if tokenize else []
        needs += ["METEOR"] if "METEOR" in wanted else []
        if needs:
            raise CaptionMetricsError(
                f"{' and '.join(needs)} need{'' if len(needs) > 1 else 's'} Java, and no 'java' was found on PATH: "
                f"{_JAVA_HINT}. Without Java, pass tokenize=False (pre-tokenized text) and metrics without METEOR "
                "and SPICE.")

    # Internal keys are positions: SPICE sorts the keys and writes them to JSON, which mixed or odd ids break.
    gts = {i: list(references[image_id]) for i, image_id in enumerate(ids)}
    res = {i: [predictions[image_id]] for i, image_id in enumerate(ids)}
    if tokenize:
        t0 = time.perf_counter()
        gts, res = _ptb_tokenize(gts), _ptb_tokenize(res)
        logging.info("caption metrics: PTB tokenization of %d images in %.1f s", len(ids), time.perf_counter() - t0)
    else:
        gts = {i: [_split_lower(c) for c in caps] for i, caps in gts.items()}
        res = {i: [_split_lower(c) for c in caps] for i, caps in res.items()}

    out: dict = {}
    per: dict = {}
    skipped: dict = {}
    for name in wanted:
        t0 = time.perf_counter()
        if name == "BLEU":
            score, scores = Bleu(4).compute_score(gts, res, verbose=0)
            for key, s, ss in zip(BLEU_KEYS, score, scores):
                out[key], per[key] = float(s), ss
        elif name == "METEOR":
            out["METEOR"], per["METEOR"] = _meteor(gts, res)
        elif name == "ROUGE_L":
            score, scores = Rouge().compute_score(gts, res)
            out["ROUGE_L"], per["ROUGE_L"] = float(score), scores
        elif name == "CIDEr":
            score, scores = Cider().compute_score(gts, res)
            out["CIDEr"], per["CIDEr"] = float(score), scores
        elif name == "SPICE":
            reason = _spice_unavailable(java)
            if reason is None:
                try:
                    score, scores = _spice_module.Spice().compute_score(gts, res)
                except (subprocess.CalledProcessError, OSError, ValueError, KeyError, AssertionError) as e:
                    reason = f"SPICE failed: {type(e).__name__}: {e}"
                else:
                    out["SPICE"] = float(score)
                    per["SPICE"] = [float(s["All"]["f"]) for s in scores]
            if reason is not None:
                skipped["SPICE"] = reason
                logging.warning("caption metrics: SPICE skipped: %s", reason)
                continue
        shown = {k: round(v, 4) for k, v in out.items() if k in (BLEU_KEYS if name == "BLEU" else (name,))}
        logging.info("caption metrics: %s on %d images in %.1f s: %s", name, len(ids), time.perf_counter() - t0,
                     shown)

    out["skipped"] = skipped
    out["num_images"] = len(ids)
    if per_image:
        out["per_image"] = {m: {image_id: float(s) for image_id, s in zip(ids, values)} for m, values in per.items()}
    return out


def _check_metrics(metrics) -> list[str]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    by_lower = {m.lower(): m for m in METRICS}
    asked = list(metrics)
    unknown = [m for m in asked if not isinstance(m, str) or m.lower() not in by_lower]
    if unknown:
        raise CaptionMetricsError(f"unknown caption metric(s) {unknown}; valid: {list(METRICS)}")
    if not asked:
        raise CaptionMetricsError(f"no metrics asked for; valid: {list(METRICS)}")
    chosen = {by_lower[m.lower()] for m in asked}
    return [m for m in METRICS if m in chosen]


def _name_ids(ids: Sequence) -> str:
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:_SHOWN_IDS])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > _SHOWN_IDS else "")


def _check_inputs(references, predictions) -> list:
    """The predicted image ids, in the predictions' order, after checking both mappings."""
    if not isinstance(predictions, Mapping):
        raise CaptionMetricsError(f"predictions must be a mapping image id -> caption, got "
                                  f"{type(predictions).__name__}")
    if not isinstance(references, Mapping):
        raise CaptionMetricsError(f"references must be a mapping image id -> captions, got {type(references).__name__}")
    if not predictions:
        raise CaptionMetricsError("no predictions to score")
    not_str = [i for i, p in predictions.items() if not isinstance(p, str)]
    if not_str:
        kinds = sorted({type(predictions[i]).__name__ for i in not_str})
        raise CaptionMetricsError(f"predictions must be strings; image id(s) {_name_ids(not_str)} have {kinds}")
    bad_refs = [i for i, r in references.items() if isinstance(r, str) or not isinstance(r, Sequence)]
    if bad_refs:
        raise CaptionMetricsError(f"references must be lists of strings; image id(s) {_name_ids(bad_refs)} have "
                                  f"{sorted({type(references[i]).__name__ for i in bad_refs})}")
    empty = [i for i, r in references.items() if len(r) == 0]
    if empty:
        raise CaptionMetricsError(f"image id(s) {_name_ids(empty)} have an empty list of references")
    not_str_refs = [i for i, r in references.items() if not all(isinstance(c, str) for c in r)]
    if not_str_refs:
        raise CaptionMetricsError(f"references must be strings; image id(s) {_name_ids(not_str_refs)} have others")
    missing = [i for i in predictions if i not in references]
    if missing:
        hint = ""
        ref_types = sorted({type(i).__name__ for i in references})
        pred_types = sorted({type(i).__name__ for i in missing})
        if ref_types != pred_types:
            hint = f" (the references' ids are {ref_types}, these are {pred_types})"
        raise CaptionMetricsError(f"predictions for image id(s) {_name_ids(missing)} have no references{hint}")
    return list(predictions)


def _one_line(text: str) -> str:
    """``text`` with every line break ``str.splitlines`` knows turned into a space (see the module doc)."""
    parts = text.splitlines()
    return " ".join(parts) if len(parts) > 1 else (parts[0] if parts else "")


def _ptb_tokenize(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    tokenized = PTBTokenizer().tokenize({i: [{"caption": _one_line(c)} for c in caps] for i, caps in captions.items()})
    lost = [i for i, caps in captions.items() if len(tokenized.get(i, ())) != len(caps)]
    if lost:  # The Java tokenizer returned fewer lines than it was given.
        raise RuntimeError(f"PTB tokenizer output does not line up with its input ({len(lost)} image(s) affected); "
                           "is Java working (java -version)?")
    return tokenized


def _split_lower(text: str) -> str:
    return " ".join(text.lower().split())


def _meteor(gts, res) -> tuple[float, list[float]]:
    meteor = Meteor()
    try:
        score, scores = meteor.compute_score(gts, res)
    except (ValueError, OSError) as e:  # The jar died: readline() gave b"" or the pipe broke.
        meteor.meteor_p.kill()
        err = meteor.meteor_p.stderr.read().decode(errors="replace")[-2000:]
        raise RuntimeError(f"METEOR (java -jar meteor-1.5.jar) failed: {e}; its stderr ends: {err}") from e
    finally:
        try:
            meteor.meteor_p.stdin.close()
        except OSError:  # the jar is gone already
            pass
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    return float(score), scores


def _spice_missing_files() -> list[str]:
    """The files SPICE needs that are not in pycocoevalcap's spice folder (absent ones would be downloaded)."""
    return [f for f in SPICE_JARS if not os.path.exists(os.path.join(SPICE_DIR, f))]


def _spice_unavailable(java) -> str | None:
    missing = _spice_missing_files()
    if missing:
        return (f"Stanford CoreNLP files missing from {SPICE_DIR}: {missing} (pycocoevalcap would download "
                "stanford-corenlp-full-2015-12-09.zip at first use; this library never does)")
    if java is None:
        return f"no 'java' on PATH: {_JAVA_HINT}"
    return None


# ----------------------------------------------------------------------------------------------------
# COCO files
# ----------------------------------------------------------------------------------------------------

def _is_image_id(x) -> bool:
    return isinstance(x, (int, str)) and not isinstance(x, bool)


def _load_json(path, what: str):
    try:
        return json.loads(files.read_text(path))
    except json.JSONDecodeError as e:
        raise CaptionMetricsError(f"{path}: not valid JSON ({what}): {e}") from e


def read_coco_references(path) -> dict[int | str, list[str]]:
    """Reference captions from a COCO captions ground-truth file (``{"images": [{"id", ...}],
    "annotations": [{"image_id", "caption", ...}]}``): ``{image_id: [caption, ...]}``, images in the file's
    order. "images" may be absent (then the annotations' ids are the images); when present, an annotation
    of an image it does not list is an error, and listed images without captions are left out (a
    prediction for one is then an error in ``score_captions``, as it fails in pycocoevalcap)."""
    data = _load_json(path, "COCO captions ground truth")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise CaptionMetricsError(f"{path}: expected a COCO captions file, an object with an 'annotations' list")
    images = data.get("images")
    refs: dict = {}
    if images is not None:
        if not isinstance(images, list):
            raise CaptionMetricsError(f"{path}: 'images' must be a list, got {type(images).__name__}")
        for n, img in enumerate(images):
            if not isinstance(img, dict) or not _is_image_id(img.get("id")):
                raise CaptionMetricsError(f"{path}: images[{n}] needs an integer or string 'id': {str(img)[:200]}")
            refs.setdefault(img["id"], [])
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not _is_image_id(ann.get("image_id")) or not isinstance(ann.get("caption"),
                                                                                                  str):
            raise CaptionMetricsError(f"{path}: annotations[{n}] needs an integer or string 'image_id' and a string "
                                      f"'caption': {str(ann)[:200]}")
        if images is not None and ann["image_id"] not in refs:
            raise CaptionMetricsError(f"{path}: annotations[{n}] is for image_id {ann['image_id']!r}, which 'images' "
                                      "does not list")
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    without = [i for i, caps in refs.items() if not caps]
    if without:
        logging.warning("%s: %d listed image(s) have no captions and are left out: %s", path, len(without),
                        _name_ids(without))
    return {i: caps for i, caps in refs.items() if caps}


def write_coco_results(path, predictions: Mapping[Any, str]) -> str:
    """Writes ``predictions`` (image id -> caption) as COCO's captioning results file,
    ``[{"image_id": id, "caption": caption}, ...]``, atomically. Returns the path written."""
    rows = []
    for image_id, caption in predictions.items():
        if isinstance(image_id, np.integer):
            image_id = int(image_id)
        if not _is_image_id(image_id):
            raise CaptionMetricsError(f"image ids must be integers or strings; got {image_id!r}")
        if not isinstance(caption, str):
            raise CaptionMetricsError(f"the prediction for image id {image_id!r} is not a string: {caption!r}")
        rows.append({"image_id": image_id, "caption": caption})
    return files.write_json_atomic(path, rows)


def read_coco_results(path) -> dict[int | str, str]:
    """Reads a COCO captioning results file (``[{"image_id", "caption"}, ...]``) into ``{image_id: caption}``,
    checking it: every entry has an integer or string id and a string caption, and no id appears twice."""
    rows = _load_json(path, "COCO captioning results")
    if not isinstance(rows, list):
        raise CaptionMetricsError(f"{path}: expected a list of {{'image_id', 'caption'}} objects, got "
                                  f"{type(rows).__name__}")
    out: dict = {}
    duplicates: list = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or not _is_image_id(row.get("image_id")) or not isinstance(row.get("caption"),
                                                                                                  str):
            raise CaptionMetricsError(f"{path}: entry [{n}] needs an integer or string 'image_id' and a string "
                                      f"'caption': {str(row)[:200]}")
        if row["image_id"] in out and row["image_id"] not in duplicates:
            duplicates.append(row["image_id"])
        out[row["image_id"]] = row["caption"]
    if duplicates:
        raise CaptionMetricsError(f"{path}: image id(s) {_name_ids(duplicates)} have more than one caption")
    return out
