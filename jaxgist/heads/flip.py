"""FLIP's heads on frozen CLIP embeddings: cosine k-NN, nearest class mean, and the image + caption
hybrid MLP (FLIP, "Fine-Grained Object Classification using CLIP", github.com/rohit901/flip).

    knn = flip.knn_classifier(train_x, train_y, val_x, val_y, num_classes)        # KnnClassifier, k on val
    cen = flip.centroid_classifier(train_x, train_y, val_x, val_y, num_classes)   # transform on val
    hyb = flip.hybrid_head(train_x, train_caption_x, train_y, val_x, val_caption_x, val_y, num_classes)
    logits = knn.predict_logits(test_x)          # [n, C] float32; hyb.predict_logits(test_x, test_caption_x)
    z = flip.hybrid_features(x, caption_x)       # [image, caption], e.g. for probes.lbfgs_probe

Numpy in, numpy out; JAX inside. Every hyperparameter (k, transform, epoch) is chosen on validation, ties
to the first candidate of the grid (FLIP chose k and the epoch on test). Captions of val/test images must
not come from caption matching, which reads the label. FLIP's notebooks, where we differ, and its
caption-only fine-tuning (``jaxgist.methods.flip``, ``configs/flip.py``): docs/methods/flip.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgist.core.arrays import HIGHEST, l2_normalize, matmul
from jaxgist.heads import probes
from jaxgist.heads.base import FittedHead
from jaxgist.models import layers

__all__ = [
    "KnnClassifier", "CentroidClassifier", "HybridHead", "HybridMLP", "BatchNorm1d", "knn_classifier",
    "centroid_classifier", "hybrid_head",
    "hybrid_features",
    "DEFAULT_KNN_KS", "KNN_WEIGHTS", "CENTROID_TRANSFORMS",
]

# k grid of knn_classifier: 1..20 (FLIP scanned 3..20 on test; scikit-learn's default is 5).
DEFAULT_KNN_KS = tuple(range(1, 21))
KNN_WEIGHTS = ("uniform", "similarity")
CENTROID_TRANSFORMS = ("none", "l2n", "cl2n")

# Elements of one block of query-by-train similarities (bounds k-NN's memory).
_KNN_BLOCK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------------
# Results.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KnnClassifier(FittedHead):
    """Cosine k-NN over the (L2-normalized) training embeddings ``train_x``, with the chosen k.

    ``predict_logits(x)``: per class, the number of the k nearest training examples in that class
    (``weights="uniform"``: exact integer counts, so ties between classes go to the lower class index,
    scikit-learn's rule), or the sum of their weights exp((cos - 1) / temperature)
    (``weights="similarity"``). Classes with no neighbour get 0. ``grid`` holds the k values tried,
    ``val_curve`` the validation accuracy of each.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    num_classes: int

    def predict_logits(self, x) -> np.ndarray:
        """[n, C] float32 votes of image embeddings ``x`` [n, d]."""
        x = _unit_rows(_query(x, self.train_x.shape[1], "x"), "x")
        k = int(self.hparams["k"])
        logits = _knn_logits(jnp.asarray(self.train_x), jnp.asarray(self.train_y), jnp.asarray(x),
                             jnp.asarray([k], jnp.int32), jnp.float32(self.hparams.get("temperature", 1.0)),
                             kmax=k, num_classes=self.num_classes, weights=self.hparams["weights"],
                             block=_knn_block(len(self.train_y), k, self.num_classes))
        return np.asarray(jax.device_get(logits))[:, 0, :]


@dataclasses.dataclass(frozen=True)
class CentroidClassifier(FittedHead):
    """Nearest class mean: ``logits = -||t(x) - centroid_c||^2`` with the chosen feature transform t.

    Transforms (SimpleShot's): ``"none"``; ``"l2n"``: x / ||x||; ``"cl2n"``: (x - m) / ||x - m||, m the
    mean training embedding. ``centroids`` [C, d] are the means of the transformed training embeddings
    of each class; a class without training examples has no centroid and gets logit -inf.
    """

    centroids: np.ndarray
    present: np.ndarray
    center: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.present)  # one flag per class, with or without training examples

    def predict_logits(self, x) -> np.ndarray:
        """[n, C] float32 negative squared distances of embeddings ``x`` [n, d] to the centroids."""
        x = _query(x, self.centroids.shape[1], "x")
        _check_transformable(x, self.center, self.hparams["transform"], "x")
        logits = _centroid_logits(jnp.asarray(x), jnp.asarray(self.centroids), jnp.asarray(self.present),
                                  jnp.asarray(self.center), transform=self.hparams["transform"])
        return np.asarray(jax.device_get(logits))


