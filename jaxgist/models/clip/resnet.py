"""OpenAI's ModifiedResNet image tower (CLIP RN50, RN101, RN50x4/x16/x64) in Flax NNX, channels-last.

    tower = ModifiedResNet(ResNetConfig(layers=(3, 4, 6, 3), width=64), embed_dim=1024, rngs=rngs)
    features = tower(pixels)               # [B, H, W, 3] normalized -> [B, embed_dim] (attention pool output)

Differences from torchvision's ResNet, as in OpenAI's ``clip/model.py``: a stem of three 3x3
convolutions (the first with stride 2) and a 2x2 average pool; bottlenecks that stride by an
average pool after ``conv2`` (and before the 1x1 conv of the ``downsample`` branch); and an
attention pool (the mean token prepended, a positional embedding, one query) instead of global
average pooling. Parameter names are OpenAI's (``conv1``, ``bn1``, ``layer1.0.downsample.0``,
``attnpool.q_proj``) with Flax leaf names; convolutions pad explicitly by 1 as PyTorch does
(``SAME`` padding differs from PyTorch's for stride 2). BatchNorm is PyTorch's
(``models.layers.BatchNorm``): running statistics in eval mode (the default), batch statistics
and updated running ones after ``model.train()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgist.models.layers import BatchNorm, Dense


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """The image tower of an RN CLIP. ``heads`` defaults to OpenAI's ``width * 32 // 64``."""

    image_size: int = 224
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    heads: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if self.heads is None:
            object.__setattr__(self, "heads", self.width * 32 // 64)

    @property
    def embed_width(self) -> int:
        """The width of the last stage, the attention pool's input (``width * 32``)."""
        return self.width * 32

    @property
    def grid(self) -> int:
        return self.image_size // 32

    def problems(self) -> list[str]:
        out = []
        if len(self.layers) != 4 or min(self.layers) < 1:
            out.append(f"vision.layers={self.layers} must be 4 positive block counts")
        if self.image_size % 32:
            out.append(f"vision.image_size={self.image_size} is not a multiple of 32 (the ResNet's total stride)")
        if self.embed_width % self.heads:
            out.append(f"vision.width*32={self.embed_width} is not divisible by vision.heads={self.heads}")
        return out


_KERNEL_INIT = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv2d(nnx.Module):
    """A bias-free convolution (stride 1 unless given) with PyTorch's explicit padding of ``kernel // 2``;
    ``kernel`` (kh, kw, in, out) as ``nnx.Conv`` stores it. A 1x1 kernel runs as one [N*H*W, in] x
    [in, out] matmul: XLA's CPU convolution is 2-5x slower than its matmul there (and a TPU runs both
    as the same matmul). ``__call__(x, kernel)`` takes another kernel of the same shape (BatchNorm folded in)."""

    def __init__(self, cin: int, cout: int, size: int, *, stride: int = 1, dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_KERNEL_INIT(rngs.params(), (size, size, cin, cout), param_dtype))
        self.stride, self.dtype = stride, dtype

    def __call__(self, x, kernel=None):
        kernel = (self.kernel[...] if kernel is None else kernel).astype(self.dtype)
        x = x.astype(self.dtype)
        kh, kw, cin, cout = kernel.shape
        if kh == kw == 1 and self.stride == 1:
            return (x.reshape(-1, cin) @ kernel.reshape(cin, cout)).reshape(*x.shape[:-1], cout)
        pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
        return jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), pad,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_bn(conv: Conv2d, bn: BatchNorm, x):
    """``bn(conv(x))``. With running statistics (eval mode) BatchNorm is folded into the kernel and a
    per-channel shift: the same function, one pass over the activations fewer."""
    if not bn.use_running_average:
        return bn(conv(x))
    scale = bn.scale[...].astype(jnp.float32) * jax.lax.rsqrt(bn.var[...] + bn.eps)
    shift = bn.bias[...].astype(jnp.float32) - bn.mean[...] * scale
    y = conv(x, conv.kernel[...].astype(jnp.float32) * scale)
    return y + shift.astype(y.dtype)


def _avg_pool(x, stride: int):
    """PyTorch's ``AvgPool2d(stride)``: non-overlapping windows, a remainder row/column dropped."""
    if stride == 1:
        return x
    return nnx.avg_pool(x, window_shape=(stride, stride), strides=(stride, stride), padding="VALID")


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = Conv2d(inplanes, planes, 1, **conv)
        self.bn1 = BatchNorm(planes, use_running_average=True, param_dtype=param_dtype)
        self.conv2 = Conv2d(planes, planes, 3, **conv)
        self.bn2 = BatchNorm(planes, use_running_average=True, param_dtype=param_dtype)
        self.conv3 = Conv2d(planes, planes * self.expansion, 1, **conv)
        # OpenAI zero-initializes the last BatchNorm of each block: a fresh block starts as the identity
        self.bn3 = BatchNorm(planes * self.expansion, use_running_average=True, scale_init=0.0,
                             param_dtype=param_dtype)
        self.stride = stride
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nnx.List([
                Conv2d(inplanes, planes * self.expansion, 1, **conv),
                BatchNorm(planes * self.expansion, use_running_average=True, param_dtype=param_dtype),
            ])
        else:
            self.downsample = None

    def __call__(self, x):
        out = jax.nn.relu(conv_bn(self.conv1, self.bn1, x))
        out = jax.nn.relu(conv_bn(self.conv2, self.bn2, out))
        out = conv_bn(self.conv3, self.bn3, _avg_pool(out, self.stride))
        identity = x
        if self.downsample is not None:
            conv, bn = self.downsample
            identity = conv_bn(conv, bn, _avg_pool(x, self.stride))
        return jax.nn.relu(out + identity.astype(out.dtype))


