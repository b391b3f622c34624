"""Linear probes on frozen embeddings: GIST's SGD probe, closed-form ridge, and L-BFGS logistic regression.

    probe = probes.sgd_probe(train_x, train_y, val_x, val_y, num_classes)   # or ridge_probe, lbfgs_probe
    logits = probe.predict_logits(test_x)     # [n, C] float32: test_x @ probe.weights + probe.bias
    probe.hparams["epoch"], probe.val_curve   # the chosen epoch (ridge, L-BFGS: "l2"), every candidate's val acc

Numpy in, numpy out (a ``LinearProbe``); trained in JAX, jitted, data on the device. Hyperparameters are
chosen on the validation split only. ``sgd_probe`` is GIST's ``linear_probe.py`` (PyTorch ``nn.Linear``
init, SGD lr 0.5, 1000 epochs, batches of 64, raw features, the best validation epoch, the later one on
ties); ``ridge_probe`` serves its whole L2 grid from one eigendecomposition; ``lbfgs_probe`` solves each
L2 (strongest first, warm-started) in a preconditioned basis (``precondition``: the eigenvectors of
X^T X on the span of the training rows, rescaled by the loss's curvature: same minimizer, fewer steps).
Details, tie rules and measured parity: docs/methods/gist.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgist.core.arrays import matmul
from jaxgist.heads.base import FittedHead

__all__ = ["FittedHead", "LinearProbe", "sgd_probe", "ridge_probe", "lbfgs_probe", "DEFAULT_RIDGE_L2", "DEFAULT_LBFGS_L2"]

# Ridge L2 grid, relative to the mean eigenvalue of the (standardized, centered) Gram matrix, i.e.
# ||X||_F^2 / d; the chosen absolute value is reported.
DEFAULT_RIDGE_L2 = tuple(np.logspace(-5.0, 3.0, 33))
# L-BFGS L2 grid (absolute), half a decade apart: the penalty is added to the *mean* cross-entropy, so
# l2 = 1 / (C * n) in scikit-learn's convention (its default C=1 on 1,000 examples is l2 = 1e-3).
DEFAULT_LBFGS_L2 = tuple(np.logspace(-7.0, 0.0, 15))

# L-BFGS stops after this many consecutive steps that do not lower the objective.
_STALL_ITERATIONS = 5


# ---------------------------------------------------------------------------------------------------
# The result.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinearProbe(FittedHead):
    """A fitted linear classifier ``logits = x @ weights + bias`` and how it was chosen.

    ``grid`` holds the candidates (L2 strengths, or epochs 1..E for SGD), ``val_curve`` the validation
    accuracy of each, ``hparams`` the chosen values (``l2`` or ``epoch``) and the fixed settings.
    """

    weights: np.ndarray
    bias: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.weights.shape[1])

    def predict_logits(self, x) -> np.ndarray:
        """[n, C] float32 logits of features ``x`` [n, d]."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.weights.shape[0]:
            raise ValueError(f"features must be [n, {self.weights.shape[0]}], got shape {x.shape}")
        return (x @ self.weights + self.bias).astype(np.float32)



# ---------------------------------------------------------------------------------------------------
# Input checks, shared by every probe.
# ---------------------------------------------------------------------------------------------------


def _features(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array [num_examples, dim], got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _labels(y, n: int, num_classes: int, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-d array of class indices, got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} labels but its features have {n} rows")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}); found values in [{y.min()}, {y.max()}]")
    return y.astype(np.int32)


def _check_inputs(train_x, train_y, val_x, val_y, num_classes):
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    num_classes = int(num_classes)
    train_x, val_x = _features(train_x, "train_x"), _features(val_x, "val_x")
    if train_x.shape[0] == 0:
        raise ValueError("train_x is empty: a probe needs training examples")
    if val_x.shape[0] == 0:
        raise ValueError("val_x is empty: hyperparameters are chosen on the validation split, which must "
                         "not be empty")
    if train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"train_x has dimension {train_x.shape[1]} but val_x has {val_x.shape[1]}")
    train_y = _labels(train_y, train_x.shape[0], num_classes, "train_y")
    val_y = _labels(val_y, val_x.shape[0], num_classes, "val_y")
    return train_x, train_y, val_x, val_y, num_classes


