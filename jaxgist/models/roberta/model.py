"""RoBERTa (HF's ``RobertaModel``, with its pooler) in Flax NNX.

Parameter names are HF's (``embeddings.word_embeddings``, ``embeddings.position_embeddings``,
``embeddings.token_type_embeddings``, ``embeddings.LayerNorm``, ``encoder.layer.N.attention.self.query``
/ ``key`` / ``value``, ``attention.output.dense`` / ``LayerNorm``, ``intermediate.dense``,
``output.dense`` / ``LayerNorm``, ``pooler.dense``) with Flax leaf names; Linear kernels are stored
(in, out), transposed from PyTorch's (``roberta.weights``).

Post-LN (BERT) blocks; LayerNorm and softmax in float32; exact (erf) GELU. Position ids are HF's:
counted from ``pad_token_id + 1`` over the non-padding tokens, ``pad_token_id`` at padding. The
pooler is ``tanh(dense(h[:, 0]))``. Dropout as HF's (``hidden_dropout`` after the embeddings and each
residual branch, ``attn_dropout`` on the attention probabilities) runs in training mode
(``model.train()``, then ``model(ids, mask, rngs=nnx.Rngs(dropout=seed))``), its random numbers those
of ``gpt2.model.uniform_draws``.

    model = roberta.create("roberta-base")
    hidden, pooled = model(ids, attention_mask)        # [B, L] -> [B, L, D], [B, D]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgist.models.conversion import resolve_preset
from jaxgist.models.gpt2.model import apply_dropout, uniform_draws
from jaxgist.models.layers import ACTIVATIONS, Dense, LayerNorm, activation

INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class RobertaConfig:
    vocab_size: int = 50265
    max_positions: int = 514  # HF's max_position_embeddings (positions start after the padding id)
    type_vocab_size: int = 1
    width: int = 768  # hidden_size
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072  # intermediate_size
    act: str = "gelu"
    eps: float = 1e-5
    pad_token_id: int = 1
    hidden_dropout: float = 0.1
    attn_dropout: float = 0.1
    pooler: bool = True  # RobertaModel(add_pooling_layer=True)
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        problems = []
        if min(self.vocab_size, self.max_positions, self.type_vocab_size, self.width, self.layers, self.heads,
               self.mlp_dim) < 1:
            problems.append("sizes must be positive")
        elif self.width % self.heads:
            problems.append(f"width={self.width} is not divisible by heads={self.heads}")
        if self.act not in ACTIVATIONS:
            problems.append(f"act={self.act!r} is not one of {ACTIVATIONS}")
        if not 0 <= self.pad_token_id < self.max_positions:
            problems.append(f"pad_token_id={self.pad_token_id} leaves no positions of {self.max_positions}")
        for name in ("hidden_dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name}={getattr(self, name)} is not in [0, 1)")
        if problems:
            raise ValueError("invalid RobertaConfig: " + "; ".join(problems))

    @property
    def max_length(self) -> int:
        """The longest input: positions run from pad_token_id + 1 to max_positions - 1."""
        return self.max_positions - self.pad_token_id - 1

    @property
    def has_dropout(self) -> bool:
        return max(self.hidden_dropout, self.attn_dropout) > 0.0

    def replace(self, **kwargs) -> "RobertaConfig":
        return dataclasses.replace(self, **kwargs)


PRESETS: dict[str, RobertaConfig] = {
    "roberta-base": RobertaConfig(),
    "roberta-large": RobertaConfig(width=1024, layers=24, heads=16, mlp_dim=4096),
    "distilroberta-base": RobertaConfig(layers=6),
}


def resolve_config(preset_or_config, **overrides) -> RobertaConfig:
    return resolve_preset(preset_or_config, PRESETS, RobertaConfig, "RoBERTa", **overrides)


def position_ids(ids, pad_token_id: int):
    """HF's ``create_position_ids_from_input_ids``: pad_token_id + 1, + 2, ... over the non-padding
    tokens; pad_token_id at padding."""
    mask = (ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask + pad_token_id


def _dense(cfg: RobertaConfig, din: int, dout: int, rngs: nnx.Rngs) -> Dense:
    return Dense(din, dout, std=INIT_STD, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class _Dense(nnx.Module):
    """A module holding one ``dense`` (HF's ``pooler.dense``, ``intermediate.dense``)."""

    def __init__(self, cfg: RobertaConfig, din: int, dout: int, *, rngs: nnx.Rngs):
        self.dense = _dense(cfg, din, dout, rngs)


class _DenseNorm(nnx.Module):
    """HF's ``RobertaSelfOutput`` / ``RobertaOutput``: LayerNorm(residual + dropout(dense(x)))."""

    def __init__(self, cfg: RobertaConfig, din: int, *, rngs: nnx.Rngs):
        self.dense = _dense(cfg, din, cfg.width, rngs)
        self.LayerNorm = LayerNorm(cfg.width, cfg.eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.rate = cfg.hidden_dropout

    def __call__(self, x, residual, uniform=None):
        return self.LayerNorm(residual + apply_dropout(self.dense(x), self.rate, uniform))


class SelfAttention(nnx.Module):
    def __init__(self, cfg: RobertaConfig, *, rngs: nnx.Rngs):
        self.query, self.key, self.value = (_dense(cfg, cfg.width, cfg.width, rngs) for _ in range(3))
        self.heads = cfg.heads
        self.rate = cfg.attn_dropout

    def __call__(self, x, allowed, uniform=None):
        """x [B, L, D]; ``allowed`` [B, L] (keys that may be attended to); ``uniform``: dropout numbers
        of the attention probabilities [B, H, L, L]."""
        b, length, d = x.shape
        h = self.heads
        hd = d // h
        q = self.query(x).reshape(b, length, h, hd)
        k = self.key(x).reshape(b, length, h, hd)
        v = self.value(x).reshape(b, length, h, hd)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (hd**-0.5)
        scores = jnp.where(allowed[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = apply_dropout(jax.nn.softmax(scores, axis=-1), self.rate, uniform).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, d)


class Attention(nnx.Module):
    def __init__(self, cfg: RobertaConfig, *, rngs: nnx.Rngs):
        setattr(self, "self", SelfAttention(cfg, rngs=rngs))  # HF's name: attention.self.query
        self.output = _DenseNorm(cfg, cfg.width, rngs=rngs)

    def __call__(self, x, allowed, uniforms=(None, None)):
        return self.output(getattr(self, "self")(x, allowed, uniforms[0]), x, uniforms[1])


class Layer(nnx.Module):
    """A post-LN block: h = LN(x + attn(x)); LN(h + dense(act(dense(h))))."""

    def __init__(self, cfg: RobertaConfig, *, rngs: nnx.Rngs):
        self.attention = Attention(cfg, rngs=rngs)
        self.intermediate = _Dense(cfg, cfg.width, cfg.mlp_dim, rngs=rngs)
        self.output = _DenseNorm(cfg, cfg.mlp_dim, rngs=rngs)
        self.act = cfg.act

    def __call__(self, x, allowed, uniforms=(None, None, None)):
        h = self.attention(x, allowed, uniforms[:2])
        return self.output(activation(self.act)(self.intermediate.dense(h)), h, uniforms[2])


class Encoder(nnx.Module):
    def __init__(self, cfg: RobertaConfig, *, rngs: nnx.Rngs):
        self.layer = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.layers)])


