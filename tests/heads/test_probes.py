"""Linear probes: accuracy against scikit-learn, exactness (ridge vs lstsq, SGD vs a PyTorch loop,
L-BFGS vs sklearn's objective), validation-only selection, and input checks."""

import json

import jax
import numpy as np
import pytest
import scipy.special
from sklearn.linear_model import LogisticRegression

from jaxgist.evaluation.accuracy import topk_accuracy
from jaxgist.heads import probes

NUM_CLASSES, DIM = 6, 24


def _gaussian_classes(per_class, seed, separation=1.0, num_classes=NUM_CLASSES, dim=DIM, offset=1.0):
    """Near-separable embeddings: class means shared across splits (fixed seed), fresh noise per ``seed``."""
    means = np.random.default_rng(1234).normal(size=(num_classes, dim)) * separation / np.sqrt(dim)
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), per_class)
    x = offset + means[y] + rng.normal(size=(len(y), dim)) / np.sqrt(dim)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def splits():
    """Near-separable: train 10, validation 15, test 150 per class."""
    return _gaussian_classes(10, 1), _gaussian_classes(15, 2), _gaussian_classes(150, 3)


@pytest.fixture(scope="module")
def hard_splits():
    """Overlapping classes, where the L2 strength and the epoch matter on test."""
    return tuple(_gaussian_classes(k, seed, separation=0.5) for k, seed in [(10, 1), (15, 2), (150, 3)])


@pytest.fixture(scope="module")
def sklearn_accuracy(splits):
    (xt, yt), _, (xs, ys) = splits
    return LogisticRegression(max_iter=2000).fit(xt, yt).score(xs, ys)


FITS = {
    "sgd": lambda *a: probes.sgd_probe(*a, epochs=150),
    "ridge": probes.ridge_probe,
    "lbfgs": probes.lbfgs_probe,
}


@pytest.mark.parametrize("method", list(FITS))
def test_probe_reaches_sklearn_accuracy(method, splits, sklearn_accuracy):
    (xt, yt), (xv, yv), (xs, ys) = splits
    probe = FITS[method](xt, yt, xv, yv, NUM_CLASSES)
    assert 0.9 < sklearn_accuracy < 1.0  # near-separable
    ours = topk_accuracy(probe.predict_logits(xs), ys)
    assert ours >= sklearn_accuracy - 0.01, (method, ours, sklearn_accuracy)
    assert probe.method == method
    assert probe.weights.shape == (DIM, NUM_CLASSES) and probe.bias.shape == (NUM_CLASSES,)
    assert probe.predict_logits(xs).dtype == np.float32
    np.testing.assert_array_equal(probe.predict(xs), probe.predict_logits(xs).argmax(1))
    assert probe.val_accuracy == pytest.approx(topk_accuracy(probe.predict_logits(xv), yv))
    json.dumps(probe.summary())


# --------------------------------------------------------------------------------------------------
# Ridge: exactness and selection.
# --------------------------------------------------------------------------------------------------


def _lstsq_ridge(x, y, num_classes, l2):
    """float64 reference: min ||X W + 1 b - Y||^2 + l2 ||W||^2 as one augmented least-squares problem."""
    n, d = x.shape
    x = x.astype(np.float64)
    a = np.block([[x, np.ones((n, 1))], [np.sqrt(l2) * np.eye(d), np.zeros((d, 1))]])
    targets = np.concatenate([np.eye(num_classes)[y], np.zeros((d, num_classes))])
    sol = np.linalg.lstsq(a, targets, rcond=None)[0]
    return sol[:d], sol[d]


