"""Reading images: every colour mode becomes uint8 RGB; missing and broken files raise clear errors; the
evaluation preprocessing resizes a PIL image in its own mode before the RGB conversion, as torchvision."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from jaxgist.data import transforms
from jaxgist.data.images import ImageReadError, decode_image, decode_pil_image, load_image, load_pil_image


def _photo(height=48, width=64, seed=0):
    """A smooth image with some texture (JPEG-friendly), uint8 RGB."""
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    base = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 2 % 256], -1)
    return np.clip(base + rng.integers(-10, 10, base.shape), 0, 255).astype(np.uint8)


def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def _png_16bit_rgb(path, pixels):
    """Writes a 16-bit-per-channel RGB PNG by hand (Pillow cannot write one)."""
    height, width, _ = pixels.shape

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


# --- well-formed files of every mode --------------------------------------------------------------


def test_rgb_png_round_trips_exactly(tmp_path):
    pixels = _photo(31, 17)
    out = load_image(_save(Image.fromarray(pixels), tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (31, 17, 3)
    np.testing.assert_array_equal(out, pixels)


def test_rgb_jpeg_decodes_close_to_source(tmp_path):
    pixels = _photo()
    path = _save(Image.fromarray(pixels), tmp_path / "a.jpg", quality=95)
    out = load_image(str(path))
    assert out.dtype == np.uint8 and out.shape == pixels.shape
    np.testing.assert_array_equal(out, np.asarray(Image.open(path).convert("RGB")))
    assert np.abs(out.astype(int) - pixels).mean() < 8  # lossy, but the same picture


def test_rgba_png_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[0, :, 3] = 255  # opaque row keeps its colour
    rgba[1, :, 3] = 0  # transparent row becomes white (not the hidden colour, not black)
    rgba[2, :, 3] = 128  # half transparent row lies halfway to white
    out = load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], np.broadcast_to([10, 20, 30], (5, 3)))
    np.testing.assert_array_equal(out[1], np.full((5, 3), 255))
    expected_half = np.round(np.array([10, 20, 30]) * 128 / 255 + 255 * 127 / 255)
    np.testing.assert_allclose(out[2], np.broadcast_to(expected_half, (5, 3)), atol=1)


def test_gray_alpha_png_is_composited_on_white(tmp_path):
    la = np.stack([np.full((3, 3), 40, np.uint8), np.array([[255] * 3, [0] * 3, [255] * 3], np.uint8)], -1)
    out = load_image(_save(Image.fromarray(la, "LA"), tmp_path / "la.png"))
    np.testing.assert_array_equal(out[0], np.full((3, 3), 40))
    np.testing.assert_array_equal(out[1], np.full((3, 3), 255))


def test_grayscale_is_replicated_into_rgb(tmp_path):
    gray = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    out = load_image(_save(Image.fromarray(gray, "L"), tmp_path / "g.png"))
    assert out.shape == (6, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_one_bit_image_becomes_black_and_white(tmp_path):
    bits = np.array([[0, 1, 1], [1, 0, 0]], bool)
    out = load_image(_save(Image.fromarray(bits).convert("1"), tmp_path / "b.png"))
    np.testing.assert_array_equal(out[..., 0], bits * 255)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    cmyk = np.zeros((16, 48, 4), np.uint8)
    cmyk[:, :16] = (255, 0, 0, 0)  # cyan
    cmyk[:, 16:32] = (0, 0, 0, 0)  # white
    cmyk[:, 32:] = (0, 0, 0, 255)  # black
    path = _save(Image.fromarray(cmyk, "CMYK"), tmp_path / "c.jpg", quality=100)
    assert Image.open(path).mode == "CMYK"
    out = load_image(path)
    assert out.shape == (16, 48, 3)
    center = out[8, [8, 24, 40]].astype(int)
    np.testing.assert_allclose(center, [[0, 255, 255], [255, 255, 255], [0, 0, 0]], atol=6)


def test_16bit_gray_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128, 129, 257, 32768, 65535]], np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "d.png")
    assert Image.open(path).mode.startswith("I")  # really stored and decoded as 16-bit
    out = load_image(path)
    # round(v * 255 / 65535)
    np.testing.assert_array_equal(out[..., 0], [[0, 0, 1, 1, 128, 255]])
    np.testing.assert_array_equal(out[..., 0], out[..., 1])


def test_16bit_gray_png_keeps_its_dynamic_range(tmp_path):
    ramp = np.linspace(0, 65535, 256).astype(np.uint16)[None]
    out = load_image(_save(Image.fromarray(ramp), tmp_path / "ramp.png"))
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255
    assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)  # monotone
    assert len(np.unique(out[..., 0])) > 200  # not collapsed to a few (clipped) levels


def test_16bit_rgb_png_keeps_the_high_byte(tmp_path):
    pixels = np.zeros((2, 3, 3), np.uint16)
    pixels[0] = [[65535, 0, 32768], [0, 65535, 0], [256, 511, 65280]]
    out = load_image(_png_16bit_rgb(tmp_path / "rgb16.png", pixels))
    np.testing.assert_array_equal(out[0], [[255, 0, 128], [0, 255, 0], [1, 1, 255]])
    np.testing.assert_array_equal(out[1], np.zeros((3, 3)))


def test_palette_png(tmp_path):
    pixels = _photo(20, 30)
    palette_image = Image.fromarray(pixels).quantize(colors=16)
    path = _save(palette_image, tmp_path / "p.png")
    assert Image.open(path).mode == "P"
    out = load_image(path)
    np.testing.assert_array_equal(out, np.asarray(palette_image.convert("RGB")))


def test_palette_png_with_transparent_index_uses_white(tmp_path):
    indices = np.array([[0, 1], [1, 0]], np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette([200, 0, 0, 0, 0, 200] + [0] * 762)
    path = _save(image, tmp_path / "pt.png", transparency=1)
    out = load_image(path)
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])


def test_decode_image_from_bytes_matches_file(tmp_path):
    path = _save(Image.fromarray(_photo()), tmp_path / "a.png")
    np.testing.assert_array_equal(decode_image(path.read_bytes(), name="rec/0"), load_image(path))


# --- torchvision's order: resize in the stored mode, crop, then RGB ---------------------------------------------

# 96 x 80 at 336 px: 403 x 336, an offset of 33.5 that torchvision rounds to 34; 50 x 70 at 32: 32 x 44, offset 6.
TV_SIZES = [(80, 96, 336), (70, 50, 32)]


def _torchvision_resize_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size, BICUBIC) + CenterCrop(size) on a PIL image, in its own mode, written out from
    torchvision's source without our code (as in test_transforms.py; torchvision itself needs CUDA torch
    here): long side `int(size * long / short)`, PIL's `resize` (which uses NEAREST for modes 1 and P and
    resamples LA/RGBA premultiplied), offsets `int(round((in - size) / 2.0))`."""
    w, h = image.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _on_white(image: Image.Image) -> np.ndarray:
    """Alpha composited on white, the library's conversion of images with transparency."""
    rgba = image.convert("RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB"))


