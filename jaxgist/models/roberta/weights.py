"""RoBERTa weights in and out: HF ``RobertaModel`` checkpoints (and the ``roberta.``-prefixed ones of
``RobertaForMaskedLM`` / ``RobertaForSequenceClassification``, whose heads are ignored), local
directory, state-dict file or hub name; an HF directory written back.

Our paths are HF's keys with Flax leaf names; Linear ``weight`` (out, in) -> transposed ``kernel``,
LayerNorm ``weight`` -> ``scale``, Embedding ``weight`` -> ``embedding``. Missing, unexpected and
mis-shaped keys are reported together in one ``CheckpointMismatchError``, with one exception taken
from HF: a checkpoint without any pooler weights (the hub's ``roberta-base`` is a masked-LM checkpoint)
gets a freshly initialized pooler, as ``RobertaModel.from_pretrained`` gives it, and a warning.

    model = roberta.load("roberta-base")
    roberta.save_hf(model, "out/")             # transformers.RobertaModel.from_pretrained("out/") loads it
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxgist.models.clip.weights import _read_hf_dir, read_state_dict
from jaxgist.models.conversion import read_hf_config
from jaxgist.models.gpt2.weights import Source, build, resolve_hf_dir, state_dict, torch_leaf
from jaxgist.models.roberta.model import Roberta, RobertaConfig, abstract, new_pooler

_IGNORED = re.compile(r"^(roberta\.)?embeddings\.(position_ids|token_type_ids)$|^(lm_head|classifier)\.")
_POOLER = re.compile(r"^(roberta\.)?pooler\.")


def _same(a):
    return a


def _transpose(a):
    return a.T


def hf_source(path: str, prefix: str = "") -> Source:
    """The HF key of our parameter ``path`` (``encoder.layer.0.attention.self.query.kernel`` ->
    ``{prefix}encoder.layer.0.attention.self.query.weight``, transposed)."""
    module, leaf = torch_leaf(path)
    if path.endswith(".kernel"):
        return f"{prefix}{module}.{leaf}", _transpose, _transpose
    return f"{prefix}{module}.{leaf}", _same, _same


def config_from_hf(hf, **overrides) -> RobertaConfig:
    """The RobertaConfig of an HF ``RobertaConfig`` (config.json as a dict, or the object)."""
    hf = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    problems = []
    if hf.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type={hf['position_embedding_type']!r}")
    if hf.get("is_decoder", False):
        problems.append("is_decoder=True")
    if problems:
        raise ValueError(f"HF RoBERTa config: {', '.join(problems)} is not supported")
    fields = dict(vocab_size=hf.get("vocab_size", 50265), max_positions=hf.get("max_position_embeddings", 514),
                  type_vocab_size=hf.get("type_vocab_size", 1), width=hf.get("hidden_size", 768),
                  layers=hf.get("num_hidden_layers", 12), heads=hf.get("num_attention_heads", 12),
                  mlp_dim=hf.get("intermediate_size", 3072), act=hf.get("hidden_act", "gelu"),
                  eps=hf.get("layer_norm_eps", 1e-5), pad_token_id=hf.get("pad_token_id", 1),
                  hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
                  attn_dropout=hf.get("attention_probs_dropout_prob", 0.1))
    fields.update(overrides)
    return RobertaConfig(**fields)


def config_to_hf(cfg: RobertaConfig) -> dict[str, Any]:
    return {
        "architectures": ["RobertaModel"], "model_type": "roberta",
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_positions,
        "type_vocab_size": cfg.type_vocab_size, "hidden_size": cfg.width, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "intermediate_size": cfg.mlp_dim, "hidden_act": cfg.act,
        "layer_norm_eps": cfg.eps, "pad_token_id": cfg.pad_token_id, "bos_token_id": 0, "eos_token_id": 2,
        "hidden_dropout_prob": cfg.hidden_dropout, "attention_probs_dropout_prob": cfg.attn_dropout,
        "initializer_range": 0.02, "position_embedding_type": "absolute",
    }


def from_hf_state_dict(sd: Mapping[str, Any], hf_config=None, *, pooler: bool = True, seed: int = 0,
                       source: str = "checkpoint", **overrides) -> Roberta:
    """A RoBERTa from an HF state dict (``RobertaModel``'s bare keys or ``roberta.``-prefixed ones; MLM
    and classifier heads ignored) and its config (a dict of config.json, a transformers config, or None:
    roberta-base's sizes). ``pooler=False``: no pooler (its weights ignored); a checkpoint without pooler
    weights gets a fresh one (from ``seed``) as in HF. ``overrides``: RobertaConfig fields."""
    sd = dict(sd)
    prefix = "roberta." if any(k.startswith("roberta.") for k in sd) else ""
    cfg = config_from_hf(hf_config or {}, pooler=pooler, **overrides)
    fresh = pooler and not any(_POOLER.match(k) for k in sd)
    if fresh:
        logging.warning("%s has no pooler weights: the RoBERTa pooler is freshly initialized (seed %d), as "
                        "transformers' RobertaModel.from_pretrained does", source, seed)
    model = build(abstract(cfg), sd, lambda p: hf_source(p, prefix), param_dtype=cfg.param_dtype, source=source,
                  what="the RoBERTa model", skip=lambda name: fresh and name.startswith("pooler."),
                  ignore=lambda k: bool(_IGNORED.match(k)) or (not pooler and bool(_POOLER.match(k))))
    if fresh:
        model.pooler = new_pooler(cfg, nnx.Rngs(seed))
    return model


def to_hf_state_dict(model: Roberta) -> dict[str, np.ndarray]:
    """``RobertaModel``-named float32 numpy state dict."""
    return state_dict(model, hf_source)


def save_hf(model: Roberta, directory: str | os.PathLike) -> pathlib.Path:
    """Writes config.json + model.safetensors that ``transformers.RobertaModel.from_pretrained`` loads."""
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2))
    save_file(to_hf_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def load(name_or_path: str | os.PathLike = "roberta-base", *, dtype=jnp.float32, compute_dtype=None,
         pooler: bool = True, seed: int = 0, **overrides) -> Roberta:
    """A pretrained RoBERTa from an HF directory, a state-dict file (HF keys, with a config.json beside it
    or roberta-base's sizes) or an HF hub name ("roberta-base": downloaded once). ``dtype``: the
    parameters'; ``compute_dtype``: the matmuls' (default ``dtype``); ``pooler``/``seed``: see
    ``from_hf_state_dict``; ``overrides``: other RobertaConfig fields (``remat``, dropout rates)."""
    overrides = dict(param_dtype=dtype, dtype=compute_dtype or dtype, **overrides)
    directory = resolve_hf_dir(name_or_path, "RoBERTa")
    if directory is not None:
        hf = read_hf_config(directory, "roberta", "RoBERTa")
        return from_hf_state_dict(_read_hf_dir(directory), hf, pooler=pooler, seed=seed, source=str(directory),
                                  **overrides)
    path = pathlib.Path(name_or_path)
    hf = read_hf_config(path.parent, "roberta", "RoBERTa") if (path.parent / "config.json").is_file() else {}
    return from_hf_state_dict(read_state_dict(path), hf, pooler=pooler, seed=seed, source=str(path), **overrides)