class AttentionPool(nnx.Module):
    """The mean of the feature map prepended as a token, a learned positional embedding, and one
    multi-head attention query from that token; ``c_proj`` maps to the joint embedding.

    With a single query the key and value projections are absorbed into it rather than applied to
    every token: per head, q.(W_k x + b_k) = (W_k^T q).x + q.b_k, and since the attention weights
    sum to one, sum_n p_n (W_v x_n + b_v) = W_v (sum_n p_n x_n) + b_v. The same function as OpenAI's
    (its parameters and their gradients), in about a twentieth of the multiply-adds at RN50's size
    (a batch of 64 on 2 CPU cores: 0.40 s down to 0.12 s)."""

    def __init__(self, grid: int, width: int, heads: int, out_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.positional_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (grid * grid + 1, width), param_dtype) * width**-0.5)
        dense = dict(std=width**-0.5, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = (Dense(width, width, **dense) for _ in range(3))
        self.c_proj = Dense(width, out_dim, **dense)
        self.heads = heads
        self.dtype = dtype

    def __call__(self, x):
        b, gh, gw, d = x.shape
        pos = self.positional_embedding[...]
        if pos.shape[0] != gh * gw + 1:
            raise ValueError(f"a {gh}x{gw} feature map (image of {gh * 32}px) does not fit the attention pool's "
                             f"{pos.shape[0] - 1} positions")
        x = x.reshape(b, gh * gw, d)
        x = (jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1) + pos.astype(x.dtype)[None]).astype(self.dtype)
        h, hd = self.heads, d // self.heads

        def heads(p):  # a projection's kernel [D, H, hd] and bias [H, hd]
            return (p.kernel[...].astype(self.dtype).reshape(d, h, hd),
                    p.bias[...].astype(self.dtype).reshape(h, hd))

        q = self.q_proj(x[:, 0]).reshape(b, h, hd) * jnp.asarray(hd**-0.5, self.dtype)  # [B, H, hd]
        wk, bk = heads(self.k_proj)
        scores = (jnp.einsum("bhd,bnd->bhn", jnp.einsum("bhe,dhe->bhd", q, wk), x)
                  + jnp.einsum("bhe,he->bh", q, bk)[..., None])  # [B, H, N]
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        wv, bv = heads(self.v_proj)
        out = jnp.einsum("bhd,dhe->bhe", jnp.einsum("bhn,bnd->bhd", probs, x), wv) + bv  # [B, H, hd]
        return self.c_proj(out.reshape(b, d))


class ModifiedResNet(nnx.Module):
    def __init__(self, c: ResNetConfig, embed_dim: int, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 remat: bool = False, rngs: nnx.Rngs):
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bn = dict(use_running_average=True, param_dtype=param_dtype)
        half = c.width // 2
        self.conv1 = Conv2d(3, half, 3, stride=2, **conv)
        self.bn1 = BatchNorm(half, **bn)
        self.conv2 = Conv2d(half, half, 3, **conv)
        self.bn2 = BatchNorm(half, **bn)
        self.conv3 = Conv2d(half, c.width, 3, **conv)
        self.bn3 = BatchNorm(c.width, **bn)
        inplanes = c.width
        for i, blocks in enumerate(c.layers):
            planes, stride = c.width * 2**i, 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(Bottleneck(inplanes, planes, stride if j == 0 else 1, **conv))
                inplanes = planes * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nnx.List(stage))
        self.attnpool = AttentionPool(c.grid, c.embed_width, c.heads, embed_dim, **conv)
        self.dtype, self.remat = dtype, remat

    def stages(self):
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def __call__(self, pixels):
        """[B, H, W, 3] normalized pixels -> [B, embed_dim] (the attention pool's projection)."""
        x = pixels.astype(self.dtype)
        x = jax.nn.relu(conv_bn(self.conv1, self.bn1, x))
        x = jax.nn.relu(conv_bn(self.conv2, self.bn2, x))
        x = jax.nn.relu(conv_bn(self.conv3, self.bn3, x))
        x = _avg_pool(x, 2)
        for stage in self.stages():
            for block in stage:
                x = nnx.remat(lambda blk, y: blk(y))(block, x) if self.remat else block(x)
        return self.attnpool(x)
