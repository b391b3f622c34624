"""timm's RandAugment and random erasing, as DeiT (and GPT4Image's DeiT recipe) train with them.

Both draw from an explicit ``np.random.Generator`` (grain's per-record generator), so an augmented
image is a function of the image and the generator's state; the operations themselves are plain,
deterministic functions of their arguments (``apply_op``, ``erase``) that tests compare one by one
with timm's.

RandAugment (``RandAugment.parse("rand-m9-mstd0.5-inc1")``, timm's config string): for each image,
``num_layers`` operations drawn uniformly with replacement; each is applied with probability
``prob`` (0.5) at a magnitude drawn from N(m, mstd) and clipped to [0, 10]; signed operations
(rotate, shear, translate, the enhancements) are negated with probability 1/2. ``inc1`` selects the
"increasing" operation set, whose severity grows with the magnitude. Geometric operations resample
bicubically (``interpolation``) and fill with the dataset mean (timm: ``round(255 * mean)``).

Random erasing (timm's ``RandomErasing(p, mode="pixel", max_count=1)``), on a normalized float image:
with probability ``p`` a box of 2%..1/3 of the area, aspect ratio log-uniform in [0.3, 1/0.3], up to
10 attempts to fit, filled with standard normal noise per pixel.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = ["INCREASING_OPS", "OPS", "RandAugment", "apply_op", "erase", "erasing_box", "random_erasing"]

MAX_LEVEL = 10.0

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


# ---------------------------------------------------------------------------------------------
# The operations: name -> (function of (image, argument, fill, resample), level -> argument, signed)
# ---------------------------------------------------------------------------------------------


def _affine(image: Image.Image, matrix, fill, resample) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return image.point(lut * len(image.getbands()))


def _posterize(image: Image.Image, bits: int) -> Image.Image:
    """Keeps the top ``bits`` bits; 0 bits (magnitude 10) gives black, as Pillow did when timm's code was
    written (Pillow 9+ refuses 0 bits, which crashes timm's own RandAugment there)."""
    if bits >= 8:
        return image
    if bits <= 0:
        return image.point([0] * 256 * len(image.getbands()))
    return ImageOps.posterize(image, bits)


_Op = Callable[[Image.Image, float, tuple, int], Image.Image]

OPS: dict[str, tuple[_Op, Callable[[float], float] | None, bool]] = {
    "AutoContrast": (lambda im, a, fill, rs: ImageOps.autocontrast(im), None, False),
    "Equalize": (lambda im, a, fill, rs: ImageOps.equalize(im), None, False),
    "Invert": (lambda im, a, fill, rs: ImageOps.invert(im), None, False),
    "Rotate": (lambda im, deg, fill, rs: im.rotate(deg, resample=rs, fillcolor=fill),
               lambda m: m / MAX_LEVEL * 30.0, True),
    "PosterizeIncreasing": (lambda im, bits, fill, rs: _posterize(im, bits),
                            lambda m: 4 - int(m / MAX_LEVEL * 4), False),
    "SolarizeIncreasing": (lambda im, t, fill, rs: ImageOps.solarize(im, t),
                           lambda m: 256 - int(m / MAX_LEVEL * 256), False),
    "SolarizeAdd": (lambda im, add, fill, rs: _solarize_add(im, add), lambda m: int(m / MAX_LEVEL * 110), False),
    "ColorIncreasing": (lambda im, f, fill, rs: ImageEnhance.Color(im).enhance(1.0 + f),
                        lambda m: m / MAX_LEVEL * 0.9, True),
    "ContrastIncreasing": (lambda im, f, fill, rs: ImageEnhance.Contrast(im).enhance(1.0 + f),
                           lambda m: m / MAX_LEVEL * 0.9, True),
    "BrightnessIncreasing": (lambda im, f, fill, rs: ImageEnhance.Brightness(im).enhance(1.0 + f),
                             lambda m: m / MAX_LEVEL * 0.9, True),
    "SharpnessIncreasing": (lambda im, f, fill, rs: ImageEnhance.Sharpness(im).enhance(1.0 + f),
                            lambda m: m / MAX_LEVEL * 0.9, True),
    "ShearX": (lambda im, s, fill, rs: _affine(im, (1, s, 0, 0, 1, 0), fill, rs), lambda m: m / MAX_LEVEL * 0.3, True),
    "ShearY": (lambda im, s, fill, rs: _affine(im, (1, 0, 0, s, 1, 0), fill, rs), lambda m: m / MAX_LEVEL * 0.3, True),
    "TranslateXRel": (lambda im, p, fill, rs: _affine(im, (1, 0, p * im.size[0], 0, 1, 0), fill, rs),
                      lambda m: m / MAX_LEVEL * 0.45, True),
    "TranslateYRel": (lambda im, p, fill, rs: _affine(im, (1, 0, 0, 0, 1, p * im.size[1]), fill, rs),
                      lambda m: m / MAX_LEVEL * 0.45, True),
}

# timm's _RAND_INCREASING_TRANSFORMS, in its order (the order the uniform choice indexes).
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def apply_op(image: Image.Image, name: str, magnitude: float, negate: bool = False, *,
             fill: tuple[int, ...] = (128, 128, 128), interpolation: str = "bicubic") -> Image.Image:
    """One RandAugment operation at ``magnitude`` (0..10), its signed argument negated when ``negate``."""
    if name not in OPS:
        raise ValueError(f"unknown RandAugment operation {name!r}; known: {sorted(OPS)}")
    fn, level, signed = OPS[name]
    arg = level(min(MAX_LEVEL, max(0.0, magnitude))) if level is not None else None
    if signed and negate:
        arg = -arg
    return fn(image, arg, tuple(fill), _RESAMPLE[interpolation])


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """timm's RandAugment with the increasing operation set (``parse`` reads timm's config string)."""

    magnitude: float = 9.0
    num_layers: int = 2
    magnitude_std: float = 0.5
    prob: float = 0.5
    fill: tuple[int, ...] = (128, 128, 128)
    interpolation: str = "bicubic"
    ops: tuple[str, ...] = INCREASING_OPS

    def __post_init__(self):
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"RandAugment interpolation={self.interpolation!r} is not one of {tuple(_RESAMPLE)}")
        unknown = [o for o in self.ops if o not in OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment operations {unknown}; known: {sorted(OPS)}")

    @classmethod
    def parse(cls, spec: str, **kwargs) -> "RandAugment":
        """From timm's string, e.g. ``"rand-m9-mstd0.5-inc1"`` (sections m, n, mstd, inc; ``inc1`` is
        required: only the increasing set is implemented)."""
        sections = spec.split("-")
        if sections[0] != "rand":
            raise ValueError(f"RandAugment spec {spec!r} must start with 'rand-' (e.g. 'rand-m9-mstd0.5-inc1')")
        values = dict(magnitude=float(MAX_LEVEL), num_layers=2, magnitude_std=0.0)
        increasing = False
        for section in sections[1:]:
            match = re.fullmatch(r"([a-z]+)(\d.*)", section)
            if not match:
                raise ValueError(f"RandAugment spec {spec!r}: cannot read section {section!r}")
            key, value = match.groups()
            try:
                if key == "m":
                    values["magnitude"] = float(int(value))
                elif key == "n":
                    values["num_layers"] = int(value)
                elif key == "mstd":
                    values["magnitude_std"] = float(value)
                elif key == "inc":
                    increasing = bool(int(value))
                else:
                    raise ValueError(f"RandAugment spec {spec!r}: unknown section {section!r} "
                                     f"(known: m<int>, n<int>, mstd<float>, inc<0|1>)")
            except ValueError as e:
                if "RandAugment spec" in str(e):
                    raise
                raise ValueError(f"RandAugment spec {spec!r}: bad value in section {section!r}") from None
        if not increasing:
            raise ValueError(f"RandAugment spec {spec!r}: only timm's increasing operation set is implemented; add '-inc1'")
        return cls(**values, **kwargs)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Draws, in timm's order: the operations, then per operation whether it applies, its magnitude
        and (for signed operations) its sign."""
        chosen = rng.integers(0, len(self.ops), size=self.num_layers)
        for index in chosen:
            name = self.ops[int(index)]
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            magnitude = self.magnitude
            if self.magnitude_std > 0:
                magnitude = rng.normal(magnitude, self.magnitude_std)
            magnitude = min(MAX_LEVEL, max(0.0, float(magnitude)))
            negate = bool(rng.random() > 0.5) if OPS[name][2] else False
            image = apply_op(image, name, magnitude, negate, fill=self.fill, interpolation=self.interpolation)
        return image


# ---------------------------------------------------------------------------------------------
# Random erasing
# ---------------------------------------------------------------------------------------------


def erasing_box(height: int, width: int, rng, min_area: float = 0.02, max_area: float = 1 / 3,
                min_aspect: float = 0.3) -> tuple[int, int, int, int] | None:
    """(top, left, h, w) of timm's erasing box, or None when 10 attempts do not fit (strictly smaller
    than the image, as timm requires; a side that rounds to 0 fits and erases nothing, as in timm)."""
    area = height * width
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target_area = rng.uniform(min_area, max_area) * area
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return None


def erase(image: np.ndarray, box: tuple[int, int, int, int], noise: np.ndarray) -> np.ndarray:
    """A copy of float ``image`` [H, W, C] with ``box`` replaced by ``noise`` [h, w, C]."""
    top, left, h, w = box
    out = np.array(image, copy=True)
    out[top:top + h, left:left + w] = noise
    return out


def random_erasing(image: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
    """timm's ``RandomErasing(prob, mode="pixel")`` on a normalized float image [H, W, C]."""
    if prob <= 0 or rng.random() > prob:
        return image
    box = erasing_box(image.shape[0], image.shape[1], rng)
    if box is None:
        return image
    noise = rng.standard_normal((box[2], box[3], image.shape[2])).astype(image.dtype)
    return erase(image, box, noise)