@pytest.mark.parametrize("n_per_class", [2, 12])  # n < d (kernel form) and n > d (covariance form)
@pytest.mark.parametrize("standardize", [False, True])
def test_ridge_equals_lstsq(n_per_class, standardize):
    x, y = _gaussian_classes(n_per_class, 5)
    x = x * np.linspace(0.5, 3.0, DIM, dtype=np.float32)  # unequal feature scales
    xv, yv = _gaussian_classes(3, 6)
    l2 = 0.7
    probe = probes.ridge_probe(x, y, xv, yv, NUM_CLASSES, l2s=[l2], standardize=standardize)
    assert probe.hparams["l2"] == pytest.approx(l2)
    if standardize:  # the same problem on features standardized with training statistics
        mean, std = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64)
        w_std, b_std = _lstsq_ridge((x - mean) / std, y, NUM_CLASSES, l2)
        w, b = w_std / std[:, None], b_std - (mean / std) @ w_std
    else:
        w, b = _lstsq_ridge(x, y, NUM_CLASSES, l2)
    scale = np.abs(w).max()
    np.testing.assert_allclose(probe.weights, w, atol=2e-4 * scale)
    np.testing.assert_allclose(probe.bias, b, atol=2e-4 * max(1.0, np.abs(b).max()))


def test_ridge_val_curve_is_each_l2_fitted_alone(splits):
    (xt, yt), (xv, yv), _ = splits
    grid = [1e-2, 1.0, 30.0, 1e3]
    probe = probes.ridge_probe(xt, yt, xv, yv, NUM_CLASSES, l2s=grid)
    np.testing.assert_allclose(probe.grid, grid, rtol=1e-6)
    for l2, acc in zip(grid, probe.val_curve):
        alone = probes.ridge_probe(xt, yt, xv, yv, NUM_CLASSES, l2s=[l2])
        assert topk_accuracy(alone.predict_logits(xv), yv) == pytest.approx(acc)


def _val_labels_favoring(weights, bias, xv):
    """Labels under which the given classifier is 100% right on the validation features."""
    return np.argmax(xv @ weights + bias, axis=1)


def _ridge_val_scores(fits, xv, yv):
    """Validation (accuracy, squared error to one-hot) of each fitted probe."""
    scores = []
    for fit in fits:
        logits = fit.predict_logits(xv).astype(np.float64)
        scores.append((topk_accuracy(logits, yv), np.sum((logits - np.eye(NUM_CLASSES)[yv]) ** 2)))
    return scores


def test_ridge_picks_the_validation_optimum_not_the_test_one(hard_splits):
    (xt, yt), (xv, _), (xs, ys) = hard_splits
    grid = np.logspace(-2, 5, 8)
    dummy = np.zeros(len(xv), np.int64)  # with a single L2 the validation labels play no part
    alone = [probes.ridge_probe(xt, yt, xv, dummy, NUM_CLASSES, l2s=[l2]) for l2 in grid]
    test_acc = [topk_accuracy(fit.predict_logits(xs), ys) for fit in alone]
    # Validation labels that the worst-on-test L2 gets exactly right: validation must pick that L2 (or
    # one as right on validation, of lower validation error), never the test optimum.
    target = int(np.argmin(test_acc))
    yv = _val_labels_favoring(alone[target].weights, alone[target].bias, xv)
    probe = probes.ridge_probe(xt, yt, xv, yv, NUM_CLASSES, l2s=grid)
    scores = _ridge_val_scores(alone, xv, yv)
    np.testing.assert_allclose(probe.val_curve, [acc for acc, _ in scores])
    assert probe.val_curve[target] == 1.0
    expected = max(range(len(grid)), key=lambda i: (scores[i][0], -scores[i][1]))
    assert test_acc[expected] < max(test_acc) - 0.02
    assert probe.hparams["l2"] == pytest.approx(grid[expected])
    assert topk_accuracy(probe.predict_logits(xs), ys) == pytest.approx(test_acc[expected])


