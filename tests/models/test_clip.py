"""CLIP model behaviour: presets, config validation, loading errors, bf16, remat, sharded jit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgist.models import clip

TINY = dict(
    vision=dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=128),
    text=dict(vocab_size=100, context_length=16, width=32, layers=2, heads=2, mlp_dim=64),
    embed_dim=24,
)


def tiny_inputs(batch=8, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.normal(size=(batch, 32, 32, 3)).astype(np.float32)
    ids = np.zeros((batch, 16), np.int32)
    for row in range(batch):
        n = 2 + row % 14
        ids[row, : n - 1] = rng.integers(3, 97, size=n - 1)
        ids[row, n - 1] = 99
    return jnp.asarray(pixels), jnp.asarray(ids)


def param_count(model):
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name,params_millions,embed", [
    ("ViT-B/32", 151.28, 512), ("ViT-B/16", 149.62, 512), ("ViT-L/14", 427.62, 768), ("ViT-L/14@336px", 427.94, 768),
])
def test_presets_have_published_sizes(name, params_millions, embed):
    model = clip.abstract(clip.PRESETS[name])
    assert param_count(model) / 1e6 == pytest.approx(params_millions, abs=0.01)
    assert model.config.embed_dim == embed


def test_invalid_config_lists_every_problem():
    with pytest.raises(ValueError) as err:
        clip.create(dict(vision=dict(image_size=30, patch_size=8, width=64, heads=5, act="relu"),
                         text=dict(width=32, heads=3)))
    msg = str(err.value)
    for fragment in ("vision.width=64", "text.width=32", "'relu'", "image_size=30"):
        assert fragment in msg


def test_unknown_preset():
    with pytest.raises(ValueError, match="ViT-B/99"):
        clip.create("ViT-B/99")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        clip.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed JSON"):
        clip.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        clip.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        clip.load(tmp_path / "absent.pt")


def test_mismatched_checkpoint_lists_all_keys(tmp_path):
    model = clip.create(TINY)
    sd = clip.to_hf_state_dict(model)
    sd.pop("logit_scale")
    sd.pop("text_projection.weight")
    sd["vision_model.extra.weight"] = np.zeros(3, np.float32)
    sd["visual_projection.weight"] = np.zeros((5, 64), np.float32)
    with pytest.raises(clip.CheckpointMismatchError) as err:
        clip.from_hf_state_dict(model.config, sd)
    msg = str(err.value)
    assert "2 missing" in msg and "logit_scale" in msg and "text_projection.weight" in msg
    assert "1 unexpected" in msg and "vision_model.extra.weight" in msg
    assert "visual_projection.weight: checkpoint (5, 64), model expects (24, 64)" in msg


def test_logit_scale_is_clamped_at_ln100():
    model = clip.create(TINY)
    model.logit_scale[...] = jnp.asarray(7.0)
    assert float(model.scale()) == pytest.approx(100.0, rel=1e-6)


def test_text_only_keeps_the_text_tower_and_drops_the_image_tower():
    model = clip.create(TINY, seed=0)
    pixels, ids = tiny_inputs()
    expected = np.asarray(model.encode_text(ids))
    full = param_count(model)
    tower = param_count(model.vision_model) + param_count(model.visual_projection)
    text = clip.text_only(model)
    assert param_count(text) == full - tower
    np.testing.assert_array_equal(np.asarray(text.encode_text(ids)), expected)
    with pytest.raises(ValueError, match="no image tower"):
        text.encode_image(pixels)
    abstract = clip.text_only(clip.abstract(model.config))
    assert param_count(abstract) == full - tower


def test_bf16_compute_keeps_fp32_params_and_stays_close():
    ref = clip.create(TINY, seed=1)
    low = clip.create(TINY, seed=1, dtype=jnp.bfloat16)
    pixels, ids = tiny_inputs()
    assert all(v.dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(low, nnx.Param)))
    a, b = ref.encode_image(pixels), low.encode_image(pixels)
    assert b.dtype == jnp.float32
    cos = np.sum(np.asarray(clip.normalize(a) * clip.normalize(b)), -1)
    assert cos.min() > 0.99
    assert not np.allclose(np.asarray(a), np.asarray(b), atol=1e-6)  # bf16 really ran


@pytest.mark.slow
def test_remat_gives_the_same_gradients():
    pixels, ids = tiny_inputs()

    def grads(remat):
        model = clip.create(TINY, seed=2, remat=remat)

        def loss(m):
            per_image, _ = m(pixels, ids)
            return jnp.mean(jax.nn.log_softmax(per_image)[jnp.arange(8), jnp.arange(8)])

        return nnx.grad(loss)(model)

    g0, g1 = grads(False), grads(True)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_sharded_jit_matches_one_device():
    assert jax.device_count() == 8, "conftest should give 8 fake CPU devices"
    model = clip.create(TINY, seed=4)
    pixels, ids = tiny_inputs(batch=16)
    want_img = model.encode_image(pixels)
    want_txt = model.encode_text(ids)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, replicated)

    @jax.jit
    def encode(state, pixels, ids):
        m = nnx.merge(graphdef, state)
        return m.encode_image(pixels), m.encode_text(ids)

    img, txt = encode(state, jax.device_put(pixels, batch), jax.device_put(ids, batch))
    assert len(img.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(img), np.asarray(want_img), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(txt), np.asarray(want_txt), rtol=0, atol=1e-5)


def test_text_longer_than_context_is_refused():
    model = clip.create(TINY)
    with pytest.raises(ValueError, match="context length 16"):
        model.encode_text(jnp.ones((1, 17), jnp.int32))


def test_trimmed_padding_gives_the_same_text_embeddings():
    from jaxgist.models.clip.tokenizer import trim_padding

    model = clip.create(TINY, seed=5)
    _, ids = tiny_inputs(batch=4)
    ids = np.asarray(ids).copy()
    ids[:, 6:] = 0
    ids[:, 5] = 99
    trimmed = trim_padding(ids, multiple=4)
    assert trimmed.shape == (4, 8)
    np.testing.assert_allclose(np.asarray(model.encode_text(jnp.asarray(trimmed))),
                               np.asarray(model.encode_text(jnp.asarray(ids))), rtol=0, atol=1e-6)


def test_hub_name_without_network_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-base-patch32"):
        clip.load("ViT-B/32")


def test_read_config_gives_the_architecture_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # OpenAI names and their hub copies: the published sizes, no download
    for name, hub in clip.OPENAI_HUB_NAMES.items():
        assert clip.read_config(name) == clip.PRESETS[name]
        assert clip.read_config(hub, dtype=jnp.float32, compute_dtype=jnp.bfloat16) == clip.PRESETS[name].replace(
            dtype=jnp.bfloat16)
    # an HF directory: config.json alone decides (no weights in it yet)
    model = clip.create(TINY, seed=0)
    saved = clip.save_hf(model, tmp_path / "hf")
    cfg = clip.read_config(saved)
    assert cfg == model.config
    (saved / "model.safetensors").unlink()
    assert clip.read_config(saved) == model.config
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        clip.load(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: malformed JSON"):
        clip.read_config(saved)
    with pytest.raises(FileNotFoundError, match="not a known model name or hub name"):
        clip.read_config("./no/such/dir")


def test_job_config_with_init_reads_no_weights(tmp_path, monkeypatch):
    import ml_collections

    from jaxgist.models.clip import weights as clip_weights

    monkeypatch.setattr(clip_weights, "from_hf_state_dict", lambda *a, **k: pytest.fail("read the weights"))
    c = ml_collections.ConfigDict(dict(init="ViT-L/14@336px", preset=None, dtype="float32",
                                       compute_dtype="bfloat16", remat=True))
    cfg = clip.config_from_model_config(c)
    assert cfg.vision.image_size == 336 and cfg.vision.layers == 24 and cfg.remat
    assert cfg.dtype == jnp.bfloat16 and cfg.param_dtype == jnp.float32
