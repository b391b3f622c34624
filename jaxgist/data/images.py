"""Reading image files and encoded image bytes into uint8 RGB arrays.

Every source of images (GIST image folders, TFDS records holding encoded bytes, user files) goes
through `decode_image`, so all of them share one set of colour-mode rules:

- RGB: unchanged.
- Transparency (RGBA, LA, PA, premultiplied RGBa/La, and P/L/RGB images with a `transparency`
  entry): composited onto a white background, as `transformers.CLIPImageProcessor` does
  (`convert_to_rgb`). Dropping the alpha channel instead would expose whatever colour sits under
  fully transparent pixels, which is often black.
- Grayscale L and 1-bit: the gray value replicated into R, G and B (1-bit pixels become 0 or 255).
- 16-bit grayscale (modes I;16, I;16L, I;16B, I;16N) and 32-bit integer I: read as 16-bit
  intensities and scaled to 8 bits with rounding, `round(v * 255 / 65535)`, values outside
  [0, 65535] clipped first. So 65535 -> 255, 32768 -> 128, 257 -> 1, 128 -> 0. Pillow's own
  conversion would clip instead, turning almost every pixel white.
- 16-bit colour PNGs: Pillow decodes them to 8-bit RGB/RGBA by keeping the high byte of each
  sample (`v >> 8`), which differs from rounding by at most one level; the result then follows
  the rules above.
- CMYK (including Adobe's inverted CMYK JPEGs, which Pillow undoes), YCbCr, LAB, HSV, float F and
  any other mode: Pillow's conversion to RGB.

Animated or multi-page files give their first frame. EXIF orientation is not applied (like the
reference pipelines, which pass the stored pixels to the model as they are).

Decoding is forced at read time (`Image.load`), so a truncated or corrupt file raises
`ImageReadError` here rather than later in a worker, or never. Pillow's global
`ImageFile.LOAD_TRUNCATED_IMAGES` must stay False (its default) for truncation to be detected.

`load_pil_image` / `decode_pil_image` stop before the conversion: the decoded PIL image in its stored
mode, for evaluation preprocessing that resizes before converting to RGB, in torchvision's order
(`jaxgist.data.transforms`, crop_rounding="torchvision"): a palette or 1-bit image is then resized
with NEAREST, as PIL does in OpenAI's `clip` preprocessing. The conversion, done after the crop,
follows the rules above.
"""

from __future__ import annotations

import io
import os
import struct

import numpy as np
from PIL import Image

__all__ = ["ImageReadError", "decode_image", "decode_pil_image", "load_image", "load_pil_image", "to_rgb",
           "with_skip_hint"]

# Exceptions Pillow raises for undecodable data (UnidentifiedImageError is an OSError; "broken PNG
# file" is a SyntaxError; some plugins raise struct.error, EOFError or ValueError on short data).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageReadError(ValueError):
    """An image file or byte string that exists but cannot be decoded (truncated, corrupt, not an image)."""


def with_skip_hint(e: FileNotFoundError | ImageReadError) -> FileNotFoundError | ImageReadError:
    """``e`` (same type) with the flag that leaves unreadable images out, for jobs that stop on one."""
    return type(e)(f"{e}; --config.data.skip_unreadable=True leaves unreadable images out (and counts them)")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file into uint8 RGB pixels [H, W, 3].

    Raises FileNotFoundError (naming the path) when the file does not exist, and ImageReadError
    (naming the path and the reason) when its contents cannot be decoded.
    """
    path = os.fspath(path)
    return decode_image(_read_bytes(path), name=path)


def load_pil_image(path: str | os.PathLike) -> Image.Image:
    """Reads an image file into a decoded PIL image in its stored mode (first frame); errors as `load_image`."""
    path = os.fspath(path)
    return decode_pil_image(_read_bytes(path), name=path)


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decodes an encoded image (JPEG, PNG, ...) held in memory into uint8 RGB pixels [H, W, 3].

    `name` is used in error messages only (a filename or record key).
    """
    return _convert(_decode(data, name), name)


def decode_pil_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decodes an encoded image held in memory into a PIL image in its stored mode (first frame).

    Raises ImageReadError as `decode_image` does, also when the mode cannot be converted to RGB (tried
    on one pixel), so such a file fails here, with its name, rather than in a later transform.
    """
    image = _decode(data, name)
    _convert(image.crop((0, 0, 1, 1)), name)
    return image


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:  # FileNotFoundError carries the path in its message
        return f.read()


def _decode(data: bytes, name: str) -> Image.Image:
    """The decoded (loaded) PIL image of `data`; ImageReadError naming `name` if it cannot be decoded."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # Image.open only reads the header; decode now so truncation surfaces here
    except _DECODE_ERRORS as e:
        raise ImageReadError(f"cannot decode image {name!r}: {type(e).__name__}: {e}") from e
    return image


def _convert(image: Image.Image, name: str) -> np.ndarray:
    """`to_rgb(image)`; ImageReadError naming `name` if its mode cannot be converted."""
    try:
        return to_rgb(image)
    except _DECODE_ERRORS as e:
        raise ImageReadError(f"cannot convert image {name!r} (mode {image.mode}) to RGB: {e}") from e


def to_rgb(image: Image.Image) -> np.ndarray:
    """A decoded PIL image of any mode -> uint8 RGB pixels [H, W, 3] (rules in the module docstring)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return np.array(image, dtype=np.uint8)
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_gray_to_rgb(image)
    if mode == "La":  # premultiplied gray + alpha: Pillow converts it only to LA
        image = image.convert("LA")
    has_alpha = "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def _sixteen_bit_gray_to_rgb(image: Image.Image) -> np.ndarray:
    """16-bit (or 32-bit integer) grayscale -> uint8 RGB with round(v * 255 / 65535)."""
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    gray = ((values * 255 + 65535 // 2) // 65535).astype(np.uint8)
    if "transparency" in image.info:  # a single transparent gray level (PNG tRNS)
        transparent = np.asarray(image) == image.info["transparency"]
        gray = np.where(transparent, np.uint8(255), gray)
    return np.repeat(gray[..., None], 3, axis=-1)
