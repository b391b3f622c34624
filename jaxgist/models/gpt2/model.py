"""GPT-2 (HF's ``GPT2LMHeadModel``) in Flax NNX, with an optional KV cache for decoding.

Parameter names are HF's (``transformer.wte``, ``transformer.wpe``, ``transformer.h.N.ln_1``,
``transformer.h.N.attn.c_attn`` (one fused q/k/v projection), ``attn.c_proj``, ``ln_2``, ``mlp.c_fc``,
``mlp.c_proj``, ``transformer.ln_f``) with Flax leaf names (``kernel``, ``bias``, ``scale``,
``embedding``). HF's ``Conv1D`` stores its weight as (in, out), which is our ``kernel`` layout: the
conversion (``gpt2.weights``) is a table of renames without transposes. The LM head is tied to ``wte``.

Pre-LN blocks; LayerNorm and softmax in float32; ``gelu_new`` (the tanh approximation). Dropout as
HF's (``embd_pdrop`` after the embeddings, ``attn_pdrop`` on the attention probabilities,
``resid_pdrop`` after each residual branch) applies when a dropout key is given: ``model.train()``
then ``model(ids, rngs=nnx.Rngs(dropout=seed))``, or ``dropout_key=`` of ``forward``; its random
numbers come from a counter-based hash seeded by that key (``uniform_draws``).

    model = gpt2.create("gpt2")                        # random init (HF's)
    logits = model(ids)                                # [B, L] -> [B, L, V] float32
    logits = model(inputs_embeds=x)                    # [B, L, D] embeddings (e.g. a prefix + tokens)
    cache = model.init_cache(batch, max_length)        # decoding: keys/values of every layer
    logits, cache = model(ids_chunk, cache=cache)      # positions continue from cache.length
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgist.models.conversion import resolve_preset
from jaxgist.models.layers import ACTIVATIONS, Dense, LayerNorm, activation

INIT_STD = 0.02  # HF's initializer_range


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    width: int = 768  # HF's n_embd
    layers: int = 12  # n_layer
    heads: int = 12  # n_head
    mlp_dim: int | None = None  # n_inner; None: 4 * width
    act: str = "gelu_new"
    eps: float = 1e-5  # layer_norm_epsilon
    embd_dropout: float = 0.1  # embd_pdrop
    attn_dropout: float = 0.1  # attn_pdrop
    resid_dropout: float = 0.1  # resid_pdrop
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: bool = False  # rematerialize each block in the backward pass (not with a cache)

    def __post_init__(self):
        problems = []
        if min(self.vocab_size, self.n_positions, self.width, self.layers, self.heads) < 1:
            problems.append("vocab_size, n_positions, width, layers and heads must be positive")
        elif self.width % self.heads:
            problems.append(f"width={self.width} is not divisible by heads={self.heads}")
        if self.mlp_dim is not None and self.mlp_dim < 1:
            problems.append(f"mlp_dim={self.mlp_dim} is not positive")
        if self.act not in ACTIVATIONS:
            problems.append(f"act={self.act!r} is not one of {ACTIVATIONS}")
        for name in ("embd_dropout", "attn_dropout", "resid_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name}={getattr(self, name)} is not in [0, 1)")
        if problems:
            raise ValueError("invalid GPT2Config: " + "; ".join(problems))

    @property
    def hidden(self) -> int:
        return self.mlp_dim or 4 * self.width

    @property
    def has_dropout(self) -> bool:
        return max(self.embd_dropout, self.attn_dropout, self.resid_dropout) > 0.0

    def replace(self, **kwargs) -> "GPT2Config":
        return dataclasses.replace(self, **kwargs)


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(),
    "gpt2-medium": GPT2Config(width=1024, layers=24, heads=16),
    "gpt2-large": GPT2Config(width=1280, layers=36, heads=20),
    "gpt2-xl": GPT2Config(width=1600, layers=48, heads=25),
    "distilgpt2": GPT2Config(layers=6),
}


def resolve_config(preset_or_config, **overrides) -> GPT2Config:
    """A GPT2Config from a preset name, a GPT2Config or a dict of its fields, then ``overrides``."""
    return resolve_preset(preset_or_config, PRESETS, GPT2Config, "GPT-2", **overrides)


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------


class KVCache(NamedTuple):
    """Keys and values of every layer, each [B, max_length, heads, head_dim], and how many positions
    are filled (``length``, an int32 scalar): the next input starts at that position."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    length: jax.Array

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[1]

    def extend(self, max_length: int) -> "KVCache":
        """The same cache with room for ``max_length`` positions (zeros appended)."""
        pad = lambda a: jnp.pad(a, ((0, 0), (0, max_length - a.shape[1]), (0, 0), (0, 0)))  # noqa: E731
        return KVCache(tuple(map(pad, self.keys)), tuple(map(pad, self.values)), self.length)

    def repeat(self, n: int) -> "KVCache":
        """Each sequence repeated ``n`` times in place (rows b0, b0, ..., b1, ...): samples sharing a prefix."""
        rep = lambda a: jnp.repeat(a, n, axis=0)  # noqa: E731
        return KVCache(tuple(map(rep, self.keys)), tuple(map(rep, self.values)), self.length)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def _mix32(x):
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 whose output bits each depend on every input bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def uniform_draws(key, shapes):
    """One float32 array of uniform [0, 1) numbers (24 random bits each) per shape in ``shapes`` (None for
    a None shape; all None without a key): dropout's random numbers for a whole forward pass.

    Counter-based: element i of the pass (over all shapes) is ``mix(mix(i * golden ^ s0) ^ s1)``, with
    the 64-bit seed (s0, s1) drawn from ``key`` by ``jax.random.bits`` and ``mix`` MurmurHash3's
    finalizer. That is an elementwise integer function which XLA fuses into the dropout itself: about
    40 times cheaper on a CPU than ``jax.random.uniform`` (whose threefry cost more than GPT-2 base's
    attention at decoding), and one small program to compile instead of one per dropout site. Ample
    for dropout masks; not ``jax.random``'s stream."""
    if key is None or all(s is None for s in shapes):
        return [None] * len(shapes)
    sizes = [0 if s is None else math.prod(s) for s in shapes]
    if sum(sizes) >= 2**32:
        raise ValueError(f"{sum(sizes)} dropout draws in one pass exceed the 2**32 counters")
    s0, s1 = jax.random.bits(key, (2,), jnp.uint32)
    out, offset = [], 0
    for shape, size in zip(shapes, sizes):
        if shape is None:
            out.append(None)
            continue
        counter = jax.lax.iota(jnp.uint32, size).reshape(shape) + jnp.uint32(offset)
        bits = _mix32(_mix32(counter * jnp.uint32(0x9E3779B9) ^ s0) ^ s1)
        out.append((bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24))
        offset += size
    return out


