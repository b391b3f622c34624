"""GPT-2: logits with and without the KV cache against HF's GPT2LMHeadModel, checkpoint layouts in and
out, numerics switches, dropout, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgist.models import gpt2  # noqa: E402
from tests.models.torch_weights import perturb  # noqa: E402

ATOL = 1e-5
TINY_HF = dict(vocab_size=96, n_positions=48, n_embd=64, n_layer=2, n_head=4, bos_token_id=95, eos_token_id=95)


def hf_gpt2(seed=0, **kw):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**{**TINY_HF, **kw})
    return perturb(transformers.GPT2LMHeadModel(config).eval(), seed), config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ref, _ = hf_gpt2()
    directory = tmp_path_factory.mktemp("gpt2")
    ref.save_pretrained(directory)
    return ref, directory


@nnx.jit
def logits_of(model, ids):
    return model(ids)


@nnx.jit
def logits_with_cache(model, x, cache):
    return model(inputs_embeds=x, cache=cache)


def ids(batch=3, length=14, seed=0, vocab=96):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length)).astype(np.int32)


def torch_logits(ref, x=None, embeds=None):
    with torch.no_grad():
        if embeds is not None:
            return ref(inputs_embeds=torch.from_numpy(np.asarray(embeds))).logits.numpy()
        return ref(input_ids=torch.from_numpy(x).long()).logits.numpy()


def test_logits_with_and_without_cache_match_hf(saved):
    ref, directory = saved
    model = gpt2.load(directory)
    assert model.config.width == 64 and model.config.layers == 2 and model.config.act == "gelu_new"
    x = ids()
    want = torch_logits(ref, x)
    full = np.asarray(logits_of(model, jnp.asarray(x)))
    diff_full = np.abs(full - want).max()
    assert diff_full < ATOL, diff_full

    # prefix as input embeddings (5 positions), then a chunk of 3 tokens, then one token at a time
    embeds = np.asarray(model.embed_tokens(jnp.asarray(x)))
    cache = model.init_cache(3, 14)
    chunks = [(0, 5), (5, 8)] + [(i, i + 1) for i in range(8, 14)]
    got = []
    for lo, hi in chunks:
        out, cache = logits_with_cache(model, jnp.asarray(embeds[:, lo:hi]), cache)
        got.append(np.asarray(out))
    assert int(cache.length) == 14
    with pytest.raises(ValueError, match="exceed the cache's 14"):
        model(inputs_embeds=jnp.asarray(embeds[:, :1]), cache=cache)
    diff_cache = np.abs(np.concatenate(got, axis=1) - want).max()
    assert diff_cache < ATOL, diff_cache
    # and HF's own inputs_embeds path agrees
    np.testing.assert_allclose(torch_logits(ref, embeds=embeds), want, rtol=0, atol=ATOL)
    print(f"GPT-2 logits max |diff| vs HF: no cache {diff_full:.2e}, KV cache {diff_cache:.2e}")


def test_save_hf_round_trip_loads_in_transformers(saved, tmp_path):
    ref, directory = saved
    model = gpt2.load(directory)
    out = gpt2.save_hf(model, tmp_path / "export")
    again = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    x = ids(seed=1)
    np.testing.assert_array_equal(torch_logits(again, x), torch_logits(ref, x))
    sd = gpt2.to_hf_state_dict(model)
    assert "lm_head.weight" not in sd and sd["transformer.h.1.attn.c_attn.weight"].shape == (64, 192)
    for k, v in ref.state_dict().items():
        if k != "lm_head.weight":
            np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)


def test_hub_layout_with_buffers_and_a_state_dict_file(saved, tmp_path):
    """The hub's GPT-2 files: GPT2Model keys without ``transformer.``, the attention buffers; a tied
    ``lm_head.weight`` is accepted, an untied one refused."""
    ref, directory = saved
    sd = {k[len("transformer."):]: v.numpy() for k, v in ref.state_dict().items() if k.startswith("transformer.")}
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = np.tril(np.ones((48, 48), np.uint8))[None, None]
        sd[f"h.{i}.attn.masked_bias"] = np.float32(-1e4)
    sd["lm_head.weight"] = sd["wte.weight"]
    model = gpt2.from_hf_state_dict(sd, ref.config)
    x = ids(seed=2)
    np.testing.assert_allclose(np.asarray(logits_of(model, jnp.asarray(x))), torch_logits(ref, x), rtol=0, atol=ATOL)
    file = tmp_path / "weights.bin"
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, file)
    (tmp_path / "config.json").write_text(ref.config.to_json_string())
    assert gpt2.load(file).config.vocab_size == 96
    sd["lm_head.weight"] = sd["wte.weight"] + 1
    with pytest.raises(gpt2.CheckpointMismatchError, match="ties its LM head"):
        gpt2.from_hf_state_dict(sd, ref.config)


def test_checkpoint_problems_are_reported_together(saved):
    ref, _ = saved
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    del sd["transformer.h.1.ln_2.weight"]
    sd["transformer.h.0.attn.extra"] = np.zeros(3, np.float32)
    sd["transformer.h.0.mlp.c_fc.weight"] = np.zeros((256, 64), np.float32)  # a Linear's (out, in): wrong
    with pytest.raises(gpt2.CheckpointMismatchError) as err:
        gpt2.from_hf_state_dict(sd, ref.config, source="bad.safetensors")
    message = str(err.value)
    for text in ("bad.safetensors", "1 missing", "transformer.h.1.ln_2.weight", "1 unexpected",
                 "transformer.h.0.attn.extra", "1 wrong shape",
                 "transformer.h.0.mlp.c_fc.weight: checkpoint (256, 64), model expects (64, 256)"):
        assert text in message, message
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        gpt2.config_from_hf(dict(TINY_HF, scale_attn_by_inverse_layer_idx=True))


def test_missing_files_say_which(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        gpt2.load(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="not-a-user/not-a-gpt2"):
        gpt2.load("not-a-user/not-a-gpt2")
    with pytest.raises(FileNotFoundError, match="config.json"):
        gpt2.load(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "roberta"}')
    with pytest.raises(ValueError, match="'roberta' is not 'gpt2'"):
        gpt2.load(tmp_path)


def test_presets_init_bf16_and_positions(saved):
    cfg = gpt2.resolve_config("gpt2")
    assert (cfg.width, cfg.layers, cfg.heads, cfg.hidden, cfg.vocab_size, cfg.n_positions) == (768, 12, 12, 3072,
                                                                                               50257, 1024)
    abstract = gpt2.abstract(cfg)
    n = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert n == 124_439_808  # GPT-2 base (the LM head is tied)
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        assert len(gpt2.logical_axes(path)) == len(var.shape), path
    model = gpt2.create(dict(vocab_size=96, n_positions=16, width=64, layers=2, heads=4), seed=1)
    assert 0.015 < float(jnp.std(model.transformer.h[0].attn.c_attn.kernel[...])) < 0.025
    assert float(jnp.std(model.transformer.h[0].mlp.c_proj.kernel[...])) < 0.012  # 0.02 / sqrt(2 * layers)
    _, directory = saved
    x = jnp.asarray(ids())
    fp32 = np.asarray(logits_of(gpt2.load(directory), x))
    low = gpt2.load(directory, compute_dtype=jnp.bfloat16)
    assert low.transformer.h[0].attn.c_attn.kernel[...].dtype == jnp.float32
    out = np.asarray(logits_of(low, x))
    assert out.dtype == np.float32 and np.abs(out - fp32).max() < 0.05 and not np.allclose(out, fp32, atol=1e-6)
    with pytest.raises(ValueError, match="17 positions exceed"):
        model(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="width 32"):
        model(inputs_embeds=jnp.zeros((1, 3, 32)))
    with pytest.raises(ValueError, match="not divisible"):
        gpt2.GPT2Config(width=30, heads=4)


@nnx.jit
def train_logits(model, ids, rngs):
    return model(ids, rngs=rngs)


def test_dropout_in_training_mode_only(saved):
    model = gpt2.load(saved[1])
    x = jnp.asarray(ids())
    ref = np.asarray(logits_of(model, x))
    model.train()
    with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
        model(x)
    a = np.asarray(train_logits(model, x, nnx.Rngs(dropout=1)))
    b = np.asarray(train_logits(model, x, nnx.Rngs(dropout=1)))
    c = np.asarray(train_logits(model, x, nnx.Rngs(dropout=2)))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, ref)
    model.eval()
    np.testing.assert_array_equal(np.asarray(logits_of(model, x)), ref)
    assert jax.tree.leaves(model.init_cache(2, 16).keys)[0].shape == (2, 16, 4, 16)


def test_dropout_numbers_are_uniform_and_keyed():
    """The counter-based draws: uniform (the kept fraction within 4 standard deviations, 32 equal bins),
    no correlation between neighbours, other numbers for another key and for each site."""
    a, b = jax.jit(lambda k: gpt2.model.uniform_draws(k, [(500, 1000), None, (3, 7)]))(jax.random.key(0))[::2]
    u = np.asarray(a).ravel()
    assert u.dtype == np.float32 and 0.0 <= u.min() and u.max() < 1.0 and b.shape == (3, 7)
    assert abs((u < 0.9).mean() - 0.9) < 4 * np.sqrt(0.09 / u.size)
    bins = np.histogram(u, bins=32, range=(0, 1))[0]
    assert ((bins - u.size / 32) ** 2 / (u.size / 32)).sum() < 70  # chi-square, 31 degrees of freedom
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.006
    other = np.asarray(gpt2.model.uniform_draws(jax.random.key(1), [(500, 1000)])[0]).ravel()
    assert abs(np.corrcoef(u, other)[0, 1]) < 0.006 and not np.array_equal(np.asarray(b).ravel(), u[:21])
    assert gpt2.model.uniform_draws(None, [(2, 2)]) == [None]
