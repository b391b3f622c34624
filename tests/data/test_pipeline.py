"""grain pipelines: pairing, determinism, exact resume, per-process shards, global arrays, bad files."""

import jax
import numpy as np
import pytest
from PIL import Image

from jaxgist.core.config import ConfigError
from jaxgist.data import datasets, images, pipeline, synthetic, transforms
from jaxgist.models.clip import tokenizer

NUM_IMAGES, NUM_CAPTIONS, SIZE = 12, 2, 32


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    names = synthetic.class_names(3)
    rng = np.random.default_rng(0)
    records = []
    for i in range(NUM_IMAGES):
        label = i % 3
        path = root / f"img_{i:02d}.png"
        h, w = (40, 56) if i % 2 else (48, 36)
        Image.fromarray(synthetic.draw(names[label], 64, rng)).resize((w, h)).save(path)
        records.append({"index": i, "filename": path.name, "path": str(path), "label": label,
                        "species": names[label], "captions": [f"caption {c} of image {i}" for c in range(3)]})
    return records


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load()


def train(source, tok, **kw):
    args = dict(image_size=SIZE, tokenize=tok, global_batch=4, num_captions=NUM_CAPTIONS, seed=0)
    args.update(kw)
    return pipeline.train_dataset(source, **args)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_pairing_repeats_each_image_with_its_first_captions(source):
    paired = pipeline.PairedCaptions(source, 2, template="{species}: {caption}")
    assert len(paired) == 2 * NUM_IMAGES
    assert paired[0]["text"] == f"{source[0]['species']}: caption 0 of image 0"
    assert paired[3]["text"] == f"{source[1]['species']}: caption 1 of image 1"
    with pytest.raises(ValueError, match="fewer than num_captions=4"):
        pipeline.PairedCaptions(source, 4)[3]
    with pytest.raises(ValueError, match="caption"):
        pipeline.PairedCaptions(source, 1, template="{species}")


def test_batches_have_the_documented_layout(source, tok):
    batch = next(iter(train(source, tok)))
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["ids"].shape == (4, 77) and batch["ids"].dtype == np.int32
    assert batch["label"].dtype == np.int32
    for ids, pair in zip(batch["ids"], batch["pair"]):
        record = source[pair // NUM_CAPTIONS]
        text = f"{record['species']}: {record['captions'][pair % NUM_CAPTIONS]}"
        np.testing.assert_array_equal(ids, tok([text])[0])


def test_deterministic_given_the_seed(source, tok):
    a = take(iter(train(source, tok, seed=3)), 3)
    b = take(iter(train(source, tok, seed=3)), 3)
    c = take(iter(train(source, tok, seed=4)), 3)
    assert_batches_equal(a, b)
    assert not all(np.array_equal(x["pair"], y["pair"]) for x, y in zip(a, c))


def test_one_epoch_covers_every_pair_once_and_the_next_reshuffles(source, tok):
    epoch = NUM_IMAGES * NUM_CAPTIONS // 4
    batches = take(iter(train(source, tok)), 2 * epoch)
    first = np.concatenate([b["pair"] for b in batches[:epoch]])
    second = np.concatenate([b["pair"] for b in batches[epoch:]])
    assert sorted(first) == list(range(NUM_IMAGES * NUM_CAPTIONS)) == sorted(second)
    assert not np.array_equal(first, second)


def test_resume_mid_epoch_gives_the_same_following_batches(source, tok):
    it = iter(train(source, tok))
    take(it, 2)
    state = it.get_state()
    want = take(it, 4)
    resumed = iter(train(source, tok))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 4), want)


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_data(source, tok, count):
    shards = []
    for index in range(count):
        ds = train(source, tok, global_batch=count, num_epochs=1, shard_index=index, shard_count=count)
        shards.append(np.concatenate([b["pair"] for b in iter(ds)]))
    allpairs = np.concatenate(shards)
    assert len(set(allpairs)) == len(allpairs) == NUM_IMAGES * NUM_CAPTIONS
    assert all(len(s) == NUM_IMAGES * NUM_CAPTIONS // count for s in shards)


def test_a_pair_gets_the_same_augmentation_whatever_the_process_count(source, tok):
    """Augmentation is seeded by the position in the global stream, not in a process's shard."""
    one = {int(p): img for b in take(iter(train(source, tok)), 3) for p, img in zip(b["pair"], b["image"])}
    two = {}
    for index in range(2):
        it = iter(train(source, tok, shard_index=index, shard_count=2))
        two.update({int(p): img for b in take(it, 3) for p, img in zip(b["pair"], b["image"])})
    assert set(one) == set(two)
    for pair in one:
        np.testing.assert_array_equal(one[pair], two[pair], err_msg=f"pair {pair}")


def test_global_batch_not_divisible_by_processes(source, tok):
    with pytest.raises(ValueError, match="not divisible"):
        train(source, tok, global_batch=6, shard_index=0, shard_count=4)


def test_to_global_shards_the_batch_over_the_mesh(source, tok):
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    batch = next(iter(train(source, tok, global_batch=8)))
    arrays = pipeline.to_global(batch, mesh, data_axes=("data", "fsdp"))
    assert arrays["image"].shape == (8, SIZE, SIZE, 3)
    assert len(arrays["image"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(arrays["ids"]), batch["ids"])


def test_eval_batches_in_order_with_a_short_last_batch(source):
    batches = list(iter(pipeline.eval_dataset(source, image_size=SIZE, batch_size=5)))
    assert [len(b["label"]) for b in batches] == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), np.arange(NUM_IMAGES))


