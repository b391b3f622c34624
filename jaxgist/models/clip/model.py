"""CLIP in Flax NNX: a ViT image tower and a causal text transformer.

Parameter names follow Hugging Face's ``CLIPModel`` (``vision_model.encoder.layers.N.self_attn.q_proj``
...), so weight conversion (``clip_weights``) is a table of renames and transposes.

Numerics: parameters are stored in ``param_dtype`` (float32 by default) and matmuls run in
``dtype`` (the compute dtype, e.g. bfloat16); LayerNorm and softmax always run in float32.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgist.core import arrays

LOGIT_SCALE_MAX = math.log(100.0)

# The sharding of activations (batch axis over the mesh's data axes) inside a sharded train step.
_ACTIVATIONS = contextvars.ContextVar("jaxgist_clip_activation_sharding", default=None)


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
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")


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
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    embed_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: bool = False  # rematerialize transformer blocks in the backward pass

    def __post_init__(self):
        problems = []
        for name, tower in (("vision", self.vision), ("text", self.text)):
            if tower.width % tower.heads:
                problems.append(f"{name}.width={tower.width} is not divisible by {name}.heads={tower.heads}")
            if tower.act not in ACTIVATIONS:
                problems.append(f"{name}.act={tower.act!r} is not one of {ACTIVATIONS}")
        if self.vision.image_size % self.vision.patch_size:
            problems.append(
                f"vision.image_size={self.vision.image_size} is not a multiple of "
                f"vision.patch_size={self.vision.patch_size}"
            )
        if problems:
            raise ValueError("invalid CLIPConfig: " + "; ".join(problems))

    def replace(self, **kwargs) -> "CLIPConfig":
        return dataclasses.replace(self, **kwargs)


def _preset(image_size, patch, v_width, v_layers, v_heads, t_width, t_heads, embed_dim, t_layers=12):
    return CLIPConfig(
        vision=VisionConfig(image_size=image_size, patch_size=patch, width=v_width, layers=v_layers,
                            heads=v_heads, mlp_dim=4 * v_width),
        text=TextConfig(width=t_width, layers=t_layers, heads=t_heads, mlp_dim=4 * t_width),
        embed_dim=embed_dim,
    )


# The published OpenAI CLIP sizes.
PRESETS: dict[str, CLIPConfig] = {
    "ViT-B/32": _preset(224, 32, 768, 12, 12, 512, 8, 512),
    "ViT-B/16": _preset(224, 16, 768, 12, 12, 512, 8, 512),
    "ViT-L/14": _preset(224, 14, 1024, 24, 16, 768, 12, 768),
    "ViT-L/14@336px": _preset(336, 14, 1024, 24, 16, 768, 12, 768),
}


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


def _linear(din, dout, cfg: CLIPConfig, rngs, *, bias=True, std=0.02):
    return Dense(din, dout, use_bias=bias, std=std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with separate q/k/v projections (HF layout)."""

    def __init__(self, width: int, heads: int, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.heads = heads
        self.q_proj = _linear(width, width, cfg, rngs)
        self.k_proj = _linear(width, width, cfg, rngs)
        self.v_proj = _linear(width, width, cfg, rngs)
        self.out_proj = _linear(width, width, cfg, rngs)

    def __call__(self, x, *, causal: bool, query_index=None):
        """x: [B, L, D]. query_index: optional [B] int, attend only from that position (out [B, 1, D])."""
        b, length, d = x.shape
        h = self.heads
        hd = d // h
        if query_index is None:
            q = self.q_proj(x)
            q_pos = jnp.arange(length)[None, :]
        else:
            q = self.q_proj(jnp.take_along_axis(x, query_index[:, None, None], axis=1))
            q_pos = query_index[:, None]
        k, v = self.k_proj(x), self.v_proj(x)
        q = q.reshape(b, -1, h, hd) * (hd**-0.5)
        k = k.reshape(b, length, h, hd)
        v = v.reshape(b, length, h, hd)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        if causal:
            allowed = jnp.arange(length)[None, None, :] <= q_pos[:, :, None]  # [B or 1, Q, K]
            scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, -1, d)
        return self.out_proj(out)


class MLP(nnx.Module):
    def __init__(self, width: int, hidden: int, act: str, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.fc1 = _linear(width, hidden, cfg, rngs)
        self.fc2 = _linear(hidden, width, cfg, rngs)
        self.act = act

    def __call__(self, x):
        return self.fc2(activation(self.act)(self.fc1(x)))


class EncoderLayer(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width, heads, mlp_dim, act, eps, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.self_attn = Attention(width, heads, cfg, rngs=rngs)
        self.layer_norm1 = LayerNorm(width, eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.mlp = MLP(width, mlp_dim, act, cfg, rngs=rngs)
        self.layer_norm2 = LayerNorm(width, eps, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, x, *, causal: bool, query_index=None):
        y = self.self_attn(self.layer_norm1(x), causal=causal, query_index=query_index)
        if query_index is not None:
            x = jnp.take_along_axis(x, query_index[:, None, None], axis=1)
        x = x + y
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    def __init__(self, width, layers, heads, mlp_dim, act, eps, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [EncoderLayer(width, heads, mlp_dim, act, eps, cfg, rngs=rngs) for _ in range(layers)]
        )
        self.remat = cfg.remat

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


class VisionEmbeddings(nnx.Module):
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
        x = self.patch_embedding(pixels.astype(self.dtype))  # [B, g, g, D]
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
        self.encoder = Encoder(c.width, c.layers, c.heads, c.mlp_dim, c.act, c.layer_norm_eps, cfg, rngs=rngs)
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
        self.encoder = Encoder(c.width, c.layers, c.heads, c.mlp_dim, c.act, c.layer_norm_eps, cfg, rngs=rngs)
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
    """CLIP with HF parameter names. Images are NHWC float pixels, already CLIP-normalized."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.vision_model = VisionTransformer(cfg.vision, cfg, rngs=rngs)
        self.text_model = TextTransformer(cfg.text, cfg, rngs=rngs)
        self.visual_projection = _linear(cfg.vision.width, cfg.embed_dim, cfg, rngs, bias=False,
                                         std=cfg.vision.width**-0.5)
        self.text_projection = _linear(cfg.text.width, cfg.embed_dim, cfg, rngs, bias=False,
                                       std=cfg.text.width**-0.5)
        self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, cfg.param_dtype))

    def encode_image(self, pixels):
        """[B, H, W, 3] normalized pixels -> projected, unnormalized embeddings [B, E] (float32)."""
        _, pooled = self.vision_model(pixels, pooled_only=True)
        return self.visual_projection(pooled).astype(jnp.float32)

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
        vision = VisionConfig(**d.pop("vision", {}))
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
}
_NORMS = ("layer_norm1", "layer_norm2", "pre_layrnorm", "post_layernorm", "final_layer_norm")


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
    raise KeyError(f"no logical axes for CLIP parameter {'.'.join(names)!r}")
