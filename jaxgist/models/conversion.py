"""What every model family's checkpoint conversion shares: the mismatch error that lists every problem
at once, and checkpoint tensors (numpy, torch, bf16) as numpy arrays.

    raise_if_mismatched("model.pth", "the ResNet", missing, unexpected, wrong_shape)
    array = as_numpy(state_dict["conv1.weight"])
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
