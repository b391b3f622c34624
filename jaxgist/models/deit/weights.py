"""DeiT weights in and out: timm / facebookresearch DeiT state dicts, and HF ``ViTForImageClassification``.

Each parameter of ours reads one or more checkpoint keys through a table entry (``_Source``): the keys
and the array transform in both directions. timm's names are ours with PyTorch leaf names (Linear
``weight`` (out, in) -> transposed ``kernel``, conv ``weight`` (O, I, kh, kw) -> ``kernel`` (kh, kw, I, O),
LayerNorm ``weight`` -> ``scale``). HF's ViT splits ``qkv`` into query/key/value (fused here) and
renames the rest; both HF layouts are read: the hub files' (``vit.encoder.layer.N.attention.attention.query``)
and transformers 5's (``vit.layers.N.attention.q_proj``). Every missing, unexpected and mis-shaped
key is reported at once in one ``CheckpointMismatchError``.

    model = deit.load("deit_b")                             # facebookresearch's DeiT-B (downloaded once)
    model = deit.load("facebook/deit-base-patch16-224")     # the HF hub copy
    model = deit.load("finetuned.pth", num_classes=200, reset_head=True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxgist.models.clip import pretrained
from jaxgist.models.clip.weights import _read_hf_dir, read_state_dict
from jaxgist.models.conversion import CheckpointMismatchError, as_numpy, raise_if_mismatched, read_hf_config
from jaxgist.models.deit.model import DeiT, DeiTConfig, abstract, new_head, resolve_config

# facebookresearch/deit's released (non-distilled) checkpoints, by preset name. The hex before
# ".pth" is the start of the file's sha256 (torch.hub's convention).
_FB = "https://dl.fbaipublicfiles.com/deit"
DEIT_URLS = {
    "deit_tiny": f"{_FB}/deit_tiny_patch16_224-a1311bcf.pth",
    "deit_small": f"{_FB}/deit_small_patch16_224-cd65a155.pth",
    "deit_b": f"{_FB}/deit_base_patch16_224-b5f2ef4d.pth",
    "deit_b_384": f"{_FB}/deit_base_patch16_384-8de9b5d1.pth",
}
DEIT_URLS.update({"deit_tiny_patch16_224": DEIT_URLS["deit_tiny"], "deit_small_patch16_224": DEIT_URLS["deit_small"],
                  "deit_base_patch16_224": DEIT_URLS["deit_b"], "deit_base_patch16_384": DEIT_URLS["deit_b_384"]})

_HF_POOLER = re.compile(r"^(vit\.)?pooler\.")  # ViTModel's tanh pooler: classification reads the class token
_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


# ---------------------------------------------------------------------------------------------
# The tables: our parameter path -> checkpoint keys, with the transforms both ways
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
    keys: tuple[str, ...]
    to_ours: Callable[[list[np.ndarray]], np.ndarray]
    from_ours: Callable[[np.ndarray], list[np.ndarray]]


def _torch_layout(path: str) -> tuple[Callable, Callable]:
    """(to ours, from ours) for one PyTorch tensor of the parameter at ``path``."""
    if path.endswith(".kernel"):
        def to_ours(v):
            return v.transpose(2, 3, 1, 0) if v.ndim == 4 else v.T  # conv (O, I, kh, kw) / Linear (out, in)

        def from_ours(v):
            return v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T

        return to_ours, from_ours
    return (lambda v: v), (lambda v: v)


def _single(key: str, path: str) -> _Source:
    to_ours, from_ours = _torch_layout(path)
    return _Source((key,), lambda vs: to_ours(vs[0]), lambda v: [from_ours(v)])


def _torch_leaf(path: str) -> tuple[str, str]:
    """'blocks.0.attn.qkv.kernel' -> ('blocks.0.attn.qkv', 'weight')."""
    module, _, leaf = path.rpartition(".")
    return module, {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)


def timm_source(path: str) -> _Source:
    """timm's key of our parameter ``path``: the same name with PyTorch's leaf."""
    module, leaf = _torch_leaf(path)
    return _single(f"{module}.{leaf}" if module else leaf, path)


_HF_TOP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "norm": "layernorm",
}
# block module -> (hub layout, transformers 5 layout)
_HF_BLOCK = {
    "norm1": ("layernorm_before", "layernorm_before"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "attn.proj": ("attention.output.dense", "attention.o_proj"),
    "mlp.fc1": ("intermediate.dense", "mlp.fc1"),
    "mlp.fc2": ("output.dense", "mlp.fc2"),
}
_HF_QKV = (("attention.attention.query", "attention.attention.key", "attention.attention.value"),
           ("attention.q_proj", "attention.k_proj", "attention.v_proj"))


def hf_source(path: str, *, prefix: str = "vit.", new_layout: bool = False) -> _Source:
    """The HF ViT key(s) of our parameter ``path``. ``prefix``: "vit." (ViTForImageClassification) or
    "" (a bare ViTModel); ``new_layout``: transformers 5's names instead of the hub files'."""
    module, leaf = _torch_leaf(path)
    if path in ("cls_token", "pos_embed"):
        return _single(prefix + _HF_TOP[path], path)
    if module == "head":
        return _single(f"classifier.{leaf}", path)
    if module in _HF_TOP:
        return _single(f"{prefix}{_HF_TOP[module]}.{leaf}", path)
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if m is None:
        raise KeyError(f"no HF ViT key for DeiT parameter {path!r}")
    block = f"{prefix}layers.{m.group(1)}." if new_layout else f"{prefix}encoder.layer.{m.group(1)}."
    if m.group(2) == "attn.qkv":
        keys = tuple(f"{block}{name}.{leaf}" for name in _HF_QKV[new_layout])
        to_ours, from_ours = _torch_layout(path)
        return _Source(keys, lambda vs: to_ours(np.concatenate(vs, axis=0)),
                       lambda v: list(np.split(from_ours(v), 3, axis=0)))
    return _single(f"{block}{_HF_BLOCK[m.group(2)][new_layout]}.{leaf}", path)


# ---------------------------------------------------------------------------------------------
# Building a model from a checkpoint
# ---------------------------------------------------------------------------------------------


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def _build(cfg: DeiTConfig, sd: Mapping[str, Any], source_of: Callable[[str], _Source], *, ignore=lambda k: False,
           checkpoint_classes: int, num_classes: int | None, reset_head: bool, seed: int, source: str,
           hint: str = "") -> DeiT:
    """The DeiT of ``cfg`` (its ``num_classes`` the checkpoint's) with every parameter read from ``sd``
    through ``source_of``; the head replaced as ``num_classes`` / ``reset_head`` ask."""
    target = checkpoint_classes if num_classes is None else int(num_classes)
    if target != checkpoint_classes and target != 0 and not reset_head:
        has = f"a head of {checkpoint_classes} classes" if checkpoint_classes else "no classifier head"
        raise ValueError(f"{source} has {has}, not num_classes={target}: pass reset_head=True for a freshly "
                         f"initialized head of {target} classes")
    fresh_head = target != 0 and (reset_head or checkpoint_classes == 0)
    cfg = cfg.replace(num_classes=target)
    graphdef, state = nnx.split(abstract(cfg))
    used, missing, mismatched, leaves = set(), [], [], []
    head_keys = set() if checkpoint_classes == 0 else {
        k for leaf in ("kernel", "bias") for k in source_of(f"head.{leaf}").keys}
    for path, var in nnx.to_flat_state(state):
        name = _dotted(path)
        if name.startswith("head.") and fresh_head:
            leaves.append((path, var))  # replaced below
            continue
        src = source_of(name)
        absent = [k for k in src.keys if k not in sd]
        if absent:
            missing.extend(absent)
            leaves.append((path, var))
            continue
        used.update(src.keys)
        raw = [as_numpy(sd[k]) for k in src.keys]
        expected = [e.shape for e in src.from_ours(np.empty(var.shape, np.int8))]
        if [r.shape for r in raw] != expected:
            for k, r, e in zip(src.keys, raw, expected):
                if r.shape != e:
                    mismatched.append(f"{k}: checkpoint {tuple(r.shape)}, model expects {tuple(e)}")
            leaves.append((path, var))
            continue
        leaves.append((path, var.replace(jnp.asarray(src.to_ours(raw), dtype=cfg.param_dtype))))
    skipped = head_keys if target != checkpoint_classes or fresh_head else set()
    unexpected = sorted(k for k in sd if k not in used and k not in skipped and not ignore(k))
    raise_if_mismatched(source, "the DeiT model", missing, unexpected, mismatched, hint)
    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    if fresh_head:
        model.head = new_head(cfg, nnx.Rngs(seed))
    return model


# ---------------------------------------------------------------------------------------------
# timm / facebookresearch DeiT state dicts
# ---------------------------------------------------------------------------------------------

_TIMM_NEEDED = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                "blocks.0.mlp.fc1.weight")


def is_timm_state_dict(sd: Mapping[str, Any]) -> bool:
    return "patch_embed.proj.weight" in sd and "cls_token" in sd


def _unwrap(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    """facebookresearch's DeiT files hold ``{"model": state_dict}``; DataParallel prefixes ``module.``."""
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def config_from_timm(sd: Mapping[str, Any], **overrides) -> DeiTConfig:
    """The architecture of a timm ViT state dict, from its shapes. Heads are width / 64 (every DeiT
    and timm ViT of these sizes) unless ``heads`` is given."""
    sd = _unwrap(sd)
    absent = [k for k in _TIMM_NEEDED if k not in sd]
    if absent:
        raise CheckpointMismatchError(f"not a timm VisionTransformer state dict: missing {absent}")
    shape = lambda k: tuple(as_numpy(sd[k]).shape)  # noqa: E731
    width, _, patch, _ = shape("patch_embed.proj.weight")
    tokens = shape("pos_embed")[1] - 1
    grid = round(tokens**0.5)
    if grid * grid != tokens:
        raise CheckpointMismatchError(f"pos_embed {shape('pos_embed')}: {tokens} patch positions are not a square "
                                      "grid (a checkpoint with extra tokens, e.g. a distilled DeiT?)")
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    fields = dict(image_size=patch * grid, patch=patch, width=width, depth=depth, heads=max(width // 64, 1),
                  mlp_ratio=shape("blocks.0.mlp.fc1.weight")[0] / width,
                  num_classes=shape("head.weight")[0] if "head.weight" in sd else 0,
                  qkv_bias="blocks.0.attn.qkv.bias" in sd)
    fields.update(overrides)
    return DeiTConfig(**fields)


def from_timm_state_dict(sd: Mapping[str, Any], cfg: DeiTConfig | None = None, *, num_classes: int | None = None,
                         reset_head: bool = False, seed: int = 0, source: str = "checkpoint", **overrides) -> DeiT:
    """A DeiT from a timm / facebookresearch DeiT state dict (numpy or torch arrays; ``{"model": sd}``
    is unwrapped). ``cfg``: the architecture (None: inferred from the shapes, with ``overrides``, e.g.
    ``dtype``, ``param_dtype``, ``remat``, ``drop_path``). ``num_classes`` other than the checkpoint's
    needs ``reset_head=True`` (a fresh head, initialized from ``seed``); 0 drops the head."""
    sd = _unwrap(sd)
    cfg = config_from_timm(sd, **overrides) if cfg is None else resolve_config(cfg, **overrides)
    hint = ("(a distilled DeiT: its dist_token and head_dist have no place here; use the non-distilled "
            "checkpoint)") if "dist_token" in sd else ""
    return _build(cfg, sd, timm_source, checkpoint_classes=cfg.num_classes, num_classes=num_classes,
                  reset_head=reset_head, seed=seed, source=source, hint=hint)


def _state_dict(model: DeiT, source_of: Callable[[str], _Source]) -> dict[str, np.ndarray]:
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        src = source_of(_dotted(path))
        values = src.from_ours(np.asarray(jax.device_get(var[...]), dtype=np.float32))
        out.update({k: np.ascontiguousarray(v) for k, v in zip(src.keys, values)})
    return out


def to_timm_state_dict(model: DeiT) -> dict[str, np.ndarray]:
    """timm-named float32 numpy state dict (``timm.create_model("deit_base_patch16_224")`` loads it)."""
    return _state_dict(model, timm_source)


# ---------------------------------------------------------------------------------------------
# HF ViTForImageClassification
# ---------------------------------------------------------------------------------------------


def config_from_hf(hf, **overrides) -> DeiTConfig:
    """The DeiTConfig of an HF ``ViTConfig`` (a dict of config.json or the config object); the number
    of classes is its ``num_labels`` (``id2label``)."""
    hf = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"HF ViT config: hidden_act={act!r}; DeiT uses the exact GELU ('gelu')")
    if hf.get("num_channels", 3) != 3:
        raise ValueError(f"HF ViT config: num_channels={hf['num_channels']}; DeiT takes RGB images")
    width = hf.get("hidden_size", 768)
    labels = hf.get("id2label")
    fields = dict(image_size=hf.get("image_size", 224), patch=hf.get("patch_size", 16), width=width,
                  depth=hf.get("num_hidden_layers", 12), heads=hf.get("num_attention_heads", 12),
                  mlp_ratio=hf.get("intermediate_size", 3072) / width, eps=hf.get("layer_norm_eps", 1e-12),
                  qkv_bias=hf.get("qkv_bias", True),
                  num_classes=len(labels) if labels else hf.get("num_labels", 2))
    fields.update(overrides)
    return DeiTConfig(**fields)


def from_hf_state_dict(sd: Mapping[str, Any], hf_config, *, num_classes: int | None = None, reset_head: bool = False,
                       seed: int = 0, source: str = "checkpoint", **overrides) -> DeiT:
    """A DeiT from an HF ``ViTForImageClassification`` state dict (or a bare ``ViTModel``'s: no
    ``vit.`` prefix, no classifier: a model without head unless ``num_classes`` and ``reset_head``
    ask for one) and its config (config.json as a dict, or a ``ViTConfig``). Reads the hub files'
    names and transformers 5's; ignores a ViTModel pooler (classification reads the class token).
    ``overrides``: DeiTConfig fields (``dtype``, ``param_dtype``, ``remat``, ``drop_path``, ...)."""
    sd = dict(sd)
    prefix = "vit." if any(k.startswith("vit.") for k in sd) else ""
    new_layout = any(k.startswith(f"{prefix}layers.") for k in sd)
    if "classifier.weight" not in sd and not prefix:
        overrides.setdefault("num_classes", 0)  # a ViTModel backbone
    cfg = config_from_hf(hf_config, **overrides)
    if any(_HF_POOLER.match(k) for k in sd):
        logging.info("%s: ignoring the ViT pooler (DeiT classifies from the class token)", source)
    return _build(cfg, sd, lambda p: hf_source(p, prefix=prefix, new_layout=new_layout),
                  ignore=lambda k: bool(_HF_POOLER.match(k)), checkpoint_classes=cfg.num_classes,
                  num_classes=num_classes, reset_head=reset_head, seed=seed, source=source)


def to_hf_state_dict(model: DeiT) -> dict[str, np.ndarray]:
    """HF ViTForImageClassification-named float32 numpy state dict (the hub files' names)."""
    return _state_dict(model, hf_source)


# ---------------------------------------------------------------------------------------------
# Files, names and the hub
# ---------------------------------------------------------------------------------------------


def _read_hf_config(directory: pathlib.Path) -> dict[str, Any]:
    return read_hf_config(directory, "vit", "ViT",
                          " (HF's 'deit' models are the distilled ones, which have no place here)")


def _download_deit(url: str) -> pathlib.Path:
    """facebookresearch's file at ``url``, cached, checked against the sha256 prefix in its name."""
    file = pretrained.download(url)
    m = re.search(r"-([0-9a-f]{8,})\.pth$", url)
    if m:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        if not digest.hexdigest().startswith(m.group(1)):
            file.unlink(missing_ok=True)
            raise FileNotFoundError(f"downloading {url}: sha256 {digest.hexdigest()} does not start with {m.group(1)}")
    return file


def load(name_or_path: str | os.PathLike, *, num_classes: int | None = None, reset_head: bool = False,
         dtype=jnp.float32, compute_dtype=None, remat: bool = False, seed: int = 0, **overrides) -> DeiT:
    """A pretrained DeiT.

    ``name_or_path``: a state-dict file (``.pth``/``.pt``/``.bin``/``.safetensors``, timm keys, or HF
    keys with a config.json beside it), a local HF directory (config.json + model.safetensors /
    pytorch_model.bin), a DeiT name ("deit_tiny", "deit_small", "deit_b", "deit_b_384" or timm's
    names: facebookresearch's files, downloaded once) or an HF hub name
    ("facebook/deit-base-patch16-224"). ``num_classes`` other than the checkpoint's needs
    ``reset_head=True`` (a fresh head, initialized from ``seed``); 0 drops the head. ``dtype``: the
    parameters'; ``compute_dtype``: the matmuls' (default ``dtype``); ``overrides``: other DeiTConfig
    fields (``drop_path``, ``dropout``) for fine-tuning. Raises FileNotFoundError naming what cannot be found.
    """
    overrides = dict(param_dtype=dtype, dtype=compute_dtype or dtype, remat=remat, **overrides)
    head = dict(num_classes=num_classes, reset_head=reset_head, seed=seed)
    path = pathlib.Path(name_or_path)
    if path.is_dir():
        hf = _read_hf_config(path)
        return from_hf_state_dict(_read_hf_dir(path), hf, source=str(path), **head, **overrides)
    if path.is_file():
        sd = _unwrap(read_state_dict(path))
        if is_timm_state_dict(sd):
            return from_timm_state_dict(sd, source=str(path), **head, **overrides)
        if (path.parent / "config.json").is_file():
            return from_hf_state_dict(sd, _read_hf_config(path.parent), source=str(path), **head, **overrides)
        raise CheckpointMismatchError(f"{path}: neither a timm state dict (no patch_embed.proj.weight / cls_token) "
                                      "nor an HF one with a config.json beside it")
    name = str(name_or_path)
    if name in DEIT_URLS:
        file = _download_deit(DEIT_URLS[name])
        return from_timm_state_dict(read_state_dict(file), source=f"{name} ({file})", **head, **overrides)
    if (re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/", "~"))
            and not name.endswith(_SUFFIXES)):
        directory, hf_format = pretrained.fetch_hub(name)  # FileNotFoundError naming the repo when unreachable
        if not hf_format:
            raise ValueError(f"the hub repo {name} has no HF-format ViT weights (config.json + model weights)")
        return load(directory, dtype=dtype, compute_dtype=compute_dtype, remat=remat, **head,
                    **{k: v for k, v in overrides.items() if k not in ("param_dtype", "dtype", "remat")})
    raise FileNotFoundError(f"{name_or_path}: no such file or directory, and not a DeiT name ({sorted(DEIT_URLS)}) "
                            "or HF hub name")
