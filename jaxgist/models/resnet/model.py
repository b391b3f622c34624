"""torchvision's ResNet (v1.5: a bottleneck strides in its 3x3 ``conv2``) in Flax NNX, channels-last.

    model = ResNet(PRESETS["resnet50"], rngs=nnx.Rngs(0))
    logits = model(pixels)                 # [B, H, W, 3] normalized -> [B, num_classes] (float32)
    feats = model.features(pixels)         # [B, feature_dim]: globally average-pooled, before ``fc``

Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv2``, ``layer2.0.downsample.0``,
``fc``) with Flax leaf names (``kernel`` (kh, kw, in, out), BatchNorm ``scale``/``bias`` and statistics
``mean``/``var``), so checkpoint conversion (``resnet.weights``) is a table. Convolutions pad
explicitly as PyTorch does (``SAME`` differs for stride 2), the stem's max pool pads with -inf.
BatchNorm is PyTorch's (``models.layers.BatchNorm``): running statistics by default (eval mode),
batch statistics and PyTorch's running-average update after ``model.train()``; ``model.eval()``
switches back. Parameters are stored in ``param_dtype``, convolutions run in ``dtype``; BatchNorm
and the global pool run in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgist.models.clip.resnet import conv_bn
from jaxgist.models.conversion import resolve_preset
from jaxgist.models.layers import BatchNorm, Dense

BLOCKS = ("basic", "bottleneck")


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """A torchvision ResNet. ``width``: the stem's channels and the first stage's planes (64; stage i
    has ``width * 2**i`` planes, a bottleneck outputs 4x that). ``num_classes`` 0: no ``fc``, the model
    returns its pooled features. ``zero_init_residual``: each block's last BatchNorm starts at scale 0.
    ``downsample_in_bottleneck``: ResNet v1 (HF's option of that name), the stride on a bottleneck's
    first 1x1 convolution instead of its 3x3 (v1.5, torchvision's). ``image_size`` is informational
    (any size works; global pooling)."""

    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    num_classes: int = 1000
    width: int = 64
    block: str = "bottleneck"
    image_size: int = 224
    zero_init_residual: bool = False
    downsample_in_bottleneck: bool = False

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        problems = []
        if len(self.layers) != 4 or min(self.layers, default=0) < 1:
            problems.append(f"layers={self.layers} must be 4 positive block counts")
        if self.block not in BLOCKS:
            problems.append(f"block={self.block!r} is not one of {BLOCKS}")
        if self.width < 1:
            problems.append(f"width={self.width} must be positive")
        if self.num_classes < 0:
            problems.append(f"num_classes={self.num_classes} must be >= 0 (0: no classifier)")
        if self.downsample_in_bottleneck and self.block != "bottleneck":
            problems.append("downsample_in_bottleneck applies to bottleneck blocks only")
        if problems:
            raise ValueError("invalid ResNetConfig: " + "; ".join(problems))

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def feature_dim(self) -> int:
        """Channels of the last stage: the pooled features' size (2048 for ResNet-50, 512 for ResNet-18)."""
        return self.width * 8 * self.expansion

    def replace(self, **kwargs) -> "ResNetConfig":
        return dataclasses.replace(self, **kwargs)


PRESETS: dict[str, ResNetConfig] = {
    "resnet18": ResNetConfig(layers=(2, 2, 2, 2), block="basic"),
    "resnet34": ResNetConfig(layers=(3, 4, 6, 3), block="basic"),
    "resnet50": ResNetConfig(layers=(3, 4, 6, 3)),
    "resnet101": ResNetConfig(layers=(3, 4, 23, 3)),
    "resnet152": ResNetConfig(layers=(3, 8, 36, 3)),
}


def resolve_config(preset_or_config="resnet50", **overrides) -> ResNetConfig:
    """A preset name ("resnet18" ... "resnet152"), a ResNetConfig, or a dict of its fields; then overrides."""
    return resolve_preset(preset_or_config, PRESETS, ResNetConfig, "ResNet", **overrides)


def _bucket(n: int) -> int:
    return 1 << (n - 1).bit_length()


def kaiming_normal(key, shape, dtype):
    """torchvision's convolution init, ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``: normal
    with std sqrt(2 / (out * kh * kw)), for a kernel (kh, kw, in, out). Drawn as the start of a normal
    vector of the next power-of-two length: one compiled sampler per size class rather than one per
    kernel shape (creating a model eagerly on CPU is otherwise mostly compiling random samplers)."""
    kh, kw, _, cout = shape
    flat = jax.random.normal(key, (_bucket(math.prod(shape)),), jnp.float32)
    return _first(flat, math.sqrt(2.0 / (kh * kw * cout)), 0.0, tuple(shape), jnp.dtype(dtype))


def torch_linear_uniform(key, shape, fan_in: int, dtype):
    """PyTorch ``nn.Linear``'s default init of its weight and bias: uniform in +-1/sqrt(fan_in) (drawn
    as ``kaiming_normal`` is, from a power-of-two-long vector)."""
    bound = 1.0 / math.sqrt(fan_in)
    flat = jax.random.uniform(key, (_bucket(math.prod(shape)),), jnp.float32)
    return _first(flat, 2.0 * bound, -bound, tuple(shape), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _first(flat, scale, shift, shape, dtype):
    return (flat[: math.prod(shape)].reshape(shape) * scale + shift).astype(dtype)


class Conv2d(nnx.Module):
    """A bias-free convolution with PyTorch's explicit padding ``size // 2``; ``kernel`` (kh, kw, in, out).
    1x1 kernels run as one [N*H*W, in] x [in, out] matmul (after taking every ``stride``-th pixel): on
    CPU XLA's matmul is several times faster than its convolution. ``__call__(x, kernel)`` accepts
    another kernel of the same shape (``clip.resnet.conv_bn`` folds eval-mode BatchNorm into it)."""

    def __init__(self, cin: int, cout: int, size: int, *, stride: int = 1, dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(kaiming_normal(rngs.params(), (size, size, cin, cout), param_dtype))
        self.stride, self.dtype = stride, dtype

    def __call__(self, x, kernel=None):
        kernel = (self.kernel[...] if kernel is None else kernel).astype(self.dtype)
        x = x.astype(self.dtype)
        kh, kw, cin, cout = kernel.shape
        s = self.stride
        if kh == kw == 1:
            if s > 1:
                x = x[:, ::s, ::s]
            return (x.reshape(-1, cin) @ kernel.reshape(cin, cout)).reshape(*x.shape[:-1], cout)
        return conv_kxk(x, kernel, s)


def _patches(x, kh: int, kw: int, stride: int):
    """[B, Ho, Wo, kh * kw * C]: each output pixel's receptive field (PyTorch's padding ``k // 2``), in
    the kernel's (kh, kw, in) order."""
    ph, pw = kh // 2, kw // 2
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    ho = (x.shape[1] + 2 * ph - kh) // stride + 1
    wo = (x.shape[2] + 2 * pw - kw) // stride + 1
    return jnp.concatenate([xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
                            for i in range(kh) for j in range(kw)], axis=-1)


def _conv(x, kernel, stride: int):
    kh, kw = kernel.shape[:2]
    pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_kxk(x, kernel, stride: int):
    """A k x k convolution (PyTorch padding ``k // 2``) whose kernel gradient is one matmul of the input's
    patches with the output gradient: XLA's CPU backward convolution for the kernel is 2-4x slower at
    ResNet's early stages (the input gradient stays XLA's own)."""
    return _conv(x, kernel, stride)


def _conv_kxk_fwd(x, kernel, stride):
    return _conv(x, kernel, stride), (x, kernel)


def _conv_kxk_bwd(stride, saved, dy):
    x, kernel = saved
    kh, kw, cin, cout = kernel.shape
    _, input_vjp = jax.vjp(lambda v: _conv(v, kernel, stride), x)
    (dx,) = input_vjp(dy)  # dropped by XLA where nothing needs it (the image)
    p = _patches(x, kh, kw, stride).reshape(-1, kh * kw * cin)
    dk = (p.T @ dy.reshape(-1, cout)).reshape(kernel.shape)
    return dx, dk.astype(kernel.dtype)


conv_kxk.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)


def max_pool(x, size: int = 3, stride: int = 2, pad: int = 1):
    """PyTorch's ``MaxPool2d(size, stride, pad)`` (floor mode): the border padded with -inf. The maximum of
    the window's shifted strided slices: its gradient is elementwise (XLA's CPU select-and-scatter,
    ``reduce_window``'s, is 2-3x slower); ties (measure zero after a convolution) share the gradient."""
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
    ho = (x.shape[1] + 2 * pad - size) // stride + 1
    wo = (x.shape[2] + 2 * pad - size) // stride + 1
    out = None
    for i in range(size):
        for j in range(size):
            win = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            out = win if out is None else jnp.maximum(out, win)
    return out


def _downsample(inplanes, outplanes, stride, conv, bn):
    """torchvision's shortcut projection (``downsample.0`` conv 1x1, ``downsample.1`` BatchNorm) where
    the block strides or changes channels; else None (the identity)."""
    if stride == 1 and inplanes == outplanes:
        return None
    return nnx.List([Conv2d(inplanes, outplanes, 1, stride=stride, **conv), BatchNorm(outplanes, **bn)])


def _shortcut(downsample, x):
    if downsample is None:
        return x
    conv, bn = downsample
    return conv_bn(conv, bn, x)


class BasicBlock(nnx.Module):
    """3x3 (stride) -> BN -> relu -> 3x3 -> BN, plus the shortcut, then relu (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, cfg: ResNetConfig, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bn = dict(use_running_average=True, param_dtype=param_dtype)
        self.conv1 = Conv2d(inplanes, planes, 3, stride=stride, **conv)
        self.bn1 = BatchNorm(planes, **bn)
        self.conv2 = Conv2d(planes, planes, 3, **conv)
        self.bn2 = BatchNorm(planes, scale_init=0.0 if cfg.zero_init_residual else 1.0, **bn)
        self.downsample = _downsample(inplanes, planes, stride, conv, bn)

    def __call__(self, x):
        out = jax.nn.relu(conv_bn(self.conv1, self.bn1, x))
        out = conv_bn(self.conv2, self.bn2, out)
        return jax.nn.relu(out + _shortcut(self.downsample, x).astype(out.dtype))


class Bottleneck(nnx.Module):
    """1x1 -> BN -> relu -> 3x3 (stride, v1.5) -> BN -> relu -> 1x1 (4x planes) -> BN, plus the shortcut,
    then relu (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, cfg: ResNetConfig, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bn = dict(use_running_average=True, param_dtype=param_dtype)
        v1 = cfg.downsample_in_bottleneck
        self.conv1 = Conv2d(inplanes, planes, 1, stride=stride if v1 else 1, **conv)
        self.bn1 = BatchNorm(planes, **bn)
        self.conv2 = Conv2d(planes, planes, 3, stride=1 if v1 else stride, **conv)
        self.bn2 = BatchNorm(planes, **bn)
        self.conv3 = Conv2d(planes, planes * self.expansion, 1, **conv)
        self.bn3 = BatchNorm(planes * self.expansion, scale_init=0.0 if cfg.zero_init_residual else 1.0, **bn)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride, conv, bn)

    def __call__(self, x):
        out = jax.nn.relu(conv_bn(self.conv1, self.bn1, x))
        out = jax.nn.relu(conv_bn(self.conv2, self.bn2, out))
        out = conv_bn(self.conv3, self.bn3, out)
        return jax.nn.relu(out + _shortcut(self.downsample, x).astype(out.dtype))


def classifier(din: int, num_classes: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> Dense | None:
    """``fc`` with PyTorch ``nn.Linear``'s default init (weight and bias uniform in +-1/sqrt(din)); None
    for ``num_classes`` 0."""
    if num_classes == 0:
        return None
    fc = nnx.eval_shape(lambda: Dense(din, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    fc.kernel = nnx.Param(torch_linear_uniform(rngs.params(), (din, num_classes), din, param_dtype))
    fc.bias = nnx.Param(torch_linear_uniform(rngs.params(), (num_classes,), din, param_dtype))
    return fc


class ResNet(nnx.Module):
    def __init__(self, cfg: ResNetConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 remat: bool = False, rngs: nnx.Rngs):
        self.config = cfg
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = Conv2d(3, cfg.width, 7, stride=2, **conv)
        self.bn1 = BatchNorm(cfg.width, use_running_average=True, param_dtype=param_dtype)
        block = Bottleneck if cfg.block == "bottleneck" else BasicBlock
        inplanes = cfg.width
        for i, blocks in enumerate(cfg.layers):
            planes, stride = cfg.width * 2**i, 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(block(inplanes, planes, stride if j == 0 else 1, cfg, **conv))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nnx.List(stage))
        self.fc = classifier(inplanes, cfg.num_classes, **conv)
        self.dtype, self.param_dtype, self.remat = dtype, param_dtype, remat

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def stages(self):
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def features(self, pixels):
        """[B, H, W, 3] normalized pixels -> [B, feature_dim] globally average-pooled features (float32)."""
        x = pixels.astype(self.dtype)
        x = jax.nn.relu(conv_bn(self.conv1, self.bn1, x))
        x = max_pool(x)
        run = nnx.remat(lambda blk, y: blk(y)) if self.remat else (lambda blk, y: blk(y))
        for stage in self.stages():
            for block in stage:
                x = run(block, x)
        return x.astype(jnp.float32).mean(axis=(1, 2))

    def __call__(self, pixels):
        """[B, H, W, 3] normalized pixels -> logits [B, num_classes] (float32); the pooled features when
        the model has no classifier (``num_classes`` 0)."""
        feats = self.features(pixels)
        if self.fc is None:
            return feats
        return self.fc(feats).astype(jnp.float32)

    def replace_head(self, num_classes: int, *, seed: int = 0) -> None:
        """A fresh ``fc`` for ``num_classes`` classes (0: none), the backbone kept; updates ``config``."""
        self.fc = classifier(self.feature_dim, num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                             rngs=nnx.Rngs(seed))
        self.config = self.config.replace(num_classes=num_classes)


def create(preset_or_config="resnet50", *, num_classes: int | None = None, seed: int = 0, dtype: Any = jnp.float32,
           param_dtype: Any = jnp.float32, remat: bool = False, **overrides) -> ResNet:
    """A randomly initialized ResNet (torchvision's init). ``dtype``: the compute dtype (e.g. bfloat16);
    ``param_dtype``: the parameters'; overrides are ResNetConfig fields."""
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    cfg = resolve_config(preset_or_config, **overrides)
    return ResNet(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(seed))


def abstract(cfg: ResNetConfig | str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
             remat: bool = False) -> ResNet:
    """A ResNet whose parameters are shape/dtype placeholders (no memory, no init cost)."""
    cfg = resolve_config(cfg)
    return nnx.eval_shape(lambda: ResNet(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)))


_CONVS = ("conv1", "conv2", "conv3")
_BNS = ("bn1", "bn2", "bn3")


def logical_axes(path) -> tuple[str | None, ...]:
    """The logical axis names of the parameter or BatchNorm statistic at ``path`` (a tuple of keys, as
    in ``nnx.State``): convolution kernels (kh, kw, in, out) are split by output channels ("embed"),
    BatchNorm vectors are "norm", the classifier is ("embed", "classes"). KeyError for anything else."""
    names = tuple(str(p) for p in path)
    if names and names[-1] == "value":  # a leaf inside an nnx.Variable
        names = names[:-1]
    if len(names) >= 2:
        leaf, owner = names[-1], names[-2]
        in_downsample = len(names) >= 3 and names[-3] == "downsample"
        if leaf == "kernel" and (owner in _CONVS or (in_downsample and owner == "0")):
            return (None, None, None, "embed")
        if leaf in ("scale", "bias", "mean", "var") and (owner in _BNS or (in_downsample and owner == "1")):
            return ("norm",)
        if names == ("fc", "kernel"):
            return ("embed", "classes")
        if names == ("fc", "bias"):
            return ("classes",)
    raise KeyError(f"no logical axes for ResNet parameter {'.'.join(names)!r}")
