"""Image transforms into CLIP's input: float32 NHWC pixels normalized with CLIP's mean and std.

Per-image functions take uint8 RGB pixels [H, W, 3] (as `jaxgist.data.images` returns them; the
evaluation ones also a decoded PIL image in its stored mode) and use only numpy and PIL, so they run
inside grain worker processes. Randomness comes from an explicit `np.random.Generator`, so an
augmentation is reproducible from its seed.

- Evaluation (`clip_eval_preprocess`): CLIP's preprocessing: bicubic resize of the short side to S,
  the long side to `int(S * long / short)` (truncated), then a center crop of S x S. Two rules for
  the crop offset and the colour conversion (`crop_rounding`):
  - "torchvision" (the default): as OpenAI's `clip`, open_clip and every seed method this library
    reimplements, `Compose([Resize(S, BICUBIC), CenterCrop(S), convert RGB, ToTensor(), Normalize])`
    on a PIL image: offsets `int(round((resized - S) / 2))` (Python's round, halves to even), and a
    PIL image is resized in its own mode and converted to RGB after the crop. That order matters for
    palette (P) and 1-bit images, which PIL resizes with NEAREST whatever filter is asked, and slightly
    (rounding, clipping, premultiplied alpha) for LA, RGBA, CMYK, YCbCr and 16-bit gray; L gives the
    same pixels either way. The conversion itself follows `images.to_rgb` (alpha composited on white,
    16-bit gray scaled), not PIL's `convert("RGB")`. Exceptions, converted first: a non-palette image
    with a `transparency` key colour (interpolation would invent and erase key pixels) and PA (palette
    indices are not interpolable).
  - "hf": as `transformers.CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S,
    "width": S})` (PIL backend): every image converted to RGB first (`images.to_rgb`), then resized;
    offsets `(resized - S) // 2` (rounded down). The two rules' offsets differ by one pixel when
    `resized - S` is 3 modulo 4 (e.g. a 96 x 80 image at 336 px: 403 wide, offset 34 vs 33).
- Training (`train_preprocess`): torchvision's RandomResizedCrop (bicubic) followed by a horizontal
  flip with probability 1/2, then CLIP normalization.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from jaxgist.data import augment
from jaxgist.data import images as images_lib

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CROP_ROUNDINGS",
    "check_crop_rounding",
    "normalize",
    "resize_center_crop",
    "clip_eval_preprocess",
    "random_resized_crop_box",
    "random_resized_crop_flip",
    "train_preprocess",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGENET_FILL",
    "INTERPOLATIONS",
    "classifier_train_preprocess",
    "classifier_eval_preprocess",
]

# OpenAI CLIP's normalization constants (RGB, on [0, 1] pixels).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

# torchvision's ImageNet normalization (classifiers trained on ImageNet: GPT4Image's ResNet and DeiT).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# RandAugment's fill colour for ImageNet-normalized classifiers: timm's ``round(255 * mean)``.
IMAGENET_FILL = tuple(min(255, round(255 * float(m))) for m in IMAGENET_MEAN)

# Evaluation preprocessing rules (module docstring): torchvision's (OpenAI's clip, open_clip) and HF's.
CROP_ROUNDINGS = ("torchvision", "hf")


# uint8 value -> normalized float32, per channel: the same numbers as (v / 255 - mean) / std computed
# in float32, for a table lookup instead of three passes over the image.
_NORMALIZED = np.stack([((np.arange(256, dtype=np.float32) / np.float32(255.0)) - CLIP_MEAN[c]) / CLIP_STD[c]
                        for c in range(3)]).astype(np.float32)


def normalize(images: np.ndarray, stats: str = "clip") -> np.ndarray:
    """uint8 [..., H, W, 3] (or float in [0, 1]) -> float32 pixels normalized with CLIP's mean and std
    (``stats="clip"``) or torchvision's ImageNet ones (``"imagenet"``), same shape."""
    images = np.asarray(images)
    if images.shape[-1] != 3:
        raise ValueError(f"expected RGB images with 3 channels last, got shape {images.shape}")
    if stats == "imagenet":
        x = images.astype(np.float32) / np.float32(255.0) if images.dtype == np.uint8 else images.astype(np.float32)
        return (x - IMAGENET_MEAN) / IMAGENET_STD
    if stats != "clip":
        raise ValueError(f"stats={stats!r} is not 'clip' or 'imagenet'")
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
    """(new_height, new_width) with the short side = size and the long side int(size * long / short).

    The same expression in both rules: torchvision's `_compute_resized_output_size` (short side =
    width when width <= height, long side `int(size * long / short)`) and HF's shortest-edge resize.
    """
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def check_crop_rounding(crop_rounding: str) -> str:
    """``crop_rounding`` if it is one of ``CROP_ROUNDINGS``; ValueError naming them otherwise."""
    if crop_rounding not in CROP_ROUNDINGS:
        raise ValueError(f"crop_rounding={crop_rounding!r} is not one of {CROP_ROUNDINGS}")
    return crop_rounding


def _crop_offset(excess: int, crop_rounding: str) -> int:
    """Offset of a centered crop from an edge `excess` pixels longer than the crop."""
    if check_crop_rounding(crop_rounding) == "torchvision":
        return int(round(excess / 2.0))  # torchvision's F.center_crop; Python's round takes halves to even
    return excess // 2  # HF's CLIPImageProcessor.center_crop