def apply_dropout(x, rate: float, uniform):
    """Dropout of ``x`` with the uniform numbers ``uniform`` (``x``'s shape): an element survives when its
    number is below 1 - rate, scaled by 1 / (1 - rate). The identity when ``uniform`` is None."""
    if uniform is None or rate == 0.0:
        return x
    keep = 1.0 - rate
    return jnp.where(uniform < keep, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


class Attention(nnx.Module):
    """Causal self-attention with HF's fused ``c_attn`` (output columns q, k, v, each head-major) and
    ``c_proj``; reads and extends a layer's KV cache when given one."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        numerics = dict(std=INIT_STD, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.c_attn = Dense(cfg.width, 3 * cfg.width, **numerics)
        self.c_proj = Dense(cfg.width, cfg.width, **(numerics | dict(std=INIT_STD / (2 * cfg.layers) ** 0.5)))
        self.heads = cfg.heads
        self.attn_dropout = cfg.attn_dropout
        self.resid_dropout = cfg.resid_dropout

    def __call__(self, x, start, layer_cache=None, uniforms=(None, None)):
        """x [B, L, D] at positions start .. start + L - 1; ``layer_cache``: (keys, values) [B, T, H, hd];
        ``uniforms``: the dropout numbers of the attention probabilities [B, H, L, T] and of the output.
        Returns (out [B, L, D], updated (keys, values) or None)."""
        b, length, d = x.shape
        h = self.heads
        hd = d // h
        qkv = self.c_attn(x).reshape(b, length, 3, h, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q_pos = start + jnp.arange(length)
        if layer_cache is None:
            keys, values, new_cache = k, v, None
        else:
            keys = jax.lax.dynamic_update_slice(layer_cache[0], k.astype(layer_cache[0].dtype), (0, start, 0, 0))
            values = jax.lax.dynamic_update_slice(layer_cache[1], v.astype(layer_cache[1].dtype), (0, start, 0, 0))
            new_cache = (keys, values)
            keys, values = keys.astype(q.dtype), values.astype(q.dtype)
        k_pos = jnp.arange(keys.shape[1])
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, keys).astype(jnp.float32) * (hd**-0.5)
        allowed = k_pos[None, :] <= q_pos[:, None]  # [L, T]: causal (and nothing past the filled cache)
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = apply_dropout(probs, self.attn_dropout, uniforms[0]).astype(values.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, values).reshape(b, length, d)
        return apply_dropout(self.c_proj(out), self.resid_dropout, uniforms[1]), new_cache


class MLP(nnx.Module):
    """``c_fc`` -> activation -> ``c_proj`` (HF's GPT2MLP)."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        numerics = dict(std=INIT_STD, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.c_fc = Dense(cfg.width, cfg.hidden, **numerics)
        self.c_proj = Dense(cfg.hidden, cfg.width, **(numerics | dict(std=INIT_STD / (2 * cfg.layers) ** 0.5)))
        self.act = cfg.act
        self.resid_dropout = cfg.resid_dropout

    def __call__(self, x, uniform=None):
        return apply_dropout(self.c_proj(activation(self.act)(self.c_fc(x))), self.resid_dropout, uniform)


class Block(nnx.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(cfg.width, cfg.eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln_2 = LayerNorm(cfg.width, cfg.eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, start, layer_cache=None, uniforms=(None, None, None)):
        y, layer_cache = self.attn(self.ln_1(x), start, layer_cache, uniforms[:2])
        x = x + y
        return x + self.mlp(self.ln_2(x), uniforms[2]), layer_cache


class Transformer(nnx.Module):
    """HF's ``GPT2Model``: token and position embeddings, the blocks ``h.N``, the final ``ln_f``."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(INIT_STD)
        self.wte = nnx.Embed(cfg.vocab_size, cfg.width, param_dtype=cfg.param_dtype, embedding_init=init, rngs=rngs)
        self.wpe = nnx.Embed(cfg.n_positions, cfg.width, param_dtype=cfg.param_dtype, embedding_init=init, rngs=rngs)
        self.h = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.layers)])
        self.ln_f = LayerNorm(cfg.width, cfg.eps, param_dtype=cfg.param_dtype, rngs=rngs)


class GPT2(nnx.Module):
    """HF's ``GPT2LMHeadModel`` (the LM head tied to ``transformer.wte``)."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.transformer = Transformer(cfg, rngs=rngs)
        self.deterministic = True

    @property
    def width(self) -> int:
        return self.config.width

    def embed_tokens(self, ids):
        """Token embeddings [B, L, D] of ids [B, L] (what ``inputs_embeds`` holds for tokens)."""
        return jnp.take(self.transformer.wte.embedding[...], ids, axis=0).astype(self.config.dtype)

    def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
        """An empty cache for ``batch`` sequences of at most ``max_length`` positions."""
        cfg = self.config
        if max_length > cfg.n_positions:
            raise ValueError(f"a cache of {max_length} positions exceeds GPT-2's n_positions={cfg.n_positions}")
        shape = (batch, max_length, cfg.heads, cfg.width // cfg.heads)
        zeros = lambda: jnp.zeros(shape, dtype or cfg.dtype)  # noqa: E731
        return KVCache(tuple(zeros() for _ in range(cfg.layers)), tuple(zeros() for _ in range(cfg.layers)),
                       jnp.zeros((), jnp.int32))

    def forward(self, inputs_embeds, *, cache: KVCache | None = None, dropout_key=None):
        """The final hidden states [B, L, D] (after ``ln_f``) of embeddings [B, L, D] at positions
        ``cache.length`` onwards (0 without a cache), and the extended cache (None without one).
        Dropout applies exactly when ``dropout_key`` is given."""
        cfg = self.config
        b, length, d = inputs_embeds.shape
        if d != cfg.width:
            raise ValueError(f"input embeddings of width {d}; this GPT-2 takes width {cfg.width}")
        limit = cfg.n_positions if cache is None else cache.max_length
        if length > limit:
            raise ValueError(f"{length} positions exceed GPT-2's {'n_positions' if cache is None else 'cache'} "
                             f"of {limit}")
        if cache is not None and not isinstance(cache.length, jax.core.Tracer):  # under jit: the caller's duty
            if int(cache.length) + length > cache.max_length:
                raise ValueError(f"{length} positions after the {int(cache.length)} cached ones exceed the cache's "
                                 f"{cache.max_length}")
        start = jnp.zeros((), jnp.int32) if cache is None else cache.length
        pos = jnp.take(self.transformer.wpe.embedding[...], start + jnp.arange(length), axis=0)
        span = length if cache is None else cache.max_length  # the keys each query attends over
        site = lambda rate, shape: shape if rate > 0.0 else None  # noqa: E731
        hidden_shape = (b, length, d)
        per_layer = [site(cfg.attn_dropout, (b, cfg.heads, length, span)), site(cfg.resid_dropout, hidden_shape),
                     site(cfg.resid_dropout, hidden_shape)]
        draws = uniform_draws(dropout_key, [site(cfg.embd_dropout, hidden_shape)] + per_layer * cfg.layers)
        x = apply_dropout((inputs_embeds + pos[None]).astype(cfg.dtype), cfg.embd_dropout, draws[0])

        def run(block, x, layer_cache, uniforms):
            return block(x, start, layer_cache, uniforms)

        if cfg.remat and cache is None:
            run = nnx.remat(run)
        new_keys, new_values = [], []
        for i, block in enumerate(self.transformer.h):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x, layer_cache = run(block, x, layer_cache, tuple(draws[1 + 3 * i: 4 + 3 * i]))
            if layer_cache is not None:
                new_keys.append(layer_cache[0])
                new_values.append(layer_cache[1])
        x = self.transformer.ln_f(x)
        new_cache = None if cache is None else KVCache(tuple(new_keys), tuple(new_values), cache.length + length)
        return x, new_cache

    def logits(self, hidden, table=None):
        """The tied LM head: hidden [..., D] -> float32 logits [..., V], against the rows of ``wte``
        (faster on a CPU than against its transpose). ``table``: ``wte`` already in the compute dtype
        (a decoding loop casts it once, not at every step)."""
        dtype = self.config.dtype
        table = self.transformer.wte.embedding[...] if table is None else table
        lead = hidden.shape[:-1]
        h = hidden.reshape(-1, hidden.shape[-1]).astype(dtype)
        out = jax.lax.dot_general(h, table.astype(dtype), (((1,), (1,)), ((), ())))
        return out.astype(jnp.float32).reshape(*lead, -1)

    def __call__(self, input_ids=None, *, inputs_embeds=None, cache: KVCache | None = None,
                 rngs: nnx.Rngs | None = None):
        """Logits [B, L, V] (float32) of ``input_ids`` [B, L] or ``inputs_embeds`` [B, L, D]; with a
        ``cache``, ``(logits, extended cache)``. In training mode (``model.train()``) with dropout rates
        > 0 this draws one key from ``rngs.dropout()``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        key = None
        if not self.deterministic and self.config.has_dropout:
            if rngs is None:
                raise ValueError("GPT-2 is in training mode with dropout: pass rngs=nnx.Rngs(dropout=seed) to the "
                                 "call, or call model.eval() for deterministic outputs")
            key = rngs.dropout()
        hidden, cache_out = self.forward(x, cache=cache, dropout_key=key)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, cache_out)


def create(preset_or_config="gpt2", *, seed: int = 0, **overrides) -> GPT2:
    """A randomly initialized GPT-2 (HF's init: normal(0.02), ``c_proj`` weights normal(0.02 /
    sqrt(2 * layers)), zero biases). Overrides are GPT2Config fields (``dtype``, ``vocab_size``, ...)."""
    return GPT2(resolve_config(preset_or_config, **overrides), rngs=nnx.Rngs(seed))


def abstract(cfg: GPT2Config) -> GPT2:
    """A GPT-2 whose parameters are shape/dtype placeholders (no memory, no init cost)."""
    return nnx.eval_shape(lambda: GPT2(resolve_config(cfg), rngs=nnx.Rngs(0)))


# Logical axes of each parameter by the last components of its path (see ``clip.model.logical_axes``).
_LOGICAL_AXES = {
    ("c_attn", "kernel"): ("embed", "heads"), ("c_attn", "bias"): ("heads",),
    ("attn", "c_proj", "kernel"): ("heads", "embed"), ("attn", "c_proj", "bias"): ("embed",),
    ("c_fc", "kernel"): ("embed", "mlp"), ("c_fc", "bias"): ("mlp",),
    ("mlp", "c_proj", "kernel"): ("mlp", "embed"), ("mlp", "c_proj", "bias"): ("embed",),
    ("wte", "embedding"): ("vocab", "embed"),
    ("wpe", "embedding"): ("pos", "embed"),
}
_NORMS = ("ln_1", "ln_2", "ln_f")


def logical_axes(path) -> tuple[str | None, ...]:
    """The logical axis names of the GPT-2 parameter at ``path`` (a tuple of keys, as in ``nnx.State``)."""
    names = tuple(str(p) for p in path)
    if names and names[-1] == "value":
        names = names[:-1]
    for n in (3, 2):
        if len(names) >= n and names[-n:] in _LOGICAL_AXES:
            return _LOGICAL_AXES[names[-n:]]
    if len(names) >= 2 and names[-2] in _NORMS and names[-1] in ("scale", "bias"):
        return ("norm",)
    raise KeyError(f"no logical axes for GPT-2 parameter {'.'.join(names)!r}")
