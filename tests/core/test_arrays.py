"""The shared array helpers: L2 normalization (numpy and jax), fp32-accurate matmul, padded batches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgist.core import arrays


def test_l2_normalize_matches_numpy_for_numpy_and_jax_inputs():
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32) * 3.0
    expected = x.astype(np.float64) / np.sqrt((x.astype(np.float64) ** 2).sum(axis=1, keepdims=True))
    out = arrays.l2_normalize(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    out_jax = arrays.l2_normalize(jnp.asarray(x))
    assert isinstance(out_jax, jax.Array) and out_jax.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out_jax), expected, rtol=1e-6)
    jitted = jax.jit(arrays.l2_normalize)(x)  # a tracer inside jit: the jax branch
    np.testing.assert_allclose(np.asarray(jitted), expected, rtol=1e-6)
    # other axes, eps, integer input, a single vector
    cols = arrays.l2_normalize(x, axis=0)
    np.testing.assert_allclose(np.linalg.norm(cols, axis=0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(arrays.l2_normalize(x, eps=1.0), x / (np.linalg.norm(x, axis=1, keepdims=True) + 1.0),
                               rtol=1e-6)
    np.testing.assert_allclose(arrays.l2_normalize([3, 4]), [0.6, 0.8])
    zero = arrays.l2_normalize(np.zeros((1, 3), np.float32), eps=1e-6)
    np.testing.assert_array_equal(zero, 0.0)


def test_matmul_is_fp32_accurate():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(64, 256)).astype(np.float32)
    b = rng.normal(size=(256, 32)).astype(np.float32)
    reference = a.astype(np.float64) @ b.astype(np.float64)
    out = np.asarray(jax.jit(arrays.matmul)(a, b))
    # the compiled dot asks for full precision (on CPUs the default is already fp32; not on GPUs / TPUs)
    assert "precision = [HIGHEST, HIGHEST]" in jax.jit(arrays.matmul).lower(a, b).as_text()
    assert out.dtype == np.float32 and out.shape == (64, 32)
    # float32 accumulation of 256 terms: a few ulps of the row norms, far below bf16/TF32 (~1e-2 relative)
    scale = np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=0)[None, :]
    assert np.max(np.abs(out - reference) / scale) < 1e-6
    # batched (broadcast) operands
    batched = np.asarray(arrays.matmul(a.reshape(4, 16, 256), b))
    np.testing.assert_allclose(batched.reshape(64, 32), out, rtol=1e-6, atol=1e-5)


def test_pad_rows():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(arrays.pad_rows(x, 5), [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
    np.testing.assert_array_equal(arrays.pad_rows(x, 4, fill="zeros")[3], [0, 0])
    assert arrays.pad_rows(x, 3) is x
    with pytest.raises(ValueError, match="cannot pad"):
        arrays.pad_rows(x, 2)
    with pytest.raises(ValueError, match="fill"):
        arrays.pad_rows(x, 4, fill="nan")


@pytest.mark.parametrize("n, batch_size", [(10, 3), (10, 5), (4, 16), (1, 1), (7, 7)])
def test_map_batches_hides_the_padding(n, batch_size):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = rng.integers(0, 9, size=n)
    shapes, progress = [], []

    def fn(xb, yb, *, scale):
        shapes.append(xb.shape)
        # a row-wise result and one that mixes rows: the padding must not reach the returned rows
        return xb * scale + yb[:, None], (jnp.sum(xb, axis=1), yb)

    out, (sums, labels) = arrays.map_batches(functools.partial(fn, scale=2.0), [x, y], batch_size,
                                             on_batch=lambda done, total: progress.append((done, total)))
    np.testing.assert_allclose(out, x * 2.0 + y[:, None], rtol=1e-6)
    np.testing.assert_allclose(sums, x.sum(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, y)
    assert isinstance(out, np.ndarray) and out.shape == (n, 4)
    size = min(n, batch_size)
    assert set(shapes) == {(size, 4)}  # one shape: a jitted fn compiles once
    assert len(shapes) == -(-n // size)
    assert progress[-1] == (n, n) and [d for d, _ in progress] == sorted(d for d, _ in progress)


def test_map_batches_compiles_once_and_takes_a_single_array():
    traces = []

    @jax.jit
    def double(x):
        traces.append(x.shape)
        return 2 * x

    x = np.arange(23, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(arrays.map_batches(double, x, 10), 2 * x)
    assert traces == [(10, 1)]


def test_map_batches_errors():
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="no rows"):
        arrays.map_batches(lambda a: a, x[:0], 2)
    with pytest.raises(ValueError, match="same number of rows"):
        arrays.map_batches(lambda a, b: a, [x, x[:2]], 2)
    with pytest.raises(ValueError, match="batch_size"):
        arrays.map_batches(lambda a: a, x, 0)