def test_ridge_breaks_accuracy_ties_by_validation_error(splits):
    (xt, yt), (xv, yv), _ = splits
    grid = np.logspace(-1, 4, 6)
    probe = probes.ridge_probe(xt, yt, xv, yv, NUM_CLASSES, l2s=grid)
    scores = _ridge_val_scores([probes.ridge_probe(xt, yt, xv, yv, NUM_CLASSES, l2s=[l2]) for l2 in grid], xv, yv)
    tied = [i for i, (acc, _) in enumerate(scores) if acc == max(acc for acc, _ in scores)]
    assert len(tied) > 1  # the data are easy enough for several L2s to tie
    expected = min(tied, key=lambda i: scores[i][1])
    assert probe.hparams["l2"] == pytest.approx(grid[expected])


def test_ridge_default_grid_is_relative_to_the_feature_scale(splits):
    (xt, yt), (xv, yv), _ = splits
    a = probes.ridge_probe(xt, yt, xv, yv, NUM_CLASSES, standardize=False)
    b = probes.ridge_probe(10 * xt, yt, 10 * xv, yv, NUM_CLASSES, standardize=False)
    np.testing.assert_allclose(b.grid, 100 * a.grid, rtol=1e-4)
    np.testing.assert_array_equal(a.val_curve, b.val_curve)


# --------------------------------------------------------------------------------------------------
# SGD: GIST's loop, exactly.
# --------------------------------------------------------------------------------------------------


def _torch_gist_loop(x, y, xv, yv, w0, b0, orders, lr, batch_size):
    """GIST's training loop in PyTorch, fed our initialization and epoch orders."""
    import torch

    torch.set_num_threads(1)  # tiny matmuls: threads only contend
    net = torch.nn.Linear(x.shape[1], w0.shape[1])
    with torch.no_grad():
        net.weight.copy_(torch.tensor(np.asarray(w0).T))
        net.bias.copy_(torch.tensor(np.asarray(b0)))
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    x, y, xv, yv = map(torch.tensor, (x, y, xv, yv))
    best, best_state, best_epoch, curve = 0.0, None, 0, []
    for epoch, order in enumerate(orders):
        for start in range(0, len(order), batch_size):  # the DataLoader's batches, last one partial
            idx = torch.tensor(np.asarray(order[start:start + batch_size]))
            optimizer.zero_grad()
            criterion(net(x[idx]), y[idx]).backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = (net(xv).argmax(1) == yv).float().mean().item()
        curve.append(accuracy)
        if accuracy >= best:
            best, best_epoch = accuracy, epoch + 1
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
    return best_state["weight"].numpy().T, best_state["bias"].numpy(), best_epoch, np.array(curve)


def test_sgd_is_gists_torch_loop(splits):
    pytest.importorskip("torch")
    (xt, yt), (xv, yv), _ = splits
    epochs, batch_size, lr, seed = 12, 16, 0.5, 3  # 60 examples: 3 full batches and a partial one
    probe = probes.sgd_probe(xt, yt, xv, yv, NUM_CLASSES, lr=lr, epochs=epochs, batch_size=batch_size, seed=seed)
    init_key, shuffle_key = probes._sgd_keys(seed)
    w0, b0 = probes._sgd_init(init_key, DIM, NUM_CLASSES)
    orders = np.asarray(jax.vmap(lambda e: probes._epoch_order(shuffle_key, e, len(yt)))(np.arange(epochs)))
    w, b, epoch, curve = _torch_gist_loop(xt, yt, xv, yv, w0, b0, orders, lr, batch_size)
    np.testing.assert_allclose(probe.val_curve, curve, atol=1e-6)
    assert probe.hparams["epoch"] == epoch
    np.testing.assert_allclose(probe.weights, w, atol=1e-4)
    np.testing.assert_allclose(probe.bias, b, atol=1e-4)
    bound = 1 / np.sqrt(DIM)  # nn.Linear's init range
    assert np.abs(np.asarray(w0)).max() <= bound and np.abs(np.asarray(w0)).max() > 0.8 * bound


