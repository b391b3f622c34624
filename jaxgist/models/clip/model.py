"""CLIP in Flax NNX: a ViT or ModifiedResNet (``clip/resnet.py``) image tower and a causal text transformer.

Parameter names follow Hugging Face's ``CLIPModel`` (``vision_model.encoder.layers.N.self_attn.q_proj``
...), so weight conversion (``clip.weights``) is a table of renames and transposes; a ResNet tower
keeps OpenAI's names under ``vision_model.`` and has no ``visual_projection`` (its attention pool
projects). The transformer layers are the shared ones of ``jaxgist.models.layers``.

Numerics: parameters are stored in ``param_dtype`` (float32 by default) and matmuls run in
``dtype`` (the compute dtype, e.g. bfloat16); LayerNorm and softmax always run in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgist.core import arrays
from jaxgist.models.clip.resnet import ModifiedResNet, ResNetConfig
from jaxgist.models.layers import ACTIVATIONS, Dense, Encoder, LayerNorm, patch_matmul

LOGIT_SCALE_MAX = math.log(100.0)
# The image statistics OpenAI's CLIP was trained with, which jaxgist's input pipeline normalizes with.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid**2 + 1


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # None: pool at the argmax of the ids (OpenAI's convention: the end token has the largest id).
    # An int: pool at the first occurrence of that id.
    eos_token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    vision: VisionConfig | ResNetConfig = VisionConfig()
    text: TextConfig = TextConfig()
    embed_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: bool = False  # rematerialize transformer blocks in the backward pass
    # the per-channel statistics the checkpoint's images were normalized with: inputs, normalized with
    # OpenAI's, are mapped to these at the start of the image tower when they differ
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    image_std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self):
        problems = self.vision.problems() if self.is_resnet else []
        for name, tower in (("text", self.text),) if self.is_resnet else (("vision", self.vision), ("text", self.text)):
            if tower.width % tower.heads:
                problems.append(f"{name}.width={tower.width} is not divisible by {name}.heads={tower.heads}")
            if tower.act not in ACTIVATIONS:
                problems.append(f"{name}.act={tower.act!r} is not one of {ACTIVATIONS}")
        if not self.is_resnet and self.vision.image_size % self.vision.patch_size:
            problems.append(
                f"vision.image_size={self.vision.image_size} is not a multiple of "
                f"vision.patch_size={self.vision.patch_size}"
            )
        if problems:
            raise ValueError("invalid CLIPConfig: " + "; ".join(problems))

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.vision, ResNetConfig)

    def replace(self, **kwargs) -> "CLIPConfig":
        return dataclasses.replace(self, **kwargs)


def _preset(image_size, patch, v_width, v_layers, v_heads, t_width, t_heads, embed_dim, t_layers=12):
    return CLIPConfig(
        vision=VisionConfig(image_size=image_size, patch_size=patch, width=v_width, layers=v_layers,
                            heads=v_heads, mlp_dim=4 * v_width),
        text=TextConfig(width=t_width, layers=t_layers, heads=t_heads, mlp_dim=4 * t_width),
        embed_dim=embed_dim,
    )


def _resnet_preset(image_size, layers, width, t_width, t_heads, embed_dim):
    return CLIPConfig(vision=ResNetConfig(image_size=image_size, layers=layers, width=width),
                      text=TextConfig(width=t_width, layers=12, heads=t_heads, mlp_dim=4 * t_width), embed_dim=embed_dim)


# The published OpenAI CLIP sizes.
PRESETS: dict[str, CLIPConfig] = {
    "ViT-B/32": _preset(224, 32, 768, 12, 12, 512, 8, 512),
    "ViT-B/16": _preset(224, 16, 768, 12, 12, 512, 8, 512),
    "ViT-L/14": _preset(224, 14, 1024, 24, 16, 768, 12, 768),
    "ViT-L/14@336px": _preset(336, 14, 1024, 24, 16, 768, 12, 768),
    "RN50": _resnet_preset(224, (3, 4, 6, 3), 64, 512, 8, 1024),
    "RN101": _resnet_preset(224, (3, 4, 23, 3), 64, 512, 8, 512),
    "RN50x4": _resnet_preset(288, (4, 6, 10, 6), 80, 640, 10, 640),
    "RN50x16": _resnet_preset(384, (6, 8, 18, 8), 96, 768, 12, 768),
    "RN50x64": _resnet_preset(448, (3, 15, 36, 10), 128, 1024, 16, 1024),
}


class VisionEmbeddings(nnx.Module):
    """Patch embedding (an ``nnx.Conv`` holding the kernel, run as ``layers.patch_matmul``), the class
    token prepended, and positional embeddings."""

    def __init__(self, c: VisionConfig, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.patch_embedding = nnx.Conv(
            3, c.width, kernel_size=(c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
            padding="VALID", use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=jax.nn.initializers.normal(0.02), rngs=rngs,
        )
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (c.width,), cfg.param_dtype) * 0.02)
        self.position_embedding = nnx.Embed(
            c.num_positions, c.width, param_dtype=cfg.param_dtype,
            embedding_init=jax.nn.initializers.normal(0.02), rngs=rngs,
        )
        self.dtype = cfg.dtype

    def __call__(self, pixels):
        x = patch_matmul(pixels, self.patch_embedding.kernel[...], self.dtype)  # [B, g, g, D]
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1)
        pos = self.position_embedding.embedding[...]
        if pos.shape[0] != x.shape[1]:
            raise ValueError(
                f"image of {gh * self.patch_embedding.kernel_size[0]}px gives {x.shape[1]} tokens; "
                f"the model has {pos.shape[0]} positions"
            )
        return x + pos.astype(x.dtype)[None]


class VisionTransformer(nnx.Module):
    def __init__(self, c: VisionConfig, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.embeddings = VisionEmbeddings(c, cfg, rngs=rngs)
        self.pre_layrnorm = LayerNorm(c.width, c.layer_norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.encoder = Encoder(c.width, c.layers, c.heads, c.mlp_dim, c.act, c.layer_norm_eps, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, remat=cfg.remat, rngs=rngs)
        self.post_layernorm = LayerNorm(c.width, c.layer_norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, pixels, *, pooled_only: bool = False):
        """pixels [B, H, W, 3] -> (last hidden states [B, N, D] or None, pooled [B, D] after post-LN)."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        if pooled_only:
            x = self.encoder(x, causal=False, pool_index=jnp.zeros((x.shape[0],), jnp.int32))
            return None, self.post_layernorm(x[:, 0])
        x = self.encoder(x, causal=False)
        return x, self.post_layernorm(x[:, 0])


