"""Layers the models share (Flax NNX): LayerNorm in float32, PyTorch's BatchNorm, a 2-D-matmul Dense, multi-head
self-attention with q/k/v projections, the MLP, the pre-LN block and the encoder stack, with HF's
parameter names (``self_attn.q_proj``, ``layer_norm1``, ``mlp.fc1``, ``layers.N``).

    block = layers.EncoderLayer(width, heads, mlp_dim, "gelu", 1e-5, dtype=jnp.bfloat16, rngs=rngs)
    encoder = layers.Encoder(width, depth, heads, mlp_dim, "quick_gelu", 1e-5, remat=True, rngs=rngs)
    y = encoder(x, causal=True, pool_index=eos_positions)       # [B, 1, D]: only the pooled position
    with layers.activation_sharding(batch_sharding): ...        # FSDP: keep each block's input split by batch

Parameters are stored in ``param_dtype``; matmuls run in ``dtype``; LayerNorm and softmax in float32.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")

# The sharding of activations (batch axis over the mesh's data axes) inside a sharded train step.
_ACTIVATIONS = contextvars.ContextVar("jaxgist_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(sharding):
    """While tracing inside this context, each transformer block's input is constrained to
    ``sharding`` (a NamedSharding of the batch axis over the data axes). With FSDP-sharded weights
    this pins the layout to "split the batch, gather the weights": left alone, XLA's partitioner may
    instead split activations along their width to match the weights, and hold far larger
    temporaries."""
    token = _ACTIVATIONS.set(sharding)
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def constrain_activations(x):
    sharding = _ACTIVATIONS.get()
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 whatever the compute dtype; output in the compute dtype."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class BatchNorm(nnx.Module):
    """PyTorch's ``BatchNorm1d``/``BatchNorm2d`` over channels-last inputs ([B, C] or [B, H, W, C]).

    Training mode (``use_running_average=False``): normalizes with the batch mean and biased variance
    over every axis but the last (over the rows where ``mask`` [B] is set, when given) and updates the
    running statistics as ``(1 - momentum) * running + momentum * batch``, the variance with the
    *unbiased* batch variance, as PyTorch does (``nnx.BatchNorm`` uses the biased one). Eval mode
    (``model.eval()`` sets it): the running statistics. ``momentum`` is in PyTorch's terms (0.1 is
    ``nnx.BatchNorm``'s 0.9). Parameters ``scale`` (PyTorch's ``weight``) and ``bias``; statistics
    (``nnx.BatchStat``) ``mean`` and ``var``. Computed in float32, returned in the input's dtype.
    Under a sharded jit the batch statistics are those of the global batch (SyncBatchNorm's).
    ``groups`` > 1 splits the batch into that many equal runs of consecutive rows, each normalized
    with its own statistics: what ``groups`` data-parallel devices with unsynchronized BatchNorm (PyTorch
    DDP without SyncBatchNorm) compute; the running statistics then move by the mean of the groups'.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.1, eps: float = 1e-5,
                 use_running_average: bool = False, scale_init: float = 1.0, param_dtype=jnp.float32,
                 groups: int = 1):
        self.scale = nnx.Param(jnp.full((num_features,), scale_init, param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.momentum, self.eps = float(momentum), float(eps)
        self.use_running_average = use_running_average
        self.groups = int(groups)

    def __call__(self, x, use_running_average: bool | None = None, mask=None):
        if use_running_average is None:
            use_running_average = self.use_running_average
        dtype, xf = x.dtype, x.astype(jnp.float32)
        if use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            g = self.groups
            if x.shape[0] % g:
                raise ValueError(f"a batch of {x.shape[0]} rows does not split into BatchNorm's {g} groups")
            w = jnp.ones(x.shape[:1], jnp.float32) if mask is None else jnp.asarray(mask).astype(jnp.float32)
            y, mean, var, count = batch_norm_train(xf, self.scale[...].astype(jnp.float32),
                                                   self.bias[...].astype(jnp.float32), w, self.eps, g)
            unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
            self.mean[...] = jax.lax.stop_gradient(
                (1.0 - self.momentum) * self.mean[...] + self.momentum * jnp.mean(mean, 0))
            self.var[...] = jax.lax.stop_gradient(
                (1.0 - self.momentum) * self.var[...] + self.momentum * jnp.mean(unbiased, 0))
            return y.astype(dtype)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


def _group_stats(x, w, groups: int):
    """Per group [G, C]: weighted mean, biased variance and the weighted element count, of ``x``
    [B, ..., C] split into ``groups`` runs of consecutive rows, each row weighted by ``w`` [B]."""
    xg = x.reshape(groups, x.shape[0] // groups, -1, x.shape[-1])  # [G, B/G, spatial, C]
    wg = w.reshape(groups, -1, 1, 1)
    count = jnp.maximum(jnp.sum(wg, axis=(1, 2)) * xg.shape[2], 1.0)  # [G, 1]
    mean = jnp.sum(wg * xg, axis=(1, 2)) / count
    var = jnp.sum(wg * jnp.square(xg - mean[:, None, None]), axis=(1, 2)) / count
    return mean, var, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def batch_norm_train(x, scale, bias, w, eps: float, groups: int):
    """Training-mode BatchNorm of float32 ``x`` [B, ..., C] with statistics per group of consecutive rows
    over the rows weighted by ``w`` [B] (0/1: a mask): returns (y, mean [G, C], biased var [G, C], count
    [G, 1]). Its backward is the closed form (two reductions and one elementwise pass), several times
    cheaper on CPU than differentiating the forward's reshapes and weighted reductions."""
    return _batch_norm_train_fwd(x, scale, bias, w, eps, groups)[0]


def _normalize(x, mean, rstd, groups):
    xg = x.reshape(groups, x.shape[0] // groups, -1, x.shape[-1])
    return (xg - mean[:, None, None]) * rstd[:, None, None]


def _batch_norm_train_fwd(x, scale, bias, w, eps, groups):
    mean, var, count = _group_stats(x, w, groups)
    rstd = jax.lax.rsqrt(var + eps)
    y = (_normalize(x, mean, rstd, groups) * scale + bias).reshape(x.shape)
    return (y, mean, var, count), (x, scale, w, mean, rstd, count)


def _batch_norm_train_bwd(eps, groups, saved, cotangents):
    x, scale, w, mean, rstd, count = saved
    dy, dmean, dvar, _ = cotangents
    xhat = _normalize(x, mean, rstd, groups)  # [G, B/G, S, C]
    dyg = dy.reshape(xhat.shape)
    sum_dy = jnp.sum(dyg, axis=(1, 2))  # [G, C]: over every row, masked ones included (their y uses the stats)
    sum_dy_xhat = jnp.sum(dyg * xhat, axis=(1, 2))
    wg = w.reshape(groups, -1, 1, 1) / count[:, None, None]  # [G, B/G, 1, 1]: w_k / m
    c = scale * rstd  # [G, C]
    dx = c[:, None, None] * dyg - wg * (c * sum_dy)[:, None, None] - wg * xhat * (c * sum_dy_xhat)[:, None, None]
    # the statistics' own cotangents (zero where only the running averages read them)
    dx = dx + wg * (dmean[:, None, None] + 2.0 * dvar[:, None, None] * xhat / rstd[:, None, None])
    dscale = jnp.sum(sum_dy_xhat, 0)
    dbias = jnp.sum(sum_dy, 0)
    return dx.reshape(x.shape), dscale, dbias, jnp.zeros_like(w)


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class Dense(nnx.Module):
    """A Linear layer (``kernel`` [in, out], optional ``bias``) that runs as one 2-D matmul.

    Leading axes are flattened first: XLA's CPU backward for a matmul contracting over several
    batch-like axes is about twice as slow as for the same matmul on [N, in].
    """

    def __init__(self, din: int, dout: int, *, use_bias=True, std=0.02, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (din, dout), param_dtype) * std)
        self.bias = nnx.Param(jnp.zeros((dout,), param_dtype)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x):
        lead = x.shape[:-1]
        y = x.reshape(-1, x.shape[-1]).astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y.reshape(*lead, -1)


def patch_matmul(pixels, kernel, dtype):
    """A convolution whose stride equals its kernel (a ViT's patch embedding; ``kernel`` (p, p, C, D) as
    ``nnx.Conv`` stores it), run as one matmul over the flattened patches: [B, H, W, C] ->
    [B, H/p, W/p, D] in ``dtype``. On CPU about twice as fast as XLA's strided convolution."""
    p, _, c, d = kernel.shape
    b, h, w, _ = pixels.shape
    if h % p or w % p:
        raise ValueError(f"image of {h}x{w} pixels is not a whole number of {p}x{p} patches")
    x = pixels.astype(dtype).reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    y = x.reshape(-1, p * p * c) @ kernel.reshape(p * p * c, d).astype(dtype)
    return y.reshape(b, h // p, w // p, d)


def dot_product_attention(q, k, v, *, allowed=None):
    """Softmax attention of q [B, Q, H, hd] over k, v [B, K, H, hd] (q scaled by hd^-1/2, softmax in
    float32; ``allowed`` a boolean mask broadcastable to [B, H, Q, K]) -> [B, Q, H * hd].

    The heads are moved ahead of the positions first, so both products are batched matmuls over
    [B, H]: on CPU about twice as fast as contracting the [B, Q, H, hd] layout in place (an
    encoder layer's forward about 10% faster), and the same numbers."""
    b, nq, h, hd = q.shape
    qh = jnp.transpose(q * jnp.asarray(hd**-0.5, q.dtype), (0, 2, 1, 3))  # [B, H, Q, hd]
    kh = jnp.transpose(k, (0, 2, 3, 1))  # [B, H, hd, K]
    vh = jnp.transpose(v, (0, 2, 1, 3))  # [B, H, K, hd]
    scores = jnp.matmul(qh, kh).astype(jnp.float32)
    if allowed is not None:
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.transpose(jnp.matmul(probs, vh), (0, 2, 1, 3)).reshape(b, nq, h * hd)


class Attention(nnx.Module):
    """Multi-head self-attention with separate q/k/v projections (HF layout)."""

    def __init__(self, width: int, heads: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            Dense(width, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(4))

    def __call__(self, x, *, causal: bool, query_index=None):
        """x: [B, L, D]. query_index: optional [B] int, attend only from that position (out [B, 1, D])."""
        b, length, d = x.shape
        h = self.heads
        hd = d // h
        if query_index is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q_pos = jnp.arange(length)[None, :]
        else:
            q = self.q_proj(jnp.take_along_axis(x, query_index[:, None, None], axis=1))
            q_pos = query_index[:, None]
            k, v = self.k_proj(x), self.v_proj(x)
        allowed = None
        if causal:
            allowed = (jnp.arange(length)[None, None, :] <= q_pos[:, :, None])[:, None]  # [B or 1, 1, Q, K]
        out = dot_product_attention(q.reshape(b, -1, h, hd), k.reshape(b, length, h, hd), v.reshape(b, length, h, hd),
                                    allowed=allowed)
        return self.out_proj(out)


class MLP(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, width: int, hidden: int, act: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.fc1 = Dense(width, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Dense(hidden, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = act

    def __call__(self, x):
        return self.fc2(activation(self.act)(self.fc1(x)))


class EncoderLayer(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width, heads, mlp_dim, act, eps, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.self_attn = Attention(width, heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(width, eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(width, mlp_dim, act, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(width, eps, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, *, causal: bool, query_index=None):
        y = self.self_attn(self.layer_norm1(x), causal=causal, query_index=query_index)
        if query_index is not None:
            x = jnp.take_along_axis(x, query_index[:, None, None], axis=1)
        x = x + y
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    """A stack of ``EncoderLayer``s (``layers.N``), each optionally rematerialized in the backward pass."""

    def __init__(self, width, layers, heads, mlp_dim, act, eps, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool = False, rngs: nnx.Rngs):
        self.layers = nnx.List([EncoderLayer(width, heads, mlp_dim, act, eps, dtype=dtype, param_dtype=param_dtype,
                                             rngs=rngs) for _ in range(layers)])
        self.remat = remat

    def __call__(self, x, *, causal: bool, pool_index=None):
        """Runs every layer. With pool_index ([B] ints) the last layer computes only that position
        (exact: nothing after the last layer reads the other positions) and returns [B, 1, D]."""

        def run(layer, x, query_index):
            return layer(x, causal=causal, query_index=query_index)

        if self.remat:
            run = nnx.remat(run)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = run(layer, constrain_activations(x), pool_index if i == last else None)
        return x


def set_batchnorm_groups(module: nnx.Module, groups: int) -> int:
    """Sets ``groups`` on every ``BatchNorm`` inside ``module`` (per-device statistics, see ``BatchNorm``);
    returns how many there are."""
    if int(groups) != groups or groups < 1:
        raise ValueError(f"BatchNorm groups={groups!r} must be a positive integer")
    count = 0
    for _, m in nnx.iter_modules(module):
        if isinstance(m, BatchNorm):
            m.groups = int(groups)
            count += 1
    return count
