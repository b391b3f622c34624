"""DeiT: timm's ``VisionTransformer`` with a class token (no distillation token), in Flax NNX.

Parameter names are timm's (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.norm1``,
``blocks.N.attn.qkv`` (one fused q/k/v projection), ``blocks.N.attn.proj``, ``blocks.N.mlp.fc1``,
``norm``, ``head``) with Flax leaf names (``kernel``, ``bias``, ``scale``), so converting a timm or
DeiT state dict (``deit.weights``) is a table of renames and transposes.

Pre-LN blocks; LayerNorm (eps 1e-6) and softmax in float32; exact (erf) GELU. The features are the
class token after the final LayerNorm; ``head`` maps them to logits (``num_classes=0``: no head,
``__call__`` returns the features, as timm's ``Identity`` head does).

Stochastic depth and dropout, as DeiT trains: ``model.train()`` sets ``deterministic=False`` on the
model and its blocks; then every residual branch of block ``i`` is dropped per sample with
probability ``dpr[i] = linspace(0, drop_path, depth)[i]`` (survivors scaled by 1 / keep), and
``dropout`` (timm 0.3's ``drop_rate``) applies after the position embedding, the attention
projection and both MLP layers. The randomness comes from ``rngs.dropout()`` of the ``rngs``
passed to the call; ``model.eval()`` (and a fresh model) is deterministic and ignores ``rngs``.

Inputs are float pixels [B, H, W, 3] (NHWC) normalized with the checkpoint's statistics: ImageNet's
(``IMAGENET_MEAN`` / ``IMAGENET_STD``) for DeiT.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgist.models.conversion import resolve_preset
from jaxgist.models.layers import (Dense, LayerNorm, activation, constrain_activations, dot_product_attention,
                                   patch_matmul)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INIT_STD = 0.02  # timm's trunc_normal_(std=.02), whose bounds (+-2) lie 100 std out: a plain normal


@dataclasses.dataclass(frozen=True)
class DeiTConfig:
    image_size: int = 224
    patch: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0: no head (features only)
    eps: float = 1e-6
    qkv_bias: bool = True
    drop_path: float = 0.0  # stochastic depth rate of the last block (linearly from 0 at the first)
    dropout: float = 0.0
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: bool = False  # rematerialize each block in the backward pass

    def __post_init__(self):
        problems = []
        if self.width % self.heads:
            problems.append(f"width={self.width} is not divisible by heads={self.heads}")
        if self.image_size % self.patch:
            problems.append(f"image_size={self.image_size} is not a multiple of patch={self.patch}")
        if min(self.image_size, self.patch, self.width, self.depth, self.heads) < 1:
            problems.append("image_size, patch, width, depth and heads must be positive")
        if self.num_classes < 0:
            problems.append(f"num_classes={self.num_classes} is negative")
        if self.mlp_dim < 1:
            problems.append(f"mlp_ratio={self.mlp_ratio} gives no MLP width")
        for name in ("drop_path", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name}={getattr(self, name)} is not in [0, 1)")
        if problems:
            raise ValueError("invalid DeiTConfig: " + "; ".join(problems))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def mlp_dim(self) -> int:
        return int(math.floor(self.width * self.mlp_ratio + 1e-6))

    @property
    def drop_path_rates(self) -> tuple[float, ...]:
        """Block i's stochastic depth rate: ``linspace(0, drop_path, depth)`` (timm's ``dpr``)."""
        return tuple(float(r) for r in np.linspace(0.0, self.drop_path, self.depth))

    def replace(self, **kwargs) -> "DeiTConfig":
        return dataclasses.replace(self, **kwargs)


PRESETS: dict[str, DeiTConfig] = {
    "deit_tiny": DeiTConfig(width=192, depth=12, heads=3),
    "deit_small": DeiTConfig(width=384, depth=12, heads=6),
    "deit_b": DeiTConfig(width=768, depth=12, heads=12),
    "deit_b_384": DeiTConfig(image_size=384, width=768, depth=12, heads=12),
}
# timm's names of the same models
PRESETS["deit_tiny_patch16_224"] = PRESETS["deit_tiny"]
PRESETS["deit_small_patch16_224"] = PRESETS["deit_small"]
PRESETS["deit_base_patch16_224"] = PRESETS["deit_b"]
PRESETS["deit_base_patch16_384"] = PRESETS["deit_b_384"]


# ---------------------------------------------------------------------------------------------
# Randomness: dropout and stochastic depth
# ---------------------------------------------------------------------------------------------


def dropout(x, rate: float, key):
    """Elementwise dropout (survivors scaled by 1 / (1 - rate)); the identity when ``key`` is None."""
    if key is None or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, x.shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def drop_path(x, rate: float, key):
    """Stochastic depth on a residual branch ``x`` [B, ...]: each sample's whole branch is zeroed with
    probability ``rate``, the others scaled by 1 / (1 - rate); the identity when ``key`` is None."""
    if key is None or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class PatchProjection(nnx.Module):
    """A convolution with kernel = stride = patch (``kernel`` (p, p, 3, D) as ``nnx.Conv`` stores it,
    ``bias`` (D,)), run as one matmul over the flattened patches. PyTorch's default Conv2d init."""

    def __init__(self, patch: int, channels: int, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        bound = (patch * patch * channels) ** -0.5
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (patch, patch, channels, width), param_dtype,
                                                   -bound, bound))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (width,), param_dtype, -bound, bound))
        self.dtype = dtype

    def __call__(self, pixels):
        """[B, H, W, C] -> [B, (H/p) * (W/p), D], patches in row-major order."""
        y = patch_matmul(pixels, self.kernel[...], self.dtype)
        b, gh, gw, d = y.shape
        return (y + self.bias[...].astype(self.dtype)).reshape(b, gh * gw, d)


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: DeiTConfig, *, rngs: nnx.Rngs):
        self.proj = PatchProjection(cfg.patch, 3, cfg.width, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, pixels):
        return self.proj(pixels)