class Embeddings(nnx.Module):
    def __init__(self, cfg: RobertaConfig, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(INIT_STD)
        embed = dict(param_dtype=cfg.param_dtype, embedding_init=init, rngs=rngs)
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.width, **embed)
        self.position_embeddings = nnx.Embed(cfg.max_positions, cfg.width, **embed)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.width, **embed)
        self.LayerNorm = LayerNorm(cfg.width, cfg.eps, param_dtype=cfg.param_dtype, rngs=rngs)
        if cfg.pad_token_id < cfg.vocab_size:  # HF zeroes the padding rows (nn.Embedding padding_idx)
            for table in (self.word_embeddings, self.position_embeddings):
                table.embedding[...] = table.embedding[...].at[cfg.pad_token_id].set(0.0)
        self.pad_token_id = cfg.pad_token_id
        self.dtype = cfg.dtype
        self.rate = cfg.hidden_dropout

    def __call__(self, ids, token_type_ids, uniform=None):
        x = (jnp.take(self.word_embeddings.embedding[...], ids, axis=0)
             + jnp.take(self.position_embeddings.embedding[...], position_ids(ids, self.pad_token_id), axis=0)
             + jnp.take(self.token_type_embeddings.embedding[...], token_type_ids, axis=0))
        return apply_dropout(self.LayerNorm(x.astype(self.dtype)), self.rate, uniform)


