"""The CgT-GAN job on generated birds (``configs/cgtgan.py:runlocal``): every stage's files, the results
schema, resuming, example captions; bad configs and data."""

import json
import os
import shutil

import numpy as np
import pytest
from absl import flags

from configs import cgtgan as cgtgan_config
from jaxgist.core import config as config_lib
from jaxgist.data import captions as captions_lib
from jaxgist.data import embedding_store
from jaxgist.methods import cgtgan

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer of the metrics needs Java")


@pytest.fixture(autouse=True)
def _flags():
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def test_config_arguments_and_validation():
    c = cgtgan_config.get_config("images=coco,corpus=gcc")
    assert (c.cgtgan.agg_temperature, c.data.corpus_style, c.train.epochs) == (175.0, "gcc", 80)
    assert cgtgan_config.get_config("images=f30k").cgtgan.agg_temperature == 125.0
    with pytest.raises(ValueError, match="unknown argument 'corpus=wiki'"):
        cgtgan_config.get_config("corpus=wiki")
    with pytest.raises(config_lib.ConfigError, match="karpathy_json"):
        cgtgan.validate(c)
    c = cgtgan_config.get_config("runlocal")
    cgtgan.validate(c)
    c.cgtgan.top_p = 0.0
    with pytest.raises(config_lib.ConfigError, match="top_p"):
        cgtgan.validate(c)
    c = cgtgan_config.get_config("runlocal")
    c.evaluate.metrics = ("BLEU", "WER")
    with pytest.raises(config_lib.ConfigError, match="WER"):
        cgtgan.validate(c)


def test_step_batches_are_epoch_permutations_and_resume():
    b = cgtgan.StepBatches(10, 3, seed=0)
    first = [next(b)[1] for _ in range(6)]
    epoch0 = np.concatenate(first[:3])
    assert len(set(epoch0.tolist())) == 9 and not np.array_equal(epoch0, np.concatenate(first[3:]))
    again = cgtgan.StepBatches(10, 3, seed=0)
    again.set_state(b.get_state())
    np.testing.assert_array_equal(next(again)[1], next(b)[1])
    with pytest.raises(ValueError, match="batches of 4"):
        cgtgan.StepBatches(10, 4, seed=0).set_state(b.get_state())
    with pytest.raises(ValueError, match="at least 3"):
        cgtgan.StepBatches(2, 3, seed=0)


def test_first_clause():
    assert cgtgan.first_clause("A grey finch on a branch, with a red bill.") == "A grey finch on a branch."
    assert cgtgan.first_clause("A warbler: white wings") == "A warbler."


def test_empty_corpus_is_an_error(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n")
    c = cgtgan_config.get_config("runlocal")
    c.data.corpus, c.data.corpus_style = str(path), "plain"
    with pytest.raises(captions_lib.CaptionDataError, match="corpus"):
        cgtgan.corpus_sentences(c, tmp_path, [])


@pytest.mark.slow
@needs_java
def test_runlocal_end_to_end_and_resume(tmp_path):
    workdir = tmp_path / "run"
    c = cgtgan_config.get_config("runlocal")
    out = cgtgan.run(c, str(workdir))["cgtgan"]
    table, run = out["CgT-GAN"], out["run"]
    for name in ("initialized", "adversarial"):
        for key in ("test_CIDEr", "test_Bleu_4", "test_ROUGE_L", "val_CIDEr"):
            assert np.isfinite(table[name][key]) and table[name][key] >= 0
    assert run["steps"] == run["steps_per_epoch"] * c.train.epochs and run["best_step"] == run["steps"]
    for name in ("images_train", "images_val", "images_test", "corpus", "targets"):
        assert embedding_store.exists(workdir / "embeddings" / name), name
    targets = embedding_store.EmbeddingStore(workdir / "embeddings" / "targets")
    assert len(targets) == run["train_images"] and targets.dim == 32
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["cgtgan"]["CgT-GAN"]) == {"initialized", "adversarial"}
    assert "test_CIDEr (%)" in (workdir / "results.md").read_text()
    preds = json.loads((workdir / "captions" / "adversarial_test.json").read_text())
    assert len(preds) == len(embedding_store.EmbeddingStore(workdir / "embeddings" / "images_test"))
    examples = (workdir / "captions" / "examples.md").read_text()
    first = examples.splitlines()[4]
    assert os.path.isfile(os.path.normpath(workdir / "captions" / first.split("](")[1].split(")")[0]))
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/reward_sem" in m for m in metrics) and any("val/CIDEr" in m for m in metrics)
    assert 0 < run["mean_retokenize_s"] < run["mean_step_time_s"] and run["mean_decode_s"] > 0
    assert (workdir / "pretrain" / "hf" / "config.json").is_file()  # the demo's CLIP, trained first
    # a rerun trains nothing and scores the same checkpoint again
    again = cgtgan.run(c, str(workdir))["cgtgan"]
    assert again["run"]["start_step"] == run["steps"]
    assert again["CgT-GAN"]["adversarial"]["test_CIDEr"] == pytest.approx(table["adversarial"]["test_CIDEr"])
    # evaluate: the best step by val CIDEr (here the last) scores as the training run did
    c.mode = "evaluate"
    scored = cgtgan.run(c, str(workdir))["cgtgan"]["CgT-GAN"][f"step_{run['best_step']}"]
    for key in ("test_CIDEr", "test_Bleu_4", "val_CIDEr"):
        assert scored[key] == pytest.approx(table["adversarial"][key]), key
    assert (workdir / "captions" / f"step_{run['best_step']}_test.json").is_file()
