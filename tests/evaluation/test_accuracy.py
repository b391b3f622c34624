"""Top-k accuracy and its bootstrap: brute-force references, GIST's exact resampling, input checks."""

import json

import numpy as np
import pytest

from jaxgist.evaluation import accuracy as evaluation


def _random_problem(n=300, num_classes=10, seed=0, skill=1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), labels] += skill  # better than chance, far from perfect
    return logits.astype(np.float32), labels


def _brute_topk(logits, labels, k):
    """Top-k by a stable descending sort (ties: the smaller class index first), one row at a time."""
    hits = [label in np.argsort(-row, kind="stable")[:k] for row, label in zip(logits, labels)]
    return float(np.mean(hits))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_topk_matches_a_sort(k):
    logits, labels = _random_problem()
    assert evaluation.topk_accuracy(logits, labels, k) == pytest.approx(_brute_topk(logits, labels, k))


def test_top1_is_argmax_and_ties_follow_it():
    logits, labels = _random_problem(seed=1)
    assert evaluation.topk_accuracy(logits, labels, 1) == np.mean(logits.argmax(1) == labels)
    # Constant logits: argmax says class 0, so only label 0 is right at k=1 and labels 0, 1 at k=2.
    flat = np.zeros((4, 5), np.float32)
    np.testing.assert_array_equal(evaluation.topk_correct(flat, np.array([0, 1, 2, 4]), 1), [1, 0, 0, 0])
    np.testing.assert_array_equal(evaluation.topk_correct(flat, np.array([0, 1, 2, 4]), 2), [1, 1, 0, 0])
    # Rows with ties in the middle: a stable sort decides.
    tied = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], np.float32)
    for k in (1, 2, 3):
        for label in range(4):
            labels = np.full(2, label)
            np.testing.assert_array_equal(evaluation.topk_correct(tied, labels, k),
                                          [label in np.argsort(-row, kind="stable")[:k] for row in tied])


def test_k_at_least_num_classes_is_always_right():
    logits, labels = _random_problem(num_classes=3)
    assert evaluation.topk_accuracy(logits, labels, 3) == 1.0
    assert evaluation.topk_accuracy(logits, labels, 7) == 1.0


def _brute_bootstrap(logits, labels, indices, ks):
    """One resample at a time, each accuracy from a full sort."""
    accs = {k: [] for k in ks}
    for idx in indices:
        for k in ks:
            accs[k].append(_brute_topk(logits[idx], labels[idx], k))
    return {f"top{k}": {"mean": np.mean(v), "std": np.std(v)} for k, v in accs.items()}


def test_bootstrap_matches_a_loop_with_the_same_rng():
    logits, labels = _random_problem(n=120)
    resamples, seed = 200, 5
    got = evaluation.bootstrap_topk(logits, labels, ks=(1, 3), resamples=resamples, seed=seed)
    indices = np.random.default_rng(seed).integers(0, len(labels), size=(resamples, len(labels)))
    want = _brute_bootstrap(logits, labels, indices, (1, 3))
    for key in ("top1", "top3"):
        assert got[key]["mean"] == pytest.approx(want[key]["mean"], abs=1e-6)
        assert got[key]["std"] == pytest.approx(want[key]["std"], abs=1e-6)


def test_bootstrap_is_gists_loop_with_rng_gist():
    """GIST's linear_probe.py: sklearn.utils.resample(labels, outputs, replace=True, random_state=j)."""
    from sklearn.utils import resample

    logits, labels = _random_problem(n=150, seed=2)
    top1, top3 = [], []
    for j in range(100):
        lab, out = resample(labels, logits, replace=True, random_state=j)
        top1.append(np.mean(out.argmax(1) == lab))
        top3.append(np.mean([lab[i] in np.argsort(-out[i], kind="stable")[:3] for i in range(len(lab))]))
    got = evaluation.bootstrap_topk(logits, labels, ks=(1, 3), resamples=100, seed=0, rng="gist")
    assert got["top1"]["mean"] == pytest.approx(np.mean(top1), abs=1e-12)
    assert got["top1"]["std"] == pytest.approx(np.std(top1), abs=1e-12)
    assert got["top3"]["mean"] == pytest.approx(np.mean(top3), abs=1e-12)
    assert got["top3"]["std"] == pytest.approx(np.std(top3), abs=1e-12)


