"""Small finished (and unfinished) workdirs written by the code the jobs write them with: the config
as the launcher writes it, ``results.write``, ``gist.save_predictions``, the training loop's
``MetricsLogger`` and caption matching's ``write_captions`` / ``write_scores``, on a generated dataset."""

from __future__ import annotations

import pathlib

import numpy as np

from configs import demo
from jaxgist.core import files, results
from jaxgist.data import sources, synthetic
from jaxgist.evaluation import accuracy
from jaxgist.methods import caption_matching, gist
from jaxgist.reports import runs
from jaxgist.training import metrics as metrics_lib

NUM_CLASSES = 4
HEADS = ("linear_probe_ridge", "zero_shot", "knn")


def birds(root: pathlib.Path) -> synthetic.SyntheticDataset:
    return synthetic.write_dataset(root, num_classes=NUM_CLASSES, train_per_class=3, val_per_class=1,
                                   test_per_class=4, image_size=32, shots=(1,), num_captions=2)


def _config(dataset: synthetic.SyntheticDataset, shots: int):
    c = demo.get_config("runlocal")
    c.data.synthetic.update(dict(dir=dataset.root, num_classes=NUM_CLASSES, train_per_class=shots))
    return c


def _predictions(labels: np.ndarray, rng: np.random.Generator, skill: float) -> np.ndarray:
    """Logits that rank the true class first for about ``skill`` of the rows."""
    logits = rng.normal(size=(len(labels), NUM_CLASSES))
    right = rng.random(len(labels)) < skill
    logits[right, labels[right]] += 10.0
    return logits


def finished_workdir(workdir: pathlib.Path, dataset: synthetic.SyntheticDataset, *, shots: int, seed: int = 0,
                     axes: dict | None = None, matched: bool = True, curves: bool = True,
                     predictions: bool = True) -> dict:
    """A GIST workdir as its stages leave it: config.json, results.json/md, predictions, metrics.jsonl and
    the matched captions with their cosines. Returns the results written."""
    rng = np.random.default_rng(seed + 100 * shots)
    config = _config(dataset, shots)
    files.write_text_atomic(files.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    test = [r for r in sources.read_metadata(dataset.metadata) if r.split == "test"]
    labels = np.asarray([r.label for r in test], np.int32)
    class_names = [n for _, n in sorted({(r.label, r.species) for r in test})]
    table = {}
    for model, skill in (("pretrained", 0.3 + 0.05 * shots), ("finetuned", 0.5 + 0.05 * shots)):
        predicted = {}
        for j, head in enumerate(HEADS):
            logits = _predictions(labels, rng, skill - 0.1 * j)
            predicted[head] = logits.argmax(axis=1)
            metrics = accuracy.accuracy_summary(logits, labels, resamples=50, seed=seed)
            if head != "zero_shot":
                metrics["val_top1"] = float(rng.uniform(0.2, 0.9))
            table.setdefault(model, {})[head] = metrics
        if predictions:
            gist.save_predictions(gist.predictions_path(workdir, model), class_names, labels, np.arange(len(labels)),
                                  predicted)
    written = results.write(workdir, "gist", table, run={"stages": {"evaluate": {}}, "seconds": 1.0})
    if curves:
        logger = metrics_lib.MetricsLogger(workdir / "finetune", total_steps=6, global_batch=8, log_every=2)
        for step in range(1, 7):
            logger.step(step, {"loss": 3.0 / step, "lr": 1e-4 * (1 - step / 7)})
            if step % 3 == 0:
                logger.write(step, {"val/zero_shot_top1": 0.1 * step})
        logger.close()
    if matched:
        train = [r for r in sources.read_metadata(dataset.metadata) if r.split == "train"]
        descriptions = sources.read_descriptions(dataset.descriptions, class_names)
        k = 3
        found = caption_matching.Matches(
            filenames=[r.filename for r in train], labels=np.asarray([r.label for r in train], np.int32),
            slots=np.tile(np.arange(k, dtype=np.int32), (len(train), 1)),
            scores=np.sort(rng.uniform(0.2, 0.4, (len(train), k)).astype(np.float32), axis=1)[:, ::-1],
            counts=np.full(len(train), k, np.int32))
        out = workdir / "match" / "captions_top3.json"
        caption_matching.write_captions(out, found.captions(descriptions))
        caption_matching.write_scores(caption_matching.scores_path(out), found)
    if axes:
        files.write_json_atomic(files.join(workdir, runs.POINT_FILE), {"name": workdir.name, "axes": axes})
    return written


def sweep_folder(root: pathlib.Path, dataset: synthetic.SyntheticDataset) -> dict[str, pathlib.Path]:
    """A sweep over shots 1 and 3 (both finished), a point whose results.json was cut off, one whose job
    failed and one not started; ``root/sweep.json`` lists them."""
    points = {"shots-1": root / "shots-1", "shots-3": root / "shots-3", "shots-2": root / "shots-2",
              "shots-all": root / "shots-all", "shots-5": root / "shots-5"}
    finished_workdir(points["shots-1"], dataset, shots=1, axes={"shots": "1"})
    finished_workdir(points["shots-3"], dataset, shots=3, axes={"shots": "3"}, matched=False, curves=False)
    partial = points["shots-2"]
    finished_workdir(partial, dataset, shots=2, axes={"shots": "2"}, matched=False, curves=False, predictions=False)
    text = (partial / "results.json").read_text()
    (partial / "results.json").write_text(text[: len(text) // 2])  # a job killed while writing it
    failed = points["shots-all"]
    files.write_json_atomic(files.join(failed, runs.POINT_FILE), {"name": "shots-all", "axes": {"shots": "all"}})
    files.write_json_atomic(files.join(failed, runs.STATUS_FILE),
                            {"status": "failed", "returncode": 1, "error": "jaxgist: error: DataError: no rows"})
    files.write_json_atomic(files.join(root, runs.SWEEP_FILE),
                            {"points": [{"name": n, "axes": {"shots": n.split("-")[1]}} for n in points]})
    return points
