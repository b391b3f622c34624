"""GPT-2 weights in and out: HF ``GPT2LMHeadModel`` / ``GPT2Model`` checkpoints (safetensors or
pytorch_model.bin, local directory or hub name), and an HF directory written back.

Our parameter paths are HF's keys with Flax leaf names; HF's ``Conv1D`` weights are (in, out), our
``kernel`` layout, so the table has no transposes. Both key layouts are read: ``transformer.h.0...``
(what ``GPT2LMHeadModel.save_pretrained`` writes) and the hub files' bare ``h.0...`` (``GPT2Model``).
The attention buffers ``attn.bias`` / ``attn.masked_bias`` of older files are ignored; an
``lm_head.weight`` must equal ``wte`` (the head is tied). Missing, unexpected and mis-shaped keys are
reported together in one ``CheckpointMismatchError``.

    model = gpt2.load("gpt2")                  # hub name (downloaded once), or an HF directory / file
    gpt2.save_hf(model, "out/")                # transformers.GPT2LMHeadModel.from_pretrained("out/") loads it
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgist.models.clip import pretrained
from jaxgist.models.clip.weights import _read_hf_dir, read_state_dict
from jaxgist.models.conversion import CheckpointMismatchError, as_numpy, raise_if_mismatched, read_hf_config
from jaxgist.models.gpt2.model import GPT2, GPT2Config, abstract, resolve_config

_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_BUFFERS = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# (checkpoint key, to ours, from ours) of one of our dotted parameter paths.
Source = tuple[str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _same(a):
    return a


def torch_leaf(path: str) -> tuple[str, str]:
    """(module path, PyTorch leaf name) of our dotted parameter path."""
    module, _, leaf = path.rpartition(".")
    return module, _LEAVES.get(leaf, leaf)


# ---------------------------------------------------------------------------------------------
# A model from a table of checkpoint keys, and back (shared by GPT-2, RoBERTa and the captioner)
# ---------------------------------------------------------------------------------------------


def dotted(path) -> str:
    return ".".join(str(p) for p in path)


def build(abstract_model: nnx.Module, sd: Mapping[str, Any], source_of: Callable[[str], Source], *, param_dtype,
          source: str, what: str, ignore: Callable[[str], bool] = lambda k: False,
          skip: Callable[[str], bool] = lambda name: False, hint: str = "") -> nnx.Module:
    """``abstract_model`` with every parameter read from ``sd`` through ``source_of``, cast to
    ``param_dtype``. Parameters whose path ``skip`` accepts keep their placeholders (the caller replaces
    them); checkpoint keys ``ignore`` accepts are not reported as unexpected. Raises one
    CheckpointMismatchError listing every missing, unexpected and mis-shaped key."""
    graphdef, state = nnx.split(abstract_model)
    used, missing, mismatched, leaves = set(), [], [], []
    for path, var in nnx.to_flat_state(state):
        name = dotted(path)
        if skip(name):
            leaves.append((path, var))
            continue
        key, to_ours, from_ours = source_of(name)
        if key not in sd:
            missing.append(key)
            leaves.append((path, var))
            continue
        used.add(key)
        raw = as_numpy(sd[key])
        expected = from_ours(np.empty(var.shape, np.int8)).shape
        if tuple(raw.shape) != tuple(expected):
            mismatched.append(f"{key}: checkpoint {tuple(raw.shape)}, model expects {tuple(expected)}")
            leaves.append((path, var))
            continue
        leaves.append((path, var.replace(jnp.asarray(to_ours(raw), dtype=param_dtype))))
    unexpected = sorted(k for k in sd if k not in used and not ignore(k))
    raise_if_mismatched(source, what, missing, unexpected, mismatched, hint)
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def state_dict(model: nnx.Module, source_of: Callable[[str], Source]) -> dict[str, np.ndarray]:
    """The float32 numpy state dict of ``model`` under the keys ``source_of`` gives."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, _, from_ours = source_of(dotted(path))
        out[key] = np.ascontiguousarray(from_ours(np.asarray(jax.device_get(var[...]), dtype=np.float32)))
    return out


# ---------------------------------------------------------------------------------------------
# GPT-2's table
# ---------------------------------------------------------------------------------------------


def hf_source(path: str, prefix: str = "transformer.") -> Source:
    """The HF key of our parameter ``path`` (``transformer.h.0.attn.c_attn.kernel`` ->
    ``{prefix}h.0.attn.c_attn.weight``); no transposes (HF's Conv1D is (in, out))."""
    module, leaf = torch_leaf(path)
    if not module.startswith("transformer."):
        raise KeyError(f"no HF key for GPT-2 parameter {path!r}")
    return f"{prefix}{module[len('transformer.'):]}.{leaf}", _same, _same


def from_hf_state_dict(sd: Mapping[str, Any], hf_config=None, *, source: str = "checkpoint", **overrides) -> GPT2:
    """A GPT-2 from an HF ``GPT2LMHeadModel`` (``transformer.`` keys) or ``GPT2Model`` (bare keys) state
    dict and its config (config.json as a dict, a ``GPT2Config`` of transformers, or None: GPT-2 base's
    sizes). ``overrides``: GPT2Config fields (``dtype``, ``param_dtype``, ``remat``, dropout rates)."""
    sd = dict(sd)
    prefix = "transformer." if any(k.startswith("transformer.") for k in sd) else ""
    cfg = config_from_hf(hf_config or {}, **overrides)
    if "lm_head.weight" in sd:
        wte = sd.get(f"{prefix}wte.weight")
        if wte is not None and not np.array_equal(as_numpy(sd["lm_head.weight"]), as_numpy(wte)):
            raise CheckpointMismatchError(f"{source}: lm_head.weight differs from {prefix}wte.weight; this GPT-2 "
                                          "ties its LM head to the token embeddings")
    return build(abstract(cfg), sd, lambda p: hf_source(p, prefix), param_dtype=cfg.param_dtype, source=source,
                 what="the GPT-2 model", ignore=lambda k: k == "lm_head.weight" or bool(_BUFFERS.match(k)))


