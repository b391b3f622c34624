"""The launcher runs the embedded default config end to end and writes its results."""

import json

import numpy as np
import pytest

from configs import demo
from configs import zero_shot as zero_shot_config
from jaxgist import main
from jaxgist.data import synthetic
from jaxgist.evaluation import zero_shot


@pytest.mark.slow
def test_demo_config_runs_every_gist_stage_learns_and_writes_results(tmp_path):
    config = demo.get_config("runlocal")
    main.run_job(config, str(tmp_path))
    written = json.loads((tmp_path / "results.json").read_text())
    res, stages = written["gist"], written["run"]["gist"]["stages"]
    names = ("linear_probe_sgd", "linear_probe_ridge", "linear_probe_lbfgs", "zero_shot", "tip_adapter",
             "tip_adapter_f", "coder", "coder_rerank", "coder_tip_adapter", "knn", "centroid")
    assert sorted(res) == ["finetuned", "pretrained"]
    for model in res:
        assert set(names) <= set(res[model])
        for head in names:
            m = res[model][head]
            assert m["test_count"] == 100  # 20 classes x 5 test images
            assert 0.0 <= m["test_top1"] <= m["test_top3"] <= 1.0
            assert m["test_top1_bootstrap_std"] > 0
    assert stages["match"]["images"] == 100 and stages["finetune"]["steps"] == 60 and stages["pretrain"]["steps"] == 200
    # something was learned: pretraining gives features that probes separate far above chance (5%),
    # fine-tuning on the matched captions raises zero-shot by more than the bootstrap noise
    chance = 1 / 20
    for model in ("pretrained", "finetuned"):
        best_probe = max(res[model][f"linear_probe_{p}"]["test_top1"] for p in ("sgd", "ridge", "lbfgs"))
        assert best_probe > 3 * chance, (model, best_probe)
    before, after = res["pretrained"]["zero_shot"], res["finetuned"]["zero_shot"]
    noise = max(before["test_top1_bootstrap_std"], after["test_top1_bootstrap_std"])
    assert after["test_top1"] - before["test_top1"] > 2 * noise, (before, after)
    captions = json.loads((tmp_path / "match" / "captions_top5.json").read_text())
    assert len(captions) == 100 and all(len(c) == 5 for c in captions.values())
    table = (tmp_path / "results.md").read_text()
    assert "| linear_probe_sgd | finetuned |" in table and "| zero_shot | pretrained |" in table
    assert "| coder_rerank | finetuned |" in table and "| tip_adapter_f | pretrained |" in table
    assert json.loads((tmp_path / "config.json").read_text())["method"] == "gist"
    # a stage can be rerun alone from what the others wrote
    config.gist.stages = ("evaluate",)
    again = main.run_job(config, str(tmp_path))["gist"]
    assert again["finetuned"]["linear_probe_ridge"]["test_top1"] == res["finetuned"]["linear_probe_ridge"]["test_top1"]
    rerun = json.loads((tmp_path / "results.json").read_text())["run"]["gist"]["stages"]
    assert rerun["finetune"] == stages["finetune"]  # results of stages not rerun are kept


def test_zero_shot_job_on_generated_shapes(tmp_path):
    config = zero_shot_config.get_config("small")
    config.data.synthetic.dir = str(tmp_path / "birds")
    main.run_job(config, str(tmp_path))
    metrics = json.loads((tmp_path / "results.json").read_text())["zero_shot"]["preset"]["zero_shot"]
    assert metrics["images"] == 40 and metrics["classes"] == 10 and metrics["chance_top1"] == 0.1
    assert 0.0 <= metrics["test_top1"] <= metrics["test_top5"] <= 1.0
    assert metrics["test_top1_bootstrap_std"] > 0
    config.zero_shot.templates = ("a photo",)
    with pytest.raises(ValueError, match=r"each template needs a '\{\}'"):
        main.run_job(config, str(tmp_path))


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
