"""Tip-Adapter: the formulas against numpy, the grid search against the reference's Python loop, label
recovery on aligned embeddings, validation-only selection, Tip-Adapter-F against a PyTorch transcription
of the reference's training loop, and input checks."""

import json

import jax
import numpy as np
import pytest

from jaxgist.heads import tip_adapter as ta

C, D = 10, 32


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_logits(x, text, keys, values, alpha, beta):
    """The formula, in float64 numpy, exactly as documented."""
    x = _unit(np.asarray(x, np.float64))
    return 100.0 * x @ np.asarray(text, np.float64).T + alpha * np.exp(
        -beta * (1.0 - x @ np.asarray(keys, np.float64).T)) @ np.asarray(values, np.float64)


def _numpy_search(x, y, text, keys, values, alphas, betas):
    """The reference's search_hp: for each beta, for each alpha (both ascending), keep a strictly better
    accuracy. Returns (alpha, beta, count grid [B, A])."""
    counts = np.zeros((len(betas), len(alphas)), np.int64)
    best, best_alpha, best_beta = -1, None, None
    for i, beta in enumerate(sorted(betas)):
        for j, alpha in enumerate(sorted(alphas)):
            counts[i, j] = np.sum(np.argmax(_numpy_logits(x, text, keys, values, alpha, beta), axis=1) == y)
            if counts[i, j] > best:
                best, best_alpha, best_beta = counts[i, j], alpha, beta
    return best_alpha, best_beta, counts


def _random_problem(seed, n_train=40, n_val=60, num_classes=C, dim=D):
    rng = np.random.default_rng(seed)
    text = _unit(rng.normal(size=(num_classes, dim))).astype(np.float32)
    train_y = rng.integers(0, num_classes, n_train)
    val_y = rng.integers(0, num_classes, n_val)
    # Weakly informative: accuracies spread over the grid instead of saturating.
    train_x = (0.4 * text[train_y] + rng.normal(size=(3, n_train, dim)) / np.sqrt(dim)).astype(np.float32)
    val_x = (0.25 * text[val_y] + rng.normal(size=(n_val, dim)) / np.sqrt(dim)).astype(np.float32)
    return train_x, train_y, val_x, val_y, text


def _aligned_problem(seed, shots=16, val_per_class=5, test_per_class=30, text_noise=3.0):
    """Images = class mean + noise; text weights = class mean + ``text_noise`` (relative) noise."""
    rng = np.random.default_rng(seed)
    means = _unit(rng.normal(size=(C, D)))
    text = _unit(means + text_noise * _unit(rng.normal(size=(C, D)))).astype(np.float32)

    def images(per_class, views=None):
        y = np.repeat(np.arange(C), per_class)
        shape = (len(y), D) if views is None else (views, len(y), D)
        return (means[y] + 0.6 * rng.normal(size=shape) / np.sqrt(D)).astype(np.float32), y

    return images(shots, views=4), images(val_per_class), images(test_per_class), text


# ---------------------------------------------------------------------------------------------------
# The formulas.
# ---------------------------------------------------------------------------------------------------


