"""CgT-GAN's generator and discriminator: decoding against a PyTorch loop over HF's GPT2LMHeadModel written
after the reference's ``ClipCaptionModel.generate`` (greedy token-identical; sampled sequences scored
the same), the discriminator against HF's RobertaModel with a torch head, the reference's names,
bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgist.models import captioner, gpt2, roberta  # noqa: E402
from jaxgist.models.gpt2 import decode  # noqa: E402
from tests.models.torch_weights import perturb  # noqa: E402

ATOL = 1e-5
PREFIX_DIM, PREFIX_LEN, T = 32, 4, 20
PAD = 95


class TorchCaptioner(torch.nn.Module):
    """The reference's ClipCaptionModel layout (MLP mapping): ``gpt`` and ``clip_project.model``."""

    def __init__(self, gpt, prefix_dim, prefix_len):
        super().__init__()
        width = gpt.config.n_embd
        self.gpt = gpt
        self.clip_project = torch.nn.Module()
        self.clip_project.model = torch.nn.Sequential(torch.nn.Linear(prefix_dim, prefix_len * width // 2),
                                                      torch.nn.Tanh(),
                                                      torch.nn.Linear(prefix_len * width // 2, prefix_len * width))
        self.prefix_len = prefix_len

    def prefix(self, clip):
        return self.clip_project.model(clip).view(clip.shape[0], self.prefix_len, -1)


def filter_torch(logits, top_k, top_p):
    """Top-k then nucleus filtering as the reference's ``top_k_top_p_filtering`` (min_tokens_to_keep=1)."""
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)))[0][..., -1, None]
        logits[logits < kth] = -float("inf")
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        remove = torch.cumsum(torch.softmax(ordered, dim=-1), dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[remove.scatter(1, order, remove)] = -float("inf")
    return logits


def torch_decode(gpt, prefix, *, stop, chosen=None, temperature=1.0, top_k=0, top_p=1.0, max_length=T, pad=PAD):
    """The reference's decoding loop on HF's model: the prefix as inputs_embeds, then one token at a time
    with past_key_values. Greedy when ``chosen`` is None; otherwise the sampled tokens are ``chosen``
    [N, T] (ours), scored under the same temperature and filtering."""
    n = prefix.shape[0]
    unfinished = torch.ones(n, dtype=torch.long)
    past, token, ids, logprobs, flags = None, None, [], [], []
    t = 0
    with torch.no_grad():
        while t < max_length:
            if past is None:
                out = gpt(inputs_embeds=prefix, use_cache=True)
            else:
                out = gpt(input_ids=token[:, None], past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :]
            if chosen is None:
                token = torch.argmax(logits, dim=-1)
            else:
                logits = filter_torch(logits / temperature if temperature != 1.0 else logits, top_k, top_p)
                token = torch.from_numpy(np.asarray(chosen[:, t])).long()
            logprobs.append(torch.log_softmax(logits, dim=-1).gather(-1, token[:, None]))
            flags.append(unfinished)
            ids.append(token * unfinished + pad * (1 - unfinished))
            unfinished = unfinished * (token != stop).long()
            t += 1
            if unfinished.max() == 0:
                break
    ids = torch.stack(ids, dim=1)
    if t == max_length:
        ids[:, -1].masked_fill_(unfinished.bool(), stop)
    flags = torch.stack(flags, dim=1).float()
    scores = (torch.cat(logprobs, dim=1) * flags).sum(1) / flags.sum(1)
    ids = torch.cat([ids, torch.full((n, max_length - ids.shape[1]), pad, dtype=torch.long)], dim=1)
    return ids.numpy(), scores.numpy()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=95,
                                     eos_token_id=95)
    ref_gpt = perturb(transformers.GPT2LMHeadModel(config).eval(), scale=0.1)
    cap = captioner.create_captioner(prefix_dim=PREFIX_DIM, prefix_length=PREFIX_LEN,
                                     gpt2=gpt2.from_hf_state_dict(ref_gpt.state_dict(), config), seed=1)
    ref = TorchCaptioner(ref_gpt, PREFIX_DIM, PREFIX_LEN)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in captioner.to_reference_state_dict(cap).items()},
                        strict=False)  # strict except the attention buffers some transformers versions keep
    missing = set(ref.state_dict()) - set(captioner.to_reference_state_dict(cap))
    assert not {k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))}, missing
    clip = np.random.default_rng(0).normal(size=(4, PREFIX_DIM)).astype(np.float32)
    return cap, ref.eval(), clip


def test_prefix_matches_the_reference_mapping(models):
    cap, ref, clip = models
    with torch.no_grad():
        want = ref.prefix(torch.from_numpy(clip)).numpy()
    got = np.asarray(cap.prefix(clip))
    assert got.shape == (4, PREFIX_LEN, 64)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    norm = captioner.ClipPrefixCaptioner(cap.config.replace(normalize_prefix=True), gpt=cap.gpt, rngs=nnx.Rngs(0))
    nnx.update(norm.clip_project, nnx.state(cap.clip_project))
    np.testing.assert_allclose(np.asarray(norm.prefix(clip * 3.0)),
                               np.asarray(cap.prefix(clip / np.linalg.norm(clip, axis=1, keepdims=True))), atol=1e-6)


