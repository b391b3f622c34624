"""The launcher runs the embedded default config end to end and writes its results."""

import json

import numpy as np
import pytest

from jaxgist import main, zero_shot
from jaxgist.data import synthetic
from configs import demo


def test_demo_config_runs_and_writes_results(tmp_path):
    config = demo.get_config("runlocal")
    main.run_job(config, str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    metrics = results["zero_shot"]
    assert metrics["num_images"] == 40 and metrics["num_classes"] == 10
    assert 0.0 <= metrics["test_top1"] <= metrics["test_top5"] <= 1.0
    assert "| zero_shot / test_top1 |" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["method"] == "zero_shot"


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
