"""Caption matching: the batched top-k equals a brute-force per-image computation; GIST's JSON format."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgist.data import images, sources, synthetic, transforms
from jaxgist.data.sources import DataError, GistSource
from jaxgist.methods import caption_matching
from jaxgist.models import clip
from jaxgist.models.clip import tokenizer

TINY = dict(vision=dict(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64),
            text=dict(width=32, layers=1, heads=2, mlp_dim=64), embed_dim=16)
LONG = ("an extremely long description that keeps going " * 12).strip()  # > 77 tokens: truncated


@pytest.fixture(scope="module")
def model():
    """The tiny CLIP with its weights shaken up: at the default init every image of a class gets
    nearly the same embedding, and so the same ranking, which would hide a mix-up of rows."""
    graph, state = nnx.split(clip.create(TINY, seed=0))
    leaves, treedef = jax.tree.flatten(state)

    @jax.jit
    def shake(leaves):
        keys = jax.random.split(jax.random.key(1), len(leaves))
        return [x + 0.5 * jax.random.normal(key, x.shape, x.dtype) if x.ndim else x
                for x, key in zip(leaves, keys)]

    return nnx.merge(graph, jax.tree.unflatten(treedef, shake(leaves)))


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("birds") / "d", num_classes=4, train_per_class=3,
                                   val_per_class=1, test_per_class=1, image_size=40, shots=(1,))


@pytest.fixture(scope="module")
def ragged(dataset, tmp_path_factory):
    """A descriptions JSON whose classes have 2, 6, 4 and 1 descriptions; class 1 repeats a string
    (an exact tie) and shares one with class 0; class 2 has one longer than the context."""
    with open(dataset.descriptions) as f:
        data = json.load(f)
    keys = list(data)
    d0, d1, d2, d3 = (data[k] for k in keys)
    data[keys[0]] = d0[:2]
    data[keys[1]] = [d1[0], d1[1], d0[0], d1[3], d1[1], d1[5]]  # slots 1 and 4 are equal
    data[keys[2]] = [d2[0], LONG, d2[2], d2[3]]
    data[keys[3]] = d3[:1]
    path = tmp_path_factory.mktemp("desc") / "ragged.json"
    path.write_text(json.dumps(data))
    return path


@nnx.jit
def _one_image(model, x):
    return model.encode_image(x)


@nnx.jit
def _one_text(model, ids):
    return model.encode_text(ids)


def brute_force(model, tok, source, descriptions, k):
    """Per train image: every description of its class encoded alone, cosine, stable argsort."""
    text_cache = {}

    def text(t):
        if t not in text_cache:
            e = np.asarray(_one_text(model, jnp.asarray(tok([t]))))[0]
            text_cache[t] = e / np.linalg.norm(e)
        return text_cache[t]

    out = {}
    for r in source:
        if r["split"] != "train":
            continue
        x = transforms.clip_eval_preprocess(images.load_image(r["path"]), 32)
        e = np.asarray(_one_image(model, jnp.asarray(x[None])))[0]
        e = e / np.linalg.norm(e)
        cos = np.array([text(t) @ e for t in descriptions[r["label"]]])
        order = np.argsort(-cos, kind="stable")[:k]
        out[r["filename"]] = (order, cos[order])
    return out


def test_matches_brute_force_with_ragged_classes(model, tok, dataset, ragged):
    source = GistSource(dataset.metadata, dataset.image_dir)  # every split: only train is matched
    descriptions = sources.read_descriptions(ragged, source.class_names)
    assert [len(d) for d in descriptions] == [2, 6, 4, 1]
    k = 5
    m = caption_matching.match_indices(model, tok, source, descriptions, k=k, batch_size=5)
    expected = brute_force(model, tok, source, descriptions, k)
    train = [r["filename"] for r in source if r["split"] == "train"]
    assert m.filenames == train and list(expected) == train
    assert m.slots.shape == (12, 5)
    for i, name in enumerate(m.filenames):
        order, cos = expected[name]
        n = m.counts[i]
        assert n == min(k, len(descriptions[m.labels[i]])) == len(order)
        np.testing.assert_array_equal(m.slots[i, :n], order, err_msg=name)
        np.testing.assert_allclose(m.scores[i, :n], cos, atol=2e-5, err_msg=name)
        assert (m.slots[i, n:] == -1).all() and np.isnan(m.scores[i, n:]).all()
        assert np.all(np.diff(m.scores[i, :n]) <= 0)

    # k = the largest class's count: full rankings. The repeated description of class 1 (slots 1
    # and 4) is an exact tie, ranked earlier slot first, next to each other.
    full = caption_matching.match_indices(model, tok, source, descriptions, k=6, batch_size=64)
    np.testing.assert_array_equal(full.slots[:, :5], m.slots)
    for row, scores in zip(full.slots[full.labels == 1], full.scores[full.labels == 1]):
        pos = list(row).index(1)
        assert row[pos + 1] == 4 and scores[pos] == scores[pos + 1]

    captions = caption_matching.match_captions(model, tok, source, descriptions, k=k, batch_size=64)
    assert list(captions) == train
    for name in train:
        label = m.labels[m.filenames.index(name)]
        assert captions[name] == [descriptions[label][j] for j in expected[name][0]]
    assert {len(c) for c in captions.values()} == {2, 5, 4, 1}  # fewer than k where a class has fewer
    # The rankings differ between images of a class (so rows cannot have been mixed up unnoticed).
    assert len({tuple(row) for row in m.slots[m.labels == 1]}) > 1


def test_json_round_trip_into_gist_source(model, tok, dataset, tmp_path):
    train = GistSource(dataset.metadata, dataset.image_dir, split="train")
    out = tmp_path / "sub" / "captions_top5.json"
    matches = caption_matching.match_to_file(model, tok, train, dataset.descriptions, out, k=5, batch_size=4)
    assert sources.read_captions(out) == matches
    assert json.loads(out.read_text()) == matches
    with_captions = GistSource(dataset.metadata, dataset.image_dir, split="train", captions=out, num_captions=5)
    assert {r["filename"]: r["captions"] for r in with_captions} == matches
    descriptions = sources.read_descriptions(dataset.descriptions, train.class_names)
    for r in with_captions:
        assert len(set(r["captions"])) == 5 and set(r["captions"]) <= set(descriptions[r["label"]])


def test_short_classes_give_fewer_captions_than_num_captions(model, tok, dataset, ragged, tmp_path):
    train = GistSource(dataset.metadata, dataset.image_dir, split="train")
    out = tmp_path / "captions.json"
    caption_matching.match_to_file(model, tok, train, ragged, out, k=5)
    with pytest.raises(DataError, match="fewer than num_captions=5"):
        GistSource(dataset.metadata, dataset.image_dir, split="train", captions=out, num_captions=5)
    assert len(GistSource(dataset.metadata, dataset.image_dir, split="train", captions=out, num_captions=1)) == 12


def test_bad_descriptions(model, tok, dataset, tmp_path):
    train = GistSource(dataset.metadata, dataset.image_dir, split="train")
    with open(dataset.descriptions) as f:
        data = json.load(f)
    keys = list(data)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({k: v for k, v in data.items() if k != keys[2]}))
    with pytest.raises(DataError, match=rf"no descriptions: 2: {train.class_names[2]!r}"):
        caption_matching.match_to_file(model, tok, train, missing, tmp_path / "o.json")
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({**data, "Purple Unicorn": ["a horse with a horn"]}))
    with pytest.raises(DataError, match="match no class name: 'Purple Unicorn'"):
        caption_matching.match_to_file(model, tok, train, extra, tmp_path / "o.json")
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        caption_matching.match_to_file(model, tok, train, tmp_path / "nowhere.json", tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()

    descriptions = sources.read_descriptions(dataset.descriptions, train.class_names)
    with pytest.raises(DataError, match="3 classes but the source has 4"):
        caption_matching.match_captions(model, tok, train, descriptions[:3])
    with pytest.raises(DataError, match="no descriptions: 1"):
        caption_matching.match_captions(model, tok, train, [descriptions[0], [], *descriptions[2:]])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        caption_matching.match_captions(model, tok, train, descriptions, k=0)
    test_only = GistSource(dataset.metadata, dataset.image_dir, split="test")
    with pytest.raises(DataError, match="no records of split 'train'"):
        caption_matching.match_captions(model, tok, test_only, descriptions)


def test_write_captions_format(tmp_path):
    path = tmp_path / "c.json"
    caption_matching.write_captions(path, {"a/b.jpg": ["x", "y"], "c.jpg": ["z\u00e9"]})
    assert path.read_text() == json.dumps({"a/b.jpg": ["x", "y"], "c.jpg": ["z\u00e9"]})
    assert sources.read_captions(path) == {"a/b.jpg": ["x", "y"], "c.jpg": ["z\u00e9"]}
    with pytest.raises(TypeError):
        caption_matching.write_captions(path, {"a.jpg": "not a list"})


def test_the_job_writes_the_captions_file_and_its_figures(tmp_path):
    """python -m jaxgist --config configs/caption_matching.py:small, in process: every training image
    gets k captions, each among its own class's descriptions."""
    import sys

    from jaxgist.core import config as config_lib
    from jaxgist.data import datasets
    from jaxgist.main import run_job

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from configs import caption_matching as match_config

    c = match_config.get_config("small")
    c.data.synthetic.dir = str(tmp_path / "birds")
    out = run_job(c, str(tmp_path / "work"))["caption_matching"]
    captions = json.loads((tmp_path / "work" / "captions_top3.json").read_text())
    assert out["images"] == len(captions) == 24 and out["k"] == 3
    paths = datasets.paths(c.data, tmp_path / "work")
    descriptions = json.loads(pathlib.Path(paths["descriptions"]).read_text())
    every = {d for ds in descriptions.values() for d in ds}
    assert all(len(v) == 3 and set(v) <= every for v in captions.values())
    assert json.loads((tmp_path / "work" / "results.json").read_text())["run"]["caption_matching"]["images"] == 24
    c.data.source = "tfds"
    with pytest.raises(config_lib.ConfigError, match="caption matching reads GIST-format descriptions"):
        run_job(c, str(tmp_path / "bad"))