def test_build_cache_matches_numpy():
    rng = np.random.default_rng(0)
    views = rng.normal(size=(5, 12, D)).astype(np.float32)
    y = rng.integers(0, 4, 12)
    keys, values = ta.build_cache(views, y, 4)
    np.testing.assert_allclose(keys, _unit(views.astype(np.float64).mean(axis=0)), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(values, np.eye(4)[y])
    assert keys.dtype == np.float32 and values.dtype == np.float32 and values.shape == (12, 4)
    one_keys, one_values = ta.build_cache(views[0], y, 4)  # [N, D]: a single view
    np.testing.assert_allclose(one_keys, _unit(views[0].astype(np.float64)), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(one_values, values)


@pytest.mark.parametrize("cache", ["one_hot", "one_hot_unequal", "soft"])
def test_tip_logits_matches_numpy(cache):
    rng = np.random.default_rng(1)
    n_keys = 24
    text = _unit(rng.normal(size=(C, D))).astype(np.float32)
    keys = _unit(rng.normal(size=(n_keys, D))).astype(np.float32)
    x = (3.0 * rng.normal(size=(17, D))).astype(np.float32)  # unnormalized: tip_logits normalizes
    if cache == "one_hot":  # grouped by class on the device, classes of equal size, shuffled order
        values = np.eye(C, dtype=np.float32)[rng.permutation(np.arange(n_keys) % C)]
    elif cache == "one_hot_unequal":  # some classes empty, one with 9 entries: padded groups
        values = np.eye(C, dtype=np.float32)[np.r_[np.zeros(9, int), rng.integers(1, 5, n_keys - 9)]]
    else:  # soft labels: a dense matmul
        values = rng.dirichlet(np.ones(C), size=n_keys).astype(np.float32)
    for alpha, beta in [(0.0, 1.0), (1.17, 1.0), (5.0, 5.5), (30.0, 0.3)]:
        got = ta.tip_logits(x, text, keys, values, alpha, beta)
        want = _numpy_logits(x, text, keys, values, alpha, beta)
        assert got.shape == (17, C) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------------
# The grid search.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["default", "vmapped_alphas_row_chunks"])
def test_search_matches_numpy_loop(layout, monkeypatch):
    if layout != "default":  # the accelerators' path (alphas vmapped), and the validation set in 3 chunks
        monkeypatch.setattr(ta, "_vectorize_alphas", lambda: True)
        monkeypatch.setattr(ta, "_SEARCH_BUDGET", 12 * C * 25)
    train_x, train_y, val_x, val_y, text = _random_problem(2)
    keys, values = ta.build_cache(train_x, train_y, C)
    rng = np.random.default_rng(3)
    alphas = rng.permutation(ta.reference_grid(10.0, 12))  # given unsorted: searched sorted
    betas = rng.permutation(ta.reference_grid(12.0, 15))
    found = ta.search(val_x, val_y, text, keys, values, alphas, betas)
    want_alpha, want_beta, want_counts = _numpy_search(val_x, val_y, text, keys, values, alphas, betas)
    np.testing.assert_array_equal(found.counts, want_counts)
    assert len(np.unique(want_counts)) > 5  # the grid matters on this problem
    assert (found.alpha, found.beta) == (want_alpha, want_beta)
    assert found.val_accuracy == want_counts.max() / len(val_y)
    np.testing.assert_array_equal(found.alphas, np.sort(alphas))
    np.testing.assert_array_equal(found.betas, np.sort(betas))
    np.testing.assert_allclose(found.accuracies, want_counts / len(val_y))


def test_search_tie_break_smallest_beta_then_alpha():
    (train_x, train_y), (val_x, val_y), _, text = _aligned_problem(4, text_noise=0.3)
    keys, values = ta.build_cache(train_x, train_y, C)
    alphas, betas = [8.0, 0.5, 2.0, 0.0], [6.0, 1.0, 3.0]
    found = ta.search(val_x, val_y, text, keys, values, alphas, betas)
    assert (found.counts == found.counts.max()).sum() > 1  # several grid points tie at the top
    best_beta, best_alpha = np.argwhere(found.counts == found.counts.max())[0]  # first in row-major order
    assert (found.beta, found.alpha) == (sorted(betas)[best_beta], sorted(alphas)[best_alpha])
    want_alpha, want_beta, _ = _numpy_search(val_x, val_y, text, keys, values, alphas, betas)
    assert (found.alpha, found.beta) == (want_alpha, want_beta)


def test_reference_grid():
    grid = ta.reference_grid(7, 200)
    assert len(grid) == 200 and grid[0] == 0.1 and grid[-1] == 199 * (7 - 0.1) / 200 + 0.1
    assert ta.DEFAULT_BETAS == ta.reference_grid(12.0, 200) and len(ta.DEFAULT_ALPHAS) == 20


# ---------------------------------------------------------------------------------------------------
# Behaviour on constructed problems.
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aligned():
    return _aligned_problem(5)


def test_recovers_labels_and_beats_noisy_zero_shot(aligned):
    (train_x, train_y), (val_x, val_y), (test_x, test_y), text = aligned
    zero_shot = np.mean(np.argmax(_unit(test_x) @ text.T, axis=1) == test_y)
    result = ta.tip_adapter(train_x, train_y, val_x, val_y, text)
    accuracy = np.mean(result.predict(test_x) == test_y)
    assert zero_shot < 0.7, zero_shot  # the noisy text weights alone are weak
    assert accuracy > 0.95 and accuracy > zero_shot + 0.25, (accuracy, zero_shot)
    assert result.alpha > 0 and result.method == "tip_adapter"
    assert result.extras["zero_shot_val_top1"] < result.val_accuracy
    # The result's logits are the formula's at the chosen (alpha, beta), and its validation accuracy
    # is that of its own predictions.
    np.testing.assert_allclose(result.predict_logits(test_x), ta.tip_logits(
        test_x, text, result.keys, result.values, result.alpha, result.beta), rtol=1e-6, atol=1e-4)
    assert np.mean(result.predict(val_x) == val_y) == result.val_accuracy
    summary = result.summary()
    json.dumps(summary)
    assert summary["val_top1"] == result.val_accuracy and summary["alpha"] == result.alpha


def test_tip_adapter_f_trains_and_selects_on_validation(aligned):
    (train_x, train_y), (val_x, val_y), (test_x, test_y), text = aligned
    result = ta.tip_adapter_f(train_x, train_y, val_x, val_y, text, epochs=8, batch_size=64)
    curve = result.extras["epoch_val_curve"]
    assert curve.shape == (8,) and result.hparams["epoch"] == int(np.argmax(curve)) + 1  # earliest best
    assert result.keys.shape == (len(train_y), D) and result.method == "tip_adapter_f"
    settings = {k: result.hparams[k] for k in ("lr", "eps", "weight_decay")}
    assert settings == {"lr": 1e-3, "eps": 1e-4, "weight_decay": 0.01}  # the reference's
    assert np.mean(result.predict(test_x) == test_y) > 0.95
    assert np.mean(result.predict(val_x) == val_y) == result.val_accuracy
    assert result.extras["train_loss"].shape == (8,) and np.isfinite(result.extras["train_loss"]).all()
    json.dumps(result.summary())


def test_selection_uses_validation_only():
    """Validation images sit near their class's text but near the *next* class's cache keys, so a large
    alpha hurts there; test images are the other way round and prefer a large alpha."""
    rng = np.random.default_rng(6)
    text, centers = _unit(rng.normal(size=(C, D))), _unit(rng.normal(size=(C, D)))
    noise = lambda n: 0.05 * rng.normal(size=(n, D))  # noqa: E731
    train_y = np.repeat(np.arange(C), 4)
    train_x = (centers[train_y] + noise(len(train_y))).astype(np.float32)
    y = np.repeat(np.arange(C), 6)
    val_x = (text[y] + 0.8 * centers[(y + 1) % C] + noise(len(y))).astype(np.float32)
    test_x = (centers[y] + 0.8 * text[(y + 1) % C] + noise(len(y))).astype(np.float32)
    alphas, betas = [0.5, 5.0, 50.0, 500.0], [1.0, 3.0]
    result = ta.tip_adapter(train_x, train_y, val_x, y, text.astype(np.float32), alphas=alphas, betas=betas)
    keys, values = result.keys, result.values
    val_alpha, val_beta, _ = _numpy_search(val_x, y, text, keys, values, alphas, betas)
    test_alpha, test_beta, test_counts = _numpy_search(test_x, y, text, keys, values, alphas, betas)
    assert (result.alpha, result.beta) == (val_alpha, val_beta)
    assert result.alpha < test_alpha  # test would have chosen a larger alpha ...
    chosen = test_counts[sorted(betas).index(result.beta), sorted(alphas).index(result.alpha)]
    assert chosen < test_counts.max()  # ... and scored better with it


# ---------------------------------------------------------------------------------------------------
# Tip-Adapter-F against the reference's training loop, transcribed to PyTorch.
# ---------------------------------------------------------------------------------------------------


def _torch_tip_adapter_f(views, train_y, val_x, val_y, text, keys, values, alpha, beta, epochs, batch_size, seed,
                         lr=0.001):
    """run_tip_adapter_F's loop (the epoch chosen on validation), with our shuffles."""
    import torch
    import torch.nn.functional as F

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adapter = torch.nn.Linear(keys.shape[1], keys.shape[0], bias=False)
        adapter.weight = torch.nn.Parameter(torch.tensor(keys))
        n = views.shape[1]
        steps_per_epoch = -(-n // batch_size)
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, eps=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
        clip_weights, cache_values = torch.tensor(text).t(), torch.tensor(values)
        val_features = torch.tensor(_unit(val_x))
        labels, val_labels = torch.tensor(train_y, dtype=torch.long), torch.tensor(val_y)
        best_acc, best_epoch, best_weight = -1, 0, None
        for epoch in range(epochs):
            features = torch.tensor(views[epoch % len(views)])
            features = features / features.norm(dim=-1, keepdim=True)
            order = np.asarray(ta._epoch_order(jax.random.key(seed), epoch, n))
            for start in range(0, n, batch_size):
                idx = torch.tensor(order[start:start + batch_size])
                image_features, target = features[idx], labels[idx]
                affinity = adapter(image_features)
                cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
                clip_logits = 100. * image_features @ clip_weights
                loss = F.cross_entropy(clip_logits + cache_logits * alpha, target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
            with torch.no_grad():
                affinity = adapter(val_features)
                cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
                tip = 100. * val_features @ clip_weights + cache_logits * alpha
                acc = int((tip.argmax(dim=1) == val_labels).sum())
            if acc > best_acc:
                best_acc, best_epoch, best_weight = acc, epoch + 1, adapter.weight.detach().clone()
        return best_weight.numpy(), best_epoch
    finally:
        torch.set_num_threads(threads)


def test_tip_adapter_f_matches_torch_reference_loop():
    train_x, train_y, val_x, val_y, text = _random_problem(8, n_train=50, n_val=40)
    order = np.random.default_rng(8).permutation(50)  # the cache in no particular class order
    train_x, train_y = train_x[:, order], train_y[order]
    # 4 batches an epoch, the last one partial; a larger lr than the default, so that the validation
    # accuracy moves within 6 epochs.
    alpha, beta, epochs, batch_size, lr = 3.0, 2.0, 6, 16, 0.03
    result = ta.tip_adapter_f(train_x, train_y, val_x, val_y, text, epochs=epochs, batch_size=batch_size, lr=lr,
                              init_alpha=alpha, init_beta=beta, seed=3, alphas=[1.0, 3.0, 9.0], betas=[1.0, 2.0])
    keys, values = ta.build_cache(train_x, train_y, C)
    want_keys, want_epoch = _torch_tip_adapter_f(train_x, train_y, val_x, val_y, text, keys, values, alpha, beta,
                                                 epochs, batch_size, seed=3, lr=lr)
    curve = result.extras["epoch_val_curve"]
    assert result.hparams["epoch"] == want_epoch > 1
    assert (curve[want_epoch - 1:] == curve.max()).sum() > 1  # tied later epochs: the earliest is kept
    assert np.abs(want_keys - keys).max() > 1e-3  # training moved the keys ...
    np.testing.assert_allclose(result.keys, want_keys, rtol=0, atol=2e-5)  # ... as the reference does
    found = ta.search(val_x, val_y, text, result.keys, values, [1.0, 3.0, 9.0], [1.0, 2.0])
    assert (result.alpha, result.beta, result.val_accuracy) == (found.alpha, found.beta, found.val_accuracy)


# ---------------------------------------------------------------------------------------------------
# Input checks.
# ---------------------------------------------------------------------------------------------------


def test_bad_inputs():
    rng = np.random.default_rng(9)
    text = _unit(rng.normal(size=(4, 8))).astype(np.float32)
    x = rng.normal(size=(6, 8)).astype(np.float32)
    y = np.arange(6) % 4
    keys, values = ta.build_cache(x, y, 4)
    with pytest.raises(ValueError, match="num_classes"):
        ta.build_cache(x, y, 1)
    with pytest.raises(ValueError, match="train_y must lie in"):
        ta.build_cache(x, y + 1, 4)
    with pytest.raises(ValueError, match="train_x must be"):
        ta.build_cache(x[None, None], y, 4)
    with pytest.raises(ValueError, match="has 5 labels"):
        ta.build_cache(x, y[:5], 4)
    with pytest.raises(ValueError, match="dimension 7"):
        ta.tip_logits(x[:, :7], text, keys, values, 1.0, 1.0)
    with pytest.raises(ValueError, match="values must be"):
        ta.tip_logits(x, text, keys, values[:, :3], 1.0, 1.0)
    with pytest.raises(ValueError, match="keys have dimension"):
        ta.tip_logits(x, text, keys[:, :7], values, 1.0, 1.0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        ta.tip_logits(x, text, keys, values, -1.0, 1.0)
    with pytest.raises(ValueError, match="beta must be finite"):
        ta.tip_logits(x, text, keys, values, 1.0, np.nan)
    with pytest.raises(ValueError, match="all-zero"):
        ta.tip_logits(np.zeros((2, 8)), text, keys, values, 1.0, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        ta.tip_logits(np.full((2, 8), np.nan), text, keys, values, 1.0, 1.0)
    with pytest.raises(ValueError, match="alphas must be a non-empty"):
        ta.search(x, y, text, keys, values, alphas=[], betas=[1.0])
    with pytest.raises(ValueError, match="betas must be finite and >= 0"):
        ta.search(x, y, text, keys, values, alphas=[1.0], betas=[-1.0])
    with pytest.raises(ValueError, match="val_y must lie in"):
        ta.search(x, y + 1, text, keys, values, alphas=[1.0], betas=[1.0])
    with pytest.raises(ValueError, match="val_y must be integer"):
        ta.search(x, y.astype(float), text, keys, values, alphas=[1.0], betas=[1.0])
    with pytest.raises(ValueError, match="text_weights must be"):
        ta.tip_adapter(x, y, x, y, text[:1])
    with pytest.raises(ValueError, match="val_x is empty"):
        ta.tip_adapter(x, y, x[:0], y[:0], text)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        ta.tip_adapter_f(x, y, x, y, text, epochs=0)
    with pytest.raises(ValueError, match="lr must be finite and > 0"):
        ta.tip_adapter_f(x, y, x, y, text, lr=0.0)
    with pytest.raises(ValueError, match="steps must be"):
        ta.reference_grid(7, 0)
