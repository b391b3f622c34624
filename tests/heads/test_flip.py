"""FLIP's heads: k-NN, nearest class mean and the hybrid MLP against direct numpy implementations,
accuracy on separable data, validation-only selection, input checks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid

from jaxgist.evaluation.accuracy import topk_accuracy
from jaxgist.heads import flip, probes

C, D_IMG, D_CAP = 5, 12, 8


def _clusters(per_class, seed, dim, separation, offset=0.0, means_seed=1234):
    """Gaussian classes: means fixed by ``means_seed`` (shared by splits), fresh noise per ``seed``."""
    means = np.random.default_rng(means_seed).normal(size=(C, dim)) * separation
    y = np.repeat(np.arange(C), per_class)
    x = offset + means[y] + np.random.default_rng(seed).normal(size=(len(y), dim))
    return x.astype(np.float32), y


def _hybrid_split(per_class, seed, separation=1.5):
    """Image and caption embeddings of the same examples, both informative."""
    x, y = _clusters(per_class, seed, D_IMG, separation)
    cx, _ = _clusters(per_class, seed + 100, D_CAP, separation, means_seed=99)
    return x, cx, y


@pytest.fixture(scope="module")
def separable():
    """train 10, validation 10, test 60 per class; well separated."""
    return [_clusters(n, s, D_IMG, 3.0, offset=2.0) for n, s in [(10, 1), (10, 2), (60, 3)]]


# --------------------------------------------------------------------------------------------------
# k-NN
# --------------------------------------------------------------------------------------------------


def _numpy_knn_votes(train_x, train_y, x, k, weights, temperature=0.07):
    """Direct float64 cosine k-NN: stable sort of the similarities (ties to the lower training index)."""
    t = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    q = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ t.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(x), C))
    for i in range(len(x)):
        for j in order[i]:
            votes[i, train_y[j]] += 1.0 if weights == "uniform" else np.exp((sims[i, j] - 1.0) / temperature)
    return votes


@pytest.mark.parametrize("weights", flip.KNN_WEIGHTS)
def test_knn_votes_and_val_curve_match_numpy(weights):
    rng = np.random.default_rng(0)
    xt, yt = rng.normal(size=(60, D_IMG)).astype(np.float32), rng.integers(0, C, 60)
    xv, yv = rng.normal(size=(25, D_IMG)).astype(np.float32), rng.integers(0, C, 25)
    xs = rng.normal(size=(30, D_IMG)).astype(np.float32)
    ks = (1, 2, 4, 7, 60, 61, 100)  # 61 and 100 exceed the 60 training examples: dropped
    knn = flip.knn_classifier(xt, yt, xv, yv, C, ks=ks, weights=weights)
    assert list(knn.grid) == [1, 2, 4, 7, 60] and knn.extras["dropped_ks"] == [61, 100]
    curve = [np.mean(_numpy_knn_votes(xt, yt, xv, k, weights).argmax(1) == yv) for k in knn.grid]
    np.testing.assert_array_equal(knn.val_curve, curve)
    assert knn.hparams["k"] == knn.grid[int(np.argmax(curve))]  # the first best: ties to the smaller k
    logits = knn.predict_logits(xs)
    assert logits.shape == (30, C) and logits.dtype == np.float32
    expected = _numpy_knn_votes(xt, yt, xs, knn.hparams["k"], weights)
    if weights == "uniform":
        np.testing.assert_array_equal(logits, expected)  # exact counts
        sk = KNeighborsClassifier(knn.hparams["k"], metric="cosine", algorithm="brute").fit(xt, yt)
        np.testing.assert_array_equal(knn.predict(xs), sk.predict(xs))
    else:
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(knn.predict(xs), logits.argmax(1))
    json.dumps(knn.summary())


def test_knn_ties_go_to_the_lower_training_index_then_the_lower_class():
    xt = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    yt = np.array([2, 1, 0])
    q = np.array([[2.0, 0.0]], np.float32)  # cosine 1 with both duplicates
    one = flip.knn_classifier(xt, yt, q, [0], 3, ks=[1])
    np.testing.assert_array_equal(one.predict_logits(q), [[0, 0, 1]])  # training row 0 (label 2) first
    two = flip.knn_classifier(xt, yt, q, [0], 3, ks=[2])
    np.testing.assert_array_equal(two.predict_logits(q), [[0, 1, 1]])
    assert two.predict(q)[0] == 1  # a vote tie goes to the lower class index


def test_knn_picks_the_validation_k_not_the_test_one():
    xt, yt = _clusters(20, 1, D_IMG, 3.0)
    noisy = yt.copy()
    flipped = np.random.default_rng(5).random(len(yt)) < 0.3
    noisy[flipped] = (yt[flipped] + 1) % C  # label noise: one neighbour is often wrong, many rarely
    xv, _ = _clusters(10, 2, D_IMG, 3.0)
    xs, ys = _clusters(60, 3, D_IMG, 3.0)
    ks = (1, 3, 5, 9, 15)
    yv = flip.knn_classifier(xt, noisy, xv, np.zeros(len(xv), int), C, ks=[1]).predict(xv)  # what k=1 says
    knn = flip.knn_classifier(xt, noisy, xv, yv, C, ks=ks)
    test_acc = [topk_accuracy(flip.knn_classifier(xt, noisy, xv, yv, C, ks=[k]).predict_logits(xs), ys) for k in ks]
    assert knn.val_curve[0] == 1.0 and np.all(knn.val_curve[1:] < 1.0)
    assert knn.hparams["k"] == 1
    assert int(np.argmax(test_acc)) != 0 and max(test_acc) > test_acc[0] + 0.1  # test prefers a larger k


# --------------------------------------------------------------------------------------------------
# Nearest class mean
# --------------------------------------------------------------------------------------------------


def _numpy_centroid_logits(xt, yt, x, transform):
    center = xt.astype(np.float64).mean(0)

    def t(a):
        a = a.astype(np.float64)
        if transform == "cl2n":
            a = a - center
        return a if transform == "none" else a / np.linalg.norm(a, axis=1, keepdims=True)

    tt, tx = t(xt), t(x)
    out = np.full((len(x), C), -np.inf)
    for c in np.unique(yt):
        out[:, c] = -np.sum((tx - tt[yt == c].mean(0)) ** 2, axis=1)
    return out


@pytest.mark.parametrize("transform", flip.CENTROID_TRANSFORMS)
def test_centroid_logits_match_numpy(transform):
    rng = np.random.default_rng(1)
    xt, yt = (rng.normal(size=(40, D_IMG)) + 1.0).astype(np.float32), rng.integers(0, C - 1, 40)  # class 4 absent
    xv, yv = rng.normal(size=(10, D_IMG)).astype(np.float32), rng.integers(0, C, 10)
    head = flip.centroid_classifier(xt, yt, xv, yv, C, transforms=[transform])
    logits = head.predict_logits(xv)
    expected = _numpy_centroid_logits(xt, yt, xv, transform)
    assert np.all(np.isneginf(logits[:, 4])) and head.extras["missing_classes"] == [4]
    np.testing.assert_allclose(logits[:, :4], expected[:, :4], rtol=1e-5, atol=1e-5)
    assert head.val_accuracy == np.mean(expected.argmax(1) == yv)
    if transform == "none":
        np.testing.assert_array_equal(head.predict(xv), NearestCentroid().fit(xt, yt).predict(xv))


def test_centroid_picks_the_validation_transform():
    xt, yt = _clusters(10, 1, D_IMG, 0.6, offset=3.0)
    xv, _ = _clusters(10, 2, D_IMG, 0.6, offset=3.0)
    yv = flip.centroid_classifier(xt, yt, xv, np.zeros(len(xv), int), C, transforms="cl2n").predict(xv)
    head = flip.centroid_classifier(xt, yt, xv, yv, C)
    assert list(head.grid) == ["none", "l2n", "cl2n"]
    assert head.val_curve[2] == 1.0 and np.all(head.val_curve[:2] < 1.0)
    assert head.hparams["transform"] == "cl2n"


# --------------------------------------------------------------------------------------------------
# The hybrid head: the forward pass, BatchNorm and the training loop against numpy
# --------------------------------------------------------------------------------------------------


def _random_params(rng, d, hidden):
    return {"w1": rng.normal(size=(d, hidden)) / np.sqrt(d), "b1": rng.normal(size=hidden) * 0.1,
            "gamma": 1 + 0.2 * rng.normal(size=hidden), "beta": 0.1 * rng.normal(size=hidden),
            "w2": rng.normal(size=(hidden, C)) / np.sqrt(hidden), "b2": rng.normal(size=C) * 0.1,
            "mean": np.abs(rng.normal(size=hidden)), "var": 0.5 + rng.random(hidden)}


def _numpy_eval(p, z, eps=1e-5):
    h = np.maximum(z @ p["w1"] + p["b1"], 0)
    return ((h - p["mean"]) / np.sqrt(p["var"] + eps) * p["gamma"] + p["beta"]) @ p["w2"] + p["b2"]


def test_hybrid_eval_forward_matches_numpy():
    rng = np.random.default_rng(2)
    params = _random_params(rng, D_IMG + D_CAP, 16)
    head = flip.HybridHead(method="hybrid", params={k: v.astype(np.float32) for k, v in params.items()},
                           image_dim=D_IMG, caption_dim=D_CAP, hparams={"bn_eps": 1e-5}, val_accuracy=0.0,
                           grid=np.arange(1, 2), val_curve=np.zeros(1))
    x, cx = rng.normal(size=(7, D_IMG)), rng.normal(size=(7, D_CAP))
    logits = head.predict_logits(x, cx)
    f32 = {k: v.astype(np.float32).astype(np.float64) for k, v in params.items()}
    z = np.concatenate([x, cx], 1).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(logits, _numpy_eval(f32, z), atol=1e-5, rtol=1e-5)
    assert logits.dtype == np.float32


def _numpy_bn_train(p, z, momentum=0.1, eps=1e-5):
    """PyTorch's BatchNorm1d in training mode: biased variance to normalize, unbiased for the running one."""
    h = np.maximum(z @ p["w1"] + p["b1"], 0)
    mean, var = h.mean(0), h.var(0)
    y = (h - mean) / np.sqrt(var + eps) * p["gamma"] + p["beta"]
    m = len(z)
    return (y @ p["w2"] + p["b2"], (1 - momentum) * p["mean"] + momentum * mean,
            (1 - momentum) * p["var"] + momentum * var * m / (m - 1))