def _mode_images(height, width):
    """Files whose stored mode is not RGB: name -> PIL image to save."""
    rgb = Image.fromarray(_photo(height, width, seed=5))
    return {
        "P": rgb.quantize(colors=12),
        "1": rgb.convert("L").point(lambda v: 255 * (v > 110)).convert("1"),
        "L": rgb.convert("L"),
    }


@pytest.mark.parametrize("height,width,size", TV_SIZES)
@pytest.mark.parametrize("mode", ["P", "1", "L"])
def test_torchvision_rule_resizes_in_the_stored_mode_then_converts(tmp_path, mode, height, width, size):
    path = _save(_mode_images(height, width)[mode], tmp_path / f"{mode}.png")
    stored = Image.open(path)
    assert stored.mode == mode
    reference = np.asarray(_torchvision_resize_crop(stored, size).convert("RGB"))  # OpenAI clip, bit for bit
    ours = transforms.resize_center_crop(load_pil_image(path), size, crop_rounding="torchvision")
    assert ours.dtype == np.uint8 and ours.shape == (size, size, 3)
    np.testing.assert_array_equal(ours, reference)
    rgb_first = transforms.resize_center_crop(load_image(path), size, crop_rounding="torchvision")
    if mode == "L":  # gray resized then replicated = replicated then resized
        np.testing.assert_array_equal(rgb_first, reference)
    else:  # PIL resizes 1 and P with NEAREST: the order changes the pixels
        assert np.abs(rgb_first.astype(int) - reference).max() > 30


@pytest.mark.parametrize("mode", ["P", "1"])
def test_hf_rule_converts_to_rgb_first(tmp_path, mode):
    path = _save(_mode_images(80, 96)[mode], tmp_path / f"{mode}.png")
    rgb = np.asarray(Image.open(path).convert("RGB"))
    resized = np.asarray(Image.fromarray(rgb).resize((403, 336), Image.Resampling.BICUBIC))
    ours = transforms.resize_center_crop(load_pil_image(path), 336, crop_rounding="hf")
    np.testing.assert_array_equal(ours, resized[:, 33:369])  # (403 - 336) // 2 = 33
    np.testing.assert_array_equal(ours, transforms.resize_center_crop(load_image(path), 336, crop_rounding="hf"))


