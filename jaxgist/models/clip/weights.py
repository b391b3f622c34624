"""CLIP weights in and out: HF checkpoints (safetensors or pytorch_model.bin), OpenAI state dicts.

Our parameter paths are HF's names with Flax leaf names, so a checkpoint key maps to a parameter by
a short table of suffix rules (Linear ``weight`` -> transposed ``kernel``, conv ``weight`` ->
``kernel`` in HWIO, LayerNorm ``weight`` -> ``scale``, Embedding ``weight`` -> ``embedding``).
OpenAI's state dicts are first renamed to HF's layout (fused ``in_proj`` split into q/k/v,
``visual.proj`` and ``text_projection`` transposed because OpenAI multiplies ``x @ proj``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import zipfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxgist.models.clip import pretrained
from jaxgist.models.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig, abstract
from jaxgist.models.clip.resnet import ResNetConfig
from jaxgist.models.conversion import (  # noqa: F401  (CheckpointMismatchError: public here too)
    CheckpointMismatchError,
    as_numpy,
    raise_if_mismatched,
    read_hf_config,
)
from jaxgist.models.layers import ACTIVATIONS

# OpenAI model names, as `clip.load` spells them, to their HF hub copies.
OPENAI_HUB_NAMES = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}

# Checkpoint keys that are buffers, not parameters.
IGNORED_HF_KEYS = re.compile(r"^(text_model|vision_model)\.embeddings\.position_ids$|\.num_batches_tracked$")
IGNORED_OPENAI_KEYS = {"input_resolution", "context_length", "vocab_size"}


class UnknownActivation(CheckpointMismatchError):
    """An OpenAI-layout state dict does not say which activation it was trained with."""


# ---------------------------------------------------------------------------------------------
# Our parameter path <-> HF key, with the array transform in each direction.
# ---------------------------------------------------------------------------------------------

_LEAVES = {".kernel": ".weight", ".scale": ".weight", ".embedding": ".weight",
           ".mean": ".running_mean", ".var": ".running_var"}  # the last two: BatchNorm statistics


def hf_key(path: str) -> str:
    """Our dotted parameter path -> HF state-dict key (PyTorch's names for BatchNorm statistics)."""
    for leaf, torch_leaf in _LEAVES.items():
        if path.endswith(leaf):
            return path[: -len(leaf)] + torch_leaf
    return path


def hf_to_ours(path: str, value: np.ndarray) -> np.ndarray:
    if path.endswith(".kernel") and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # convolution (O, I, kh, kw) -> (kh, kw, I, O)
    if path.endswith(".kernel"):
        return value.T  # Linear (out, in) -> (in, out)
    return value


def ours_to_hf(path: str, value: np.ndarray) -> np.ndarray:
    if path.endswith(".kernel") and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if path.endswith(".kernel"):
        return value.T
    return value


def _flat_params(model: CLIP) -> dict[str, Any]:
    """Parameters and BatchNorm statistics by dotted path."""
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    return {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


def from_hf_state_dict(cfg: CLIPConfig, state_dict: Mapping[str, Any], *, source: str = "checkpoint") -> CLIP:
    """Builds a CLIP of config ``cfg`` from an HF-named state dict (numpy or torch arrays; a ResNet
    tower's keys are OpenAI's under ``vision_model.``).

    Missing, unexpected and mis-shaped keys are reported together in one CheckpointMismatchError.
    Arrays are cast to ``cfg.param_dtype``.
    """
    model = abstract(cfg)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    used, missing, mismatched = set(), [], []
    leaves = []
    for path, var in flat:
        name = ".".join(str(p) for p in path)
        key = hf_key(name)
        if key not in state_dict:
            missing.append(key)
            leaves.append((path, var))
            continue
        used.add(key)
        raw = as_numpy(state_dict[key])
        value = hf_to_ours(name, raw)
        if tuple(value.shape) != tuple(var.shape):
            expected = ours_to_hf(name, np.empty(var.shape, np.int8)).shape
            mismatched.append(f"{key}: checkpoint {tuple(raw.shape)}, model expects {tuple(expected)}")
            leaves.append((path, var))
            continue
        dtype = jnp.float32 if isinstance(var, nnx.BatchStat) else cfg.param_dtype
        leaves.append((path, var.replace(jnp.asarray(value, dtype=dtype))))
    unexpected = sorted(k for k in state_dict if k not in used and not IGNORED_HF_KEYS.match(k))
    raise_if_mismatched(source, "the CLIP model", missing, unexpected, mismatched)
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def to_hf_state_dict(model: CLIP) -> dict[str, np.ndarray]:
    """HF-named float32 numpy state dict of a CLIP."""
    out = {}
    for name, var in _flat_params(model).items():
        value = np.asarray(jax.device_get(var[...]), dtype=np.float32)
        out[hf_key(name)] = np.array(ours_to_hf(name, value), order="C")  # 0-d stays 0-d
    return out


# ---------------------------------------------------------------------------------------------
# HF config.json <-> CLIPConfig
# ---------------------------------------------------------------------------------------------


def config_from_hf(hf: Mapping[str, Any], **overrides) -> CLIPConfig:
    v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
    eos = t.get("eos_token_id", 2)
    cfg = CLIPConfig(
        vision=VisionConfig(
            image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
            width=v.get("hidden_size", 768), layers=v.get("num_hidden_layers", 12),
            heads=v.get("num_attention_heads", 12), mlp_dim=v.get("intermediate_size", 3072),
            act=v.get("hidden_act", "quick_gelu"), layer_norm_eps=v.get("layer_norm_eps", 1e-5),
        ),
        text=TextConfig(
            vocab_size=t.get("vocab_size", 49408), context_length=t.get("max_position_embeddings", 77),
            width=t.get("hidden_size", 512), layers=t.get("num_hidden_layers", 12),
            heads=t.get("num_attention_heads", 8), mlp_dim=t.get("intermediate_size", 2048),
            act=t.get("hidden_act", "quick_gelu"), layer_norm_eps=t.get("layer_norm_eps", 1e-5),
            # HF pools at the argmax of the ids when eos_token_id == 2 (the original OpenAI configs).
            eos_token_id=None if eos == 2 else eos,
        ),
        embed_dim=hf.get("projection_dim", 512),
        logit_scale_init=hf.get("logit_scale_init_value", math.log(1 / 0.07)),
    )
    return cfg.replace(**overrides) if overrides else cfg


def config_to_hf(cfg: CLIPConfig) -> dict[str, Any]:
    if cfg.is_resnet:
        raise ValueError("HF's CLIPModel has no ResNet image tower: a ResNet CLIP is saved by its train-state "
                         "checkpoints, not as an HF directory")
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.logit_scale_init,
        "initializer_factor": 1.0,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": t.vocab_size, "max_position_embeddings": t.context_length,
            "hidden_size": t.width, "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
            "intermediate_size": t.mlp_dim, "hidden_act": t.act, "layer_norm_eps": t.layer_norm_eps,
            "projection_dim": cfg.embed_dim,
            "bos_token_id": 0, "pad_token_id": 1,
            "eos_token_id": 2 if t.eos_token_id is None else t.eos_token_id,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": 3,
            "hidden_size": v.width, "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
            "intermediate_size": v.mlp_dim, "hidden_act": v.act, "layer_norm_eps": v.layer_norm_eps,
            "projection_dim": cfg.embed_dim,
        },
    }


