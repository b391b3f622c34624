"""CgT-GAN's train steps against a PyTorch step written after the reference's ``cgtgan.py`` /
``initialization.py`` (HF GPT2LMHeadModel and RobertaModel with the reference's heads, its rewards,
SCST losses, gradient clipping and AdamW groups), on tiny random models without dropout."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgist.methods import cgtgan_step  # noqa: E402
from jaxgist.models import captioner, gpt2, roberta  # noqa: E402
from jaxgist.models.clip import weights as clip_weights  # noqa: E402
from jaxgist.training import optim, parallel  # noqa: E402
from tests.models.torch_weights import perturb  # noqa: E402

B, K, T, PREFIX_DIM, PREFIX_LEN, E, L_DISC, L_CLIP = 3, 2, 6, 16, 3, 16, 9, 8
STOP = 13
CLIP_NORM = 0.5
# Adam eps: a gradient at rounding level (GPT-2's key biases, whose true gradient is 0) then moves its
# parameter by lr * g / eps, not by about lr in a direction that rounding decides.
EPS = 1e-6
# No weight decay on biases and LayerNorms: ours by parameter path, the reference's by PyTorch name.
DECAY_EXCLUDE = r"(bias|(ln_\d|ln_f|LayerNorm)\.scale)$"


def torch_no_decay(name: str) -> bool:
    return name.endswith("bias") or bool(re.search(r"(ln_\d|ln_f|LayerNorm)\.weight$", name))


def copies(module):
    """Numpy copies of a torch module's state (numpy views of live tensors would follow their updates)."""
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def optim_config(lr, warmup=0):
    c = optim.default_config()
    c.update(dict(name="adamw", lr=lr, b1=0.9, b2=0.999, eps=EPS, weight_decay=0.05, decay_exclude=DECAY_EXCLUDE,
                  grad_clip_norm=CLIP_NORM, warmup_steps=warmup, schedule="constant"))
    return c


