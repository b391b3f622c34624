"""Image transforms into CLIP's input: float32 NHWC pixels normalized with CLIP's mean and std."""

from __future__ import annotations

import numpy as np

# OpenAI CLIP's normalization constants (RGB, on [0, 1] pixels).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] (or float in [0, 1]) -> float32 CLIP-normalized pixels, same shape."""
    images = np.asarray(images)
    if images.shape[-1] != 3:
        raise ValueError(f"expected RGB images with 3 channels last, got shape {images.shape}")
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x /= 255.0
    return (x - CLIP_MEAN) / CLIP_STD