# ---------------------------------------------------------------------------------------------
# OpenAI state dicts (OpenAI's clip/model.py, and GIST's fine-tuned checkpoints)
# ---------------------------------------------------------------------------------------------

_OPENAI_BLOCK = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPENAI_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def is_openai_state_dict(sd: Mapping[str, Any]) -> bool:
    return "visual.conv1.weight" in sd or any(k.startswith("visual.layer1.") for k in sd)


def is_resnet_state_dict(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd)


def openai_to_hf(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Renames an OpenAI CLIP state dict to HF keys (a ResNet tower's keys keep OpenAI's names under
    ``vision_model.``). Keys it does not know are kept (and then reported as unexpected by
    ``from_hf_state_dict``)."""
    resnet = is_resnet_state_dict(sd)
    out = {}
    for key, value in sd.items():
        if key in IGNORED_OPENAI_KEYS or key.endswith(".num_batches_tracked"):
            continue
        value = as_numpy(value)
        if resnet and key.startswith("visual."):
            out["vision_model." + key[len("visual."):]] = value
        elif key in _OPENAI_TOP:
            out[_OPENAI_TOP[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.T
        elif key == "text_projection":
            out["text_projection.weight"] = value.T
        elif m := _RESBLOCK.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part
                continue
            module, _, leaf = rest.rpartition(".")
            out[prefix + _OPENAI_BLOCK.get(module, module) + "." + leaf] = value
        else:
            out[key] = value
    return out


def config_from_openai(sd: Mapping[str, Any], *, act: str = "quick_gelu", vision_heads: int | None = None,
                       text_heads: int | None = None, **overrides) -> CLIPConfig:
    """Infers sizes from the shapes, as OpenAI's ``build_model`` does (heads = width / 64 unless
    given: open_clip's ViT-H/g/bigG use wider heads). ``act`` is both towers' activation: OpenAI's
    checkpoints use quick_gelu, open_clip's LAION/DataComp ones gelu; the shapes cannot tell."""
    resnet = is_resnet_state_dict(sd)
    need = ["text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight",
            *(["visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding"] if resnet else
              ["visual.conv1.weight", "visual.positional_embedding"])]
    absent = [k for k in need if k not in sd]
    if absent:
        raise CheckpointMismatchError(f"not an OpenAI {'ResNet' if resnet else 'ViT'} CLIP state dict: missing {absent}")
    shape = lambda k: tuple(as_numpy(sd[k]).shape)  # noqa: E731

    def layers(prefix):
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    if resnet:
        grid = round((shape("visual.attnpool.positional_embedding")[0] - 1) ** 0.5)
        width = shape("visual.layer1.0.conv1.weight")[0]
        vision = ResNetConfig(image_size=32 * grid, layers=tuple(layers(f"visual.layer{i}.") for i in range(1, 5)),
                              width=width, heads=vision_heads)
    else:
        v_width, _, patch, _ = shape("visual.conv1.weight")
        grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
        vision = VisionConfig(image_size=patch * grid, patch_size=patch, width=v_width,
                              layers=layers("visual.transformer.resblocks."), heads=vision_heads or v_width // 64,
                              mlp_dim=shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0], act=act)
    t_width = shape("ln_final.weight")[0]
    cfg = CLIPConfig(
        vision=vision,
        text=TextConfig(vocab_size=shape("token_embedding.weight")[0], context_length=shape("positional_embedding")[0],
                        width=t_width, layers=layers("transformer.resblocks."), heads=text_heads or t_width // 64,
                        mlp_dim=shape("transformer.resblocks.0.mlp.c_fc.weight")[0], act=act),
        embed_dim=shape("text_projection")[1],
    )
    return cfg.replace(**overrides) if overrides else cfg


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def is_torchscript(path: pathlib.Path) -> bool:
    """A TorchScript archive (how OpenAI released its CLIP checkpoints) rather than a pickled state dict."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in archive.namelist())


def _torch_load(path: pathlib.Path):
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs PyTorch (pip install torch); or convert it to safetensors") from e
    if is_torchscript(path):  # OpenAI's released checkpoints are TorchScript archives.
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e


def _unwrap_state_dict(obj, path) -> dict[str, Any]:
    """Accepts a bare state dict or a training checkpoint holding one; strips DataParallel's prefix."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointMismatchError(f"{path}: no state dict found (got {type(obj).__name__})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    return _unwrap_state_dict(_torch_load(path), path)


