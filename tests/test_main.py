"""The launcher runs the embedded default config end to end and writes its results."""

import json

import ml_collections
import numpy as np
import pytest

from jaxgist import main
from jaxgist.evaluation import zero_shot
from jaxgist.data import synthetic
from configs import demo


def test_demo_config_runs_every_gist_stage_and_writes_results(tmp_path):
    config = demo.get_config("runlocal")
    main.run_job(config, str(tmp_path))
    res = json.loads((tmp_path / "results.json").read_text())["gist"]
    names = ("linear_probe_sgd", "linear_probe_ridge", "linear_probe_lbfgs", "zero_shot", "tip_adapter",
             "tip_adapter_f", "coder", "coder_rerank", "coder_tip_adapter", "knn", "centroid")
    heads = {f"{h}/{m}" for h in names for m in ("pretrained", "finetuned")}
    assert heads <= set(res)
    for key in heads:
        m = res[key]
        assert m["test_count"] == 40  # 20 classes x 2 test images
        assert 0.0 <= m["test_top1"] <= m["test_top3"] <= 1.0
        assert m["test_top1_bootstrap_std"] > 0
    assert res["match"]["images"] == 100 and res["finetune"]["steps"] == 15 and res["pretrain"]["steps"] == 20
    captions = json.loads((tmp_path / "match" / "captions_top5.json").read_text())
    assert len(captions) == 100 and all(len(c) == 5 for c in captions.values())
    table = (tmp_path / "results.md").read_text()
    assert "| linear_probe_sgd | finetuned |" in table and "| zero_shot | pretrained |" in table
    assert "| coder_rerank | finetuned |" in table and "| tip_adapter_f | pretrained |" in table
    assert json.loads((tmp_path / "config.json").read_text())["method"] == "gist"
    # a stage can be rerun alone from what the others wrote
    config.gist.stages = ("evaluate",)
    again = main.run_job(config, str(tmp_path))["gist"]
    assert again["linear_probe_ridge/finetuned"]["test_top1"] == res["linear_probe_ridge/finetuned"]["test_top1"]
    assert again["finetune"] == res["finetune"]  # results of stages not rerun are kept


def test_zero_shot_job_on_generated_shapes(tmp_path):
    config = ml_collections.ConfigDict(dict(
        method="zero_shot", seed=0,
        model=dict(init="", tokenizer="", dtype="float32", preset=dict(
            vision=dict(image_size=32, patch_size=16, width=64, layers=1, heads=2, mlp_dim=128),
            text=dict(context_length=77, width=64, layers=1, heads=2, mlp_dim=128), embed_dim=32)),
        data=dict(source="synthetic", num_classes=10, per_class=4),
        zero_shot=dict(templates=("a photo of a {}.",), batch_size=64)))
    main.run_job(config, str(tmp_path))
    metrics = json.loads((tmp_path / "results.json").read_text())["zero_shot"]
    assert metrics["num_images"] == 40 and metrics["num_classes"] == 10
    assert 0.0 <= metrics["test_top1"] <= metrics["test_top5"] <= 1.0


def test_unknown_method_is_refused(tmp_path):
    config = demo.get_config("runlocal")
    config.method = "nope"
    with pytest.raises(ValueError, match="'nope'"):
        main.run_job(config, str(tmp_path))


def test_topk_accuracy_against_brute_force():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7))
    labels = rng.integers(0, 7, size=50)
    for k in (1, 3, 7):
        want = np.mean([labels[i] in np.argsort(-logits[i])[:k] for i in range(50)])
        assert zero_shot.topk_accuracy(logits, labels, k) == pytest.approx(want)


def test_synthetic_images_are_deterministic_and_distinct():
    a, la, names = synthetic.make_images(4, 3, 32, seed=1)
    b, lb, _ = synthetic.make_images(4, 3, 32, seed=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert a.shape == (12, 32, 32, 3) and a.dtype == np.uint8 and len(set(names)) == 4
    assert not np.array_equal(a[0], a[1])