def test_bootstrap_mean_is_near_the_accuracy_and_std_near_the_binomial():
    logits, labels = _random_problem(n=2000, seed=3)
    n = len(labels)
    got = evaluation.bootstrap_topk(logits, labels, ks=(1, 3), resamples=1000, seed=0)
    for k in (1, 3):
        acc = evaluation.topk_accuracy(logits, labels, k)
        binomial_std = np.sqrt(acc * (1 - acc) / n)
        assert got[f"top{k}"]["mean"] == pytest.approx(acc, abs=4 * binomial_std / np.sqrt(1000) + 1e-4)
        assert got[f"top{k}"]["std"] == pytest.approx(binomial_std, rel=0.1)


def test_bootstrap_is_deterministic_per_seed_and_blocks_do_not_matter(monkeypatch):
    logits, labels = _random_problem(n=90, seed=4)
    a = evaluation.bootstrap_topk(logits, labels, resamples=50, seed=1)
    monkeypatch.setattr(evaluation, "_GATHER_BLOCK", 7 * 90)  # 7 resamples per block
    b = evaluation.bootstrap_topk(logits, labels, resamples=50, seed=1)
    c = evaluation.bootstrap_topk(logits, labels, resamples=50, seed=2)
    assert a == b and a != c


def test_accuracy_summary_is_flat_and_json_ready():
    logits, labels = _random_problem(n=200, seed=6)
    summary = evaluation.accuracy_summary(logits, labels, prefix="test", resamples=100)
    assert set(summary) == {"test_top1", "test_top1_bootstrap_mean", "test_top1_bootstrap_std", "test_top3",
                            "test_top3_bootstrap_mean", "test_top3_bootstrap_std", "test_count"}
    assert summary["test_top1"] == evaluation.topk_accuracy(logits, labels, 1)
    assert summary["test_count"] == 200
    boot = evaluation.bootstrap_topk(logits, labels, resamples=100)
    assert summary["test_top3_bootstrap_std"] == boot["top3"]["std"]
    json.dumps(summary)
    plain = evaluation.accuracy_summary(logits, labels, prefix="val", ks=(1,), resamples=0)
    assert set(plain) == {"val_top1", "val_count"}


@pytest.mark.parametrize("logits, labels, message", [
    (np.zeros((3, 4)), np.array([0, 1]), "3 rows of logits but 2 labels"),
    (np.zeros((3, 4)), np.array([0, 1, 4]), r"must lie in \[0, 4\)"),
    (np.zeros((3, 4)), np.array([0, -1, 2]), r"must lie in \[0, 4\)"),
    (np.zeros((0, 4)), np.zeros(0, np.int64), "no examples"),
    (np.zeros(4), np.array([0]), r"\[num_examples, num_classes\]"),
    (np.zeros((2, 4)), np.array([[0], [1]]), "1-d array"),
    (np.zeros((2, 4)), np.array([0.0, 1.0]), "integer class indices"),
    (np.array([[0.0, np.nan], [1.0, 0.0]]), np.array([0, 1]), "NaN"),
])
def test_bad_input_raises(logits, labels, message):
    for call in (lambda: evaluation.topk_accuracy(logits, labels, 1),
                 lambda: evaluation.bootstrap_topk(logits, labels, resamples=5),
                 lambda: evaluation.accuracy_summary(logits, labels, resamples=5)):
        with pytest.raises(ValueError, match=message):
            call()


def test_bad_options_raise():
    logits, labels = _random_problem(n=20)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        evaluation.topk_accuracy(logits, labels, 0)
    with pytest.raises(ValueError, match="resamples"):
        evaluation.bootstrap_topk(logits, labels, resamples=0)
    with pytest.raises(ValueError, match="ks is empty"):
        evaluation.bootstrap_topk(logits, labels, ks=())
    with pytest.raises(ValueError, match="rng"):
        evaluation.bootstrap_topk(logits, labels, rng="torch")