@dataclasses.dataclass(frozen=True)
class HybridHead(FittedHead):
    """FLIP's hybrid head: [x, caption_x] -> Linear -> ReLU -> BatchNorm -> Linear, in eval mode.

    ``params``: ``w1`` [d_image + d_caption, hidden], ``b1``, ``gamma``, ``beta`` (BatchNorm's affine
    parameters), ``w2`` [hidden, C], ``b2`` and BatchNorm's running statistics ``mean`` and ``var``,
    all of the chosen (best validation) epoch: the variables of the ``HybridMLP`` (``_HYBRID_VARIABLES``),
    as numpy arrays under FLIP's layer names. ``grid`` is epochs 1..E, ``val_curve`` the validation
    accuracy after each; ``extras``: ``train_loss`` (mean minibatch loss per epoch) and ``final_params``
    (those of the last epoch).
    """

    params: dict[str, np.ndarray]
    image_dim: int
    caption_dim: int

    @property
    def num_classes(self) -> int:
        return int(self.params["w2"].shape[1])

    def predict_logits(self, x, caption_x) -> np.ndarray:
        """[n, C] float32 logits of image embeddings ``x`` [n, d_image] and the embeddings of the same
        images' captions ``caption_x`` [n, d_caption] (BatchNorm in eval mode: running statistics)."""
        z = _hybrid_inputs(x, caption_x, "", self.image_dim, self.caption_dim)
        model = _hybrid_model(self.params, self.hparams.get("bn_momentum", 0.1), self.hparams["bn_eps"])
        return np.asarray(jax.device_get(_hybrid_eval_logits(model, jnp.asarray(z))))


# ---------------------------------------------------------------------------------------------------
# Input checks (the shared ones live in probes).
# ---------------------------------------------------------------------------------------------------


def _query(x, dim: int, name: str) -> np.ndarray:
    x = probes._features(x, name)
    if x.shape[1] != dim:
        raise ValueError(f"{name} must be [n, {dim}], got shape {x.shape}")
    return x


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    """Rows scaled to unit L2 norm; a zero row has no direction and is an error."""
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise ValueError(f"{name} has {zero.size} all-zero row(s) (e.g. row {zero[0]}): cosine similarity is "
                         f"undefined for them")
    return l2_normalize(x.astype(np.float64)).astype(np.float32)


def _int_grid(values, name: str) -> tuple[int, ...]:
    values = list(np.asarray(values).reshape(-1)) if not isinstance(values, (list, tuple)) else list(values)
    if not values:
        raise ValueError(f"{name} is empty: give at least one value")
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must hold positive integers, got {values!r}")
        out.append(int(v))
    return tuple(sorted(set(out)))


def _hybrid_inputs(x, caption_x, prefix: str, image_dim: int | None = None,
                   caption_dim: int | None = None) -> np.ndarray:
    x = probes._features(x, f"{prefix}x")
    caption_x = probes._features(caption_x, f"{prefix}caption_x")
    if x.shape[0] != caption_x.shape[0]:
        raise ValueError(f"{prefix}x has {x.shape[0]} rows but {prefix}caption_x has {caption_x.shape[0]}: one "
                         f"caption embedding per image is needed")
    if image_dim is not None and x.shape[1] != image_dim:
        raise ValueError(f"{prefix}x must be [n, {image_dim}] (the training image embeddings' size), got shape "
                         f"{x.shape}")
    if caption_dim is not None and caption_x.shape[1] != caption_dim:
        raise ValueError(f"{prefix}caption_x must be [n, {caption_dim}] (the training caption embeddings' size), "
                         f"got shape {caption_x.shape}")
    return np.concatenate([x, caption_x], axis=1)


