"""Shared layers: BatchNorm's training-mode closed-form backward against autodiff of the direct formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgist.models import layers


def _direct(x, scale, bias, w, eps, groups):
    """Training-mode BatchNorm written out (weighted statistics per group of consecutive rows)."""
    xg = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    wr = w.reshape((groups, -1) + (1,) * (x.ndim - 1))
    m = jnp.maximum(jnp.sum(wr, axis=axes, keepdims=True) * np.prod(x.shape[1:-1]), 1.0)
    mean = jnp.sum(wr * xg, axis=axes, keepdims=True) / m
    var = jnp.sum(wr * jnp.square(xg - mean), axis=axes, keepdims=True) / m
    y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * scale + bias
    return y, mean.reshape(groups, -1), var.reshape(groups, -1)


@pytest.mark.parametrize("shape,groups,masked", [((8, 5, 3, 4), 1, False), ((8, 5, 3, 4), 2, True),
                                                 ((6, 7), 3, False), ((4, 2, 2, 3), 4, False)])
def test_batch_norm_backward_equals_autodiff_of_the_formula(shape, groups, masked):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape) * 2 + 1, jnp.float32)
    scale, bias = (jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.random(shape[0]) > 0.3 if masked else np.ones(shape[0]), jnp.float32)
    if masked:
        w = w.at[0].set(1.0)
    t_y = jnp.asarray(rng.normal(size=shape), jnp.float32)
    t_stats = jnp.asarray(rng.normal(size=(groups, shape[-1])), jnp.float32)

    def loss(fn):
        def f(x, scale, bias):
            y, mean, var = fn(x, scale, bias, w, 1e-5, groups)[:3]
            return jnp.sum(y * t_y) + jnp.sum(mean * t_stats) + jnp.sum(var * t_stats ** 2)
        return f

    ours = jax.grad(loss(layers.batch_norm_train), argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(loss(_direct), argnums=(0, 1, 2))(x, scale, bias)
    for name, a, b in zip(("x", "scale", "bias"), ours, want):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(layers.batch_norm_train(x, scale, bias, w, 1e-5, groups)[0],
                               _direct(x, scale, bias, w, 1e-5, groups)[0], atol=1e-6)
