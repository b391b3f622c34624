"""timm's RandAugment and random erasing (jaxgist.data.augment) against timm 0.3.2's own code (the version
DeiT pins), and DeiT's repeated augmentation in the classifier pipeline.

timm's ``auto_augment.py`` and ``random_erasing.py`` are loaded by file (the ``timm_module`` fixture)."""

import collections
import io
import math

import numpy as np
import pytest
from PIL import Image

from jaxgist.data import augment, pipeline, transforms

FILL = transforms.IMAGENET_FILL


@pytest.fixture(scope="module")
def timm_aa(timm_module):
    return timm_module("data/auto_augment.py")


def _image(h=37, w=52, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    return Image.fromarray(np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8))


class _Coin:
    """Stands in for Python's ``random`` inside timm: ``random()`` returns a fixed value."""

    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


@pytest.mark.parametrize("name", augment.INCREASING_OPS)
def test_every_operation_equals_timms(timm_aa, name, monkeypatch):
    image = _image()
    hparams = dict(img_mean=FILL, interpolation=Image.BICUBIC, translate_const=100)
    for magnitude in (0.0, 3.7, 9.0, 10.0):
        if name == "PosterizeIncreasing" and magnitude == 10.0:
            # 0 bits: black, as the Pillow of timm's time gave (today's Pillow refuses 0 bits)
            assert not np.asarray(augment.apply_op(image, name, magnitude, fill=FILL)).any()
            continue
        for negate in (False, True):
            monkeypatch.setattr(timm_aa, "random", _Coin(0.9 if negate else 0.1))  # > 0.5 negates
            expected = np.asarray(timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)(image))
            ours = np.asarray(augment.apply_op(image, name, magnitude, negate, fill=FILL))
            np.testing.assert_array_equal(ours, expected, err_msg=f"{name} m={magnitude} negate={negate}")


def test_the_increasing_set_and_config_string_are_timms(timm_aa):
    assert augment.INCREASING_OPS == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)
    theirs = timm_aa.rand_augment_transform("rand-m9-mstd0.5-inc1", dict(img_mean=FILL))
    ours = augment.RandAugment.parse("rand-m9-mstd0.5-inc1")
    assert (ours.num_layers, ours.magnitude, ours.prob) == (theirs.num_layers, theirs.ops[0].magnitude,
                                                            theirs.ops[0].prob)
    assert ours.magnitude_std == theirs.ops[0].hparams["magnitude_std"] == 0.5
    assert augment.RandAugment.parse("rand-m7-n3-inc1").num_layers == 3


@pytest.mark.parametrize("spec", ["rand-m9", "augmix-m9-inc1", "rand-m9-w0-inc1", "rand-mx-inc1", "rand-q3-inc1"])
def test_unsupported_or_malformed_spec_is_refused(spec):
    with pytest.raises(ValueError, match="RandAugment spec"):
        augment.RandAugment.parse(spec)


def test_randaugment_draws_follow_timms_distribution(monkeypatch):
    calls = []

    def record(image, name, magnitude, negate, **kwargs):
        calls.append((name, magnitude, negate))
        return image

    monkeypatch.setattr(augment, "apply_op", record)
    ra = augment.RandAugment.parse("rand-m9-mstd0.5-inc1")
    rng = np.random.default_rng(0)
    images = 6000
    for _ in range(images):
        ra(None, rng)
    applied = len(calls) / (2 * images)
    assert abs(applied - 0.5) < 0.02, applied  # each of the 2 layers applies with p = 0.5
    counts = collections.Counter(name for name, _, _ in calls)
    assert set(counts) == set(augment.INCREASING_OPS)
    expected = len(calls) / len(augment.INCREASING_OPS)
    assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts.values()), counts
    magnitudes = np.array([m for _, m, _ in calls])
    assert abs(magnitudes.mean() - 9.0) < 0.03 and abs(magnitudes.std() - 0.5) < 0.03
    assert magnitudes.max() == 10.0 and magnitudes.min() >= 0.0  # clipped to [0, 10] as timm does
    assert abs(np.mean(magnitudes == 10.0) - 0.0228) < 0.01  # P(N(9, 0.5) >= 10)
    signed = [neg for name, _, neg in calls if augment.OPS[name][2]]
    assert abs(np.mean(signed) - 0.5) < 0.03
    assert not any(neg for name, _, neg in calls if not augment.OPS[name][2])


class _Stream:
    """One stream of uniform numbers read through timm's ``random`` API and numpy's Generator API alike."""

    def __init__(self, values):
        self.values = list(values)

    def _next(self):
        return self.values.pop(0)

    def random(self):
        return self._next()

    def uniform(self, a, b):
        return a + (b - a) * self._next()

    def randint(self, a, b):  # Python's, inclusive
        return a + min(int(self._next() * (b - a + 1)), b - a)

    def integers(self, low, high):  # numpy's, exclusive
        return low + min(int(self._next() * (high - low)), high - low - 1)