def test_hybrid_batchnorm_training_mode_matches_numpy():
    rng = np.random.default_rng(3)
    params = {k: v.astype(np.float32) for k, v in _random_params(rng, D_IMG + D_CAP, 16).items()}
    z = rng.normal(size=(16, D_IMG + D_CAP)).astype(np.float32)
    mask = np.arange(16) < 11  # a partial batch: 11 real rows, 5 of padding that must not count
    z[11:] = 100.0
    model = flip._hybrid_model(params, bn_momentum=0.1, bn_eps=1e-5)
    logits = model(jnp.asarray(z), use_running_average=False, mask=jnp.asarray(mask))  # training mode
    logits, mean, var = jax.device_get((logits, model.norm.mean[...], model.norm.var[...]))
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    ref_logits, ref_mean, ref_var = _numpy_bn_train(p64, z[:11].astype(np.float64))
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits[:11], ref_logits, rtol=1e-4, atol=1e-5)


def test_batchnorm1d_matches_pytorch():
    """Running statistics over several training steps (unbiased variance, momentum 0.1) and eval mode,
    against torch.nn.BatchNorm1d; nnx.BatchNorm (biased running variance) would not match."""
    torch = pytest.importorskip("torch")
    from flax import nnx

    rng = np.random.default_rng(4)
    batches = [rng.normal(loc=1.0, scale=2.0, size=(m, 6)).astype(np.float32) for m in (8, 5, 3)]
    ours = flip.BatchNorm1d(6, momentum=0.1, eps=1e-5)
    ref = torch.nn.BatchNorm1d(6, momentum=0.1, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 1.5, 6))
        ref.bias.copy_(torch.linspace(-0.2, 0.3, 6))
    ours.scale[...] = jnp.linspace(0.5, 1.5, 6)
    ours.bias[...] = jnp.linspace(-0.2, 0.3, 6)
    ref.train()
    for b in batches:
        out = ours(jnp.asarray(b))
        with torch.no_grad():
            expected = ref(torch.from_numpy(b)).numpy()
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.mean[...]), ref.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.var[...]), ref.running_var.numpy(), rtol=1e-6, atol=1e-6)
    ref.eval()
    x = rng.normal(size=(4, 6)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x), use_running_average=True)), expected, rtol=1e-5,
                               atol=1e-5)
    # nnx.BatchNorm with PyTorch's momentum keeps the biased variance: a different running variance
    nnx_bn = nnx.BatchNorm(6, momentum=0.9, use_fast_variance=False, rngs=nnx.Rngs(0))
    for b in batches:
        nnx_bn(jnp.asarray(b))
    assert not np.allclose(np.asarray(nnx_bn.var[...]), ref.running_var.numpy(), rtol=1e-4)