def test_greedy_is_token_identical_to_the_reference_loop(models):
    cap, ref, clip = models
    with torch.no_grad():
        prefix = ref.prefix(torch.from_numpy(clip))
    # a stop token that greedy decoding emits in some rows, not in others
    free, _ = torch_decode(ref.gpt, prefix, stop=-1)
    counts = [(sum(tok in row[1:15] for row in free), tok) for tok in np.unique(free[:, 1:15])]
    stop = next(tok for c, tok in sorted(counts, reverse=True) if c < len(free))
    want_ids, want_scores = torch_decode(ref.gpt, prefix, stop=stop)
    out = cap.greedy(clip, stop_id=int(stop), pad_id=PAD)
    assert out.tokens.shape == (4, T) and out.scores.shape == (4,)
    np.testing.assert_array_equal(np.asarray(out.tokens), want_ids)
    diff = np.abs(np.asarray(out.scores) - want_scores).max()
    assert diff < ATOL, diff
    lengths = np.asarray(out.lengths)
    assert lengths.min() < T  # some rows stopped early: padding after the stop token
    for row, n in zip(np.asarray(out.tokens), lengths):
        if n < T:
            assert row[n - 1] == stop and np.all(row[n:] == PAD)
    print(f"greedy: token-identical, scores max |diff| {diff:.2e}, stop id {stop}, lengths {lengths.tolist()}")


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7, top_k=12, top_p=0.9)], ids=["plain", "filtered"])
def test_sampled_scores_match_the_reference_for_the_same_tokens(models, options):
    cap, ref, clip = models
    with torch.no_grad():
        prefix = ref.prefix(torch.from_numpy(clip)).repeat_interleave(5, dim=0)  # the reference's B x K order
    key = jax.random.key(3)
    free = cap.sample(clip, key, dropout=False, stop_id=-1, pad_id=PAD, **options)
    # the same key draws the same tokens whatever the stop id: pick one that ends about half the samples early
    rows = np.asarray(free.sampled).reshape(20, T)[:, :T - 1]
    stop = min(np.unique(rows), key=lambda tok: abs(np.any(rows == tok, axis=1).sum() - 10))
    out = cap.sample(clip, key, dropout=False, stop_id=int(stop), pad_id=PAD, **options)
    assert out.tokens.shape == (4, 5, T) and out.scores.shape == (4, 5)
    sampled = np.asarray(out.sampled).reshape(20, T)
    want_ids, want_scores = torch_decode(ref.gpt, prefix, stop=stop, chosen=sampled, **options)
    np.testing.assert_array_equal(np.asarray(out.tokens).reshape(20, T), want_ids)
    diff = np.abs(np.asarray(out.scores).reshape(-1) - want_scores).max()
    assert diff < ATOL, diff
    lengths = np.asarray(out.lengths).reshape(-1)
    assert lengths.min() < T and lengths.max() == T, lengths
    np.testing.assert_allclose(np.asarray(out.logprobs).sum(-1) / np.asarray(out.lengths), np.asarray(out.scores),
                               rtol=1e-6)
    assert len({tuple(r) for r in np.asarray(out.tokens)[0]}) > 1  # the 5 samples of an image differ
    print(f"sampling {options or 'plain'}: scores max |diff| {diff:.2e}, stop id {stop}")


def test_sampling_dropout_switch_and_options(models):
    cap, _, clip = models
    key = jax.random.key(4)
    off = cap.sample(clip, key, dropout=False, pad_id=PAD)
    on = cap.sample(clip, key, pad_id=PAD)  # dropout on by default, as the reference samples
    again = cap.sample(clip, key, pad_id=PAD)
    np.testing.assert_array_equal(np.asarray(on.tokens), np.asarray(again.tokens))
    assert not np.allclose(np.asarray(on.scores), np.asarray(off.scores))
    assert on.tokens.shape == (4, 5, T)
    with pytest.raises(ValueError, match="temperature=0"):
        cap.sample(clip, key, temperature=0)
    with pytest.raises(ValueError, match="top_p=1.5"):
        cap.sample(clip, key, top_p=1.5)
    with pytest.raises(ValueError, match="need 33 positions"):
        cap.greedy(clip, max_new_tokens=30)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 96)).astype(np.float32))
    kept = np.isfinite(np.asarray(decode.filter_logits(logits, 1.0, top_k=5)))
    assert np.all(kept.sum(-1) == 5)
    want = filter_torch(torch.from_numpy(np.asarray(logits)) / 0.5, 20, 0.8).numpy()
    np.testing.assert_array_equal(np.asarray(decode.filter_logits(logits, 0.5, top_k=20, top_p=0.8)), want)