def torch_adamw(module, lr):
    decay = [p for n, p in module.named_parameters() if not torch_no_decay(n)]
    no_decay = [p for n, p in module.named_parameters() if torch_no_decay(n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, eps=EPS)


class TorchCaptioner(torch.nn.Module):
    def __init__(self, gpt):
        super().__init__()
        width = gpt.config.n_embd
        self.gpt = gpt
        self.clip_project = torch.nn.Module()
        self.clip_project.model = torch.nn.Sequential(
            torch.nn.Linear(PREFIX_DIM, PREFIX_LEN * width // 2), torch.nn.Tanh(),
            torch.nn.Linear(PREFIX_LEN * width // 2, PREFIX_LEN * width))

    def forward(self, tokens, prefix):
        """The reference's ``encode_forward``: logits of the prefix followed by ``tokens``."""
        emb = self.gpt.transformer.wte(tokens)
        pre = self.clip_project.model(prefix).view(prefix.shape[0], PREFIX_LEN, -1)
        return self.gpt(inputs_embeds=torch.cat([pre, emb], dim=1)).logits


class TorchDiscriminator(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.text_encoder = encoder
        self.mlp = torch.nn.Module()
        width = encoder.config.hidden_size
        self.mlp.model = torch.nn.Sequential(torch.nn.Linear(width, width // 2), torch.nn.Tanh(),
                                             torch.nn.Linear(width // 2, 1))

    def forward(self, ids, mask):
        return self.mlp.model(self.text_encoder(input_ids=ids, attention_mask=mask)[1])


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    gcfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=39, eos_token_id=39)
    ref_gpt = perturb(transformers.GPT2LMHeadModel(gcfg), scale=0.1)
    gen = captioner.create_captioner(prefix_dim=PREFIX_DIM, prefix_length=PREFIX_LEN,
                                     gpt2=gpt2.from_hf_state_dict(copies(ref_gpt), gcfg), seed=1)
    ref_gen = TorchCaptioner(ref_gpt)
    ref_gen.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in captioner.to_reference_state_dict(gen).items()},
                            strict=False)
    rcfg = transformers.RobertaConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=16, type_vocab_size=1,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    encoder = perturb(transformers.RobertaModel(rcfg), seed=2)
    disc = captioner.create_discriminator(roberta.from_hf_state_dict(copies(encoder), rcfg), seed=3)
    ref_disc = TorchDiscriminator(encoder)
    ref_disc.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in captioner.to_reference_state_dict(disc).items()},
                             strict=False)
    ccfg = transformers.CLIPConfig(
        vision_config=dict(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64),
        text_config=dict(vocab_size=50, max_position_embeddings=L_CLIP, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64, eos_token_id=2),
        projection_dim=E)
    hf_clip = perturb(transformers.CLIPModel(ccfg), seed=4)
    clip_model = clip_weights.from_hf_state_dict(clip_weights.config_from_hf(ccfg.to_dict()),
                                                 {k: v.detach().numpy() for k, v in hf_clip.state_dict().items()})
    return gen, disc, clip_model, ref_gen, ref_disc


def make_batch(rng):
    lengths = rng.integers(2, T + 1, size=(B, K)).astype(np.int32)
    sampled = rng.integers(14, 40, size=(B, K, T)).astype(np.int32)
    for b in range(B):
        for k in range(K):
            if lengths[b, k] < T or rng.random() < 0.5:
                sampled[b, k, lengths[b, k] - 1] = STOP
    def ids(n):
        out = np.ones((B, n, L_DISC), np.int32)
        mask = np.zeros((B, n, L_DISC), np.int32)
        for b in range(B):
            for j in range(n):
                m = int(rng.integers(3, L_DISC + 1))
                out[b, j, :m] = np.concatenate([[0], rng.integers(3, 30, m - 2), [2]])
                mask[b, j, :m] = 1
        return out, mask
    fake_ids, fake_mask = ids(K + 1)
    real_ids, real_mask = ids(K)
    clip_ids = np.zeros((B, K + 1, L_CLIP), np.int32)
    for b in range(B):
        for j in range(K + 1):
            m = int(rng.integers(2, L_CLIP + 1))
            clip_ids[b, j, :m - 1] = rng.integers(3, 48, m - 1)
            clip_ids[b, j, m - 1] = 2
    return {"image_embeds": rng.normal(size=(B, PREFIX_DIM)).astype(np.float32),
            "targets": (0.3 * rng.normal(size=(B, E))).astype(np.float32),
            "sampled": sampled, "lengths": lengths, "clip_ids": clip_ids, "fake_ids": fake_ids, "fake_mask": fake_mask,
            "real_ids": real_ids, "real_mask": real_mask}


def flat(module_state):
    return {optim.path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(module_state)}


def test_reward_weight_ramp():
    r = cgtgan_step.Rewards(reward_weight=0.5, gan_steps=150, gan_warm_steps=2350)
    got = [float(cgtgan_step.reward_weight(n, r)) for n in (1, 150, 151, 1325, 2500, 2501, 9000)]
    want = [0.0, 0.0, 0.5 / 2350, 0.5 * 1175 / 2350, 0.5, 0.5, 0.5]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_adversarial_step_matches_a_pytorch_step(models):
    gen, disc, clip_model, ref_gen, ref_disc = models
    rng = np.random.default_rng(0)
    batch = make_batch(rng)
    lr = 1e-3
    rewards = cgtgan_step.Rewards(cos_weight=0.5, clip_weight=0.2, reward_weight=0.5, gan_steps=0, gan_warm_steps=4)
    mesh = parallel.make_mesh((("data", 1),), devices=jax.devices()[:1])
    txs, schedules = {}, {}
    for name, model in ((cgtgan_step.GENERATOR, gen), (cgtgan_step.DISCRIMINATOR, disc)):
        txs[name], schedules[name] = optim.make(optim_config(lr), nnx.state(model, nnx.Param), 10)
    models_ = {cgtgan_step.GENERATOR: gen, cgtgan_step.DISCRIMINATOR: disc, cgtgan_step.CLIP: clip_model}
    setup = cgtgan_step.build_adversarial(mesh, {n: nnx.eval_shape(lambda m=m: m) for n, m in models_.items()},
                                          txs, schedules, rewards, rules=parallel.DEFAULT_RULES)
    before = {**{f"gen.{k}": v for k, v in captioner.to_reference_state_dict(gen).items()},
              **{f"disc.{k}": v for k, v in captioner.to_reference_state_dict(disc).items()}}
    state = setup.layout.init(models_)
    u = np.asarray(clip_model.encode_text(jnp.asarray(batch["clip_ids"].reshape(-1, L_CLIP)))).reshape(B, K + 1, E)
    new_state, metrics = setup.update(state, {k: jnp.asarray(v) for k, v in batch.items()})
    metrics = jax.device_get(metrics)

    # ---- the reference's step in PyTorch ----
    t = lambda a: torch.from_numpy(np.asarray(a).copy())  # noqa: E731
    ref_gen.train(), ref_disc.train()
    opt_g, opt_d = torch_adamw(ref_gen, lr), torch_adamw(ref_disc, lr)
    img = t(batch["image_embeds"])
    sampled = t(batch["sampled"]).long().view(B * K, T)
    lengths = t(batch["lengths"]).view(B * K)
    logits = ref_gen(sampled[:, :-1], img.repeat_interleave(K, 0))[:, PREFIX_LEN - 1:PREFIX_LEN - 1 + T]
    picked = torch.log_softmax(logits, -1).gather(-1, sampled[..., None])[..., 0]
    active = (torch.arange(T)[None] < lengths[:, None]).float()
    sample_logprobs = (picked * active).sum(1) / active.sum(1)
    # discriminator loss: real then the K samples
    fake_ids, fake_mask = t(batch["fake_ids"]).long(), t(batch["fake_mask"]).float()
    d_in = torch.cat([t(batch["real_ids"]).long().view(B * K, -1), fake_ids[:, :K].reshape(B * K, -1)])
    d_mask = torch.cat([t(batch["real_mask"]).float().view(B * K, -1), fake_mask[:, :K].reshape(B * K, -1)])
    labels = torch.cat([torch.ones(B * K), torch.zeros(B * K)])
    d_loss = torch.nn.BCEWithLogitsLoss()(ref_disc(d_in, d_mask).squeeze(), labels)
    # rewards: gen_res = the B*K samples then the B greedy captions (the reference's order)
    order = np.concatenate([np.arange(B * (K + 1)).reshape(B, K + 1)[:, :K].ravel(),
                            np.arange(B * (K + 1)).reshape(B, K + 1)[:, K]])
    text_features = t(u.reshape(B * (K + 1), E))[order]
    gt_idx = [i // K for i in range(B * K)] + list(range(B))
    gt = t(batch["targets"])[gt_idx]
    image_features = img[gt_idx]
    scale = clip_model.scale()
    l1_score = float(scale) * (1 - torch.nn.L1Loss(reduction="none")(gt, text_features).mean(axis=1))
    gtn, txn = gt / gt.norm(dim=1, keepdim=True), text_features / text_features.norm(dim=1, keepdim=True)
    cos_score = float(scale) * (gtn * txn).sum(1)
    imn = image_features / image_features.norm(dim=1, keepdim=True)
    clip_score = float(scale) * (imn * txn).sum(1)
    scores = (1 - 0.2) * (0.5 * cos_score + 0.5 * l1_score) + 0.2 * clip_score

    def pg(scores):
        reward = scores[:B * K].reshape(B, K) - scores[-B:][:, None]
        return -(sample_logprobs * reward.reshape(B * K).detach()).mean()

    reward_loss = pg(scores.detach())
    ref_disc.eval()
    with torch.no_grad():
        critic = ref_disc(fake_ids.view(B * (K + 1), -1)[order], fake_mask.view(B * (K + 1), -1)[order]).squeeze()
    ref_disc.train()
    fd_loss = pg(critic)
    w = 0.5 * min(1 / 4, 1.0)  # global_step is 1 when the reference computes it
    g_loss = w * reward_loss + (1 - w) * fd_loss
    d_loss.backward()
    torch.nn.utils.clip_grad_norm_(ref_disc.parameters(), CLIP_NORM)
    opt_d.step()
    g_loss.backward()
    g_norm = torch.nn.utils.clip_grad_norm_(ref_gen.parameters(), CLIP_NORM)
    opt_g.step()

    assert abs(metrics["loss"] - g_loss.item()) < 1e-5, (metrics["loss"], g_loss.item())
    assert abs(metrics["d_loss"] - d_loss.item()) < 1e-5
    assert abs(metrics["loss_sem"] - reward_loss.item()) < 1e-4 * max(1.0, abs(reward_loss.item()))
    assert abs(metrics["loss_nat"] - fd_loss.item()) < 1e-5
    assert abs(metrics["reward_weight"] - w) < 1e-7
    np.testing.assert_allclose(metrics["reward_sem"], scores[:B * K].mean().item(), rtol=1e-5)
    np.testing.assert_allclose(metrics["g_grad_norm"], g_norm.item(), rtol=1e-4)
    assert g_norm.item() > CLIP_NORM  # clipping took effect

    ours = {**{f"gen.{k}": v for k, v in captioner.to_reference_state_dict(
        setup.layout.merge(new_state, cgtgan_step.GENERATOR)).items()},
            **{f"disc.{k}": v for k, v in captioner.to_reference_state_dict(
                setup.layout.merge(new_state, cgtgan_step.DISCRIMINATOR)).items()}}
    theirs = {**{f"gen.{k}": v.detach().numpy() for k, v in ref_gen.state_dict().items()},
              **{f"disc.{k}": v.detach().numpy() for k, v in ref_disc.state_dict().items()}}
    worst, moved = 0.0, 0
    for key, value in ours.items():
        if key not in theirs:
            continue
        worst = max(worst, float(np.abs(value - theirs[key]).max()))
    moved = sum(float(np.abs(ours[k] - before[k]).max()) > 1e-4 for k in ours)
    assert moved > 0.9 * len(ours)  # the step changed (nearly) every parameter
    assert worst < 1e-5, worst
    print(f"adversarial step: max |param diff| vs PyTorch {worst:.2e}; G loss {metrics['loss']:.6f}")


def test_initialization_step_matches_a_pytorch_step(models):
    gen, _, _, ref_gen, _ = models
    rng = np.random.default_rng(1)
    tokens = rng.integers(14, 40, size=(4, 7)).astype(np.int32)
    mask = np.zeros((4, 7), np.int32)
    for row, n in enumerate((7, 3, 5, 1)):
        mask[row, :n] = 1
    tokens = np.where(mask == 1, tokens, 0)
    prefix = rng.normal(size=(4, PREFIX_DIM)).astype(np.float32)
    lr = 1e-3
    mesh = parallel.make_mesh((("data", 1),), devices=jax.devices()[:1])
    tx, schedule = optim.make(optim_config(lr), nnx.state(gen, nnx.Param), 10)
    setup = cgtgan_step.build_initialization(mesh, nnx.eval_shape(lambda: gen), tx, schedule,
                                             rules=parallel.DEFAULT_RULES)
    state = setup.layout.init({cgtgan_step.GENERATOR: gen})
    new_state, metrics = setup.update(state, {"prefix_embeds": jnp.asarray(prefix), "tokens": jnp.asarray(tokens),
                                              "mask": jnp.asarray(mask)})

    ref = TorchCaptioner(transformers.GPT2LMHeadModel(ref_gen.gpt.config))
    ref.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in captioner.to_reference_state_dict(gen).items()},
                        strict=False)
    ref.train()
    opt = torch_adamw(ref, lr)
    tt = torch.from_numpy(tokens).long()
    logits = ref(tt, torch.from_numpy(prefix))[:, PREFIX_LEN - 1:-1]
    # the reference's ignore_index=0 on zero-padded tokens; no real token is 0 here
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tt.flatten(), ignore_index=0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP_NORM)
    opt.step()
    assert abs(float(metrics["loss"]) - loss.item()) < 1e-5
    ours = captioner.to_reference_state_dict(setup.layout.merge(new_state, cgtgan_step.GENERATOR))
    theirs = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    worst = max(float(np.abs(v - theirs[k]).max()) for k, v in ours.items() if k in theirs)
    assert worst < 1e-5, worst