def _read_hf_dir(directory: pathlib.Path) -> dict[str, Any]:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.exists():
        return read_state_dict(single)
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd = {}
        for f in files:
            sd.update(read_state_dict(directory / f))
        return sd
    if (directory / "pytorch_model.bin").exists():
        return read_state_dict(directory / "pytorch_model.bin")
    raise FileNotFoundError(
        f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def _download_hub(name: str) -> pathlib.Path:
    from huggingface_hub import snapshot_download

    return pathlib.Path(snapshot_download(
        name, allow_patterns=["config.json", "model.safetensors", "model.safetensors.index.json",
                              "model-*.safetensors"]))


def _image_stats(directory: pathlib.Path) -> dict[str, tuple[float, ...]]:
    """``image_mean`` / ``image_std`` of an HF directory's ``preprocessor_config.json`` ({} without one)."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        pre = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e
    return {k: tuple(float(v) for v in pre[k]) for k in ("image_mean", "image_std") if k in pre}


def _with_act(cfg: CLIPConfig, act: str | None) -> CLIPConfig:
    """``cfg`` with both towers' activation forced to ``act`` (a ResNet image tower has none)."""
    if not act:
        return cfg
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r} is not one of {ACTIVATIONS}")
    vision = cfg.vision if cfg.is_resnet else dataclasses.replace(cfg.vision, act=act)
    return cfg.replace(vision=vision, text=dataclasses.replace(cfg.text, act=act))


