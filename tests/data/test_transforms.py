"""CLIP evaluation preprocessing against torchvision's rule (OpenAI's clip) and Hugging Face's, and the
random-resized-crop augmentation."""

import numpy as np
import pytest
import transformers
from PIL import Image

from jaxgist.data import transforms
from jaxgist.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    CROP_ROUNDINGS,
    clip_eval_preprocess,
    normalize,
    random_resized_crop_box,
    random_resized_crop_flip,
    resize_center_crop,
    train_preprocess,
)

# (width, height). 227x224 and 224x231 resize to an odd excess of 3 and 7 pixels at size 224, where
# flooring the crop offset (HF) and rounding it half to even (torchvision) disagree by one pixel.
SIZES = [(300, 200), (200, 300), (224, 224), (500, 180), (97, 131), (227, 224), (224, 231)]
# (width, height, size) where the two rules' offsets differ: excess 67 (96x80 at 336: 403 wide, offset 33.5 ->
# 34 vs 33), 3 (227x224), 7 (224x231); and where they agree although (in - out) / 2 is a half: excess 5
# (69x64 at 64: 2.5 -> 2, as round-half-to-even and floor give, not 3 as rounding half up would), 1.
DIFFERING = [(96, 80, 336), (227, 224, 224), (224, 231, 224), (80, 96, 336)]
HALF_TO_EVEN = [(69, 64, 64), (64, 69, 64), (65, 64, 64)]