def _numpy_sgd_step(p, z, y, lr, momentum=0.1, eps=1e-5):
    """One SGD step of mean cross-entropy through Linear-ReLU-BatchNorm(train)-Linear, by hand."""
    m = len(z)
    a = z @ p["w1"] + p["b1"]
    h = np.maximum(a, 0)
    mean, var = h.mean(0), h.var(0)
    inv = 1 / np.sqrt(var + eps)
    xhat = (h - mean) * inv
    out = xhat * p["gamma"] + p["beta"]
    logits = out @ p["w2"] + p["b2"]
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    loss = -np.mean(np.log(prob[np.arange(m), y]))
    g = prob.copy()
    g[np.arange(m), y] -= 1
    g /= m
    grads = {"w2": out.T @ g, "b2": g.sum(0)}
    dout = g @ p["w2"].T
    grads["gamma"], grads["beta"] = (dout * xhat).sum(0), dout.sum(0)
    dxhat = dout * p["gamma"]
    dh = inv / m * (m * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0))
    da = dh * (a > 0)
    grads["w1"], grads["b1"] = z.T @ da, da.sum(0)
    new = {k: p[k] - lr * grads[k] for k in grads}
    new["mean"] = (1 - momentum) * p["mean"] + momentum * mean
    new["var"] = (1 - momentum) * p["var"] + momentum * var * m / (m - 1)
    return new, loss