def test_erasing_box_equals_timms(timm_module):
    torch = pytest.importorskip("torch")
    timm_re = timm_module("data/random_erasing.py")
    eraser = timm_re.RandomErasing(probability=1.0, mode="pixel", max_count=1, device="cpu")
    rng = np.random.default_rng(0)
    boxes = misses = 0
    for h, w in [(32, 32), (24, 40), (5, 3), (2, 2), (1, 40), (224, 224)]:
        for _ in range(60):
            values = rng.random(64).tolist()
            timm_re.random = _Stream([0.0] + values)  # the first number is the probability gate
            img = torch.zeros(3, h, w)
            eraser(img)
            erased = np.argwhere(img.numpy().any(0))
            box = augment.erasing_box(h, w, _Stream(values))
            if box is None:
                misses += 1
                assert erased.size == 0
                continue
            boxes += 1
            top, left, bh, bw = box
            assert bh < h and bw < w
            if bh == 0 or bw == 0:  # fits, erases nothing (timm's empty slice)
                assert erased.size == 0
                continue
            np.testing.assert_array_equal(erased.min(0), [top, left])
            np.testing.assert_array_equal(erased.max(0), [top + bh - 1, left + bw - 1])
    assert boxes > 100 and misses > 0  # both branches were compared


def test_classifier_preprocess_erasing_changes_one_box_to_noise():
    image = np.asarray(_image(60, 50))
    plain = transforms.classifier_train_preprocess(image, 32, np.random.default_rng(3), interpolation="bicubic")
    erased = transforms.classifier_train_preprocess(image, 32, np.random.default_rng(3), interpolation="bicubic",
                                                    erasing_prob=1.0)
    changed = np.argwhere((plain != erased).any(-1))
    assert changed.size  # the same crop and flip, then a box replaced
    (t, l), (b, r) = changed.min(0), changed.max(0)
    box_area = (b - t + 1) * (r - l + 1)
    assert 0.02 * 32 * 32 * 0.5 <= box_area <= 32 * 32 / 3 + 2 * 32
    noise = erased[t:b + 1, l:r + 1]
    assert abs(noise.mean()) < 0.5 and 0.6 < noise.std() < 1.4  # standard normal, not image content
    with_ra = transforms.classifier_train_preprocess(image, 32, np.random.default_rng(3), interpolation="bicubic",
                                                     randaugment=augment.RandAugment.parse("rand-m9-mstd0.5-inc1"))
    assert with_ra.shape == plain.shape == (32, 32, 3) and with_ra.dtype == np.float32


class _Records:
    def __init__(self, n, size=24):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        buffer = io.BytesIO()
        _image(self.size, self.size, seed=i).save(buffer, format="PNG")
        return {"image_bytes": buffer.getvalue(), "path": f"r{i}.png", "label": i}


def _batches(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)], it


def test_repeated_augmentation_triples_and_epochs():
    src = _Records(20)
    ds = pipeline.classifier_train_dataset(src, image_size=16, global_batch=6, seed=1, repeats=3,
                                           randaugment="rand-m9-mstd0.5-inc1", erasing_prob=0.25)
    per_epoch = 20 // 6
    batches, _ = _batches(ds, 2 * per_epoch)
    labels = np.concatenate([b["label"] for b in batches])
    for start in range(0, len(labels), 3):  # consecutive copies of one record, augmented differently
        assert len(set(labels[start:start + 3])) == 1
        images = np.concatenate([b["image"] for b in batches])[start:start + 3]
        assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    epoch0, epoch1 = labels[:per_epoch * 6], labels[per_epoch * 6:]
    assert len(set(epoch0)) == per_epoch * 6 // 3  # distinct records within an epoch
    assert list(epoch0) != list(epoch1)  # each epoch has its own permutation


def test_repeated_augmentation_resumes_exactly():
    src = _Records(20)

    def make():
        return pipeline.classifier_train_dataset(src, image_size=16, global_batch=6, seed=2, repeats=3)

    full, _ = _batches(make(), 5)
    _, it = _batches(make(), 2)
    state = it.get_state()
    resumed = iter(make())
    resumed.set_state(state)
    for expected in full[2:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["label"], expected["label"])
        np.testing.assert_array_equal(got["image"], expected["image"])


def test_pipeline_refuses_bad_augmentation_settings():
    src = _Records(4)
    with pytest.raises(ValueError, match="repeats"):
        pipeline.classifier_train_dataset(src, image_size=16, global_batch=2, repeats=0)
    with pytest.raises(ValueError, match="interpolation"):
        pipeline.classifier_train_dataset(src, image_size=16, global_batch=2, interpolation="lanczos")
    with pytest.raises(ValueError, match="exceeds"):
        pipeline.classifier_train_dataset(src, image_size=16, global_batch=8, repeats=3)
