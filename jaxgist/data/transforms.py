"""Image transforms into CLIP's input: float32 NHWC pixels normalized with CLIP's mean and std.

Per-image functions take uint8 RGB pixels [H, W, 3] (as `jaxgist.data.images` returns them) and
use only numpy and PIL, so they run inside grain worker processes. Randomness comes from an
explicit `np.random.Generator`, so an augmentation is reproducible from its seed.

- Evaluation (`clip_eval_preprocess`): CLIP's preprocessing, matching
  `transformers.CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})`
  (PIL backend): bicubic resize of the short side to S, the long side to `int(S * long / short)`
  (truncated), then a center crop whose offsets are `(resized - S) // 2` (rounded down).
- Training (`train_preprocess`): torchvision's RandomResizedCrop (bicubic) followed by a horizontal
  flip with probability 1/2, then CLIP normalization.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "normalize",
    "resize_center_crop",
    "clip_eval_preprocess",
    "random_resized_crop_box",
    "random_resized_crop_flip",
    "train_preprocess",
]

# OpenAI CLIP's normalization constants (RGB, on [0, 1] pixels).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


# uint8 value -> normalized float32, per channel: the same numbers as (v / 255 - mean) / std computed
# in float32, for a table lookup instead of three passes over the image.
_NORMALIZED = np.stack([((np.arange(256, dtype=np.float32) / np.float32(255.0)) - CLIP_MEAN[c]) / CLIP_STD[c]
                        for c in range(3)]).astype(np.float32)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] (or float in [0, 1]) -> float32 CLIP-normalized pixels, same shape."""
    images = np.asarray(images)
    if images.shape[-1] != 3:
        raise ValueError(f"expected RGB images with 3 channels last, got shape {images.shape}")
    if images.dtype == np.uint8:
        out = np.empty(images.shape, np.float32)
        for c in range(3):
            out[..., c] = _NORMALIZED[c][images[..., c]]
        return out
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x /= 255.0
    return (x - CLIP_MEAN) / CLIP_STD


def _check_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB pixels [H, W, 3], got {image.dtype} {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected a non-empty image, got shape {image.shape}")
    return image


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_height, new_width) with the short side = size and the long side int(size * long / short)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: CLIP's resize (short side, bicubic) and center crop.

    This is `clip_eval_preprocess` without the scaling to [0, 1] and the normalization.
    """
    image = _check_rgb_uint8(image)
    height, width = image.shape[:2]
    new_height, new_width = _shortest_edge_size(height, width, size)
    resized = Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BICUBIC)
    top = (new_height - size) // 2
    left = (new_width - size) // 2
    return np.ascontiguousarray(np.asarray(resized)[top : top + size, left : left + size])


def clip_eval_preprocess(image: np.ndarray, size: int = 224) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [size, size, 3]: CLIP's evaluation preprocessing, normalized."""
    return normalize(resize_center_crop(image, size))


# ---------------------------------------------------------------------------------------------
# Training augmentation
# ---------------------------------------------------------------------------------------------


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) of a random crop, as torchvision's RandomResizedCrop.

    Up to 10 attempts draw an area fraction uniformly from `scale` and an aspect ratio (width /
    height) log-uniformly from `ratio`; the first crop that fits in the image is placed uniformly
    at random. If none fits, the fallback is a central crop of the whole image, narrowed to the
    nearest bound of `ratio` when the image's own aspect ratio lies outside it.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_flip(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: a random resized crop (bicubic), flipped with p = 1/2.

    Draws from `rng` in a fixed order (the crop box, then one uniform number for the flip), so the
    result is a function of the image and the generator's state.
    """
    image = _check_rgb_uint8(image)
    top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    crop = Image.fromarray(image[top : top + h, left : left + w])
    out = np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def train_preprocess(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [size, size, 3]: random resized crop, flip, CLIP normalization."""
    return normalize(random_resized_crop_flip(image, size, rng))