class Attention(nnx.Module):
    """Multi-head self-attention with timm's fused ``qkv`` projection (output columns: q, k, v, each
    head-major) and output ``proj``. Softmax in float32."""

    def __init__(self, cfg: DeiTConfig, *, rngs: nnx.Rngs):
        numerics = dict(std=INIT_STD, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.qkv = Dense(cfg.width, 3 * cfg.width, use_bias=cfg.qkv_bias, **numerics)
        self.proj = Dense(cfg.width, cfg.width, **numerics)
        self.heads = cfg.heads

    def __call__(self, x, *, cls_only: bool = False):
        """x [B, N, D] -> [B, N, D]; with ``cls_only`` only the class token attends ([B, 1, D])."""
        b, n, d = x.shape
        h = self.heads
        hd = d // h
        qkv = self.qkv(x).reshape(b, n, 3, h, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if cls_only:
            q = q[:, :1]
        return self.proj(dot_product_attention(q, k, v))


class Mlp(nnx.Module):
    def __init__(self, cfg: DeiTConfig, *, rngs: nnx.Rngs):
        numerics = dict(std=INIT_STD, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.fc1 = Dense(cfg.width, cfg.mlp_dim, **numerics)
        self.fc2 = Dense(cfg.mlp_dim, cfg.width, **numerics)

    def __call__(self, x, *, rate: float = 0.0, keys=(None, None)):
        x = dropout(activation("gelu")(self.fc1(x)), rate, keys[0])
        return dropout(self.fc2(x), rate, keys[1])


class Block(nnx.Module):
    """Pre-LN block: x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))."""

    def __init__(self, cfg: DeiTConfig, drop_path_rate: float, *, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(cfg.width, cfg.eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = LayerNorm(cfg.width, cfg.eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.drop_path_rate = float(drop_path_rate)
        self.dropout_rate = float(cfg.dropout)
        self.deterministic = True

    @property
    def stochastic(self) -> bool:
        """Whether a call draws random numbers (training mode and a positive rate)."""
        return not self.deterministic and (self.drop_path_rate > 0.0 or self.dropout_rate > 0.0)

    def __call__(self, x, key=None, *, cls_only: bool = False):
        """x [B, N, D]; ``key``: a PRNG key, needed when ``stochastic``. With ``cls_only`` only the
        class token is computed ([B, 1, D]): exact when nothing after this block reads the others."""
        if not self.stochastic:
            key = None
        elif key is None:
            raise ValueError("a DeiT block in training mode with drop_path or dropout > 0 needs a PRNG key")
        keys = jax.random.split(key, 5) if key is not None else (None,) * 5
        y = dropout(self.attn(self.norm1(x), cls_only=cls_only), self.dropout_rate, keys[0])
        x = (x[:, :1] if cls_only else x) + drop_path(y, self.drop_path_rate, keys[1])
        y = self.mlp(self.norm2(x), rate=self.dropout_rate, keys=keys[2:4])
        return x + drop_path(y, self.drop_path_rate, keys[4])


class DeiT(nnx.Module):
    """timm's VisionTransformer with a class token, under timm's parameter names."""

    def __init__(self, cfg: DeiTConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, cfg.width), cfg.param_dtype) * INIT_STD)
        self.pos_embed = nnx.Param(
            jax.random.normal(rngs.params(), (1, cfg.num_patches + 1, cfg.width), cfg.param_dtype) * INIT_STD)
        self.blocks = nnx.List([Block(cfg, rate, rngs=rngs) for rate in cfg.drop_path_rates])
        self.norm = LayerNorm(cfg.width, cfg.eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.head = new_head(cfg, rngs) if cfg.num_classes else None
        self.deterministic = True

    @property
    def feature_dim(self) -> int:
        return self.config.width

    def _needs_rngs(self) -> bool:
        return (not self.deterministic and self.config.dropout > 0.0) or any(b.stochastic for b in self.blocks)

    def embed(self, pixels):
        """[B, H, W, 3] -> tokens [B, 1 + N, D]: the class token, then the patches, plus positions."""
        x = self.patch_embed(pixels)
        b, n, d = x.shape
        pos = self.pos_embed[...]
        if pos.shape[1] != n + 1:
            raise ValueError(f"an image of {pixels.shape[1]}x{pixels.shape[2]} pixels gives {n} patches; the model "
                             f"has positions for {pos.shape[1] - 1} ({self.config.image_size}px)")
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, d))
        return jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)

    def features(self, pixels, *, rngs: nnx.Rngs | None = None):
        """[B, H, W, 3] normalized pixels -> the class token after the final LayerNorm, [B, D] (float32).

        In training mode (``model.train()``) with ``drop_path`` or ``dropout`` > 0 this draws one key
        from ``rngs.dropout()``; otherwise ``rngs`` is not used."""
        key = None
        if self._needs_rngs():
            if rngs is None:
                raise ValueError(
                    f"DeiT is in training mode with drop_path={self.config.drop_path}, dropout={self.config.dropout}: "
                    "pass rngs=nnx.Rngs(dropout=seed) to the call, or call model.eval() for deterministic outputs")
            key = rngs.dropout()
        keys = list(jax.random.split(key, len(self.blocks) + 1)) if key is not None else [None] * (len(self.blocks) + 1)
        x = self.embed(pixels)
        if not self.deterministic:
            x = dropout(x, self.config.dropout, keys[-1])

        def run(block, x, key):
            return block(x, key)

        def run_last(block, x, key):  # only the class token: nothing after the last block reads the others
            return block(x, key, cls_only=True)

        if self.config.remat:
            run, run_last = nnx.remat(run), nnx.remat(run_last)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = (run_last if i == last else run)(block, constrain_activations(x), keys[i] if block.stochastic else None)
        return self.norm(x[:, 0]).astype(jnp.float32)

    def __call__(self, pixels, *, rngs: nnx.Rngs | None = None):
        """[B, H, W, 3] normalized pixels -> logits [B, num_classes] (float32); the features when the
        model has no head (``num_classes=0``)."""
        x = self.features(pixels, rngs=rngs)
        if self.head is None:
            return x
        return self.head(x.astype(self.config.dtype)).astype(jnp.float32)


def new_head(cfg: DeiTConfig, rngs: nnx.Rngs) -> Dense:
    """A freshly initialized classifier ``head`` (width -> num_classes), timm's init."""
    return Dense(cfg.width, cfg.num_classes, std=INIT_STD, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------


def resolve_config(preset_or_config, **overrides) -> DeiTConfig:
    """A preset name ("deit_tiny", "deit_small", "deit_b", "deit_b_384", or timm's names of them), a
    DeiTConfig, or a dict of DeiTConfig fields; then ``overrides`` (DeiTConfig fields)."""
    return resolve_preset(preset_or_config, PRESETS, DeiTConfig, "DeiT", **overrides)


def create(preset_or_config="deit_b", *, num_classes: int | None = None, seed: int = 0, dtype=None,
           param_dtype=None, **overrides) -> DeiT:
    """A randomly initialized DeiT (timm's init). ``dtype``: the compute dtype (e.g. ``jnp.bfloat16``);
    ``param_dtype``: the parameters' (float32 by default); overrides are other DeiTConfig fields
    (``drop_path``, ``remat``, ...)."""
    for name, value in (("num_classes", num_classes), ("dtype", dtype), ("param_dtype", param_dtype)):
        if value is not None:
            overrides[name] = value
    return DeiT(resolve_config(preset_or_config, **overrides), rngs=nnx.Rngs(seed))


def abstract(cfg: DeiTConfig) -> DeiT:
    """A DeiT whose parameters are shape/dtype placeholders (no memory, no init cost)."""
    return nnx.eval_shape(lambda: DeiT(resolve_config(cfg), rngs=nnx.Rngs(0)))


# Logical axes of each parameter by the last components of its path (the longest match wins). Sharding
# rules (``jaxgist.training.parallel``) map these names to mesh axes. "embed" is the width, "heads"
# the attention width (q/k/v outputs), "mlp" the MLP hidden width, "pos" the token positions,
# "classes" the head's outputs.
_LOGICAL_AXES = {
    ("patch_embed", "proj", "kernel"): (None, None, None, "embed"),
    ("patch_embed", "proj", "bias"): ("embed",),
    ("attn", "qkv", "kernel"): ("embed", "heads"), ("attn", "qkv", "bias"): ("heads",),
    ("attn", "proj", "kernel"): ("heads", "embed"), ("attn", "proj", "bias"): ("embed",),
    ("fc1", "kernel"): ("embed", "mlp"), ("fc1", "bias"): ("mlp",),
    ("fc2", "kernel"): ("mlp", "embed"), ("fc2", "bias"): ("embed",),
    ("head", "kernel"): ("embed", "classes"), ("head", "bias"): ("classes",),
    ("cls_token",): (None, None, "embed"),
    ("pos_embed",): (None, "pos", "embed"),
}
_NORMS = ("norm1", "norm2", "norm")


def logical_axes(path) -> tuple[str | None, ...]:
    """The logical axis names of the DeiT parameter at ``path`` (a tuple of keys, as in ``nnx.State``)."""
    names = tuple(str(p) for p in path)
    if names and names[-1] == "value":  # a leaf inside an nnx.Variable
        names = names[:-1]
    for n in (3, 2, 1):
        if len(names) >= n and names[-n:] in _LOGICAL_AXES:
            return _LOGICAL_AXES[names[-n:]]
    if len(names) >= 2 and names[-2] in _NORMS and names[-1] in ("scale", "bias"):
        return ("norm",)
    raise KeyError(f"no logical axes for DeiT parameter {'.'.join(names)!r}")