def hybrid_features(x, caption_x) -> np.ndarray:
    """[n, d_image + d_caption] float32: image embeddings and their captions' embeddings side by side
    (FLIP's ``torch.cat((image, text), dim=1)``). Row i of ``caption_x`` must embed image i's caption."""
    return _hybrid_inputs(x, caption_x, "")


def _first_best(counts: np.ndarray) -> int:
    """Index of the first maximum (ties go to the earlier candidate)."""
    return int(np.argmax(counts))


# ---------------------------------------------------------------------------------------------------
# k-NN.
# ---------------------------------------------------------------------------------------------------


def _knn_block(n_train: int, kmax: int, num_classes: int) -> int:
    """Queries per block: the [block, n_train] similarities and [block, kmax, C] votes stay bounded."""
    return int(max(1, min(1024, _KNN_BLOCK_ELEMENTS // max(n_train, kmax * num_classes, 1))))


def _knn_votes(train_n, train_y, q, ks, temperature, *, kmax, num_classes, weights):
    """[len(ks), C]: the votes of the k nearest (cosine) training examples of one query, for every k in ``ks``.

    Neighbours are ranked by similarity, equal similarities by training index (``lax.top_k``'s rule);
    the votes of the first k are the k-th row of the cumulative sum of the weighted one-hot labels, so
    one top-kmax search serves the whole grid.
    """
    top, idx = jax.lax.top_k(matmul(train_n, q), kmax)
    if weights == "uniform":
        w = jnp.ones_like(top)
    else:  # exp(cos / T), divided by the constant exp(1 / T) so that a small T cannot overflow
        w = jnp.exp((top - 1.0) / temperature)
    votes = jnp.cumsum(jax.nn.one_hot(train_y[idx], num_classes, dtype=jnp.float32) * w[:, None], axis=0)
    return votes[ks - 1]


@functools.partial(jax.jit, static_argnames=("kmax", "num_classes", "weights", "block"))
def _knn_logits(train_n, train_y, queries_n, ks, temperature, *, kmax, num_classes, weights, block):
    """[nq, len(ks), C] votes, the queries taken ``block`` at a time."""
    votes = functools.partial(_knn_votes, train_n, train_y, ks=ks, temperature=temperature, kmax=kmax,
                              num_classes=num_classes, weights=weights)
    return jax.lax.map(votes, queries_n, batch_size=block)


@functools.partial(jax.jit, static_argnames=("kmax", "num_classes", "weights", "block"))
def _knn_val_counts(train_n, train_y, val_n, val_y, ks, temperature, *, kmax, num_classes, weights, block):
    """[len(ks)] int: correct validation predictions (argmax of the votes) for each k."""

    def correct(args):
        q, y = args
        votes = _knn_votes(train_n, train_y, q, ks, temperature, kmax=kmax, num_classes=num_classes, weights=weights)
        return jnp.argmax(votes, axis=-1) == y

    return jnp.sum(jax.lax.map(correct, (val_n, val_y), batch_size=block), axis=0)


def knn_classifier(train_x, train_y, val_x, val_y, num_classes: int, *, ks: Sequence[int] = DEFAULT_KNN_KS,
                   weights: str = "uniform", temperature: float = 0.07) -> KnnClassifier:
    """k nearest neighbours by cosine similarity of the embeddings, k chosen on validation.

    Embeddings are L2-normalized (an all-zero row is an error). ``weights="uniform"``: majority vote,
    the logits are the neighbour counts per class and ties between classes go to the lower class index
    (scikit-learn's ``KNeighborsClassifier`` rule, and ``argmax``'s); ``"similarity"``: each neighbour
    votes exp(cos / ``temperature``) (the weighted k-NN of Wu et al. 2018 / DINO, T = 0.07), stored
    divided by exp(1 / T). ``ks`` (sorted, deduplicated; values above the number of training examples
    are dropped) are all scored from one top-k search; the most accurate on validation wins, ties going
    to the smaller k. ``extras["dropped_ks"]`` lists the k values dropped.
    """
    train_x, train_y, val_x, val_y, num_classes = probes._check_inputs(train_x, train_y, val_x, val_y, num_classes)
    if weights not in KNN_WEIGHTS:
        raise ValueError(f"weights must be one of {KNN_WEIGHTS}, got {weights!r}")
    if weights == "similarity" and not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    grid = _int_grid(ks, "ks")
    n = len(train_y)
    kept, dropped = tuple(k for k in grid if k <= n), [k for k in grid if k > n]
    if not kept:
        raise ValueError(f"every k in ks={list(grid)} exceeds the {n} training examples")
    train_n, val_n = _unit_rows(train_x, "train_x"), _unit_rows(val_x, "val_x")
    kmax = max(kept)
    counts = np.asarray(jax.device_get(_knn_val_counts(
        jnp.asarray(train_n), jnp.asarray(train_y), jnp.asarray(val_n), jnp.asarray(val_y),
        jnp.asarray(kept, jnp.int32), jnp.float32(temperature), kmax=kmax, num_classes=num_classes,
        weights=weights, block=_knn_block(n, kmax, num_classes))))
    best = _first_best(counts)
    hparams: dict[str, Any] = {"k": kept[best], "weights": weights}
    if weights == "similarity":
        hparams["temperature"] = float(temperature)
    curve = counts.astype(np.float64) / len(val_y)
    return KnnClassifier(method="knn", train_x=train_n, train_y=train_y, num_classes=num_classes, hparams=hparams,
                         val_accuracy=float(curve[best]), grid=np.asarray(kept), val_curve=curve,
                         extras={"dropped_ks": dropped})


# ---------------------------------------------------------------------------------------------------
# Nearest class mean.
# ---------------------------------------------------------------------------------------------------


def _transform(x, center, transform: str):
    if transform == "none":
        return x
    if transform == "cl2n":
        x = x - center
    return l2_normalize(x)


def _check_transformable(x: np.ndarray, center: np.ndarray, transform: str, name: str) -> None:
    """A row that is zero (``"l2n"``) or the training mean (``"cl2n"``) cannot be normalized."""
    if transform != "none":
        _unit_rows(x - center if transform == "cl2n" else x, name if transform == "l2n" else f"{name} - mean")


@functools.partial(jax.jit, static_argnames=("num_classes", "transform"))
def _centroids(x, y, *, num_classes, transform):
    center = jnp.mean(x, axis=0)
    t = _transform(x, center, transform)
    onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
    counts = jnp.sum(onehot, axis=0)
    sums = matmul(onehot.T, t)
    return sums / jnp.maximum(counts, 1.0)[:, None], counts > 0, center


@functools.partial(jax.jit, static_argnames=("transform",))
def _centroid_logits(x, centroids, present, center, *, transform):
    t = _transform(x, center, transform)
    # ||t - c||^2 directly (not expanded): exact and never negative
    d2 = jnp.sum(jnp.square(t[:, None, :] - centroids[None, :, :]), axis=-1)
    return jnp.where(present[None, :], -d2, -jnp.inf)


def centroid_classifier(train_x, train_y, val_x, val_y, num_classes: int, *,
                        transforms: Sequence[str] = CENTROID_TRANSFORMS) -> CentroidClassifier:
    """Nearest class mean (scikit-learn's ``NearestCentroid`` on transformed features), the transform
    chosen on validation among ``transforms`` (``"none"``, ``"l2n"``, ``"cl2n"``: see
    ``CentroidClassifier``; ties go to the earlier transform of the tuple). Logits are negative squared
    Euclidean distances to the class centroids; classes without training examples get -inf
    (``extras["missing_classes"]``).
    """
    train_x, train_y, val_x, val_y, num_classes = probes._check_inputs(train_x, train_y, val_x, val_y, num_classes)
    if isinstance(transforms, str):
        transforms = (transforms,)
    transforms = tuple(transforms)
    if not transforms:
        raise ValueError("transforms is empty: give at least one of " + ", ".join(CENTROID_TRANSFORMS))
    bad = [t for t in transforms if t not in CENTROID_TRANSFORMS]
    if bad or len(set(transforms)) != len(transforms):
        raise ValueError(f"transforms must be distinct values of {CENTROID_TRANSFORMS}, got {transforms!r}")
    center = train_x.mean(axis=0)
    for t in transforms:
        _check_transformable(train_x, center, t, "train_x")
        _check_transformable(val_x, center, t, "val_x")
    fits, counts = [], []
    for t in transforms:
        centroids, present, c = _centroids(jnp.asarray(train_x), jnp.asarray(train_y), num_classes=num_classes,
                                           transform=t)
        logits = _centroid_logits(jnp.asarray(val_x), centroids, present, c, transform=t)
        fits.append(jax.device_get((centroids, present, c)))
        counts.append(int(jnp.sum(jnp.argmax(logits, axis=1) == jnp.asarray(val_y))))
    counts = np.asarray(counts)
    best = _first_best(counts)
    centroids, present, c = fits[best]
    curve = counts.astype(np.float64) / len(val_y)
    return CentroidClassifier(
        method="centroid", centroids=np.asarray(centroids), present=np.asarray(present), center=np.asarray(c),
        hparams={"transform": transforms[best]}, val_accuracy=float(curve[best]), grid=np.asarray(transforms),
        val_curve=curve, extras={"missing_classes": np.flatnonzero(~np.asarray(present)).tolist()})


# ---------------------------------------------------------------------------------------------------
# The hybrid head: an NNX network, trained by a jitted SGD loop.
# ---------------------------------------------------------------------------------------------------


# PyTorch's BatchNorm1d (unbiased running variance, row mask), shared with the CNN towers
BatchNorm1d = layers.BatchNorm


def _torch_linear_init(fan_in: int):
    """PyTorch's ``nn.Linear`` initialization of weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


class HybridMLP(nnx.Module):
    """FLIP's hybrid network: Linear(d, hidden) -> ReLU -> BatchNorm1d(hidden) -> Linear(hidden, C),
    initialized as PyTorch initializes these layers, matmuls in full float32. ``mask`` [B] (training
    mode): the rows that count in BatchNorm's batch statistics."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, *, bn_momentum: float = 0.1,
                 bn_eps: float = 1e-5, rngs: nnx.Rngs):
        def linear(fan_in, fan_out):
            init = _torch_linear_init(fan_in)
            return nnx.Linear(fan_in, fan_out, kernel_init=init, bias_init=init, precision=HIGHEST, rngs=rngs)

        self.hidden = linear(in_features, hidden)
        self.norm = BatchNorm1d(hidden, momentum=bn_momentum, eps=bn_eps)
        self.out = linear(hidden, num_classes)

    def __call__(self, z, use_running_average: bool | None = None, mask=None):
        return self.out(self.norm(jax.nn.relu(self.hidden(z)), use_running_average, mask))


# ``HybridHead.params`` names (FLIP's layers) -> the HybridMLP variable that holds each.
_HYBRID_VARIABLES = {"w1": ("hidden", "kernel"), "b1": ("hidden", "bias"), "gamma": ("norm", "scale"),
                     "beta": ("norm", "bias"), "w2": ("out", "kernel"), "b2": ("out", "bias"),
                     "mean": ("norm", "mean"), "var": ("norm", "var")}


def _hybrid_keys(seed):
    """(initialization key, shuffling key) of ``hybrid_head(seed=seed)``."""
    return tuple(jax.random.split(jax.random.key(seed)))


def _hybrid_init(init_key, d: int, hidden: int, num_classes: int, bn_momentum: float = 0.1,
                 bn_eps: float = 1e-5) -> HybridMLP:
    """The network ``hybrid_head`` starts from (PyTorch's initialization, drawn from ``init_key``)."""
    return HybridMLP(d, hidden, num_classes, bn_momentum=bn_momentum, bn_eps=bn_eps, rngs=nnx.Rngs(params=init_key))


def _hybrid_params(state) -> dict[str, np.ndarray]:
    """The flat ``HybridHead.params`` dict (numpy) of a ``HybridMLP`` or of its ``nnx.State``."""
    pure = nnx.to_pure_dict(state if isinstance(state, nnx.State) else nnx.state(state))
    return {k: np.asarray(pure[layer][name]) for k, (layer, name) in _HYBRID_VARIABLES.items()}


def _hybrid_model(params: dict[str, Any], bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> HybridMLP:
    """A ``HybridMLP`` holding the flat ``params`` (``HybridHead.params``)."""
    (d, hidden), num_classes = np.shape(params["w1"]), np.shape(params["w2"])[1]
    model = nnx.eval_shape(lambda: HybridMLP(d, hidden, num_classes, bn_momentum=bn_momentum, bn_eps=bn_eps,
                                             rngs=nnx.Rngs(0)))
    nested: dict[str, dict[str, jax.Array]] = {}
    for k, (layer, name) in _HYBRID_VARIABLES.items():
        nested.setdefault(layer, {})[name] = jnp.asarray(params[k], jnp.float32)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, nested)
    nnx.update(model, state)
    return model


@nnx.jit
def _hybrid_eval_logits(model: HybridMLP, z):
    return model(z, use_running_average=True)


@functools.partial(jax.jit, static_argnames=("hidden", "num_classes", "epochs", "batch_size", "bn_momentum",
                                             "bn_eps"))
def _hybrid_train(z, y, zv, yv, init_key, shuffle_key, lr, *, hidden, num_classes, epochs, batch_size, bn_momentum,
                  bn_eps):
    """Every epoch of SGD in one ``lax.scan``: (best state, final state, best epoch, val counts [E], mean
    train loss [E]); states are the ``nnx.State`` of the network (parameters and BatchNorm statistics)."""
    n, d = z.shape
    num_batches = -(-n // batch_size)
    padded = num_batches * batch_size
    valid = (jnp.arange(padded) < n).reshape(num_batches, batch_size)
    graphdef, params0, stats0 = nnx.split(_hybrid_init(init_key, d, hidden, num_classes, bn_momentum, bn_eps),
                                          nnx.Param, nnx.BatchStat)

    def batch_loss(params, stats, zb, yb, mask):
        net = nnx.merge(graphdef, params, stats, copy=True)  # fresh variables: this trace may update them
        logits = net(zb, use_running_average=False, mask=mask)  # updates net's running statistics
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1)[:, 0]
        return jnp.sum(nll * mask) / jnp.sum(mask), nnx.state(net, nnx.BatchStat)  # the mean over real rows

    grad_fn = jax.value_and_grad(batch_loss, has_aux=True)

    def sgd_step(carry, batch):
        params, stats = carry
        idx, mask = batch
        (loss, new_stats), grads = grad_fn(params, stats, z[idx], y[idx], mask)
        new_params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        # A batch of one example has no batch variance (PyTorch's BatchNorm1d refuses it in training
        # mode): it is skipped. Only the last, partial batch can be that small.
        used = jnp.sum(mask) >= 2
        carry = jax.tree.map(lambda new, old: jnp.where(used, new, old), (new_params, new_stats), carry)
        return carry, (jnp.where(used, loss, 0.0), used)

    def epoch(carry, e):
        state, best, best_count, best_epoch = carry
        order = jnp.pad(probes._epoch_order(shuffle_key, e, n), (0, padded - n)).reshape(num_batches, batch_size)
        state, (losses, used) = jax.lax.scan(sgd_step, state, (order, valid))
        count = probes._count_correct(nnx.merge(graphdef, *state)(zv, use_running_average=True), yv)
        better = count > best_count  # ties keep the earlier epoch
        best = jax.tree.map(lambda new, old: jnp.where(better, new, old), state, best)
        carry = (state, best, jnp.where(better, count, best_count), jnp.where(better, e + 1, best_epoch))
        return carry, (count, jnp.sum(losses) / jnp.sum(used))

    state0 = (params0, stats0)
    (final, best, _, best_epoch), (counts, losses) = jax.lax.scan(
        epoch, (state0, state0, jnp.int32(-1), jnp.int32(0)), jnp.arange(epochs, dtype=jnp.int32))
    return nnx.merge_state(*best), nnx.merge_state(*final), best_epoch, counts, losses


def hybrid_head(train_x, train_caption_x, train_y, val_x, val_caption_x, val_y, num_classes: int, *,
                hidden: int = 512, lr: float = 0.005, epochs: int = 30, batch_size: int = 16,
                bn_momentum: float = 0.1, bn_eps: float = 1e-5, seed: int = 0) -> HybridHead:
    """FLIP's hybrid head on image embeddings and their captions' embeddings, the epoch chosen on validation.

    The input is ``hybrid_features(x, caption_x)`` (raw embeddings, as FLIP); the network
    Linear(d, ``hidden``) -> ReLU -> BatchNorm1d(``hidden``, eps ``bn_eps``, momentum ``bn_momentum``)
    -> Linear(``hidden``, C), initialized as PyTorch does, trained with mean cross-entropy and plain SGD
    (``lr``; no momentum, no weight decay) on minibatches of ``batch_size`` shuffled every epoch (the
    last one partial, as a DataLoader without ``drop_last``; a last batch of a single example is
    skipped, since BatchNorm has no batch variance for it). The defaults are FLIP's. BatchNorm uses
    batch statistics while training and its running statistics when scoring: after every epoch the
    validation accuracy is measured in eval mode, and the parameters and running statistics of the most
    accurate epoch are kept (ties to the earlier epoch). All epochs run in one ``lax.scan`` on the device.
    """
    train_z = _hybrid_inputs(train_x, train_caption_x, "train_")
    image_dim = np.shape(train_x)[1]
    caption_dim = train_z.shape[1] - image_dim
    val_z = _hybrid_inputs(val_x, val_caption_x, "val_", image_dim, caption_dim)
    train_z, train_y, val_z, val_y, num_classes = probes._check_inputs(train_z, train_y, val_z, val_y, num_classes)
    hidden, epochs = probes._positive_int(hidden, "hidden"), probes._positive_int(epochs, "epochs")
    batch_size = probes._positive_int(batch_size, "batch_size")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (BatchNorm needs two examples per batch), got {batch_size}")
    if len(train_y) < 2:
        raise ValueError(f"the hybrid head needs at least 2 training examples (BatchNorm), got {len(train_y)}")
    if not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be finite and > 0, got {lr!r}")
    if not 0.0 <= bn_momentum <= 1.0:
        raise ValueError(f"bn_momentum must be in [0, 1], got {bn_momentum!r}")
    if not np.isfinite(bn_eps) or bn_eps <= 0:
        raise ValueError(f"bn_eps must be finite and > 0, got {bn_eps!r}")
    best, final, best_epoch, counts, losses = jax.device_get(_hybrid_train(
        train_z, train_y, val_z, val_y, *_hybrid_keys(seed), jnp.float32(lr), hidden=hidden, num_classes=num_classes,
        epochs=epochs, batch_size=batch_size, bn_momentum=float(bn_momentum), bn_eps=float(bn_eps)))
    curve = np.asarray(counts, dtype=np.float64) / len(val_y)
    best_epoch = int(best_epoch)
    return HybridHead(
        method="hybrid", params=_hybrid_params(best), image_dim=int(image_dim),
        caption_dim=int(caption_dim),
        hparams={"epoch": best_epoch, "lr": float(lr), "epochs": epochs, "batch_size": batch_size, "hidden": hidden,
                 "bn_momentum": float(bn_momentum), "bn_eps": float(bn_eps), "seed": seed},
        val_accuracy=float(curve[best_epoch - 1]), grid=np.arange(1, epochs + 1), val_curve=curve,
        extras={"train_loss": np.asarray(losses), "final_params": _hybrid_params(final)})