def test_sgd_picks_the_validation_optimum_not_the_test_one(hard_splits):
    (xt, yt), (xv, _), (xs, ys) = hard_splits
    epochs, seed = 150, 0  # 150 epochs: the same compiled loop as the other tests
    early = probes.sgd_probe(xt, yt, xv, np.zeros(len(xv), np.int64), NUM_CLASSES, epochs=1, seed=seed)
    # Validation labels that the epoch-1 weights get exactly right: epoch 1 must be chosen, although
    # later epochs are better on test.
    yv = _val_labels_favoring(early.extras["final_weights"], early.extras["final_bias"], xv)
    probe = probes.sgd_probe(xt, yt, xv, yv, NUM_CLASSES, epochs=epochs, seed=seed)
    assert probe.val_curve[0] == 1.0 and np.all(probe.val_curve[1:] < 1.0)
    assert probe.hparams["epoch"] == 1
    np.testing.assert_array_equal(probe.weights, early.extras["final_weights"])
    final_test = topk_accuracy(xs @ probe.extras["final_weights"] + probe.extras["final_bias"], ys)
    assert topk_accuracy(probe.predict_logits(xs), ys) < final_test - 0.05


def test_sgd_is_seeded_and_ties_go_to_the_later_epoch(splits):
    (xt, yt), (xv, yv), _ = splits
    a = probes.sgd_probe(xt, yt, xv, yv, NUM_CLASSES, epochs=150, seed=7)
    b = probes.sgd_probe(xt, yt, xv, yv, NUM_CLASSES, epochs=150, seed=7)
    c = probes.sgd_probe(xt, yt, xv, yv, NUM_CLASSES, epochs=150, seed=8)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert not np.array_equal(a.extras["final_weights"], c.extras["final_weights"])
    best = a.val_curve.max()
    assert a.hparams["epoch"] == np.flatnonzero(a.val_curve == best)[-1] + 1
    assert a.extras["train_loss"].shape == (150,) and a.extras["train_loss"][-1] < a.extras["train_loss"][0]


# --------------------------------------------------------------------------------------------------
# L-BFGS: the minimizer.
# --------------------------------------------------------------------------------------------------


def _objective(x, y, w, b, l2):
    logits = x.astype(np.float64) @ w + b
    nll = scipy.special.logsumexp(logits, axis=1) - logits[np.arange(len(y)), y]
    return nll.mean() + 0.5 * l2 * np.sum(np.square(w, dtype=np.float64))


@pytest.mark.parametrize("n_per_class, precondition", [(2, True), (10, True), (10, False)])  # n < d, n > d
def test_lbfgs_minimizes_the_objective_sklearn_minimizes(n_per_class, precondition):
    x, y = _gaussian_classes(n_per_class, 11, separation=1.5)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)  # standardized: our standardization is a no-op
    xv, yv = _gaussian_classes(15, 12)
    l2 = 1e-2
    probe = probes.lbfgs_probe(x, y, xv, yv, NUM_CLASSES, l2s=[l2], precondition=precondition, tol=1e-4)
    # sklearn: C * sum(CE) + ||W||^2 / 2, unpenalized intercept: C = 1 / (l2 n) is the same minimizer.
    sk = LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=10000).fit(x, y)
    ours = _objective(x, y, probe.weights, probe.bias, l2)
    theirs = _objective(x, y, sk.coef_.T, sk.intercept_, l2)
    assert ours == pytest.approx(theirs, rel=1e-4)
    np.testing.assert_allclose(probe.weights, sk.coef_.T, atol=5e-3 * np.abs(sk.coef_).max())


