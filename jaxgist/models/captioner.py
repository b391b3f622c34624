"""CgT-GAN's models: the caption generator (a CLIP embedding mapped to a prefix of GPT-2 input
embeddings) and the discriminator (RoBERTa's pooler output -> a real/fake logit).

    cap = captioner.create_captioner(prefix_dim=768, gpt2="gpt2")        # GPT-2 weights from the hub / a directory
    prefix = cap.prefix(clip_embeds)                                      # [B, 768] -> [B, 10, 768]
    logits = cap(clip_embeds, tokens)                                     # teacher forcing: [B, 10 + L, V]
    out = cap.greedy(clip_embeds)                                         # tokens [B, 20], scores [B]
    out = cap.sample(clip_embeds, key)                                    # tokens [B, 5, 20], scores [B, 5]
    disc = captioner.create_discriminator(roberta="roberta-base")
    logits = disc(ids, mask)                                              # [N] (RoBERTa-tokenized captions)
    loss = captioner.bce_with_logits(logits, labels)

The prefix mapping is the reference's ``MLP((prefix_dim, P * D // 2, P * D))``: ``Linear -> Tanh ->
Linear`` reshaped to P (``prefix_length``, 10) tokens of GPT-2's width D, fed to GPT-2 as input
embeddings. CLIP embeddings go in unnormalized unless ``normalize_prefix``. The discriminator head
is ``Linear(D, D // 2) -> Tanh -> Linear(D // 2, 1)`` on the pooler output, trained with binary
cross-entropy on logits. Both heads use PyTorch's default Linear init (uniform, +-1/sqrt(fan_in)).
Parameter names: ``clip_project.fc1``/``fc2`` and ``gpt.transformer...`` (GPT-2's); ``text_encoder...``
(RoBERTa's) and ``mlp.fc1``/``fc2``. ``to_reference_state_dict`` / ``from_reference_state_dict``
convert to and from the reference's PyTorch names (``clip_project.model.0``, ``gpt.transformer...``,
``mlp.model.2``, ``text_encoder.encoder...``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgist.core.arrays import l2_normalize
from jaxgist.models import gpt2 as gpt2_lib
from jaxgist.models import roberta as roberta_lib
from jaxgist.models.conversion import CheckpointMismatchError, as_numpy
from jaxgist.models.gpt2 import decode
from jaxgist.models.gpt2.weights import build, state_dict, torch_leaf
from jaxgist.models.layers import Dense

# CLIP embedding widths, to name them in errors.
CLIP_WIDTHS = {512: "ViT-B/32, ViT-B/16, RN101", 640: "RN50x4", 768: "ViT-L/14, RN50x16", 1024: "RN50, ViT-L/14 towers"}


def _clip_names(width: int) -> str:
    return f" ({CLIP_WIDTHS[width]})" if width in CLIP_WIDTHS else ""


class TanhMLP(nnx.Module):
    """``fc1 -> tanh -> fc2`` with PyTorch's default Linear init (the reference's ``MLP`` of 3 sizes)."""

    def __init__(self, din: int, hidden: int, dout: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.fc1 = Dense(din, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Dense(hidden, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for layer, fan_in in ((self.fc1, din), (self.fc2, hidden)):
            bound = fan_in**-0.5
            for var in (layer.kernel, layer.bias):
                var[...] = jax.random.uniform(rngs.params(), var.shape, param_dtype, -bound, bound)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CaptionerConfig:
    prefix_dim: int = 768  # the CLIP embedding width (ViT-L/14: 768, ViT-B/32: 512, RN50x4: 640)
    prefix_length: int = 10
    normalize_prefix: bool = False  # L2-normalize the CLIP embeddings before the mapping
    gpt2: Any = "gpt2"  # a GPT-2 preset name, GPT2Config or dict of its fields

    def __post_init__(self):
        if self.prefix_dim < 1 or self.prefix_length < 1:
            raise ValueError(f"invalid CaptionerConfig: prefix_dim={self.prefix_dim} and "
                             f"prefix_length={self.prefix_length} must be positive")

    def replace(self, **kwargs) -> "CaptionerConfig":
        return dataclasses.replace(self, **kwargs)


class ClipPrefixCaptioner(nnx.Module):
    """A CLIP embedding -> ``prefix_length`` GPT-2 input embeddings -> GPT-2 (CgT-GAN's ``ClipCaptionModel``
    with the MLP mapping)."""

    def __init__(self, cfg: CaptionerConfig, *, gpt: gpt2_lib.GPT2 | None = None, rngs: nnx.Rngs):
        gpt = gpt if gpt is not None else gpt2_lib.GPT2(gpt2_lib.resolve_config(cfg.gpt2), rngs=rngs)
        width, p = gpt.width, cfg.prefix_length
        self.config = cfg.replace(gpt2=gpt.config)
        self.clip_project = TanhMLP(cfg.prefix_dim, p * width // 2, p * width, dtype=gpt.config.dtype,
                                    param_dtype=gpt.config.param_dtype, rngs=rngs)
        self.gpt = gpt

    def check_embeds(self, shape) -> None:
        """ValueError unless ``shape`` is [B, prefix_dim], naming the CLIP models of both widths."""
        cfg = self.config
        shape = tuple(shape)
        if len(shape) != 2 or shape[-1] != cfg.prefix_dim:
            width = shape[-1] if shape else 0
            raise ValueError(
                f"CLIP embeddings of shape {shape}{_clip_names(width)}: this captioner's prefix mapping takes "
                f"[B, {cfg.prefix_dim}]{_clip_names(cfg.prefix_dim)} (CaptionerConfig.prefix_dim); use the CLIP "
                f"model the mapping was built for, or a mapping of prefix_dim={width}")

    def prefix(self, clip_embeds):
        """CLIP embeddings [B, prefix_dim] -> GPT-2 input embeddings [B, prefix_length, D]."""
        x = jnp.asarray(clip_embeds)
        self.check_embeds(x.shape)
        x = x.astype(jnp.float32)
        if self.config.normalize_prefix:
            x = l2_normalize(x)
        return self.clip_project(x).reshape(x.shape[0], self.config.prefix_length, self.gpt.width)

    def __call__(self, clip_embeds, tokens, *, rngs: nnx.Rngs | None = None):
        """Teacher forcing (the reference's ``encode_forward``): logits [B, P + L, V] of the prefix
        followed by ``tokens`` [B, L]; position P - 1 + i predicts ``tokens[:, i]``. Right padding needs
        no mask (attention is causal)."""
        x = jnp.concatenate([self.prefix(clip_embeds), self.gpt.embed_tokens(tokens)], axis=1)
        return self.gpt(inputs_embeds=x, rngs=rngs)

    def greedy(self, clip_embeds, **options) -> decode.Decoded:
        """``decode.greedy`` from the prefix of ``clip_embeds`` [B, prefix_dim]: tokens [B, T], scores [B]."""
        return decode.greedy(self.gpt, _prefix(self, clip_embeds), **options)

    def sample(self, clip_embeds, key, **options) -> decode.Decoded:
        """``decode.sample`` from the prefix of ``clip_embeds``: tokens [B, K, T], scores [B, K] (K =
        ``num_samples``, 5; dropout on unless ``dropout=False``; ``temperature``, ``top_k``, ``top_p``)."""
        return decode.sample(self.gpt, _prefix(self, clip_embeds), key, **options)


def _prefix(model: ClipPrefixCaptioner, clip_embeds):
    model.check_embeds(jnp.shape(clip_embeds))  # before tracing: the error names the widths
    return _prefix_jit(model, jnp.asarray(clip_embeds))


@nnx.jit
def _prefix_jit(model, clip_embeds):
    return model.prefix(clip_embeds)


def create_captioner(cfg: CaptionerConfig | None = None, *, gpt2: Any = None, seed: int = 0, dtype=jnp.float32,
                     compute_dtype=None, **fields) -> ClipPrefixCaptioner:
    """A captioner with a random prefix mapping (from ``seed``) and GPT-2 from ``gpt2``: an HF hub name,
    directory or state-dict file (pretrained weights; their config decides the architecture), a GPT2
    model, a GPT2Config or dict of its fields (random weights), or None: a random GPT-2 of ``cfg.gpt2``.
    ``fields``: CaptionerConfig fields."""
    cfg = (cfg or CaptionerConfig()).replace(**fields) if fields else (cfg or CaptionerConfig())
    numerics = dict(param_dtype=dtype, dtype=compute_dtype or dtype)
    if gpt2 is None or isinstance(gpt2, (dict, gpt2_lib.GPT2Config)):
        gpt_cfg = gpt2_lib.resolve_config(cfg.gpt2 if gpt2 is None else gpt2, **numerics)
        gpt = gpt2_lib.GPT2(gpt_cfg, rngs=nnx.Rngs(seed + 1))
    elif isinstance(gpt2, gpt2_lib.GPT2):
        gpt = gpt2
    else:
        gpt = gpt2_lib.load(gpt2, dtype=dtype, compute_dtype=compute_dtype)
    return ClipPrefixCaptioner(cfg, gpt=gpt, rngs=nnx.Rngs(seed))


# ---------------------------------------------------------------------------------------------
# The discriminator
# ---------------------------------------------------------------------------------------------


class Discriminator(nnx.Module):
    """CgT-GAN's ``RobertaDiscriminator``: RoBERTa's pooler output -> ``Linear(D, D/2) -> Tanh ->
    Linear(D/2, 1)``, one logit per caption (real: human-written)."""

    def __init__(self, text_encoder: roberta_lib.Roberta, *, rngs: nnx.Rngs):
        if text_encoder.pooler is None:
            raise ValueError("the discriminator reads RoBERTa's pooler output: load RoBERTa with pooler=True")
        width = text_encoder.width
        self.text_encoder = text_encoder
        self.mlp = TanhMLP(width, width // 2, 1, dtype=text_encoder.config.dtype,
                           param_dtype=text_encoder.config.param_dtype, rngs=rngs)

    def __call__(self, ids, attention_mask, *, rngs: nnx.Rngs | None = None):
        """Logits [N] (float32) of RoBERTa-tokenized captions ids [N, L] with their mask. In training mode
        (``model.train()``, as the reference trains it) RoBERTa's dropout draws from ``rngs``."""
        _, pooled = self.text_encoder(ids, attention_mask, rngs=rngs)
        return self.mlp(pooled)[:, 0].astype(jnp.float32)


def bce_with_logits(logits, labels):
    """Mean binary cross-entropy of logits against 0/1 labels (PyTorch's ``BCEWithLogitsLoss``)."""
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels, jnp.float32)
    if logits.shape != labels.shape:
        raise ValueError(f"logits of shape {logits.shape} and labels of shape {labels.shape} differ")
    return jnp.mean(jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def create_discriminator(roberta: Any = None, *, seed: int = 0, dtype=jnp.float32, compute_dtype=None,
                         config: Any = "roberta-base") -> Discriminator:
    """A discriminator with a random head (from ``seed``) on RoBERTa from ``roberta``: an HF hub name
    ("roberta-base"), directory or state-dict file, a Roberta model, or None for a random RoBERTa of
    ``config`` (a preset name, RobertaConfig or dict)."""
    if roberta is None:
        encoder = roberta_lib.Roberta(roberta_lib.resolve_config(config, param_dtype=dtype,
                                                                 dtype=compute_dtype or dtype), rngs=nnx.Rngs(seed + 1))
    elif isinstance(roberta, roberta_lib.Roberta):
        encoder = roberta
    else:
        encoder = roberta_lib.load(roberta, dtype=dtype, compute_dtype=compute_dtype, seed=seed + 1)
    return Discriminator(encoder, rngs=nnx.Rngs(seed))


# ---------------------------------------------------------------------------------------------
# The reference's PyTorch names
# ---------------------------------------------------------------------------------------------

_REFERENCE_MLP = {"fc1": "model.0", "fc2": "model.2"}
_GPT2_BUFFERS = re.compile(r"^gpt\.(transformer\.h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight)$")
_ROBERTA_BUFFERS = re.compile(r"^text_encoder\.embeddings\.(position_ids|token_type_ids)$")


def _transpose(a):
    return a.T


def _reference_source(path: str):
    """Our parameter path -> (reference key, to ours, from ours)."""
    head, _, rest = path.partition(".")
    if head == "gpt":
        key, to_ours, from_ours = gpt2_lib.weights.hf_source(rest)
        return f"gpt.{key}", to_ours, from_ours
    if head == "text_encoder":
        key, to_ours, from_ours = roberta_lib.weights.hf_source(rest)
        return f"text_encoder.{key}", to_ours, from_ours
    module, leaf = torch_leaf(path)
    name, _, layer = module.rpartition(".")
    if head in ("clip_project", "mlp") and layer in _REFERENCE_MLP:
        key = f"{name}.{_REFERENCE_MLP[layer]}.{leaf}"
        return (key, _transpose, _transpose) if path.endswith(".kernel") else (key, lambda a: a, lambda a: a)
    raise KeyError(f"no reference key for parameter {path!r}")


def to_reference_state_dict(model: ClipPrefixCaptioner | Discriminator) -> dict[str, np.ndarray]:
    """The reference's float32 state dict of a captioner (``ClipCaptionModel``: ``gpt.*``,
    ``clip_project.model.{0,2}.*``) or a discriminator (``RobertaDiscriminator``: ``text_encoder.*``,
    ``mlp.model.{0,2}.*``). GPT-2's tied ``gpt.lm_head.weight`` is added, as PyTorch's state dict has it."""
    sd = state_dict(model, _reference_source)
    if isinstance(model, ClipPrefixCaptioner):
        sd["gpt.lm_head.weight"] = sd["gpt.transformer.wte.weight"]
    return sd


def from_reference_state_dict(sd: Mapping[str, Any], cfg: CaptionerConfig | None = None, *,
                              source: str = "checkpoint", **fields) -> ClipPrefixCaptioner:
    """A captioner from the reference's ``ClipCaptionModel`` state dict (MLP mapping; torch or numpy
    arrays). ``cfg``/``fields``: the CaptionerConfig (default: ViT-L/14's 768-wide embeddings, 10 prefix
    tokens, GPT-2 base); a checkpoint of other sizes raises one CheckpointMismatchError listing every
    mis-shaped key. An untied ``gpt.lm_head.weight`` is refused."""
    cfg = (cfg or CaptionerConfig()).replace(**fields) if fields else (cfg or CaptionerConfig())
    sd = dict(sd)
    if "gpt.lm_head.weight" in sd and "gpt.transformer.wte.weight" in sd:
        if not np.array_equal(as_numpy(sd["gpt.lm_head.weight"]), as_numpy(sd["gpt.transformer.wte.weight"])):
            raise CheckpointMismatchError(f"{source}: gpt.lm_head.weight differs from gpt.transformer.wte.weight; "
                                          "this GPT-2 ties its LM head to the token embeddings")
    gpt_cfg = gpt2_lib.resolve_config(cfg.gpt2)
    abstract = nnx.eval_shape(lambda: ClipPrefixCaptioner(cfg.replace(gpt2=gpt_cfg), rngs=nnx.Rngs(0)))
    if any(k.startswith("clip_project.") and not re.match(r"clip_project\.model\.[02]\.", k) for k in sd):
        hint = "(the reference's transformer mapping, mapping_type='transformer', is not implemented: only 'mlp')"
    else:
        hint = ""
    return build(abstract, sd, _reference_source, param_dtype=gpt_cfg.param_dtype, source=source,
                 what="the CgT-GAN captioner", ignore=lambda k: bool(_GPT2_BUFFERS.match(k)), hint=hint)


def discriminator_from_reference_state_dict(sd: Mapping[str, Any], roberta_config: Any = "roberta-base", *,
                                            source: str = "checkpoint") -> Discriminator:
    """A discriminator from the reference's ``RobertaDiscriminator`` state dict."""
    rcfg = roberta_lib.resolve_config(roberta_config)
    abstract = nnx.eval_shape(lambda: Discriminator(roberta_lib.Roberta(rcfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0)))
    return build(abstract, dict(sd), _reference_source, param_dtype=rcfg.param_dtype, source=source,
                 what="the CgT-GAN discriminator", ignore=lambda k: bool(_ROBERTA_BUFFERS.match(k)))
