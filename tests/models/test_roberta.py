"""RoBERTa: the pooler output and hidden states against HF's RobertaModel on padded batches, checkpoint
layouts in and out (the MLM checkpoint without a pooler), dropout, errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgist.models import roberta  # noqa: E402
from tests.models.torch_weights import perturb  # noqa: E402

ATOL = 1e-5
TINY_HF = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
               eos_token_id=2)


def hf_roberta(seed=0):
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(**TINY_HF)
    return perturb(transformers.RobertaModel(config).eval(), seed), config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ref, _ = hf_roberta()
    directory = tmp_path_factory.mktemp("roberta")
    ref.save_pretrained(directory)
    return ref, directory


@nnx.jit
def run(model, ids, mask, rngs=None):
    return model(ids, mask, rngs=rngs)


def batch(seed=0, length=12):
    """<s> tokens </s> then padding (id 1), lengths 12, 7 and 3."""
    rng = np.random.default_rng(seed)
    ids = np.ones((3, length), np.int32)
    for row, n in enumerate((length, 7, 3)):
        ids[row, :n] = np.concatenate([[0], rng.integers(3, 96, n - 2), [2]])
    return ids, (ids != 1).astype(np.int32)


def torch_outputs(ref, ids, mask):
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def test_pooler_output_and_hidden_states_match_hf(saved):
    ref, directory = saved
    model = roberta.load(directory)
    assert model.config.width == 64 and model.config.type_vocab_size == 1 and model.config.max_length == 38
    ids, mask = batch()
    hidden, pooled = run(model, jnp.asarray(ids), jnp.asarray(mask))
    want_hidden, want_pooled = torch_outputs(ref, ids, mask)
    diff_pooled = np.abs(np.asarray(pooled) - want_pooled).max()
    diff_hidden = np.abs(np.asarray(hidden) - want_hidden)[mask.astype(bool)].max()
    assert diff_pooled < ATOL and diff_hidden < ATOL, (diff_pooled, diff_hidden)
    print(f"RoBERTa max |diff| vs HF: pooler {diff_pooled:.2e}, hidden states {diff_hidden:.2e}")
    # HF's position ids: from pad_token_id + 1 over the tokens, pad_token_id at padding
    np.testing.assert_array_equal(np.asarray(roberta.position_ids(jnp.asarray(ids), 1))[2], [2, 3, 4] + [1] * 9)


def test_save_hf_round_trip_and_mlm_checkpoint_without_pooler(saved, tmp_path, caplog):
    ref, directory = saved
    model = roberta.load(directory)
    out = roberta.save_hf(model, tmp_path / "export")
    again = transformers.RobertaModel.from_pretrained(out).eval()
    ids, mask = batch(seed=1)
    want_hidden, want_pooled = torch_outputs(ref, ids, mask)
    got_hidden, got_pooled = torch_outputs(again, ids, mask)
    np.testing.assert_array_equal(got_pooled, want_pooled)
    sd = roberta.to_hf_state_dict(model)
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)

    # RobertaForMaskedLM's layout: "roberta." keys, an lm_head, buffers, and no pooler (the hub's roberta-base)
    mlm = {f"roberta.{k}": v for k, v in sd.items() if not k.startswith("pooler.")}
    mlm.update({"lm_head.dense.weight": np.zeros((64, 64), np.float32), "lm_head.bias": np.zeros(96, np.float32),
                "roberta.embeddings.position_ids": np.arange(40)[None]})
    fresh = roberta.from_hf_state_dict(mlm, TINY_HF, seed=3, source="mlm.bin")
    assert "no pooler weights" in caplog.text
    hidden, pooled = run(fresh, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(hidden)[mask.astype(bool)], want_hidden[mask.astype(bool)], rtol=0,
                               atol=ATOL)
    assert 0.015 < float(jnp.std(fresh.pooler.dense.kernel[...])) < 0.025
    bare = roberta.from_hf_state_dict(sd, TINY_HF, pooler=False)
    assert bare.pooler is None and run(bare, jnp.asarray(ids), jnp.asarray(mask))[1] is None


def test_checkpoint_problems_are_reported_together(saved):
    ref, _ = saved
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    del sd["encoder.layer.1.attention.self.key.bias"]
    del sd["pooler.dense.bias"]  # one pooler key without the other is an error, not a fresh pooler
    sd["encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
    sd["encoder.layer.0.intermediate.dense.weight"] = np.zeros((64, 128), np.float32)
    with pytest.raises(roberta.CheckpointMismatchError) as err:
        roberta.from_hf_state_dict(sd, ref.config, source="bad.safetensors")
    message = str(err.value)
    for text in ("bad.safetensors", "2 missing", "encoder.layer.1.attention.self.key.bias", "pooler.dense.bias",
                 "encoder.layer.0.extra.weight",
                 "encoder.layer.0.intermediate.dense.weight: checkpoint (64, 128), model expects (128, 64)"):
        assert text in message, message
    with pytest.raises(ValueError, match="position_embedding_type"):
        roberta.config_from_hf(dict(TINY_HF, position_embedding_type="relative_key"))


def test_presets_dropout_and_errors(tmp_path, monkeypatch):
    cfg = roberta.resolve_config("roberta-base")
    params = nnx.state(roberta.abstract(cfg), nnx.Param)
    n = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(params))
    assert n == 124_645_632  # roberta-base with its pooler
    for path, var in nnx.to_flat_state(params):
        assert len(roberta.logical_axes(path)) == len(var.shape), path
    model = roberta.create(dict(vocab_size=96, max_positions=40, width=64, layers=2, heads=4, mlp_dim=128), seed=1)
    assert not np.any(np.asarray(model.embeddings.word_embeddings.embedding[...][1]))  # padding row
    ids, mask = (jnp.asarray(a) for a in batch())
    ref = np.asarray(run(model, ids, mask)[1])
    model.train()
    with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
        model(ids, mask)
    a = np.asarray(run(model, ids, mask, nnx.Rngs(dropout=1))[1])
    assert not np.allclose(a, ref)
    model.eval()
    np.testing.assert_array_equal(np.asarray(run(model, ids, mask)[1]), ref)
    with pytest.raises(ValueError, match="39 tokens exceed"):
        model(jnp.zeros((1, 39), jnp.int32))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not-a-user/not-a-roberta"):
        roberta.load("not-a-user/not-a-roberta")