def test_lbfgs_val_curve_and_selection(hard_splits):
    (xt, yt), (xv, _), (xs, ys) = hard_splits
    grid = [1e-2, 1e-1, 100.0]
    dummy = np.zeros(len(xv), np.int64)
    alone = [probes.lbfgs_probe(xt, yt, xv, dummy, NUM_CLASSES, l2s=[l2]) for l2 in grid]
    test_acc = [topk_accuracy(p.predict_logits(xs), ys) for p in alone]
    # Validation labels that the weakest penalty gets exactly right, although it is not the best on test.
    target = 0
    yv = _val_labels_favoring(alone[target].weights, alone[target].bias, xv)
    probe = probes.lbfgs_probe(xt, yt, xv, yv, NUM_CLASSES, l2s=grid)
    assert probe.val_curve[target] == 1.0
    expected = np.flatnonzero(probe.val_curve == 1.0)[-1]  # ties: the larger L2
    assert test_acc[expected] < max(test_acc) - 0.02
    assert probe.hparams["l2"] == pytest.approx(grid[expected])
    # The warm-started path agrees with fitting each L2 alone.
    for acc, single in zip(probe.val_curve, alone):
        assert acc == pytest.approx(topk_accuracy(single.predict_logits(xv), yv), abs=1.5 / len(yv))


# --------------------------------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------------------------------

ALL_PROBES = [probes.sgd_probe, probes.ridge_probe, probes.lbfgs_probe]


@pytest.mark.parametrize("fit", ALL_PROBES, ids=["sgd", "ridge", "lbfgs"])
@pytest.mark.parametrize("case, message", [
    ("train_lengths", "train_y has 59 labels"),
    ("val_lengths", "val_y has 10 labels"),
    ("label_range", r"must lie in \[0, 6\)"),
    ("negative_label", r"must lie in \[0, 6\)"),
    ("empty_val", "val_x is empty"),
    ("empty_train", "train_x is empty"),
    ("dims", "dimension"),
    ("float_labels", "integer class indices"),
    ("nan", "NaN"),
    ("num_classes", "num_classes"),
    ("one_d_features", "2-d array"),
])
def test_bad_input_raises(fit, case, message, splits):
    (xt, yt), (xv, yv), _ = splits
    args = [xt, yt, xv, yv, NUM_CLASSES]
    if case == "train_lengths":
        args[1] = yt[:-1]
    elif case == "val_lengths":
        args[3] = yv[:10]
    elif case == "label_range":
        args[1] = np.where(np.arange(len(yt)) == 0, NUM_CLASSES, yt)
    elif case == "negative_label":
        args[3] = np.where(np.arange(len(yv)) == 0, -1, yv)
    elif case == "empty_val":
        args[2], args[3] = xv[:0], yv[:0]
    elif case == "empty_train":
        args[0], args[1] = xt[:0], yt[:0]
    elif case == "dims":
        args[2] = xv[:, :-1]
    elif case == "float_labels":
        args[1] = yt.astype(np.float32)
    elif case == "nan":
        args[0] = np.where(np.arange(DIM) == 0, np.nan, xt).astype(np.float32)
    elif case == "num_classes":
        args[4] = 1
    elif case == "one_d_features":
        args[2] = xv[:, 0]
    with pytest.raises(ValueError, match=message):
        fit(*args)


def test_bad_options_raise(splits):
    (xt, yt), (xv, yv), _ = splits
    with pytest.raises(ValueError, match="l2s"):
        probes.ridge_probe(xt, yt, xv, yv, NUM_CLASSES, l2s=[])
    with pytest.raises(ValueError, match="l2s"):
        probes.lbfgs_probe(xt, yt, xv, yv, NUM_CLASSES, l2s=[1.0, -1.0])
    with pytest.raises(ValueError, match="epochs"):
        probes.sgd_probe(xt, yt, xv, yv, NUM_CLASSES, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        probes.sgd_probe(xt, yt, xv, yv, NUM_CLASSES, lr=-0.5)
    probe = probes.ridge_probe(xt, yt, xv, yv, NUM_CLASSES)
    with pytest.raises(ValueError, match="features must be"):
        probe.predict_logits(xv[:, :3])