@pytest.mark.parametrize("workers", [0, 1])
def test_missing_image_is_an_error_or_a_counted_skip(source, tmp_path, workers):
    """Counted in this process also when a grain worker process skipped it."""
    broken = [dict(r) for r in source[:7]]
    broken[2]["path"] = str(tmp_path / "absent.png")
    with pytest.raises(FileNotFoundError, match="absent.png"):
        list(iter(pipeline.eval_dataset(broken, image_size=SIZE, batch_size=5)))
    before = len(pipeline.skipped_images())
    batches = list(iter(pipeline.eval_dataset(broken, image_size=SIZE, batch_size=3, skip_unreadable=True,
                                              workers=workers)))
    assert np.concatenate([b["index"] for b in batches]).tolist() == [0, 1, 3, 4, 5, 6]
    assert all(set(b) == {"image", "label", "index"} for b in batches)  # the skip report is removed
    assert pipeline.skipped_images()[before:] == [str(tmp_path / "absent.png")]


def test_corrupt_image_names_the_file(source, tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    broken = [dict(source[0], path=str(bad))]
    with pytest.raises(images.ImageReadError, match="corrupt.jpg"):
        list(iter(pipeline.eval_dataset(broken, image_size=SIZE, batch_size=1)))


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(source, tok):
    want = take(iter(train(source, tok)), 3)
    got = take(iter(train(source, tok, workers=1)), 3)
    assert_batches_equal(got, want)


def test_augmented_eval_passes_are_seeded_views_in_source_order(source):
    def first(**kw):
        return next(iter(pipeline.eval_dataset(source, image_size=SIZE, batch_size=NUM_IMAGES, **kw)))

    a, b, c, plain = first(augment_seed=1), first(augment_seed=1), first(augment_seed=2), first()
    np.testing.assert_array_equal(a["index"], np.arange(NUM_IMAGES))
    np.testing.assert_array_equal(a["label"], plain["label"])
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"]) and not np.array_equal(a["image"], plain["image"])
    assert a["image"].shape == plain["image"].shape and a["image"].dtype == np.float32


def test_eval_preprocessing_follows_crop_rounding(tmp_path):
    """A palette image 59 x 40 at 32 px (47 x 32: an offset of 7.5, 8 by torchvision's rule, 7 by HF's):
    the default is torchvision's rule, resizing in the stored mode; "hf" converts first and floors. A TFDS-style
    record holding the encoded bytes gives the same pixels as the file."""
    rgb = Image.fromarray(synthetic.draw(synthetic.class_names(1)[0], 64, np.random.default_rng(1))).resize((59, 40))
    path = tmp_path / "p.png"
    rgb.quantize(colors=8).save(path)
    record = {"index": 0, "filename": "p.png", "path": str(path), "label": 0}
    from_bytes = {**record, "image_bytes": path.read_bytes()}

    def first(rec, **kw):
        return next(iter(pipeline.eval_dataset([rec], image_size=SIZE, batch_size=1, **kw)))["image"][0]

    torchvision = transforms.clip_eval_preprocess(images.load_pil_image(path), SIZE, crop_rounding="torchvision")
    hf = transforms.clip_eval_preprocess(images.load_image(path), SIZE, crop_rounding="hf")
    assert not np.array_equal(torchvision, hf)
    for rec in (record, from_bytes):
        np.testing.assert_array_equal(first(rec), torchvision)
        np.testing.assert_array_equal(first(rec, crop_rounding="torchvision"), torchvision)
        np.testing.assert_array_equal(first(rec, crop_rounding="hf"), hf)
    with pytest.raises(ValueError, match="crop_rounding='round'"):
        pipeline.eval_dataset([record], image_size=SIZE, batch_size=1, crop_rounding="round")


def test_data_config_checks_crop_rounding():
    c = datasets.default_config()
    c.source, c.folder = "folder", "images"
    assert c.crop_rounding == "torchvision"
    datasets.validate(c)
    c.crop_rounding = "hf"
    datasets.validate(c)
    c.crop_rounding = "floor"
    with pytest.raises(ConfigError, match=r"config\.data\.crop_rounding='floor'"):
        datasets.validate(c)