def _image(height, width, seed=0):
    """Noise over a gradient: any misplaced pixel (rounding, crop offset) shows up as a large error."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 200 // width, yy * 200 // height, (xx + yy) * 100 // (width + height)], -1)
    return np.clip(base + rng.integers(0, 56, (height, width, 3)), 0, 255).astype(np.uint8)


def _hf_processor(size):
    """CLIPImageProcessor with PIL resizing, the reference: OpenAI's CLIP resizes PIL images with PIL's
    bicubic. (With torchvision installed, CLIPImageProcessor resizes tensors with torch's bicubic,
    a different kernel, so the PIL backend is asked for explicitly then.)"""
    kwargs = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = transformers.CLIPImageProcessor(**kwargs)
    if not type(processor).__name__.endswith("Pil"):
        processor = transformers.CLIPImageProcessorPil(**kwargs)
    return processor


def _torchvision_reference(image: Image.Image, size: int) -> np.ndarray:
    """OpenAI clip's `Compose([Resize(size, BICUBIC), CenterCrop(size), convert RGB])` on a PIL image, written
    out from torchvision's source without our code (torchvision needs CUDA torch here, GUIDE section 4):
    - `F.resize` -> `_compute_resized_output_size`: `short, long = (w, h) if w <= h else (h, w)`, the
      short side becomes `size`, the long one `int(size * long / short)`; then PIL's `img.resize((w, h),
      BICUBIC)` (PIL itself uses NEAREST for modes 1 and P), skipped when the size is already right.
    - `F.center_crop`: `top = int(round((h - size) / 2.0))`, `left = int(round((w - size) / 2.0))`,
      `img.crop((left, top, left + size, top + size))`.
    - `_convert_image_to_rgb`: `img.convert("RGB")`.
    """
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)).convert("RGB"))


def _unnormalize(pixels):
    return pixels * CLIP_STD + CLIP_MEAN


# --- evaluation preprocessing -------------------------------------------------------------------


@pytest.mark.parametrize("width,height", SIZES)
@pytest.mark.parametrize("size", [224, 64])
def test_eval_preprocess_matches_hf_clip_image_processor(width, height, size):
    image = _image(height, width, seed=width * height)
    hf = _hf_processor(size)(images=Image.fromarray(image), return_tensors="np")["pixel_values"][0]
    hf = hf.transpose(1, 2, 0)  # NCHW -> NHWC
    ours = clip_eval_preprocess(image, size, crop_rounding="hf")
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    max_diff = np.abs(_unnormalize(ours) - _unnormalize(hf)).max()
    assert max_diff <= 2 / 255, f"{width}x{height} -> {size}: max diff {max_diff * 255:.2f}/255"


@pytest.mark.parametrize("width,height,size", DIFFERING)
def test_hf_rule_matches_hf_where_the_rules_differ(width, height, size):
    image = _image(height, width, seed=size)
    hf = _hf_processor(size)(images=Image.fromarray(image), return_tensors="np")["pixel_values"][0]
    hf = hf.transpose(1, 2, 0)  # NCHW -> NHWC
    ours = _unnormalize(clip_eval_preprocess(image, size, crop_rounding="hf"))
    assert np.abs(ours - _unnormalize(hf)).max() <= 2 / 255
    torchvision = _unnormalize(clip_eval_preprocess(image, size, crop_rounding="torchvision"))
    assert np.abs(torchvision - _unnormalize(hf)).max() > 4 / 255  # one pixel off: outside the tolerance above


@pytest.mark.parametrize("width,height,size", 
                         [(w, h, s) for w, h in SIZES for s in (224, 64)] + DIFFERING + HALF_TO_EVEN)
def test_torchvision_rule_matches_the_torchvision_reference_exactly(width, height, size):
    image = _image(height, width, seed=width + height)
    ours = resize_center_crop(image, size, crop_rounding="torchvision")
    np.testing.assert_array_equal(ours, _torchvision_reference(Image.fromarray(image), size))
    # the same pixels from a PIL image, the form the eval pipeline passes
    np.testing.assert_array_equal(resize_center_crop(Image.fromarray(image), size), ours)


@pytest.mark.parametrize("width,height,size", DIFFERING)
def test_the_rules_differ_by_one_pixel_where_the_offset_is_a_half_rounded_up(width, height, size):
    image = _image(height, width, seed=1)
    torchvision = resize_center_crop(image, size, crop_rounding="torchvision")
    hf = resize_center_crop(image, size, crop_rounding="hf")
    assert not np.array_equal(torchvision, hf)
    # the same resized image, cropped one pixel further along the long side by torchvision's rule
    axis = 1 if width > height else 0
    np.testing.assert_array_equal(np.take(torchvision, range(size - 1), axis=axis),
                                  np.take(hf, range(1, size), axis=axis))


@pytest.mark.parametrize("width,height,size", HALF_TO_EVEN)
def test_halves_round_to_even_so_the_rules_agree_there(width, height, size):
    image = _image(height, width, seed=2)
    torchvision = resize_center_crop(image, size, crop_rounding="torchvision")
    np.testing.assert_array_equal(torchvision, resize_center_crop(image, size, crop_rounding="hf"))
    # rounding half up would have moved the crop: the test tells the rules apart
    new_w, new_h = (int(size * width / height), size) if width > height else (size, int(size * height / width))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    up_top, up_left = int(np.floor((new_h - size) / 2 + 0.5)), int(np.floor((new_w - size) / 2 + 0.5))
    assert not np.array_equal(torchvision, resized[up_top : up_top + size, up_left : up_left + size])


def test_torchvision_is_the_default_rule():
    image = _image(80, 96)
    np.testing.assert_array_equal(clip_eval_preprocess(image, 336), clip_eval_preprocess(image, 336, "torchvision"))
    assert not np.array_equal(clip_eval_preprocess(image, 336), clip_eval_preprocess(image, 336, "hf"))
    assert CROP_ROUNDINGS == ("torchvision", "hf")


def test_an_unknown_crop_rounding_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"crop_rounding='floor'.*torchvision.*hf"):
        clip_eval_preprocess(_image(40, 50), 32, crop_rounding="floor")


def test_resize_center_crop_is_the_unnormalized_eval_preprocess():
    image = _image(131, 97)
    for rule in CROP_ROUNDINGS:
        crop = resize_center_crop(image, 64, rule)
        assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
        np.testing.assert_allclose(_unnormalize(clip_eval_preprocess(image, 64, rule)), crop / 255.0, atol=1e-6)


def test_eval_resize_keeps_aspect_and_truncates_the_long_side():
    # 97 x 131 -> short side 64, long side int(64 * 131 / 97) = int(86.43) = 86; crop offset (86 - 64) // 2 = 11
    # under both rules (22 / 2 is whole)
    image = _image(131, 97)
    resized = np.asarray(Image.fromarray(image).resize((64, 86), Image.Resampling.BICUBIC))
    for rule in CROP_ROUNDINGS:
        np.testing.assert_array_equal(resize_center_crop(image, 64, rule), resized[11:75])


def test_eval_preprocess_of_a_constant_image_is_the_normalized_colour():
    image = np.full((50, 70, 3), (255, 0, 128), np.uint8)
    out = clip_eval_preprocess(image, 32)
    expected = (np.array([1.0, 0.0, 128 / 255], np.float32) - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(out, np.broadcast_to(expected, (32, 32, 3)), atol=1e-5)


def test_normalize_keeps_its_contract():
    batch = np.zeros((2, 4, 4, 3), np.uint8)
    np.testing.assert_allclose(normalize(batch)[0, 0, 0], -CLIP_MEAN / CLIP_STD, rtol=1e-6)
    np.testing.assert_allclose(normalize(np.ones((4, 4, 3), np.float32))[0, 0], (1 - CLIP_MEAN) / CLIP_STD)
    with pytest.raises(ValueError):
        normalize(np.zeros((4, 4, 1), np.uint8))


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((0, 8, 3), np.uint8)])
def test_transforms_reject_non_rgb_uint8(bad):
    with pytest.raises(ValueError):
        clip_eval_preprocess(bad, 8)
    with pytest.raises(ValueError):
        random_resized_crop_flip(bad, 8, np.random.default_rng(0))


# --- training augmentation ----------------------------------------------------------------------


def test_train_preprocess_shapes_and_range():
    image = _image(200, 300)
    crop = random_resized_crop_flip(image, 64, np.random.default_rng(0))
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    out = train_preprocess(image, 64, np.random.default_rng(0))
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, normalize(crop), atol=1e-6)  # same seed, same crop


def test_random_crop_is_deterministic_given_the_seed():
    image = _image(200, 300)
    a = random_resized_crop_flip(image, 48, np.random.default_rng(7))
    b = random_resized_crop_flip(image, 48, np.random.default_rng(7))
    c = random_resized_crop_flip(image, 48, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_random_crop_is_the_resized_box_then_an_optional_flip():
    image = _image(120, 90)
    for seed in range(6):
        out = random_resized_crop_flip(image, 32, np.random.default_rng(seed))
        replay = np.random.default_rng(seed)
        top, left, h, w = random_resized_crop_box(120, 90, replay)
        expected = np.asarray(
            Image.fromarray(image[top : top + h, left : left + w]).resize((32, 32), Image.Resampling.BICUBIC)
        )
        if replay.random() < 0.5:
            expected = expected[:, ::-1]
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("height,width", [(200, 300), (300, 200), (97, 131), (224, 224)])
def test_crop_boxes_lie_inside_the_image_with_the_requested_scale_and_ratio(height, width):
    rng = np.random.default_rng(0)
    boxes = np.array([random_resized_crop_box(height, width, rng) for _ in range(2000)])
    top, left, h, w = boxes.T
    assert np.all((top >= 0) & (left >= 0) & (h > 0) & (w > 0))
    assert np.all((top + h <= height) & (left + w <= width))
    area = h * w / (height * width)
    # sizes are rounded to whole pixels: allow a pixel's worth of slack on the bounds
    slack = (h + w + 1) / (height * width)
    assert np.all(area >= 0.08 - slack) and np.all(area <= 1.0 + slack)
    aspect = w / h
    assert np.all(aspect >= 3 / 4 * (1 - 1 / h) - 1 / h) and np.all(aspect <= 4 / 3 * (1 + 1 / h) + 1 / h)
    assert area.min() < 0.15 and area.max() > 0.8  # the whole scale range is used
    assert len(np.unique(top)) > 20 and len(np.unique(left)) > 20  # positions vary


def test_crop_box_respects_custom_scale_and_ratio():
    rng = np.random.default_rng(1)
    boxes = np.array([random_resized_crop_box(400, 400, rng, scale=(0.25, 0.25), ratio=(1.0, 1.0)) for _ in range(50)])
    np.testing.assert_array_equal(boxes[:, 2:], np.full((50, 2), 200))  # sqrt(0.25 * 400 * 400) = 200


@pytest.mark.parametrize(
    "height,width,expected",
    [
        (10, 1000, (0, (1000 - 13) // 2, 10, 13)),  # too wide: full height, width round(10 * 4/3) = 13
        (1000, 10, ((1000 - 13) // 2, 0, 13, 10)),  # too tall: full width, height round(10 / (3/4)) = 13
    ],
)
def test_crop_box_falls_back_to_a_central_crop_for_extreme_aspect_ratios(height, width, expected):
    # no sampled crop of at least 8% of the area fits in 10 pixels, so every one of the 10 tries fails
    for seed in range(5):
        assert random_resized_crop_box(height, width, np.random.default_rng(seed)) == expected
    out = random_resized_crop_flip(np.full((height, width, 3), 90, np.uint8), 16, np.random.default_rng(0))
    assert out.shape == (16, 16, 3) and np.all(out == 90)


def test_fallback_keeps_the_whole_image_when_its_ratio_is_allowed():
    rng = np.random.default_rng(0)
    # scale above 1 never fits, so the fallback runs; a square image is within ratio (3/4, 4/3)
    assert random_resized_crop_box(50, 50, rng, scale=(1.5, 2.0)) == (0, 0, 50, 50)


def test_flip_happens_about_half_the_time():
    # the full-image crop with the image's own aspect ratio makes the only randomness the flip
    height, width = 24, 40
    image = _image(height, width)
    plain = np.asarray(Image.fromarray(image).resize((16, 16), Image.Resampling.BICUBIC))
    flipped = plain[:, ::-1]
    assert not np.array_equal(plain, flipped)
    rng = np.random.default_rng(3)
    n, flips = 400, 0
    for _ in range(n):
        out = random_resized_crop_flip(image, 16, rng, scale=(1.0, 1.0), ratio=(width / height, width / height))
        if np.array_equal(out, flipped):
            flips += 1
        else:
            np.testing.assert_array_equal(out, plain)
    assert 0.4 * n < flips < 0.6 * n  # binomial(400, 0.5): 5 standard deviations either side


def test_module_exports():
    for name in transforms.__all__:
        assert hasattr(transforms, name)