class TextEmbeddings(nnx.Module):
    def __init__(self, c: TextConfig, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(c.vocab_size, c.width, param_dtype=cfg.param_dtype,
                                         embedding_init=jax.nn.initializers.normal(0.02), rngs=rngs)
        self.position_embedding = nnx.Embed(c.context_length, c.width, param_dtype=cfg.param_dtype,
                                            embedding_init=jax.nn.initializers.normal(0.01), rngs=rngs)
        self.dtype = cfg.dtype

    def __call__(self, ids):
        length = ids.shape[1]
        pos = self.position_embedding.embedding[...]
        if length > pos.shape[0]:
            raise ValueError(f"text of {length} tokens exceeds the context length {pos.shape[0]}")
        x = jnp.take(self.token_embedding.embedding[...], ids, axis=0) + pos[:length][None]
        return x.astype(self.dtype)


class TextTransformer(nnx.Module):
    def __init__(self, c: TextConfig, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.embeddings = TextEmbeddings(c, cfg, rngs=rngs)
        self.encoder = Encoder(c.width, c.layers, c.heads, c.mlp_dim, c.act, c.layer_norm_eps, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, remat=cfg.remat, rngs=rngs)
        self.final_layer_norm = LayerNorm(c.width, c.layer_norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.eos_token_id = c.eos_token_id

    def pool_index(self, ids):
        if self.eos_token_id is None:
            return jnp.argmax(ids, axis=-1).astype(jnp.int32)
        return jnp.argmax(ids == self.eos_token_id, axis=-1).astype(jnp.int32)

    def __call__(self, ids, *, pooled_only: bool = False):
        """ids [B, L] -> (last hidden states after final LN [B, L, D] or None, pooled [B, D])."""
        index = self.pool_index(ids)
        x = self.embeddings(ids)
        if pooled_only:
            x = self.encoder(x, causal=True, pool_index=index)
            return None, self.final_layer_norm(x[:, 0])
        x = self.final_layer_norm(self.encoder(x, causal=True))
        pooled = jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
        return x, pooled


class CLIP(nnx.Module):
    """CLIP with HF parameter names. Images are NHWC float pixels, normalized with OpenAI's CLIP
    statistics (as jaxgist's pipeline does); ``renormalize`` maps them to the checkpoint's own."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        numerics = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        if cfg.is_resnet:
            self.vision_model = ModifiedResNet(cfg.vision, cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                               remat=cfg.remat, rngs=rngs)
        else:
            self.vision_model = VisionTransformer(cfg.vision, cfg, rngs=rngs)
        self.text_model = TextTransformer(cfg.text, cfg, rngs=rngs)
        # (created in this order so that a seed gives the same ViT weights as before ResNet towers existed)
        self.visual_projection = None if cfg.is_resnet else Dense(  # a ResNet's attention pool projects itself
            cfg.vision.width, cfg.embed_dim, std=cfg.vision.width**-0.5, **numerics)
        self.text_projection = Dense(cfg.text.width, cfg.embed_dim, std=cfg.text.width**-0.5, **numerics)
        self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, cfg.param_dtype))

    def encode_image(self, pixels):
        """[B, H, W, 3] normalized pixels -> projected, unnormalized embeddings [B, E] (float32)."""
        if self.vision_model is None:
            raise ValueError("this CLIP has no image tower (made text-only by clip.text_only): it encodes text only")
        pixels = self.renormalize(pixels)
        if self.visual_projection is None:
            return self.vision_model(pixels).astype(jnp.float32)
        _, pooled = self.vision_model(pixels, pooled_only=True)
        return self.visual_projection(pooled).astype(jnp.float32)

    def renormalize(self, pixels):
        """Pixels normalized with OpenAI's statistics (the input pipeline's) -> normalized with the
        checkpoint's ``config.image_mean`` / ``image_std`` (an affine map per channel; the identity,
        and no work, for OpenAI's)."""
        cfg = self.config
        if (tuple(cfg.image_mean), tuple(cfg.image_std)) == (OPENAI_MEAN, OPENAI_STD):
            return pixels
        mean, std = jnp.asarray(cfg.image_mean, jnp.float32), jnp.asarray(cfg.image_std, jnp.float32)
        scale = jnp.asarray(OPENAI_STD, jnp.float32) / std
        shift = (jnp.asarray(OPENAI_MEAN, jnp.float32) - mean) / std
        return (pixels.astype(jnp.float32) * scale + shift).astype(pixels.dtype)

    def encode_text(self, ids):
        """[B, L] int token ids -> projected, unnormalized embeddings [B, E] (float32)."""
        _, pooled = self.text_model(ids, pooled_only=True)
        return self.text_projection(pooled).astype(jnp.float32)

    def scale(self):
        """exp(logit_scale), with logit_scale clamped at ln(100)."""
        return jnp.exp(jnp.minimum(self.logit_scale[...].astype(jnp.float32), LOGIT_SCALE_MAX))

    def __call__(self, pixels, ids):
        """Returns (logits_per_image [B_img, B_txt], logits_per_text [B_txt, B_img])."""
        img = normalize(self.encode_image(pixels))
        txt = normalize(self.encode_text(ids))
        logits_per_text = self.scale() * txt @ img.T
        return logits_per_text.T, logits_per_text


def text_only(model: CLIP) -> CLIP:
    """``model`` without its image tower (in place; returned): a CLIP that only encodes text, such as a
    frozen reward model, then neither holds nor shards nor checkpoints the tower's weights.
    ``encode_image`` raises; ``encode_text`` and ``scale`` are unchanged. Works on abstract models."""
    model.vision_model = None
    model.visual_projection = None
    return model


def normalize(x, eps: float = 0.0):
    """L2-normalize the last axis (``jaxgist.core.arrays.l2_normalize``)."""
    return arrays.l2_normalize(jnp.asarray(x), eps=eps)


def resolve_config(preset_or_config, **overrides) -> CLIPConfig:
    """A preset name ("ViT-B/32", ...), a CLIPConfig, or a dict of CLIPConfig fields."""
    if isinstance(preset_or_config, CLIPConfig):
        cfg = preset_or_config
    elif isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(f"unknown CLIP preset {preset_or_config!r}; known: {sorted(PRESETS)}")
        cfg = PRESETS[preset_or_config]
    elif isinstance(preset_or_config, dict):
        d = dict(preset_or_config)
        v = dict(d.pop("vision", {}))
        # a ResNet tower is named by its four stage depths ("layers": [3, 4, 6, 3])
        vision = ResNetConfig(**v) if isinstance(v.get("layers"), (list, tuple)) else VisionConfig(**v)
        text = TextConfig(**d.pop("text", {}))
        cfg = CLIPConfig(vision=vision, text=text, **d)
    else:
        raise TypeError(f"expected a preset name, CLIPConfig or dict, got {type(preset_or_config).__name__}")
    return cfg.replace(**overrides) if overrides else cfg


def create(preset_or_config="ViT-B/32", *, seed: int = 0, **overrides) -> CLIP:
    """A randomly initialized CLIP. Overrides are CLIPConfig fields (dtype, param_dtype, remat, ...)."""
    return CLIP(resolve_config(preset_or_config, **overrides), rngs=nnx.Rngs(seed))


def abstract(cfg: CLIPConfig) -> CLIP:
    """A CLIP whose parameters are shape/dtype placeholders (no memory, no init cost)."""
    return nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))