class Roberta(nnx.Module):
    """HF's ``RobertaModel``: embeddings, the post-LN encoder, and (``pooler=True``) the tanh pooler."""

    def __init__(self, cfg: RobertaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.pooler = new_pooler(cfg, rngs) if cfg.pooler else None
        self.deterministic = True

    @property
    def width(self) -> int:
        return self.config.width

    def forward(self, ids, attention_mask=None, token_type_ids=None, *, dropout_key=None):
        """(last hidden states [B, L, D], pooled [B, D] float32 or None) of ids [B, L]; ``attention_mask``
        [B, L] (1 for tokens, 0 for padding; default: every position). Dropout applies exactly when
        ``dropout_key`` is given."""
        cfg = self.config
        ids = jnp.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids of shape {tuple(ids.shape)}: expected [B, L]")
        if ids.shape[1] > cfg.max_length:
            raise ValueError(f"{ids.shape[1]} tokens exceed RoBERTa's {cfg.max_length} positions")
        allowed = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask) != 0
        token_type_ids = jnp.zeros_like(ids) if token_type_ids is None else jnp.asarray(token_type_ids)
        b, length = ids.shape
        hidden = (b, length, cfg.width) if cfg.hidden_dropout > 0.0 else None
        per_layer = [(b, cfg.heads, length, length) if cfg.attn_dropout > 0.0 else None, hidden, hidden]
        draws = uniform_draws(dropout_key, [hidden] + per_layer * cfg.layers)
        x = self.embeddings(ids, token_type_ids, draws[0])

        def run(layer, x, uniforms):
            return layer(x, allowed, uniforms)

        if cfg.remat:
            run = nnx.remat(run)
        for i, layer in enumerate(self.encoder.layer):
            x = run(layer, x, tuple(draws[1 + 3 * i: 4 + 3 * i]))
        pooled = None
        if self.pooler is not None:
            pooled = jnp.tanh(self.pooler.dense(x[:, 0]).astype(jnp.float32))
        return x, pooled

    def __call__(self, ids, attention_mask=None, token_type_ids=None, *, rngs: nnx.Rngs | None = None):
        """(last hidden states [B, L, D], pooled output [B, D] or None). In training mode
        (``model.train()``) with dropout this draws one key from ``rngs.dropout()``."""
        key = None
        if not self.deterministic and self.config.has_dropout:
            if rngs is None:
                raise ValueError("RoBERTa is in training mode with dropout: pass rngs=nnx.Rngs(dropout=seed) to the "
                                 "call, or call model.eval() for deterministic outputs")
            key = rngs.dropout()
        return self.forward(ids, attention_mask, token_type_ids, dropout_key=key)


def new_pooler(cfg: RobertaConfig, rngs: nnx.Rngs) -> _Dense:
    """A freshly initialized pooler (HF's init: normal(0.02), zero bias)."""
    return _Dense(cfg, cfg.width, cfg.width, rngs=rngs)


def create(preset_or_config="roberta-base", *, seed: int = 0, **overrides) -> Roberta:
    """A randomly initialized RoBERTa (HF's init). Overrides are RobertaConfig fields."""
    return Roberta(resolve_config(preset_or_config, **overrides), rngs=nnx.Rngs(seed))


def abstract(cfg: RobertaConfig) -> Roberta:
    return nnx.eval_shape(lambda: Roberta(resolve_config(cfg), rngs=nnx.Rngs(0)))


_LOGICAL_AXES = {
    ("query", "kernel"): ("embed", "heads"), ("query", "bias"): ("heads",),
    ("key", "kernel"): ("embed", "heads"), ("key", "bias"): ("heads",),
    ("value", "kernel"): ("embed", "heads"), ("value", "bias"): ("heads",),
    ("attention", "output", "dense", "kernel"): ("heads", "embed"),
    ("attention", "output", "dense", "bias"): ("embed",),
    ("intermediate", "dense", "kernel"): ("embed", "mlp"), ("intermediate", "dense", "bias"): ("mlp",),
    ("output", "dense", "kernel"): ("mlp", "embed"), ("output", "dense", "bias"): ("embed",),
    ("pooler", "dense", "kernel"): ("embed", None), ("pooler", "dense", "bias"): (None,),
    ("word_embeddings", "embedding"): ("vocab", "embed"),
    ("position_embeddings", "embedding"): ("pos", "embed"),
    ("token_type_embeddings", "embedding"): (None, "embed"),
}


def logical_axes(path) -> tuple[str | None, ...]:
    """The logical axis names of the RoBERTa parameter at ``path``."""
    names = tuple(str(p) for p in path)
    if len(names) >= 2 and names[-1] == "value" and names[-2] in ("kernel", "bias", "scale", "embedding"):
        names = names[:-1]  # a leaf inside an nnx.Variable (not the attention's ``value`` projection)
    for n in (4, 3, 2):
        if len(names) >= n and names[-n:] in _LOGICAL_AXES:
            return _LOGICAL_AXES[names[-n:]]
    if len(names) >= 2 and names[-2] == "LayerNorm" and names[-1] in ("scale", "bias"):
        return ("norm",)
    raise KeyError(f"no logical axes for RoBERTa parameter {'.'.join(names)!r}")
