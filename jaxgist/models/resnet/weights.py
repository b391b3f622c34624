"""ResNet weights in and out: torchvision state dicts, HF ``ResNetForImageClassification`` checkpoints, names.

Our parameter paths are torchvision's module names with Flax leaf names, so a torchvision key is our
path with the leaf renamed (``kernel``/``scale`` -> ``weight``, ``mean``/``var`` -> ``running_mean``/
``running_var``), convolution kernels transposed (O, I, kh, kw) <-> (kh, kw, I, O) and the classifier
(out, in) <-> (in, out). HF's names are torchvision's renamed by the table ``HF_NAMES``. Every missing,
unexpected and mis-shaped key is reported at once in one ``CheckpointMismatchError``.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgist.models.clip import pretrained
from jaxgist.models.clip.weights import read_state_dict
from jaxgist.models.conversion import CheckpointMismatchError, as_numpy, raise_if_mismatched, read_hf_config
from jaxgist.models.resnet.model import ResNet, ResNetConfig, abstract

# torchvision's ImageNet weights (``torchvision.models.ResNet*_Weights``); a bare name is the best
# published: IMAGENET1K_V2 where it exists. The 8 hex digits before ``.pth`` start the file's sha256.
_TV = "https://download.pytorch.org/models"
TORCHVISION_WEIGHTS = {
    "resnet18.IMAGENET1K_V1": f"{_TV}/resnet18-f37072fd.pth",
    "resnet34.IMAGENET1K_V1": f"{_TV}/resnet34-b627a593.pth",
    "resnet50.IMAGENET1K_V1": f"{_TV}/resnet50-0676ba61.pth",
    "resnet50.IMAGENET1K_V2": f"{_TV}/resnet50-11ad3fa6.pth",
    "resnet101.IMAGENET1K_V1": f"{_TV}/resnet101-63fe2227.pth",
    "resnet101.IMAGENET1K_V2": f"{_TV}/resnet101-cd907fc2.pth",
    "resnet152.IMAGENET1K_V1": f"{_TV}/resnet152-394f9c45.pth",
    "resnet152.IMAGENET1K_V2": f"{_TV}/resnet152-f82ba261.pth",
}
TORCHVISION_WEIGHTS.update({
    "resnet18": TORCHVISION_WEIGHTS["resnet18.IMAGENET1K_V1"],
    "resnet34": TORCHVISION_WEIGHTS["resnet34.IMAGENET1K_V1"],
    "resnet50": TORCHVISION_WEIGHTS["resnet50.IMAGENET1K_V2"],
    "resnet101": TORCHVISION_WEIGHTS["resnet101.IMAGENET1K_V2"],
    "resnet152": TORCHVISION_WEIGHTS["resnet152.IMAGENET1K_V2"],
})

IGNORED_KEYS = re.compile(r"(^|\.)num_batches_tracked$")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")

# ---------------------------------------------------------------------------------------------
# Our parameter path <-> torchvision key <-> HF key
# ---------------------------------------------------------------------------------------------

_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}

# torchvision key (regex) -> HF ``ResNetForImageClassification`` key; ``{stage}`` and ``{conv}`` are
# torchvision's 1-based stage (layerN) and convolution (convN/bnN) numbers less one (HF counts from 0).
HF_NAMES = (
    (r"conv1\.weight", "resnet.embedder.embedder.convolution.weight"),
    (r"bn1\.(?P<leaf>\w+)", "resnet.embedder.embedder.normalization.{leaf}"),
    (r"layer(?P<stage>\d)\.(?P<block>\d+)\.conv(?P<conv>\d)\.weight",
     "resnet.encoder.stages.{stage}.layers.{block}.layer.{conv}.convolution.weight"),
    (r"layer(?P<stage>\d)\.(?P<block>\d+)\.bn(?P<conv>\d)\.(?P<leaf>\w+)",
     "resnet.encoder.stages.{stage}.layers.{block}.layer.{conv}.normalization.{leaf}"),
    (r"layer(?P<stage>\d)\.(?P<block>\d+)\.downsample\.0\.weight",
     "resnet.encoder.stages.{stage}.layers.{block}.shortcut.convolution.weight"),
    (r"layer(?P<stage>\d)\.(?P<block>\d+)\.downsample\.1\.(?P<leaf>\w+)",
     "resnet.encoder.stages.{stage}.layers.{block}.shortcut.normalization.{leaf}"),
    (r"fc\.(?P<leaf>weight|bias)", "classifier.1.{leaf}"),
)
_HF_RULES = tuple((re.compile(pattern), template) for pattern, template in HF_NAMES)


def torchvision_key(path: str) -> str:
    """Our dotted path ("layer1.0.bn2.var") -> torchvision's state-dict key ("layer1.0.bn2.running_var")."""
    module, _, leaf = path.rpartition(".")
    return f"{module}.{_LEAVES.get(leaf, leaf)}"