def _resized_in_own_mode(image: Image.Image) -> bool:
    """Whether torchvision's order applies to this PIL image: resized in its own mode, converted after the
    crop. RGB gives the same pixels either way (so it takes the array path); the exceptions are the
    module docstring's."""
    if image.mode in ("RGB", "PA"):
        return False
    return "transparency" not in image.info or image.mode in ("1", "P")  # NEAREST keeps key values exact


def _resize_center_crop_in_mode(image: Image.Image, size: int) -> np.ndarray:
    """torchvision's Resize(size, BICUBIC) + CenterCrop(size) on a PIL image of any mode, then RGB.

    PIL's `resize` itself picks NEAREST for modes 1 and P and resamples LA/RGBA premultiplied."""
    new_height, new_width = _shortest_edge_size(image.height, image.width, size)
    resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    top = _crop_offset(new_height - size, "torchvision")
    left = _crop_offset(new_width - size, "torchvision")
    return images_lib.to_rgb(resized.crop((left, top, left + size, top + size)))


def resize_center_crop(image: np.ndarray | Image.Image, size: int, crop_rounding: str = "torchvision") -> np.ndarray:
    """uint8 [H, W, 3] or a PIL image -> uint8 [size, size, 3]: CLIP's resize (short side, bicubic) and
    center crop, under ``crop_rounding``'s rule (module docstring).

    This is `clip_eval_preprocess` without the scaling to [0, 1] and the normalization.
    """
    check_crop_rounding(crop_rounding)
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"expected a non-empty image, got size {image.size}")
        if crop_rounding == "torchvision" and _resized_in_own_mode(image):
            return _resize_center_crop_in_mode(image, size)
        image = images_lib.to_rgb(image)
    image = _check_rgb_uint8(image)
    height, width = image.shape[:2]
    new_height, new_width = _shortest_edge_size(height, width, size)
    resized = Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BICUBIC)
    top = _crop_offset(new_height - size, crop_rounding)
    left = _crop_offset(new_width - size, crop_rounding)
    return np.ascontiguousarray(np.asarray(resized)[top : top + size, left : left + size])


def clip_eval_preprocess(image: np.ndarray | Image.Image, size: int = 224,
                         crop_rounding: str = "torchvision") -> np.ndarray:
    """uint8 [H, W, 3] or a PIL image -> float32 [size, size, 3]: CLIP's evaluation preprocessing under
    ``crop_rounding``'s rule ("torchvision" or "hf", module docstring), normalized."""
    return normalize(resize_center_crop(image, size, crop_rounding))


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
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: a random resized crop (bicubic, or ``resample``),
    flipped with p = 1/2.

    Draws from `rng` in a fixed order (the crop box, then one uniform number for the flip), so the
    result is a function of the image and the generator's state.
    """
    image = _check_rgb_uint8(image)
    top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    crop = Image.fromarray(image[top : top + h, left : left + w])
    out = np.asarray(crop.resize((size, size), resample))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def train_preprocess(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [size, size, 3]: random resized crop, flip, CLIP normalization."""
    return normalize(random_resized_crop_flip(image, size, rng))


# ---------------------------------------------------------------------------------------------
# ImageNet classifiers (torchvision's recipe, as GPT4Image's ResNet and DeiT code use it)
# ---------------------------------------------------------------------------------------------


def classifier_train_preprocess(image: np.ndarray, size: int, rng: np.random.Generator, *,
                                interpolation: str = "bilinear", randaugment: "augment.RandAugment | None" = None,
                                erasing_prob: float = 0.0) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [size, size, 3]: ``RandomResizedCrop(size)`` (``interpolation``:
    torchvision's default bilinear for ResNet, bicubic for DeiT), ``RandomHorizontalFlip()``, then
    timm's RandAugment when given, ImageNet normalization, and timm's random erasing (pixel mode) with
    probability ``erasing_prob``: the order of timm's ``create_transform``."""
    out = random_resized_crop_flip(image, size, rng, resample=_interpolation(interpolation))
    if randaugment is not None:
        out = np.asarray(randaugment(Image.fromarray(out), rng))
    out = normalize(out, "imagenet")
    return augment.random_erasing(out, rng, erasing_prob) if erasing_prob > 0 else out


INTERPOLATIONS = ("bilinear", "bicubic")


def _interpolation(name: str) -> Image.Resampling:
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation={name!r} is not one of {INTERPOLATIONS}")
    return Image.Resampling.BILINEAR if name == "bilinear" else Image.Resampling.BICUBIC


def classifier_eval_preprocess(image: np.ndarray | Image.Image, size: int = 224, resize: int | None = None,
                               interpolation: str = "bilinear") -> np.ndarray:
    """uint8 [H, W, 3] or a PIL image -> float32 [size, size, 3]: torchvision's ``Resize(resize)``
    (short side, ``interpolation``: bilinear for ResNet, bicubic for DeiT; default ``int(size / 0.875)``,
    256 for 224), ``CenterCrop(size)`` (offsets rounded as torchvision does), ImageNet normalization."""
    resize = int(size / 0.875) if resize is None else int(resize)
    if resize < size:
        raise ValueError(f"resize={resize} is smaller than the crop size {size}")
    if isinstance(image, Image.Image):
        image = images_lib.to_rgb(image)
    image = _check_rgb_uint8(image)
    new_height, new_width = _shortest_edge_size(image.shape[0], image.shape[1], resize)
    resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), _interpolation(interpolation)))
    top = _crop_offset(new_height - size, "torchvision")
    left = _crop_offset(new_width - size, "torchvision")
    return normalize(resized[top : top + size, left : left + size], "imagenet")
