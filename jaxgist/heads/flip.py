"""FLIP's heads on frozen CLIP embeddings (k-NN, nearest class mean, the image + caption hybrid MLP) and
the checks of FLIP's caption-only fine-tuning (``configs/flip.py``).

FLIP ("FLIP: Fine-Grained Object Classification using CLIP", Aljubran, Bharadwaj, Sanjeev; code in
github.com/rohit901/flip, notebooks only) on CUB-200-2011 with CLIP ViT-B/32:

- Caption-only fine-tuning (``CLIP_CUB_zeroshot_KNN.ipynb``): CLIP's contrastive loss on (image, caption)
  pairs, the caption being the first line of the image's human-written description file (Reed et al.'s
  CUB text, 10 sentences per image, which describe the bird without naming its class), Adam lr 5e-7,
  betas 0.9/0.98, eps 1e-6, weight decay 0.001 (PyTorch Adam: coupled L2), batch 32, 30 (and 100)
  epochs, fp16 weights on GPU.
  The pairs are ``glob(images/**/*.jpg)``: every CUB image, *test images included*. Ours trains on
  the train split only: ``validate_finetune`` / ``check_finetune_splits`` reject any other selection.
- k-NN (same notebook): scikit-learn ``KNeighborsClassifier`` on raw (unnormalized) image embeddings,
  Euclidean distance, uniform votes, k = 5 after every fine-tuning epoch and k = 3..20 at the end,
  each scored on the test split (k is chosen on test there). Ours: cosine similarity, k chosen on
  validation.
- Hybrid (``fully-supervised/Fully_supervised_{with,without}_finetuning_MLPs.ipynb``): the image
  embedding and the embedding of the image's own caption (first line of its description file, for
  train *and test* images alike) concatenated, [image, caption] (512 + 512), into
  Linear(1024, 512) -> ReLU -> BatchNorm1d(512) -> Linear(512, 200) (a Dropout is defined but never
  applied; the Image_Model/Text_Model towers are built but unused), PyTorch default initialization,
  mean cross-entropy, plain SGD lr 0.005 (no momentum, no weight decay), shuffled minibatches of 16,
  30 epochs, ``model.train()`` for the epoch and ``model.eval()`` (BatchNorm's running statistics)
  for scoring; every epoch is scored on the *test* split only and the reported 75.18% is the test
  accuracy printed after the 15th epoch, so the epoch is chosen on test. Ours: the same network and
  optimizer, the epoch chosen on validation, and the caption embedding of every split an input
  (``caption_x``), since FLIP's test images have captions of their own.
  The ``*_imgs_text`` notebooks also fit scikit-learn's LogisticRegression, KNN and SVMs to the same
  concatenation: logistic regression is ``probes.lbfgs_probe(hybrid_features(x, caption_x), ...)``,
  k-NN ``knn_classifier(hybrid_features(...), ...)``.

Where the caption of a test image comes from matters: it must describe the image without knowing its
label (a human or a captioning model, as FLIP's CUB descriptions). GIST's matched captions are chosen
among the descriptions of the image's *true class*, so using them for validation or test images would
leak the label: ``caption_x`` of those splits must not come from caption matching.

Heads (numpy in, numpy out; JAX inside; every hyperparameter chosen on the validation split only):

- ``knn_classifier``: cosine k-NN; returns a ``KnnClassifier``.
- ``centroid_classifier``: nearest class mean (SimpleShot's feature transforms); a ``CentroidClassifier``.
- ``hybrid_head``: FLIP's image + caption MLP; a ``HybridHead``.

Every result has ``predict_logits(...)`` (numpy [n, C] float32), ``predict``, ``hparams``,
``val_accuracy``, ``grid`` / ``val_curve`` (each candidate's validation accuracy) and ``summary()``
(a flat, JSON-ready dict). Accuracy is compared as integer counts; ties in validation accuracy go to
the first candidate of the grid (the smallest k, the first transform, the earliest epoch).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgist.heads import probes

__all__ = [
    "KnnClassifier", "CentroidClassifier", "HybridHead", "knn_classifier", "centroid_classifier", "hybrid_head",
    "hybrid_features",
    "DEFAULT_KNN_KS", "KNN_WEIGHTS", "CENTROID_TRANSFORMS",
]

# k grid of knn_classifier: 1..20 (FLIP scanned 3..20 on test; scikit-learn's default is 5).
DEFAULT_KNN_KS = tuple(range(1, 21))
KNN_WEIGHTS = ("uniform", "similarity")
CENTROID_TRANSFORMS = ("none", "l2n", "cl2n")

_HIGHEST = jax.lax.Precision.HIGHEST  # fp32 matmuls everywhere (no TF32 / bf16 passes on GPUs and TPUs)
# Elements of one block of query-by-train similarities (bounds k-NN's memory).
_KNN_BLOCK_ELEMENTS = 1 << 24


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


# ---------------------------------------------------------------------------------------------------
# Results.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KnnClassifier(probes.FittedHead):
    """Cosine k-NN over the (L2-normalized) training embeddings ``train_x``, with the chosen k.

    ``predict_logits(x)``: per class, the number of the k nearest training examples in that class
    (``weights="uniform"``: exact integer counts, so ties between classes go to the lower class index,
    scikit-learn's rule), or the sum of their weights exp((cos - 1) / temperature)
    (``weights="similarity"``). Classes with no neighbour get 0. ``grid`` holds the k values tried,
    ``val_curve`` the validation accuracy of each.
    """

    method: str
    train_x: np.ndarray
    train_y: np.ndarray
    num_classes: int
    hparams: dict[str, Any]
    val_accuracy: float
    grid: np.ndarray
    val_curve: np.ndarray
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

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
class CentroidClassifier(probes.FittedHead):
    """Nearest class mean: ``logits = -||t(x) - centroid_c||^2`` with the chosen feature transform t.

    Transforms (SimpleShot's): ``"none"``; ``"l2n"``: x / ||x||; ``"cl2n"``: (x - m) / ||x - m||, m the
    mean training embedding. ``centroids`` [C, d] are the means of the transformed training embeddings
    of each class; a class without training examples has no centroid and gets logit -inf.
    """

    method: str
    centroids: np.ndarray
    present: np.ndarray
    center: np.ndarray
    hparams: dict[str, Any]
    val_accuracy: float
    grid: np.ndarray
    val_curve: np.ndarray
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.centroids.shape[0])

    def predict_logits(self, x) -> np.ndarray:
        """[n, C] float32 negative squared distances of embeddings ``x`` [n, d] to the centroids."""
        x = _query(x, self.centroids.shape[1], "x")
        _check_transformable(x, self.center, self.hparams["transform"], "x")
        logits = _centroid_logits(jnp.asarray(x), jnp.asarray(self.centroids), jnp.asarray(self.present),
                                  jnp.asarray(self.center), transform=self.hparams["transform"])
        return np.asarray(jax.device_get(logits))


@dataclasses.dataclass(frozen=True)
class HybridHead(probes.FittedHead):
    """FLIP's hybrid head: [x, caption_x] -> Linear -> ReLU -> BatchNorm -> Linear, in eval mode.

    ``params``: ``w1`` [d_image + d_caption, hidden], ``b1``, ``gamma``, ``beta`` (BatchNorm's affine
    parameters), ``w2`` [hidden, C], ``b2`` and BatchNorm's running statistics ``mean`` and ``var``,
    all of the chosen (best validation) epoch. ``grid`` is epochs 1..E, ``val_curve`` the validation
    accuracy after each; ``extras``: ``train_loss`` (mean minibatch loss per epoch) and ``final_params``
    (those of the last epoch).
    """

    method: str
    params: dict[str, np.ndarray]
    image_dim: int
    caption_dim: int
    hparams: dict[str, Any]
    val_accuracy: float
    grid: np.ndarray
    val_curve: np.ndarray
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.params["w2"].shape[1])

    def predict_logits(self, x, caption_x) -> np.ndarray:
        """[n, C] float32 logits of image embeddings ``x`` [n, d_image] and the embeddings of the same
        images' captions ``caption_x`` [n, d_caption] (BatchNorm in eval mode: running statistics)."""
        z = _hybrid_inputs(x, caption_x, "", self.image_dim, self.caption_dim)
        return np.asarray(jax.device_get(_hybrid_eval_logits(
            jax.tree.map(jnp.asarray, self.params), jnp.asarray(z), jnp.float32(self.hparams["bn_eps"]))))


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
    return (x / norms).astype(np.float32)


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
    top, idx = jax.lax.top_k(_mm(train_n, q), kmax)
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
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


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
    sums = _mm(onehot.T, t)
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
# The hybrid head.
# ---------------------------------------------------------------------------------------------------


def _hybrid_keys(seed):
    """(initialization key, shuffling key) of ``hybrid_head(seed=seed)``."""
    return tuple(jax.random.split(jax.random.key(seed)))


def _hybrid_init(init_key, d: int, hidden: int, num_classes: int) -> dict[str, jax.Array]:
    """PyTorch's defaults: Linear weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); BatchNorm1d
    weight 1, bias 0, running mean 0, running variance 1."""
    k1, k2, k3, k4 = jax.random.split(init_key, 4)
    b_in, b_hid = 1.0 / np.sqrt(d), 1.0 / np.sqrt(hidden)
    uniform = functools.partial(jax.random.uniform, dtype=jnp.float32)
    return {
        "w1": uniform(k1, (d, hidden), minval=-b_in, maxval=b_in),
        "b1": uniform(k2, (hidden,), minval=-b_in, maxval=b_in),
        "gamma": jnp.ones((hidden,), jnp.float32),
        "beta": jnp.zeros((hidden,), jnp.float32),
        "w2": uniform(k3, (hidden, num_classes), minval=-b_hid, maxval=b_hid),
        "b2": uniform(k4, (num_classes,), minval=-b_hid, maxval=b_hid),
        "mean": jnp.zeros((hidden,), jnp.float32),
        "var": jnp.ones((hidden,), jnp.float32),
    }


_TRAINED = ("w1", "b1", "gamma", "beta", "w2", "b2")  # "mean" and "var" are statistics, not parameters


def _hybrid_train_forward(params, z, mask, bn_momentum, bn_eps):
    """Training mode on one batch (rows where ``mask`` is set): (logits, running mean, running var).

    BatchNorm1d in training mode: normalization by the batch mean and the biased batch variance;
    running statistics updated as (1 - momentum) * running + momentum * batch, with the unbiased
    variance (m / (m - 1)) for the running variance, as PyTorch does.
    """
    h = jax.nn.relu(_mm(z, params["w1"]) + params["b1"])
    w = mask.astype(jnp.float32)
    m = jnp.sum(w)
    mean = jnp.sum(w[:, None] * h, axis=0) / m
    var = jnp.sum(w[:, None] * jnp.square(h - mean), axis=0) / m
    y = (h - mean) * jax.lax.rsqrt(var + bn_eps) * params["gamma"] + params["beta"]
    logits = _mm(y, params["w2"]) + params["b2"]
    unbiased = var * m / jnp.maximum(m - 1.0, 1.0)
    running_mean = (1.0 - bn_momentum) * params["mean"] + bn_momentum * mean
    running_var = (1.0 - bn_momentum) * params["var"] + bn_momentum * unbiased
    return logits, jax.lax.stop_gradient(running_mean), jax.lax.stop_gradient(running_var)


def _hybrid_eval_forward(params, z, bn_eps):
    """Eval mode: BatchNorm normalizes with its running statistics."""
    h = jax.nn.relu(_mm(z, params["w1"]) + params["b1"])
    y = (h - params["mean"]) * jax.lax.rsqrt(params["var"] + bn_eps) * params["gamma"] + params["beta"]
    return _mm(y, params["w2"]) + params["b2"]


_hybrid_eval_logits = jax.jit(_hybrid_eval_forward)


@functools.partial(jax.jit, static_argnames=("hidden", "num_classes", "epochs", "batch_size"))
def _hybrid_train(z, y, zv, yv, init_key, shuffle_key, lr, bn_momentum, bn_eps, *, hidden, num_classes, epochs,
                  batch_size):
    n, d = z.shape
    num_batches = -(-n // batch_size)
    padded = num_batches * batch_size
    valid = (jnp.arange(padded) < n).reshape(num_batches, batch_size)
    params0 = _hybrid_init(init_key, d, hidden, num_classes)

    def batch_loss(trained, stats, zb, yb, mask):
        logits, mean, var = _hybrid_train_forward({**trained, **stats}, zb, mask, bn_momentum, bn_eps)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1)[:, 0]
        return jnp.sum(nll * mask) / jnp.sum(mask), (mean, var)  # CrossEntropyLoss's mean over real rows

    grad_fn = jax.value_and_grad(batch_loss, has_aux=True)

    def sgd_step(params, batch):
        idx, mask = batch
        trained = {k: params[k] for k in _TRAINED}
        stats = {"mean": params["mean"], "var": params["var"]}
        (loss, (mean, var)), grads = grad_fn(trained, stats, z[idx], y[idx], mask)
        new = {k: trained[k] - lr * grads[k] for k in _TRAINED}
        new.update(mean=mean, var=var)
        # A batch of one example has no batch variance (PyTorch's BatchNorm1d refuses it in training
        # mode): it is skipped. Only the last, partial batch can be that small.
        used = jnp.sum(mask) >= 2
        params = jax.tree.map(lambda a, b: jnp.where(used, a, b), new, params)
        return params, (jnp.where(used, loss, 0.0), used)

    def epoch(carry, e):
        params, best, best_count, best_epoch = carry
        order = jnp.pad(probes._epoch_order(shuffle_key, e, n), (0, padded - n)).reshape(num_batches, batch_size)
        params, (losses, used) = jax.lax.scan(sgd_step, params, (order, valid))
        count = probes._count_correct(_hybrid_eval_forward(params, zv, bn_eps), yv)
        better = count > best_count  # ties keep the earlier epoch
        best = jax.tree.map(lambda new, old: jnp.where(better, new, old), params, best)
        carry = (params, best, jnp.where(better, count, best_count), jnp.where(better, e + 1, best_epoch))
        return carry, (count, jnp.sum(losses) / jnp.sum(used))

    carry0 = (params0, params0, jnp.int32(-1), jnp.int32(0))
    (final, best, _, best_epoch), (counts, losses) = jax.lax.scan(
        epoch, carry0, jnp.arange(epochs, dtype=jnp.int32))
    return best, final, best_epoch, counts, losses


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
        train_z, train_y, val_z, val_y, *_hybrid_keys(seed), jnp.float32(lr), jnp.float32(bn_momentum),
        jnp.float32(bn_eps), hidden=hidden, num_classes=num_classes, epochs=epochs, batch_size=batch_size))
    curve = np.asarray(counts, dtype=np.float64) / len(val_y)
    best_epoch = int(best_epoch)
    return HybridHead(
        method="hybrid", params={k: np.asarray(v) for k, v in best.items()}, image_dim=int(image_dim),
        caption_dim=int(caption_dim),
        hparams={"epoch": best_epoch, "lr": float(lr), "epochs": epochs, "batch_size": batch_size, "hidden": hidden,
                 "bn_momentum": float(bn_momentum), "bn_eps": float(bn_eps), "seed": seed},
        val_accuracy=float(curve[best_epoch - 1]), grid=np.arange(1, epochs + 1), val_curve=curve,
        extras={"train_loss": np.asarray(losses), "final_params": {k: np.asarray(v) for k, v in final.items()}})