# Logical axes of each parameter, by the last components of its path. Sharding rules (in the job
# config, applied by ``jaxgist.training.parallel``) map these names to mesh axes; the model knows nothing of
# meshes. "embed" is a tower's width, "heads" the attention width (q/k/v outputs), "mlp" the MLP
# hidden width, "proj" the joint embedding, "vocab"/"pos" the rows of embedding tables.
_LOGICAL_AXES = {
    ("q_proj", "kernel"): ("embed", "heads"), ("q_proj", "bias"): ("heads",),
    ("k_proj", "kernel"): ("embed", "heads"), ("k_proj", "bias"): ("heads",),
    ("v_proj", "kernel"): ("embed", "heads"), ("v_proj", "bias"): ("heads",),
    ("out_proj", "kernel"): ("heads", "embed"), ("out_proj", "bias"): ("embed",),
    ("fc1", "kernel"): ("embed", "mlp"), ("fc1", "bias"): ("mlp",),
    ("fc2", "kernel"): ("mlp", "embed"), ("fc2", "bias"): ("embed",),
    ("visual_projection", "kernel"): ("embed", "proj"),
    ("text_projection", "kernel"): ("embed", "proj"),
    ("patch_embedding", "kernel"): (None, None, None, "embed"),
    ("embeddings", "class_embedding"): ("embed",),
    ("position_embedding", "embedding"): ("pos", "embed"),
    ("token_embedding", "embedding"): ("vocab", "embed"),
    ("logit_scale",): (),
    # ResNet towers
    ("attnpool", "positional_embedding"): ("pos", "embed"),
    ("c_proj", "kernel"): ("heads", "proj"), ("c_proj", "bias"): ("proj",),
}
_NORMS = ("layer_norm1", "layer_norm2", "pre_layrnorm", "post_layernorm", "final_layer_norm")
_CONVS = ("conv1", "conv2", "conv3")


def logical_axes(path) -> tuple[str | None, ...]:
    """The logical axis names of the parameter at ``path`` (a tuple of keys, as in ``nnx.State``)."""
    names = tuple(str(p) for p in path)
    if names and names[-1] == "value":  # a leaf inside an nnx.Variable
        names = names[:-1]
    for n in (2, 1):
        if names[-n:] in _LOGICAL_AXES:
            return _LOGICAL_AXES[names[-n:]]
    if len(names) >= 2 and names[-2] in _NORMS and names[-1] in ("scale", "bias"):
        return ("norm",)
    # ResNet towers: convolution kernels (kh, kw, in, out) split by output channels; BatchNorm
    # parameters and running statistics (bn1..3, downsample.1) are per channel, like LayerNorm's
    in_downsample = len(names) >= 3 and names[-3] == "downsample"
    if names[-1] == "kernel" and (names[-2] in _CONVS or (in_downsample and names[-2] == "0")):
        return (None, None, None, "embed")
    if names[-1] in ("scale", "bias", "mean", "var") and (names[-2].startswith("bn") or
                                                          (in_downsample and names[-2] == "1")):
        return ("norm",)
    raise KeyError(f"no logical axes for CLIP parameter {'.'.join(names)!r}")