def test_torchvision_rule_keeps_a_palette_transparency_and_composites_after_the_crop(tmp_path):
    indices = (np.arange(30 * 40).reshape(30, 40) // 7 % 3).astype(np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette([200, 0, 0, 0, 0, 200, 0, 150, 0] + [0] * 759)
    path = _save(image, tmp_path / "pt.png", transparency=1)
    stored = Image.open(path)
    reference = _on_white(_torchvision_resize_crop(stored, 24))
    ours = transforms.resize_center_crop(load_pil_image(path), 24, crop_rounding="torchvision")
    np.testing.assert_array_equal(ours, reference)
    assert set(map(tuple, ours.reshape(-1, 3))) <= {(200, 0, 0), (255, 255, 255), (0, 150, 0)}  # NEAREST: no blends


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_torchvision_rule_resizes_alpha_images_premultiplied_then_composites(tmp_path, mode):
    alpha = np.tile(np.linspace(0, 255, 50, dtype=np.uint8), (40, 1))  # transparent left to opaque right
    rgba = np.concatenate([_photo(40, 50, seed=3), alpha[..., None]], -1)
    path = _save(Image.fromarray(rgba, "RGBA").convert(mode), tmp_path / f"{mode}.png")
    reference = _on_white(_torchvision_resize_crop(Image.open(path), 32))
    ours = transforms.resize_center_crop(load_pil_image(path), 32, crop_rounding="torchvision")
    np.testing.assert_array_equal(ours, reference)


def test_torchvision_rule_scales_16bit_gray_after_the_resize(tmp_path):
    values = (np.linspace(0, 65535, 50)[None, :] * np.linspace(0.2, 1, 40)[:, None]).astype(np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "d.png")
    stored = Image.open(path)
    assert stored.mode.startswith("I")
    crop = np.asarray(_torchvision_resize_crop(stored, 32)).astype(np.int64)
    reference = np.repeat(((np.clip(crop, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, -1)
    ours = transforms.resize_center_crop(load_pil_image(path), 32, crop_rounding="torchvision")
    np.testing.assert_array_equal(ours, reference)


def test_a_transparency_key_colour_of_a_non_palette_image_is_applied_before_the_resize(tmp_path):
    gray = (np.arange(40 * 50).reshape(40, 50) % 97 + 60).astype(np.uint8)
    path = _save(Image.fromarray(gray, "L"), tmp_path / "lt.png", transparency=100)
    assert "transparency" in Image.open(path).info
    for rule in transforms.CROP_ROUNDINGS:  # interpolation would invent and erase key pixels: RGB first
        np.testing.assert_array_equal(transforms.resize_center_crop(load_pil_image(path), 32, crop_rounding=rule),
                                      transforms.resize_center_crop(load_image(path), 32, crop_rounding=rule))


def test_pil_image_loaders_keep_the_stored_mode(tmp_path):
    path = _save(_mode_images(20, 30)["P"], tmp_path / "p.png")
    image = load_pil_image(path)
    assert image.mode == "P" and image.size == (30, 20)
    assert decode_pil_image(path.read_bytes(), name="rec/0").mode == "P"
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), load_image(path))
    with pytest.raises(FileNotFoundError, match="absent.png"):
        load_pil_image(tmp_path / "absent.png")
    with pytest.raises(ImageReadError, match="record-3"):
        decode_pil_image(b"not an image", name="record-3")


# --- missing and broken files ------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "missing.jpg"
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(path)


def test_truncated_jpeg_raises_image_read_error(tmp_path):
    full = _save(Image.fromarray(_photo(96, 128)), tmp_path / "full.jpg", quality=90).read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageReadError, match="cut.jpg") as info:
        load_image(path)
    assert "truncated" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_truncated_png_raises_image_read_error(tmp_path):
    full = _save(Image.fromarray(_photo(96, 128)), tmp_path / "full.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        load_image(path)


def test_corrupt_png_data_raises_image_read_error(tmp_path):
    data = bytearray(_save(Image.fromarray(_photo(96, 128)), tmp_path / "full.png").read_bytes())
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(ImageReadError, match="record-7"):
        decode_image(bytes(data), name="record-7")


def test_garbage_bytes_with_jpg_name_raise_image_read_error(tmp_path):
    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"this is not an image at all" * 20)
    with pytest.raises(ImageReadError, match="garbage.jpg") as info:
        load_image(path)
    assert "cannot identify" in str(info.value)


def test_empty_bytes_raise_image_read_error():
    with pytest.raises(ImageReadError, match="<bytes>"):
        decode_image(b"")