def test_hybrid_training_loop_matches_numpy():
    x, cx, y = _hybrid_split(6, 1, separation=0.7)  # 30 examples
    xv, cxv, yv = _hybrid_split(4, 2, separation=0.7)
    x, cx, y = x[:-1], cx[:-1], y[:-1]  # 29 = 2 batches of 14 and one of a single example, which is skipped
    epochs, batch_size, lr, hidden, seed = 4, 14, 0.05, 16, 3
    head = flip.hybrid_head(x, cx, y, xv, cxv, yv, C, hidden=hidden, lr=lr, epochs=epochs, batch_size=batch_size,
                            seed=seed)
    init_key, shuffle_key = flip._hybrid_keys(seed)
    p = {k: np.asarray(v, np.float64)
         for k, v in flip._hybrid_params(flip._hybrid_init(init_key, D_IMG + D_CAP, hidden, C)).items()}
    z, zv = np.concatenate([x, cx], 1).astype(np.float64), np.concatenate([xv, cxv], 1).astype(np.float64)
    curve, losses = [], []
    for e in range(epochs):
        order = np.asarray(probes._epoch_order(shuffle_key, e, len(y)))
        batch_losses = []
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue
            p, loss = _numpy_sgd_step(p, z[idx], y[idx], lr)
            batch_losses.append(loss)
        losses.append(np.mean(batch_losses))
        curve.append(np.mean(_numpy_eval(p, zv).argmax(1) == yv))
    np.testing.assert_allclose(head.extras["train_loss"], losses, rtol=1e-4)
    np.testing.assert_allclose(head.val_curve, curve)
    for k, v in head.extras["final_params"].items():
        np.testing.assert_allclose(v, p[k], atol=1e-4, rtol=1e-4, err_msg=k)
    assert head.hparams["epoch"] == int(np.argmax(curve)) + 1  # the first best epoch


def test_hybrid_picks_the_validation_epoch_not_the_test_one():
    x, cx, y = _hybrid_split(8, 1, separation=0.8)
    xv, cxv, _ = _hybrid_split(8, 2, separation=0.8)
    xs, cxs, ys = _hybrid_split(60, 3, separation=0.8)
    opts = dict(hidden=32, epochs=25, seed=0)
    first = flip.hybrid_head(x, cx, y, xv, cxv, np.zeros(len(xv), int), C, **{**opts, "epochs": 1})
    yv = first.predict(xv, cxv)  # validation labels that the epoch-1 network gets exactly right
    head = flip.hybrid_head(x, cx, y, xv, cxv, yv, C, **opts)
    assert head.val_curve[0] == 1.0 and np.all(head.val_curve[1:] < 1.0)
    assert head.hparams["epoch"] == 1
    for k, v in head.params.items():
        np.testing.assert_array_equal(v, first.params[k], err_msg=k)
    final = flip.HybridHead(**{**head.__dict__, "params": head.extras["final_params"]})
    assert topk_accuracy(head.predict_logits(xs, cxs), ys) < topk_accuracy(final.predict_logits(xs, cxs), ys) - 0.1


# --------------------------------------------------------------------------------------------------
# Separable data, results
# --------------------------------------------------------------------------------------------------