def test_draw_follows_the_softmax():
    """Inverse-CDF draws over 3 chunks of 256 tokens: frequencies within 5.5 standard deviations of the
    softmax probabilities, filtered (-inf) tokens never drawn, log-probabilities exact."""
    logits = np.random.default_rng(5).normal(scale=2.0, size=600).astype(np.float32)
    logits[::7] = -np.inf
    n = 20_000
    tokens, logprobs = jax.jit(decode.draw)(jax.random.key(0), jnp.asarray(np.tile(logits, (n, 1))))
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    freq = np.bincount(np.asarray(tokens), minlength=600) / n
    assert freq[::7].sum() == 0
    assert np.all(np.abs(freq - probs) <= 5.5 * np.sqrt(probs * (1 - probs) / n) + 1e-4)
    np.testing.assert_allclose(np.asarray(logprobs), np.log(probs[np.asarray(tokens)]), rtol=0, atol=1e-5)


def test_teacher_forcing_matches_hf(models):
    cap, ref, clip = models
    tokens = np.random.default_rng(1).integers(0, 96, size=(4, 6))
    with torch.no_grad():
        prefix = ref.prefix(torch.from_numpy(clip))
        embeds = torch.cat([prefix, ref.gpt.transformer.wte(torch.from_numpy(tokens))], dim=1)
        want = ref.gpt(inputs_embeds=embeds).logits.numpy()
    got = np.asarray(nnx.jit(lambda m, c, t: m(c, t))(cap, jnp.asarray(clip), jnp.asarray(tokens)))
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_reference_state_dict_round_trip_and_width_mismatch(models):
    cap = captioner.create_captioner(prefix_dim=768, prefix_length=2, gpt2=models[0].gpt, seed=5)
    sd = captioner.to_reference_state_dict(cap)
    assert sd["clip_project.model.0.weight"].shape == (64, 768) and sd["clip_project.model.2.weight"].shape == (128, 64)
    again = captioner.from_reference_state_dict(sd, cap.config)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(cap)), nnx.to_flat_state(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    # a ViT-B/32 embedding (512) against a 768 mapping: a clear error, before any computation
    with pytest.raises(ValueError, match=r"\(2, 512\) \(ViT-B/32.*takes \[B, 768\] \(ViT-L/14.*prefix_dim=512"):
        cap.greedy(np.zeros((2, 512), np.float32))
    with pytest.raises(ValueError, match="prefix_dim=512"):
        cap.sample(np.zeros((2, 512), np.float32), 0)
    with pytest.raises(gpt2.CheckpointMismatchError, match=r"clip_project.model.0.weight: checkpoint \(64, 768\), "
                                                           r"model expects \(64, 512\)"):
        captioner.from_reference_state_dict(sd, cap.config.replace(prefix_dim=512))
    with pytest.raises(ValueError, match=r"\[B, P, 64\]"):
        decode.greedy(cap.gpt, np.zeros((2, 3, 48), np.float32))


def test_discriminator_matches_hf_roberta_with_the_reference_head():
    torch.manual_seed(2)
    config = transformers.RobertaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, max_position_embeddings=40, type_vocab_size=1,
                                        layer_norm_eps=1e-5)
    encoder = perturb(transformers.RobertaModel(config).eval(), seed=2)
    disc = captioner.create_discriminator(roberta.from_hf_state_dict(encoder.state_dict(), config), seed=3)
    head = torch.nn.Module()
    head.model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    sd = captioner.to_reference_state_dict(disc)
    head.load_state_dict({k[len("mlp."):]: torch.from_numpy(v) for k, v in sd.items() if k.startswith("mlp.")})
    ids = np.ones((4, 10), np.int64)
    rng = np.random.default_rng(2)
    for row, n in enumerate((10, 6, 4, 8)):
        ids[row, :n] = np.concatenate([[0], rng.integers(3, 96, n - 2), [2]])
    mask = (ids != 1).astype(np.int64)
    labels = np.array([1, 1, 0, 0], np.float32)
    with torch.no_grad():
        pooled = encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).pooler_output
        want = head.model(pooled)[:, 0]
        want_loss = torch.nn.BCEWithLogitsLoss()(want, torch.from_numpy(labels)).item()
    logits = nnx.jit(lambda d, i, m: d(i, m))(disc, jnp.asarray(ids), jnp.asarray(mask))
    diff = np.abs(np.asarray(logits) - want.numpy()).max()
    assert logits.shape == (4,) and diff < ATOL, diff
    assert abs(float(captioner.bce_with_logits(logits, labels)) - want_loss) < 1e-6
    again = captioner.discriminator_from_reference_state_dict(sd, roberta.config_from_hf(config))
    np.testing.assert_array_equal(np.asarray(again.mlp.fc2.kernel[...]), np.asarray(disc.mlp.fc2.kernel[...]))
    print(f"discriminator logits max |diff| vs torch: {diff:.2e}")
