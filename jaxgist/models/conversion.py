"""What every model family's configs and checkpoint conversion share: the mismatch error that lists
every problem at once, checkpoint tensors (numpy, torch, bf16) as numpy arrays, an HF directory's
checked config.json, and presets resolved to configs.

    raise_if_mismatched("model.pth", "the ResNet", missing, unexpected, wrong_shape)
    array = as_numpy(state_dict["conv1.weight"])
    hf = read_hf_config(directory, "resnet", "ResNet")
    cfg = resolve_preset("resnet50", PRESETS, ResNetConfig, "ResNet", num_classes=10)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model; the message lists every problem."""


def as_numpy(value) -> np.ndarray:
    """A checkpoint tensor (numpy array, torch tensor, bf16 included) as a numpy array."""
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def raise_if_mismatched(source: str, model: str, missing: Sequence[str], unexpected: Sequence[str],
                        wrong_shape: Sequence[str], hint: str = "") -> None:
    """CheckpointMismatchError listing every missing, unexpected and wrong-shape key of ``source``
    against ``model`` (e.g. "the CLIP model"), then ``hint``; nothing when all three are empty."""
    if not (missing or unexpected or wrong_shape):
        return
    lines = [f"{source} does not match {model}:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if items:
            lines.append(f"  {len(items)} {title} key(s):")
            lines.extend(f"    {k}" for k in items)
    if hint:
        lines.append(hint)
    raise CheckpointMismatchError("\n".join(lines))


def read_hf_config(directory, model_type: str, what: str, hint: str = "") -> dict:
    """``directory/config.json`` of an HF model directory, checked to be of ``model_type`` (or to
    name none); ``what`` names the family in errors ("CLIP"), ``hint`` follows a wrong type."""
    import json
    import pathlib

    config_file = pathlib.Path(directory) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file.parent}: not an HF {what} directory (no config.json)")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: malformed JSON ({e})") from e
    if hf.get("model_type") not in (None, model_type):
        raise ValueError(f"{config_file}: model_type {hf.get('model_type')!r} is not {model_type!r}{hint}")
    return hf


def resolve_preset(preset_or_config, presets: dict, config_cls: type, family: str, **overrides):
    """A config of ``config_cls`` from a preset name (a key of ``presets``), a ``config_cls`` or a dict
    of its fields; then ``overrides`` (fields, applied with ``.replace``)."""
    if isinstance(preset_or_config, config_cls):
        cfg = preset_or_config
    elif isinstance(preset_or_config, str):
        if preset_or_config not in presets:
            raise ValueError(f"unknown {family} preset {preset_or_config!r}; known: {sorted(presets)}")
        cfg = presets[preset_or_config]
    elif isinstance(preset_or_config, dict):
        cfg = config_cls(**preset_or_config)
    else:
        raise TypeError(f"expected a preset name, {config_cls.__name__} or dict, got {type(preset_or_config).__name__}")
    return cfg.replace(**overrides) if overrides else cfg