def test_heads_are_accurate_on_separable_data(separable):
    (xt, yt), (xv, yv), (xs, ys) = separable
    heads = [(flip.knn_classifier(xt, yt, xv, yv, C), "k"),
             (flip.knn_classifier(xt, yt, xv, yv, C, weights="similarity"), "k"),
             (flip.centroid_classifier(xt, yt, xv, yv, C), "transform")]
    for head, key in heads:
        assert topk_accuracy(head.predict_logits(xs), ys) >= 0.95, head.summary()
        assert head.val_accuracy == pytest.approx(topk_accuracy(head.predict_logits(xv), yv))
        assert np.sum(head.val_curve == head.val_curve.max()) > 1  # tied candidates: the first one wins
        assert head.hparams[key] == head.grid[int(np.argmax(head.val_curve))]
        json.dumps(head.summary())
    tr, va, te = _hybrid_split(10, 1), _hybrid_split(10, 2), _hybrid_split(60, 3)
    hybrid = flip.hybrid_head(*tr, *va, C, hidden=32, epochs=25)
    assert topk_accuracy(hybrid.predict_logits(te[0], te[1]), te[2]) >= 0.95
    assert hybrid.val_accuracy == pytest.approx(topk_accuracy(hybrid.predict_logits(va[0], va[1]), va[2]))
    assert np.sum(hybrid.val_curve == hybrid.val_curve.max()) > 1  # tied epochs: the earliest one wins
    assert hybrid.hparams["epoch"] == int(np.argmax(hybrid.val_curve)) + 1
    summary = hybrid.summary()
    assert summary["method"] == "hybrid" and summary["epoch"] == hybrid.hparams["epoch"]
    json.dumps(summary)
    np.testing.assert_array_equal(flip.hybrid_features(te[0], te[1]), np.concatenate(te[:2], 1))


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def test_bad_inputs_raise(separable):
    (xt, yt), (xv, yv), _ = separable
    cases = [
        (lambda: flip.knn_classifier(xt, yt[:-1], xv, yv, C), "labels but its features"),
        (lambda: flip.knn_classifier(xt, yt, xv[:, :3], yv, C), "dimension"),
        (lambda: flip.knn_classifier(np.where(xt > 0, np.nan, xt), yt, xv, yv, C), "NaN"),
        (lambda: flip.knn_classifier(xt, yt, xv, yv, C, ks=[0, 3]), "positive integers"),
        (lambda: flip.knn_classifier(xt, yt, xv, yv, C, ks=[]), "empty"),
        (lambda: flip.knn_classifier(xt, yt, xv, yv, C, ks=[500]), "exceeds"),
        (lambda: flip.knn_classifier(xt, yt, xv, yv, C, weights="distance"), "weights"),
        (lambda: flip.knn_classifier(xt, yt, xv, yv, C, weights="similarity", temperature=0.0), "temperature"),
        (lambda: flip.knn_classifier(np.vstack([xt[:-1], 0 * xt[:1]]), yt, xv, yv, C), "all-zero"),
        (lambda: flip.knn_classifier(xt, yt, xv, yv + C, C), "must lie in"),
        (lambda: flip.knn_classifier(xt, yt, xv[:0], yv[:0], C), "val_x is empty"),
        (lambda: flip.knn_classifier(xt, yt, xv, yv, C).predict_logits(xv[:, :3]), "must be"),
        (lambda: flip.centroid_classifier(xt, yt, xv, yv, C, transforms=["whiten"]), "transforms"),
        (lambda: flip.centroid_classifier(xt, yt, xv, yv, C, transforms=[]), "empty"),
        (lambda: flip.centroid_classifier(xt, yt, xv, yv, 1), "num_classes"),
    ]
    cx, cxv = xt[:, :D_CAP], xv[:, :D_CAP]
    cases += [
        (lambda: flip.hybrid_head(xt, cx[:-1], yt, xv, cxv, yv, C), "one caption embedding per image"),
        (lambda: flip.hybrid_head(xt, cx, yt, xv, cxv[:, :3], yv, C), "val_caption_x must be"),
        (lambda: flip.hybrid_head(xt, cx, yt, xv[:, :3], cxv, yv, C), "val_x must be"),
        (lambda: flip.hybrid_head(xt, cx, yt, xv, cxv, yv, C, batch_size=1), "batch_size"),
        (lambda: flip.hybrid_head(xt[:1], cx[:1], yt[:1], xv, cxv, yv, C), "at least 2"),
        (lambda: flip.hybrid_head(xt, cx, yt, xv, cxv, yv, C, lr=-1.0), "lr"),
        (lambda: flip.hybrid_head(xt, cx, yt, xv, cxv, yv, C, bn_momentum=2.0), "bn_momentum"),
        (lambda: flip.hybrid_head(xt, cx, yt, xv, cxv, yv, C, epochs=0), "epochs"),
        (lambda: flip.hybrid_features(xt, cx[:3]), "rows"),
        (lambda: flip.hybrid_features(xt[0], cx), "2-d"),
    ]
    for fit, message in cases:
        with pytest.raises(ValueError, match=message):
            fit()