def to_hf_state_dict(model: GPT2) -> dict[str, np.ndarray]:
    """``GPT2LMHeadModel``-named float32 numpy state dict (``transformer.`` keys, no ``lm_head``: tied)."""
    return state_dict(model, hf_source)


# ---------------------------------------------------------------------------------------------
# config.json <-> GPT2Config
# ---------------------------------------------------------------------------------------------


def config_from_hf(hf, **overrides) -> GPT2Config:
    """The GPT2Config of an HF ``GPT2Config`` (config.json as a dict, or the object); refuses the
    variants this model does not implement."""
    hf = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    problems = []
    if not hf.get("scale_attn_weights", True):
        problems.append("scale_attn_weights=False")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if hf.get("add_cross_attention", False):
        problems.append("add_cross_attention=True")
    if not hf.get("tie_word_embeddings", True):
        problems.append("tie_word_embeddings=False")
    if problems:
        raise ValueError(f"HF GPT-2 config: {', '.join(problems)} is not supported")
    fields = dict(vocab_size=hf.get("vocab_size", 50257), n_positions=hf.get("n_positions", 1024),
                  width=hf.get("n_embd", 768), layers=hf.get("n_layer", 12), heads=hf.get("n_head", 12),
                  mlp_dim=hf.get("n_inner"), act=hf.get("activation_function", "gelu_new"),
                  eps=hf.get("layer_norm_epsilon", 1e-5), embd_dropout=hf.get("embd_pdrop", 0.1),
                  attn_dropout=hf.get("attn_pdrop", 0.1), resid_dropout=hf.get("resid_pdrop", 0.1),
                  bos_token_id=hf.get("bos_token_id", 50256), eos_token_id=hf.get("eos_token_id", 50256))
    fields.update(overrides)
    return GPT2Config(**fields)


def config_to_hf(cfg: GPT2Config) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_embd": cfg.width, "n_layer": cfg.layers,
        "n_head": cfg.heads, "n_inner": cfg.mlp_dim, "activation_function": cfg.act,
        "layer_norm_epsilon": cfg.eps, "embd_pdrop": cfg.embd_dropout, "attn_pdrop": cfg.attn_dropout,
        "resid_pdrop": cfg.resid_dropout, "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "use_cache": True,
    }


# ---------------------------------------------------------------------------------------------
# Files and the hub
# ---------------------------------------------------------------------------------------------


def save_hf(model: GPT2, directory: str | os.PathLike) -> pathlib.Path:
    """Writes config.json + model.safetensors that ``transformers.GPT2LMHeadModel.from_pretrained`` loads."""
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2))
    save_file(to_hf_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def is_hub_name(name: str) -> bool:
    """``owner/name`` or a bare hub name like ``gpt2`` (not a path, not a checkpoint file name)."""
    return (bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.startswith((".", "/", "~"))
            and not name.endswith(_SUFFIXES))


def resolve_hf_dir(name_or_path, what: str) -> pathlib.Path | None:
    """A local HF directory, or a hub name's downloaded one; None for a state-dict file.
    FileNotFoundError names what cannot be found."""
    path = pathlib.Path(name_or_path)
    if path.is_dir():
        return path
    if path.is_file():
        return None
    name = str(name_or_path)
    if is_hub_name(name):
        directory, hf_format = pretrained.fetch_hub(name)  # FileNotFoundError naming the repo when unreachable
        if not hf_format:
            raise ValueError(f"the hub repo {name} has no HF-format {what} weights (config.json + model weights)")
        return directory
    raise FileNotFoundError(f"{name_or_path}: no such file or directory, and not an HF hub name")


def load(name_or_path: str | os.PathLike = "gpt2", *, dtype=jnp.float32, compute_dtype=None, **overrides) -> GPT2:
    """A pretrained GPT-2 from an HF directory (config.json + model.safetensors / pytorch_model.bin), a
    state-dict file (HF keys, with a config.json beside it or GPT-2 base's sizes) or an HF hub name
    ("gpt2", "gpt2-medium", "distilgpt2", ...: downloaded once). ``dtype``: the parameters' (checkpoint
    tensors are cast to it); ``compute_dtype``: the matmuls' (default ``dtype``); ``overrides``: other
    GPT2Config fields (``remat``, dropout rates)."""
    overrides = dict(param_dtype=dtype, dtype=compute_dtype or dtype, **overrides)
    directory = resolve_hf_dir(name_or_path, "GPT-2")
    if directory is not None:
        hf = read_hf_config(directory, "gpt2", "GPT-2")
        return from_hf_state_dict(_read_hf_dir(directory), hf, source=str(directory), **overrides)
    path = pathlib.Path(name_or_path)
    hf = read_hf_config(path.parent, "gpt2", "GPT-2") if (path.parent / "config.json").is_file() else {}
    return from_hf_state_dict(read_state_dict(path), hf, source=str(path), **overrides)


__all__ = ["build", "config_from_hf", "config_to_hf", "from_hf_state_dict", "hf_source", "load", "resolve_config",
           "save_hf", "state_dict", "to_hf_state_dict"]