def _positive_grid(values, name: str) -> np.ndarray:
    grid = np.asarray(values, dtype=np.float64).reshape(-1)
    if grid.size == 0:
        raise ValueError(f"{name} is empty: give at least one value")
    if not np.isfinite(grid).all() or (grid <= 0).any():
        raise ValueError(f"{name} must be finite and > 0, got {grid.tolist()}")
    return np.sort(grid)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _standardizer(x, standardize: bool):
    """Training-set mean and scale (scale 1 when ``standardize`` is off: centering only)."""
    mean = jnp.mean(x, axis=0)
    if not standardize:
        return mean, jnp.ones_like(mean)
    std = jnp.std(x, axis=0)
    # A constant feature is all zeros once centered, whatever its scale; 1e-6 of the largest std keeps
    # a near-constant one from being blown up to unit variance.
    return mean, jnp.maximum(std, 1e-6 * jnp.max(std) + 1e-30)


def _last_argmax(counts):
    """Index of the last maximum of a 1-d array (ties go to the later element)."""
    return counts.shape[0] - 1 - jnp.argmax(counts[::-1])


def _best_on_val(counts, losses):
    """Index of the most accurate candidate on validation; among equally accurate ones, the one of
    lowest validation loss (then the later one: the larger L2)."""
    ok = counts == jnp.max(counts)
    losses = jnp.where(ok, losses, jnp.inf)
    return _last_argmax(jnp.where(ok & (losses == jnp.min(losses)), 1, 0))


def _count_correct(logits, labels):
    return jnp.sum(jnp.argmax(logits, axis=-1) == labels)


# ---------------------------------------------------------------------------------------------------
# GIST's SGD probe.
# ---------------------------------------------------------------------------------------------------


def _sgd_keys(seed):
    """(initialization key, shuffling key) of ``sgd_probe(seed=seed)``."""
    return tuple(jax.random.split(jax.random.key(seed)))