def _load_entry(entry, *, dtype, compute_dtype, remat, act) -> CLIP:
    """Loads a named pretrained CLIP (``pretrained.PRETRAINED``), with the image statistics it was
    trained with (``CLIPConfig.image_mean`` / ``image_std``)."""
    overrides = dict(param_dtype=dtype, dtype=compute_dtype or dtype, remat=remat, image_mean=tuple(entry.mean),
                     image_std=tuple(entry.std))
    if entry.url:
        file = pretrained.download(entry.url, entry.sha256)
        sd = read_state_dict(file)
        cfg = config_from_openai(sd, act=act or entry.act, vision_heads=entry.vision_heads, **overrides)
        return from_hf_state_dict(cfg, openai_to_hf(sd), source=f"{entry.name} ({file})")
    if not entry.hf_hub:  # one of OpenAI's ViTs under its open_clip name
        return load(entry.preset, dtype=dtype, compute_dtype=compute_dtype, remat=remat, act=act)
    path, hf_format = pretrained.fetch_hub(entry.hf_hub)
    if hf_format:
        cfg = config_from_hf(_read_hf_config(path / "config.json"), **overrides)
        if cfg.text.act != (act or entry.act):
            logging.warning("%s: config.json says %s, open_clip's model %s; using %s", entry.name, cfg.text.act,
                            entry.act, act or entry.act)
        return from_hf_state_dict(_with_act(cfg, act or entry.act), _read_hf_dir(path), source=str(path))
    sd = read_state_dict(path)
    cfg = config_from_openai(sd, act=act or pretrained.open_clip_act(path.parent / "open_clip_config.json")
                             or entry.act, vision_heads=entry.vision_heads, **overrides)
    return from_hf_state_dict(cfg, openai_to_hf(sd), source=f"{entry.name} ({path})")


def load(name_or_path: str | os.PathLike, *, dtype=jnp.float32, compute_dtype=None, remat: bool = False,
         act: str | None = None) -> CLIP:
    """Loads a pretrained CLIP.

    ``name_or_path``: a local HF directory (config.json + model.safetensors / pytorch_model.bin),
    an OpenAI or GIST state-dict file (``.pt``/``.pth``/``.bin``/``.safetensors`` with OpenAI keys,
    ViT or ResNet), an OpenAI model name ("ViT-B/32", "RN50", ...), an open_clip name
    ("ViT-B-32/laion2b_s34b_b79k", ``pretrained.PRETRAINED``) or an HF hub name
    ("openai/clip-vit-base-patch32"). ``dtype``: the parameter dtype (checkpoint tensors, fp16
    included, are cast to it); ``compute_dtype``: the matmul dtype (defaults to ``dtype``).
    ``act``: forces the activation; an OpenAI-layout state dict that does not record it (not a
    TorchScript archive, no ``open_clip_config.json`` beside it) needs it.
    """
    overrides = dict(param_dtype=dtype, dtype=compute_dtype or dtype, remat=remat)
    path = pathlib.Path(name_or_path)
    if path.is_dir():
        hf = _read_hf_config(path / "config.json")
        cfg = _with_act(config_from_hf(hf, **{**_image_stats(path), **overrides}), act)
        return from_hf_state_dict(cfg, _read_hf_dir(path), source=str(path))
    if path.is_file():
        sd = read_state_dict(path)
        cfg, openai = _state_dict_file_config(path, sd, overrides, act)
        return from_hf_state_dict(cfg, openai_to_hf(sd) if openai else sd, source=str(path))
    entry = pretrained.lookup(str(name_or_path))
    if entry is not None:
        return _load_entry(entry, dtype=dtype, compute_dtype=compute_dtype, remat=remat, act=act)
    name = OPENAI_HUB_NAMES.get(str(name_or_path), str(name_or_path))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not str(name_or_path).startswith((".", "/")):
        try:
            directory = _download_hub(name)
        except Exception as e:
            raise FileNotFoundError(
                f"{name_or_path}: not a local file or directory, and downloading {name!r} from the HF hub failed: {e}"
            ) from e
        return load(directory, dtype=dtype, compute_dtype=compute_dtype, remat=remat, act=act)
    raise FileNotFoundError(f"{name_or_path}: no such file or directory, and not a known model name or hub name")