def hf_key(path: str) -> str:
    """Our dotted path -> HF ``ResNetForImageClassification``'s state-dict key."""
    key = torchvision_key(path)
    for pattern, template in _HF_RULES:
        if m := pattern.fullmatch(key):
            groups = m.groupdict()
            for one_based in ("stage", "conv"):
                if one_based in groups:
                    groups[one_based] = int(groups[one_based]) - 1
            return template.format(**groups)
    raise KeyError(f"no HF name for the ResNet parameter {path!r}")


def _to_ours(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # convolution (O, I, kh, kw) -> (kh, kw, I, O)
    if value.ndim == 2:
        return value.T  # Linear (out, in) -> (in, out)
    return value


def _to_torch(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:
        return value.T
    return value


def _strip_module_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    """DataParallel/DDP save every key under ``module.``."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _build(cfg: ResNetConfig, sd: Mapping[str, Any], key_of: Callable[[str], str], *, source: str, dtype,
           param_dtype, remat) -> ResNet:
    """A ResNet of ``cfg`` whose every parameter and statistic is read from ``sd`` at ``key_of(path)``;
    every missing, unexpected and mis-shaped key reported together."""
    model = abstract(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat)
    graphdef, state = nnx.split(model)
    used, missing, mismatched, leaves = set(), [], [], []
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(p) for p in path)
        key = key_of(name)
        if key not in sd:
            missing.append(key)
            leaves.append((path, var))
            continue
        used.add(key)
        raw = as_numpy(sd[key])
        value = _to_ours(raw)
        if tuple(value.shape) != tuple(var.shape):
            expected = _to_torch(np.empty(var.shape, np.int8)).shape
            mismatched.append(f"{key}: checkpoint {tuple(raw.shape)}, model expects {tuple(expected)}")
            leaves.append((path, var))
            continue
        target = jnp.float32 if isinstance(var, nnx.BatchStat) else param_dtype
        leaves.append((path, var.replace(jnp.asarray(value, dtype=target))))
    unexpected = sorted(k for k in sd if k not in used and not IGNORED_KEYS.search(k))
    raise_if_mismatched(source, f"the ResNet ({_describe(cfg)})", missing, unexpected, mismatched)
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _describe(cfg: ResNetConfig) -> str:
    return (f"{cfg.block} blocks {list(cfg.layers)}, width {cfg.width}, {cfg.num_classes} classes"
            + (", v1 bottlenecks" if cfg.downsample_in_bottleneck else ""))


# ---------------------------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------------------------


def is_hf_state_dict(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("resnet.embedder.", "embedder.embedder.")) for k in sd)


def config_from_torchvision(sd: Mapping[str, Any], **overrides) -> ResNetConfig:
    """The architecture of a torchvision ResNet state dict, from its keys and shapes: block type
    (a ``conv3`` in the blocks: bottleneck), blocks per stage, width (the stem's channels) and
    classes (``fc``'s rows; 0 without ``fc``)."""
    sd = _strip_module_prefix(sd)
    need = [k for k in ("conv1.weight", "layer1.0.conv1.weight") if k not in sd]
    if need:
        hint = (" (it has HF's ResNetForImageClassification keys: use from_hf_state_dict, or load its directory)"
                if is_hf_state_dict(sd) else "")
        raise CheckpointMismatchError(f"not a torchvision ResNet state dict: no {need}{hint}; "
                                      f"its first keys: {sorted(sd)[:5]}")
    shape = lambda k: tuple(as_numpy(sd[k]).shape)  # noqa: E731
    block = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    width = shape("conv1.weight")[0]
    layers = []
    for i in range(1, 5):
        indices = {k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}
        layers.append(len({int(j) for j in indices if j.isdigit()}))
    if min(layers) == 0:
        raise CheckpointMismatchError(f"not a torchvision ResNet state dict: blocks per stage {layers} "
                                      f"(a stage without blocks)")
    inner = shape("layer1.0.conv1.weight")[0]
    if inner != width:
        raise CheckpointMismatchError(
            f"layer1.0.conv1 has {inner} output channels where a plain torchvision ResNet of width {width} has "
            f"{width}: wide ResNets and ResNeXts (other bottleneck widths, grouped convolutions) are not supported")
    num_classes = shape("fc.weight")[0] if "fc.weight" in sd else 0
    cfg = ResNetConfig(layers=tuple(layers), num_classes=num_classes, width=width, block=block)
    return cfg.replace(**overrides) if overrides else cfg


def from_torchvision_state_dict(sd: Mapping[str, Any], cfg: ResNetConfig | None = None, *,
                                dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, remat: bool = False,
                                source: str = "the state dict") -> ResNet:
    """A ResNet from a torchvision state dict (numpy or torch arrays; ``num_batches_tracked`` ignored,
    a ``module.`` prefix stripped). ``cfg`` None: inferred from the keys and shapes
    (``config_from_torchvision``). ``dtype`` is the compute dtype, ``param_dtype`` the parameters'
    (checkpoint arrays are cast to it; BatchNorm statistics stay float32)."""
    sd = _strip_module_prefix(sd)
    if cfg is None:
        cfg = config_from_torchvision(sd)
    return _build(cfg, sd, torchvision_key, source=source, dtype=dtype, param_dtype=param_dtype, remat=remat)


def to_torchvision_state_dict(model: ResNet) -> dict[str, np.ndarray]:
    """torchvision-named float32 numpy state dict (what ``torchvision.models.resnet50().load_state_dict``
    takes; PyTorch fills in the ``num_batches_tracked`` counters it lacks)."""
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    out = {}
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(p) for p in path)
        value = np.asarray(jax.device_get(var[...]), dtype=np.float32)
        out[torchvision_key(name)] = np.array(_to_torch(value), order="C")
    return out


# ---------------------------------------------------------------------------------------------
# HF transformers (``ResNetForImageClassification``, ``ResNetModel``)
# ---------------------------------------------------------------------------------------------


def config_from_hf(hf_config, *, num_classes: int | None = None) -> ResNetConfig:
    """ResNetConfig of an HF ``ResNetConfig`` (object or config.json dict). HF's ResNets are more
    general than torchvision's; those that are not torchvision's layout are refused with the reason."""
    hf = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    if hf.get("model_type", "resnet") != "resnet":
        raise ValueError(f"model_type {hf.get('model_type')!r} is not 'resnet'")
    block = hf.get("layer_type", "bottleneck")
    width = int(hf.get("embedding_size", 64))
    depths = tuple(hf.get("depths", (3, 4, 6, 3)))
    hidden = [int(h) for h in hf.get("hidden_sizes", (256, 512, 1024, 2048))]
    expansion = 4 if block == "bottleneck" else 1
    problems = []
    if block not in ("basic", "bottleneck"):
        problems.append(f"layer_type {block!r} is neither 'basic' nor 'bottleneck'")
    if len(depths) != 4:
        problems.append(f"depths {list(depths)}: torchvision's ResNets have 4 stages")
    want = [width * 2**i * expansion for i in range(len(depths))]
    if hidden != want:
        problems.append(f"hidden_sizes {hidden} with embedding_size {width}: torchvision's layout has {want}")
    if hf.get("downsample_in_first_stage", False):
        problems.append("downsample_in_first_stage: torchvision's first stage does not stride")
    if hf.get("hidden_act", "relu") != "relu":
        problems.append(f"hidden_act {hf.get('hidden_act')!r} (torchvision's is relu)")
    if int(hf.get("num_channels", 3)) != 3:
        problems.append(f"num_channels {hf.get('num_channels')} (RGB: 3)")
    if problems:
        raise CheckpointMismatchError("an HF ResNet that is not torchvision's architecture: " + "; ".join(problems))
    if num_classes is None:
        labels = hf.get("id2label")
        num_classes = len(labels) if labels else int(hf.get("num_labels", 2))
    return ResNetConfig(layers=depths, num_classes=num_classes, width=width, block=block,
                        downsample_in_bottleneck=bool(hf.get("downsample_in_bottleneck", False)))


def from_hf_state_dict(sd: Mapping[str, Any], hf_config, *, dtype: Any = jnp.float32,
                       param_dtype: Any = jnp.float32, remat: bool = False,
                       source: str = "the HF state dict") -> ResNet:
    """A ResNet from the state dict of HF's ``ResNetForImageClassification`` (or ``ResNetModel``: keys
    without the ``resnet.`` prefix and no classifier, giving a model without ``fc``) and its config
    (an HF ``ResNetConfig`` or the config.json dict). The number of classes is the classifier's rows.
    ``downsample_in_bottleneck`` (v1, stride in the first 1x1) is supported."""
    sd = _strip_module_prefix(sd)
    if any(k.startswith("embedder.embedder.") for k in sd) and not any(k.startswith("resnet.") for k in sd):
        sd = {f"resnet.{k}": v for k, v in sd.items()}  # ResNetModel: the backbone alone
    head = sd.get("classifier.1.weight")
    cfg = config_from_hf(hf_config, num_classes=0 if head is None else int(as_numpy(head).shape[0]))
    return _build(cfg, sd, hf_key, source=source, dtype=dtype, param_dtype=param_dtype, remat=remat)


# ---------------------------------------------------------------------------------------------
# Files and names
# ---------------------------------------------------------------------------------------------


def _read_hf_config(directory: pathlib.Path) -> dict[str, Any]:
    return read_hf_config(directory, "resnet", "ResNet")


def _read_hf_dir(directory: pathlib.Path) -> tuple[dict[str, Any], pathlib.Path]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return read_state_dict(directory / name), directory / name
    raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin")


def _download_torchvision(url: str) -> pathlib.Path:
    """torchvision's file into the cache, checked against the sha256 prefix in its name."""
    path = pretrained.download(url)
    m = re.search(r"-([0-9a-f]{8,})\.pth?$", path.name)
    if m:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        if not digest.hexdigest().startswith(m.group(1)):
            path.unlink(missing_ok=True)
            raise FileNotFoundError(f"downloading {url}: the file's sha256 {digest.hexdigest()} does not start with "
                                    f"{m.group(1)} (its name's); the corrupt copy was removed")
    return path


def _load_checkpoint(name_or_path, kw) -> ResNet:
    path = pathlib.Path(name_or_path)
    name = str(name_or_path)
    if path.is_dir():
        hf = _read_hf_config(path)
        sd, file = _read_hf_dir(path)
        return from_hf_state_dict(sd, hf, source=str(file), **kw)
    if path.is_file():
        sd = read_state_dict(path)
        if path.suffix == ".safetensors":
            sd = _strip_module_prefix(sd)
        if is_hf_state_dict(sd):
            if not (path.parent / "config.json").is_file():
                raise CheckpointMismatchError(f"{path}: HF ResNet keys, but no config.json beside it")
            return from_hf_state_dict(sd, _read_hf_config(path.parent), source=str(path), **kw)
        return from_torchvision_state_dict(sd, source=str(path), **kw)
    if name in TORCHVISION_WEIGHTS:
        file = _download_torchvision(TORCHVISION_WEIGHTS[name])
        return from_torchvision_state_dict(read_state_dict(file), source=f"{name} ({file})", **kw)
    looks_like_repo = (re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/"))
                       and not name.endswith(CHECKPOINT_SUFFIXES))
    if looks_like_repo:
        directory, hf_format = pretrained.fetch_hub(name)  # FileNotFoundError naming the repo when unreachable
        if not hf_format:
            raise CheckpointMismatchError(f"the hub repo {name} has no HF-format ResNet (config.json + weights)")
        return _load_checkpoint(directory, kw)
    raise FileNotFoundError(f"{name}: no such file or directory, and not a torchvision ResNet name "
                            f"({', '.join(sorted(TORCHVISION_WEIGHTS))}) or an HF hub name")


def load(name_or_path: str | os.PathLike, *, num_classes: int | None = None, reset_head: bool = False,
         dtype: Any = jnp.float32, compute_dtype: Any = None, remat: bool = False, seed: int = 0) -> ResNet:
    """Loads a pretrained ResNet.

    ``name_or_path``: a torchvision-layout state-dict file (``.pth``/``.pt``/``.bin``/``.safetensors``,
    bare or inside a training checkpoint's ``model``/``state_dict``, ``module.`` prefixes stripped), a
    local HF directory (config.json + model.safetensors or pytorch_model.bin), a torchvision name
    ("resnet50": its IMAGENET1K_V2 weights, downloaded and cached; "resnet50.IMAGENET1K_V1": the
    originals; ``TORCHVISION_WEIGHTS``) or an HF hub name ("microsoft/resnet-50").

    ``dtype``: the parameters' dtype (as ``clip.load``); ``compute_dtype``: the convolutions' (default
    ``dtype``). ``num_classes`` other than the checkpoint's is an error unless ``reset_head``, which
    keeps the backbone and gives a fresh ``fc`` (of ``num_classes``, else the checkpoint's count;
    0: none) initialized from ``seed``.
    """
    kw = dict(dtype=compute_dtype or dtype, param_dtype=dtype, remat=remat)
    model = _load_checkpoint(name_or_path, kw)
    have = model.config.num_classes
    if reset_head:
        model.replace_head(have if num_classes is None else num_classes, seed=seed)
    elif num_classes is not None and num_classes != have:
        raise CheckpointMismatchError(
            f"{name_or_path} has a {have}-class head, not {num_classes}; pass reset_head=True to keep its backbone "
            f"and start a fresh {num_classes}-class fc")
    return model