def _sgd_init(init_key, d: int, num_classes: int):
    """torch.nn.Linear's initialization: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    wkey, bkey = jax.random.split(init_key)
    bound = 1.0 / np.sqrt(d)
    return (jax.random.uniform(wkey, (d, num_classes), jnp.float32, -bound, bound),
            jax.random.uniform(bkey, (num_classes,), jnp.float32, -bound, bound))


def _epoch_order(shuffle_key, epoch, n: int):
    """The order of the training examples in ``epoch`` (0-based). fold_in: the shuffles of the first
    E epochs do not depend on the total number of epochs."""
    return jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), n)


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"))
def _sgd_train(x, y, xv, yv, init_key, shuffle_key, lr, *, num_classes, epochs, batch_size):
    n, d = x.shape
    num_batches = -(-n // batch_size)
    padded = num_batches * batch_size
    valid = (jnp.arange(padded) < n).reshape(num_batches, batch_size)
    w0, b0 = _sgd_init(init_key, d, num_classes)

    def batch_loss(params, xb, yb, mask):
        w, b = params
        logits = matmul(xb, w) + b
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1)[:, 0]
        return jnp.sum(nll * mask) / jnp.sum(mask)  # CrossEntropyLoss's mean, over the real rows

    grad_fn = jax.value_and_grad(batch_loss)

    def sgd_step(params, batch):
        idx, mask = batch
        loss, grads = grad_fn(params, x[idx], y[idx], mask)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        return params, loss

    def epoch(carry, e):
        params, best, best_count, best_epoch = carry
        order = jnp.pad(_epoch_order(shuffle_key, e, n), (0, padded - n)).reshape(num_batches, batch_size)
        params, losses = jax.lax.scan(sgd_step, params, (order, valid))
        count = _count_correct(matmul(xv, params[0]) + params[1], yv)
        better = count >= best_count
        best = jax.tree.map(lambda new, old: jnp.where(better, new, old), params, best)
        carry = (params, best, jnp.where(better, count, best_count), jnp.where(better, e + 1, best_epoch))
        return carry, (count, jnp.mean(losses))

    carry0 = ((w0, b0), (w0, b0), jnp.int32(-1), jnp.int32(0))
    (final, best, best_count, best_epoch), (counts, losses) = jax.lax.scan(
        epoch, carry0, jnp.arange(epochs, dtype=jnp.int32))
    return best, final, best_epoch, counts, losses


def sgd_probe(train_x, train_y, val_x, val_y, num_classes: int, *, lr: float = 0.5, epochs: int = 1000,
              batch_size: int = 64, seed: int = 0) -> LinearProbe:
    """GIST's linear probe: SGD on raw features, the weights of the best validation epoch.

    ``lr`` 0.5, ``epochs`` 1000 and ``batch_size`` 64 are GIST's settings (module docstring). ``seed``
    fixes the initialization and the shuffles; ``extras["train_loss"]`` is the mean minibatch loss per
    epoch (what GIST prints), ``extras["final_weights"]``/``["final_bias"]`` the last epoch's weights.
    """
    train_x, train_y, val_x, val_y, num_classes = _check_inputs(train_x, train_y, val_x, val_y, num_classes)
    epochs, batch_size = _positive_int(epochs, "epochs"), _positive_int(batch_size, "batch_size")
    if not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be finite and > 0, got {lr!r}")
    best, final, best_epoch, counts, losses = _sgd_train(
        train_x, train_y, val_x, val_y, *_sgd_keys(seed), jnp.float32(lr), num_classes=num_classes,
        epochs=epochs, batch_size=batch_size)
    best, final, best_epoch, counts, losses = jax.device_get((best, final, best_epoch, counts, losses))
    curve = np.asarray(counts, dtype=np.float64) / len(val_y)
    best_epoch = int(best_epoch)
    return LinearProbe(
        method="sgd", weights=np.asarray(best[0]), bias=np.asarray(best[1]),
        hparams={"epoch": best_epoch, "lr": float(lr), "epochs": epochs, "batch_size": batch_size, "seed": seed},
        val_accuracy=float(curve[best_epoch - 1]), grid=np.arange(1, epochs + 1), val_curve=curve,
        extras={"train_loss": np.asarray(losses), "final_weights": np.asarray(final[0]),
                "final_bias": np.asarray(final[1])})


# ---------------------------------------------------------------------------------------------------
# Closed-form ridge regression.
# ---------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("num_classes", "standardize", "relative"))
def _ridge_fit(x, y, xv, yv, l2s, *, num_classes, standardize, relative):
    n, d = x.shape
    mean, scale = _standardizer(x, standardize)
    xs = (x - mean) / scale
    onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
    prior = jnp.mean(onehot, axis=0)  # the bias in the centered problem
    yc = onehot - prior
    # W(l2) = lhs @ diag(1 / (eigs + l2)) @ rhs, from the eigendecomposition of the smaller Gram matrix:
    #   n >= d:  (X^T X + l2 I)^-1 X^T Y,   X^T X = Q diag(e) Q^T,  lhs = Q,       rhs = Q^T X^T Y
    #   n <  d:  X^T (X X^T + l2 I)^-1 Y,   X X^T = Q diag(e) Q^T,  lhs = X^T Q,   rhs = Q^T Y
    if n >= d:
        eigs, q = jnp.linalg.eigh(matmul(xs.T, xs))
        lhs, rhs = q, matmul(q.T, matmul(xs.T, yc))
    else:
        eigs, q = jnp.linalg.eigh(matmul(xs, xs.T))
        lhs, rhs = matmul(xs.T, q), matmul(q.T, yc)
    eigs = jnp.maximum(eigs, 0.0)
    l2s = l2s * (jnp.sum(eigs) / d if relative else 1.0)

    projected = matmul((xv - mean) / scale, lhs)  # [nv, r]: validation features in the eigenbasis

    val_onehot = jax.nn.one_hot(yv, num_classes, dtype=jnp.float32)

    def val_scores(l2):
        logits = matmul(projected / (eigs + l2), rhs) + prior
        return _count_correct(logits, yv), jnp.sum(jnp.square(logits - val_onehot))

    counts, errors = jax.lax.map(val_scores, l2s, batch_size=8)
    best = _best_on_val(counts, errors)
    w_std = matmul(lhs / (eigs + l2s[best]), rhs)
    weights = w_std / scale[:, None]
    bias = prior - matmul(mean / scale, w_std)
    return weights, bias, l2s, counts, best


def ridge_probe(train_x, train_y, val_x, val_y, num_classes: int, *, l2s: Sequence[float] | None = None,
                standardize: bool = True) -> LinearProbe:
    """Ridge regression to one-hot targets, the L2 strength chosen on validation accuracy.

    Minimizes ||X W + 1 b - Y||^2 + l2 ||W||^2 (sum over examples; Y one-hot in {0, 1}; bias free) on
    the features standardized with training statistics (``standardize=False``: raw features), then
    folds the standardization into the returned ``weights`` and ``bias``. ``l2s``: absolute strengths;
    by default ``DEFAULT_RIDGE_L2`` times the mean eigenvalue of the Gram matrix (||X||_F^2 / d), which
    makes the grid independent of the feature scale. The grid is sorted ascending; the L2 of the best
    validation accuracy wins, ties going to the lowest validation squared error. ``hparams["l2"]`` is
    the chosen absolute value, ``grid`` every absolute value tried.
    """
    train_x, train_y, val_x, val_y, num_classes = _check_inputs(train_x, train_y, val_x, val_y, num_classes)
    relative = l2s is None
    grid = _positive_grid(DEFAULT_RIDGE_L2 if relative else l2s, "l2s")
    weights, bias, l2s_abs, counts, best = jax.device_get(_ridge_fit(
        train_x, train_y, val_x, val_y, jnp.asarray(grid, jnp.float32), num_classes=num_classes,
        standardize=bool(standardize), relative=relative))
    best = int(best)
    curve = np.asarray(counts, dtype=np.float64) / len(val_y)
    l2s_abs = np.asarray(l2s_abs, dtype=np.float64)
    return LinearProbe(
        method="ridge", weights=np.asarray(weights), bias=np.asarray(bias),
        hparams={"l2": float(l2s_abs[best]), "standardize": bool(standardize)},
        val_accuracy=float(curve[best]), grid=l2s_abs, val_curve=curve)


# ---------------------------------------------------------------------------------------------------
# L-BFGS multinomial logistic regression.
# ---------------------------------------------------------------------------------------------------


def _row_space_basis(xs):
    """(eigs [r], basis [d, r]) with r = min(n, d): eigenpairs of X^T X / n on the span of X's rows.

    From the smaller Gram matrix; for n < d the basis is X^T Q / sqrt(n e), with the columns of zero
    eigenvalues (directions with no data, e.g. the one centering removes) set to zero.
    """
    n, d = xs.shape
    if n >= d:
        eigs, basis = jnp.linalg.eigh(matmul(xs.T, xs) / n)
        return jnp.maximum(eigs, 0.0), basis
    eigs, q = jnp.linalg.eigh(matmul(xs, xs.T) / n)
    eigs = jnp.maximum(eigs, 0.0)
    keep = eigs > 1e-6 * jnp.max(eigs)
    inv_norm = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, n * eigs, 1.0)), 0.0)
    return jnp.where(keep, eigs, 0.0), matmul(xs.T, q) * inv_norm


@functools.partial(jax.jit, static_argnames=("standardize", "precondition"))
def _lbfgs_prepare(x, xv, *, standardize, precondition):
    """Standardized features, in the preconditioning eigenbasis when asked: (xs, xvs, eigs, basis,
    mean, scale)."""
    mean, scale = _standardizer(x, standardize)
    xs, xvs = (x - mean) / scale, (xv - mean) / scale
    if not precondition:
        return xs, xvs, jnp.zeros((x.shape[1],), jnp.float32), None, mean, scale
    # The eigenbasis of X^T X / n restricted to the span of the training rows, where the minimizer lies
    # (the loss gradient is X^T G and the penalty is rotation invariant).
    eigs, basis = _row_space_basis(xs)
    return matmul(xs, basis), matmul(xvs, basis), eigs, basis, mean, scale


@functools.partial(jax.jit, static_argnames=("precondition", "max_iter"))
def _lbfgs_solve(xs, y, xvs, yv, eigs, l2, warm_w, warm_b, tol, *, precondition, max_iter):
    """One L2: L-BFGS from (warm_w, warm_b). Returns (w, b, val correct count, iterations, objective)."""
    n, r = xs.shape
    num_classes = warm_b.shape[0]
    # Each direction rescaled by 1 / sqrt(its curvature), curvature ~ e / (n C) + l2: the Hessian of the
    # mean cross-entropy at W = 0 is (X^T X / n) (x) (I - 11^T / C) / C. W = diag(c) V.
    c = jax.lax.rsqrt(eigs / (n * num_classes) + l2) if precondition else jnp.ones((r,), jnp.float32)

    is_label = jax.nn.one_hot(y, num_classes, dtype=jnp.bool_)

    def objective(params):
        v, b = params
        w = c[:, None] * v
        logits = matmul(xs, w) + b
        # -log softmax(logits)[y] = softplus(logsumexp_{j != y}(logits_j - logits_y)): accurate when the
        # loss is tiny (nearly separable data, small l2), where logsumexp(logits) - logits_y cancels.
        margins = logits - jnp.take_along_axis(logits, y[:, None], axis=1)
        nll = jax.nn.softplus(jax.nn.logsumexp(jnp.where(is_label, -jnp.inf, margins), axis=1))
        return jnp.mean(nll) + 0.5 * l2 * jnp.sum(w * w)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)
    params = (warm_w / c[:, None], warm_b)
    state = opt.init(params)

    def not_done(carry):
        # Converged when the gradient (in W's coordinates) is small next to the penalty's gradient
        # l2 * W, which it cancels at the minimizer: a criterion that does not loosen as l2 -> 0.
        # Also stops after _STALL_ITERATIONS steps in a row that did not lower the objective
        # (float32's floor).
        (v, _), state, it, stalled = carry
        gv, gb = optax.tree.get(state, "grad")
        residual = jnp.sqrt(jnp.sum(jnp.square(gv / c[:, None])) + jnp.sum(jnp.square(gb)))
        converged = residual <= tol * l2 * jnp.linalg.norm(c[:, None] * v)
        return (it == 0) | ((it < max_iter) & ~converged & (stalled < _STALL_ITERATIONS))

    def step(carry):
        params, state, it, stalled = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        stalled = jnp.where(optax.tree.get(state, "value") < value, 0, stalled + 1)
        return optax.apply_updates(params, updates), state, it + 1, stalled

    params, state, iters, _ = jax.lax.while_loop(not_done, step, (params, state, jnp.int32(0), jnp.int32(0)))
    v, b = params
    w = c[:, None] * v
    return w, b, _count_correct(matmul(xvs, w) + b, yv), iters, optax.tree.get(state, "value")


@jax.jit
def _lbfgs_weights(w, b, basis, mean, scale):
    """Back from the (rotated) standardized space to the given features."""
    if basis is not None:
        w = matmul(basis, w)
    weights = w / scale[:, None]
    return weights, b - matmul(mean / scale, w)


def lbfgs_probe(train_x, train_y, val_x, val_y, num_classes: int, *, l2s: Sequence[float] | None = None,
                standardize: bool = True, max_iter: int = 300, tol: float = 1e-2,
                precondition: bool = True) -> LinearProbe:
    """Multinomial logistic regression with an L2 penalty, the strength chosen on validation accuracy.

    Minimizes mean cross-entropy + (l2 / 2) ||W||^2 (bias free) on features standardized with training
    statistics (``standardize=False``: raw features) for every ``l2s`` value (absolute; default
    ``DEFAULT_LBFGS_L2``), from the largest down, each fit warm-started from the previous one and run
    with L-BFGS until ||gradient|| <= ``tol`` * l2 * ||W|| (the gradient small next to the penalty's,
    which it cancels at the minimizer), until 5 steps in a row fail to lower the objective, or
    ``max_iter`` iterations. The most accurate L2 on validation wins, ties going to the larger L2.
    ``extras``: ``iterations`` and final ``objective`` per L2 (ascending, like ``grid``).
    ``precondition`` (module docstring) changes the path, not the minimizer.
    """
    train_x, train_y, val_x, val_y, num_classes = _check_inputs(train_x, train_y, val_x, val_y, num_classes)
    grid = _positive_grid(DEFAULT_LBFGS_L2 if l2s is None else l2s, "l2s")
    max_iter = _positive_int(max_iter, "max_iter")
    if not np.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be finite and >= 0, got {tol!r}")
    xs, xvs, eigs, basis, mean, scale = _lbfgs_prepare(train_x, val_x, standardize=bool(standardize),
                                                       precondition=bool(precondition))
    y, yv = jnp.asarray(train_y), jnp.asarray(val_y)
    w = jnp.zeros((xs.shape[1], num_classes), jnp.float32)
    b = jnp.zeros((num_classes,), jnp.float32)
    fits = []
    for l2 in grid[::-1]:  # strongest penalty first: each fit starts from the previous one's minimizer
        w, b, *scores = _lbfgs_solve(
            xs, y, xvs, yv, eigs, jnp.float32(l2), w, b, jnp.float32(tol), precondition=bool(precondition),
            max_iter=max_iter)
        fits.append((w, b, *scores))
    fits = fits[::-1]
    counts, iters, losses = (np.asarray(jax.device_get([fit[k] for fit in fits])) for k in (2, 3, 4))
    best = len(grid) - 1 - int(np.argmax(counts[::-1]))  # ascending grid: ties go to the larger L2
    weights, bias = jax.device_get(_lbfgs_weights(fits[best][0], fits[best][1], basis, mean, scale))
    curve = np.asarray(counts, dtype=np.float64) / len(val_y)
    return LinearProbe(
        method="lbfgs", weights=np.asarray(weights), bias=np.asarray(bias),
        hparams={"l2": float(grid[best]), "standardize": bool(standardize), "max_iter": max_iter},
        val_accuracy=float(curve[best]), grid=grid, val_curve=curve,
        extras={"iterations": np.asarray(iters), "objective": np.asarray(losses)})