def read_config(name_or_path: str | os.PathLike, *, dtype=jnp.float32, compute_dtype=None,
                remat: bool = False, act: str | None = None) -> CLIPConfig:
    """The architecture ``load(name_or_path)`` would build, without reading the weights where the
    config alone tells it: a local HF directory's config.json, an OpenAI or open_clip model name of
    published sizes (``PRESETS``) or the HF hub copy of one, another hub name's config.json
    (downloaded alone). A state-dict file is read (an OpenAI/GIST one has no config: the tensors'
    shapes tell it)."""
    from jaxgist.models.clip.model import PRESETS

    overrides = dict(param_dtype=dtype, dtype=compute_dtype or dtype, remat=remat)
    path = pathlib.Path(name_or_path)
    if path.is_dir():
        return _with_act(config_from_hf(_read_hf_config(path / "config.json"), **{**_image_stats(path), **overrides}),
                         act)
    if path.is_file():
        return _state_dict_file_config(path, read_state_dict(path), overrides, act)[0]
    entry = pretrained.lookup(str(name_or_path))
    if entry is not None:
        overrides.update(image_mean=tuple(entry.mean), image_std=tuple(entry.std))
    if entry is not None and entry.preset:
        return _with_act(PRESETS[entry.preset].replace(**overrides), act or entry.act)
    if entry is not None:  # an open_clip model of other sizes: its hub copy's config.json, or its weights
        try:
            from huggingface_hub import hf_hub_download

            config_file = pathlib.Path(hf_hub_download(entry.hf_hub, "config.json"))
            return _with_act(config_from_hf(_read_hf_config(config_file), **overrides), act or entry.act)
        except Exception:  # noqa: BLE001 - no HF copy: the weights tell
            return load(str(name_or_path), dtype=dtype, compute_dtype=compute_dtype, remat=remat, act=act).config
    by_hub = {hub: name for name, hub in OPENAI_HUB_NAMES.items()}
    preset = str(name_or_path) if str(name_or_path) in PRESETS else by_hub.get(str(name_or_path))
    if preset is not None:
        return _with_act(PRESETS[preset].replace(**overrides), act)
    name = str(name_or_path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/")):
        from huggingface_hub import hf_hub_download

        try:
            config_file = pathlib.Path(hf_hub_download(name, "config.json"))
        except Exception as e:
            raise FileNotFoundError(f"{name}: not a local file or directory, and downloading its config.json from "
                                    f"the HF hub failed: {e}") from e
        return _with_act(config_from_hf(_read_hf_config(config_file), **overrides), act)
    raise FileNotFoundError(f"{name_or_path}: no such file or directory, and not a known model name or hub name")


def _state_dict_file_config(path: pathlib.Path, sd: Mapping[str, Any], overrides,
                            act: str | None = None) -> tuple[CLIPConfig, bool]:
    """(architecture, OpenAI layout?) of the state dict ``sd`` read from the file ``path``: an OpenAI
    one's from its shapes, an HF one's from the config.json beside it. The activation of an OpenAI
    layout: ``act``, else an ``open_clip_config.json`` beside the file, else QuickGELU for a
    TorchScript archive (OpenAI's releases); otherwise it cannot be known and UnknownActivation asks."""
    if is_openai_state_dict(sd):
        act = act or pretrained.open_clip_act(path.parent / "open_clip_config.json") or (
            "quick_gelu" if is_torchscript(path) else None)
        if act is None:
            raise UnknownActivation(
                f"{path}: an OpenAI-layout CLIP state dict does not record its activation (OpenAI's CLIP and "
                f"open_clip's *-quickgelu models use quick_gelu; open_clip's LAION and DataComp models gelu); "
                f"set --config.model.act=quick_gelu or gelu (clip.load(..., act=...))")
        return config_from_openai(sd, act=act, **overrides), True
    if (path.parent / "config.json").exists():
        return _with_act(config_from_hf(_read_hf_config(path.parent / "config.json"), **overrides), act), False
    raise CheckpointMismatchError(
        f"{path}: neither an OpenAI CLIP state dict (no visual.conv1.weight) nor an HF one with a config.json beside it"
    )


def _read_hf_config(config_file: pathlib.Path) -> dict[str, Any]:
    return read_hf_config(config_file.parent, "clip", "CLIP")


def save_hf(model: CLIP, directory: str | os.PathLike) -> pathlib.Path:
    """Writes config.json + model.safetensors that ``transformers.CLIPModel.from_pretrained`` loads."""
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2))
    size = model.config.vision.image_size
    (directory / "preprocessor_config.json").write_text(json.dumps({  # CLIPImageProcessor's, with the statistics
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(model.config.image_mean),
        "image_std": list(model.config.image_std), "do_convert_rgb": True}, indent=2))
    save_file(to_hf_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
