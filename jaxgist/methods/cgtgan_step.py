"""CgT-GAN's two jitted train steps: the generator's initialization by teacher forcing, and the
adversarial update (discriminator and generator, with CLIP and discriminator rewards through
self-critical sequence training).

    setup = cgtgan_step.build_adversarial(mesh, models, optims, total_steps, rewards, seed=0)
    state = setup.layout.init({"generator": g, "discriminator": d, "clip": clip_model})
    state, metrics = setup.update(state, batch)       # batch: see ``adversarial_batch_spec``

The adversarial step follows the reference's ``cgtgan.py`` train loop, for B images and K samples:

- The caller decodes, outside the step (``ClipPrefixCaptioner.greedy`` / ``sample``), one greedy
  caption per image (GPT-2 in eval mode) and K sampled ones (train mode: dropout on), then re-tokenizes
  the caption texts for CLIP and RoBERTa on the host (the three vocabularies differ).
- Rewards, inside the step and without gradient, for the K samples and the greedy caption (the
  baseline) of each image: ``r_sem = (1 - clip_w) (cos_w s * cos(u, e) + (1 - cos_w) s (1 -
  mean|u - e|)) + clip_w s cos(v, u)`` with ``u`` the frozen CLIP text embedding of the caption
  (its final "." removed, unnormalized), ``e`` the CLIP-aggregated target of the image, ``v`` the image
  embedding and ``s`` CLIP's logit scale (100); ``r_nat`` = the discriminator's logit in eval mode
  (no dropout), before this step's discriminator update.
- Self-critical losses: ``L = -mean_{b,k} lp_bk (r_bk - r_b,greedy)`` for each reward, ``lp`` the mean
  log-probability of the sampled tokens up to and including the stop (the decoding's length-normalized
  score), recomputed here by teacher forcing with dropout on so that it carries the gradient. The
  generator loss is ``w L_sem + (1 - w) L_nat``, ``w = 0`` for the first ``gan_steps`` updates and then
  ``reward_weight * min((n - gan_steps) / gan_warm_steps, 1)``, ``n`` the 1-based update number.
- Discriminator: binary cross-entropy with logits, in train mode (dropout), K real corpus sentences
  per image labelled 1 against the K samples labelled 0.
- Both models clip their gradient norm and step their own AdamW (``training.optim``).

The initialization step is the reference's ``initialization.py``: the CLIP *text* embedding of a
corpus sentence is the prefix, and GPT-2 learns to write the sentence back (cross-entropy of each
token given the prefix and the tokens before it, averaged over the batch's tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxgist.core.arrays import l2_normalize
from jaxgist.models import captioner as captioner_lib
from jaxgist.models.clip import model as clip_model_lib
from jaxgist.models import gpt2 as gpt2_lib
from jaxgist.models import roberta as roberta_lib
from jaxgist.models.gpt2 import decode
from jaxgist.training import parallel, train_state

GENERATOR, DISCRIMINATOR, CLIP = "generator", "discriminator", "clip"


@dataclasses.dataclass(frozen=True)
class Rewards:
    """The reward settings (the reference's flags of the same names)."""

    cos_weight: float = 0.5  # cosine against L1 in the semantic reward
    clip_weight: float = 0.0  # the image-text CLIP score's share of the semantic reward
    reward_weight: float = 0.5  # w at the end of the ramp
    gan_steps: int = 150  # updates with w = 0 (the discriminator reward alone)
    gan_warm_steps: int = 2350  # updates over which w rises to reward_weight
    normalize_prefix: bool = False  # L2-normalize image embeddings and targets (the reference's flag)
    temperature: float = 1.0  # the sampling distribution the log-probabilities are taken under
    top_k: int = 0
    top_p: float = 1.0


def reward_weight(update_number, r: Rewards):
    """``w`` of the ``update_number``-th update (1-based)."""
    n = jnp.asarray(update_number, jnp.float32)
    ramp = jnp.minimum((n - r.gan_steps) / max(r.gan_warm_steps, 1), 1.0) * r.reward_weight
    return jnp.where(n > r.gan_steps, ramp, 0.0)


def semantic_rewards(text_embeds, targets, image_embeds, scale, r: Rewards):
    """(reward, parts) of CLIP text embeddings ``text_embeds`` [..., E] (unnormalized) against their
    images' targets [..., E] and image embeddings [..., E]: the reference's ``ClipDiscriminator``."""
    u = text_embeds.astype(jnp.float32)
    l1 = scale * (1.0 - jnp.mean(jnp.abs(targets - u), axis=-1))
    un = l2_normalize(u)
    cos = scale * jnp.sum(l2_normalize(targets) * un, axis=-1)
    clip_score = scale * jnp.sum(l2_normalize(image_embeds) * un, axis=-1)
    sim = r.cos_weight * cos + (1.0 - r.cos_weight) * l1
    return (1.0 - r.clip_weight) * sim + r.clip_weight * clip_score, {"cos": cos, "l1": l1, "clip": clip_score}


def scst_loss(logprobs, rewards):
    """Self-critical loss: ``logprobs`` [B, K] of the samples, ``rewards`` [B, K + 1] (the K samples',
    then the greedy caption's: the baseline)."""
    advantage = jax.lax.stop_gradient(rewards[:, :-1] - rewards[:, -1:])
    return -jnp.mean(logprobs * advantage)


def _teacher_forced_logits(generator: captioner_lib.ClipPrefixCaptioner, clip_embeds, tokens, rngs):
    """Logits [N, T, V] predicting each of ``tokens`` [N, T] from the prefix of ``clip_embeds`` and the
    tokens before it."""
    t, p = tokens.shape[1], generator.config.prefix_length
    return generator(clip_embeds, tokens[:, :-1], rngs=rngs)[:, p - 1:p - 1 + t]  # of [N, P + T - 1, V]


def sequence_logprobs(generator: captioner_lib.ClipPrefixCaptioner, clip_embeds, tokens, lengths, *, rngs=None,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Mean log-probability [N] of ``tokens`` [N, T] (as drawn) over their first ``lengths`` [N] tokens,
    each under the distribution it was drawn from (logits / temperature, then top-k/top-p), by teacher
    forcing from the prefix of ``clip_embeds`` [N, prefix_dim]."""
    t = tokens.shape[1]
    logits = _teacher_forced_logits(generator, clip_embeds, tokens, rngs)
    if temperature != 1.0 or top_k or top_p < 1.0:
        logits = decode.filter_logits(logits.reshape(-1, logits.shape[-1]), temperature, top_k, top_p
                                      ).reshape(logits.shape)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    active = jnp.arange(t)[None, :] < lengths[:, None]
    return jnp.sum(jnp.where(active, picked, 0.0), axis=1) / jnp.maximum(lengths, 1)


def teacher_forcing_loss(generator: captioner_lib.ClipPrefixCaptioner, clip_embeds, tokens, mask, *, rngs=None):
    """Mean cross-entropy of ``tokens`` [B, L] where ``mask`` [B, L] is 1, each predicted from the prefix
    of ``clip_embeds`` and the tokens before it (the reference's initialization loss)."""
    logp = jax.nn.log_softmax(_teacher_forced_logits(generator, clip_embeds, tokens, rngs), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return -jnp.sum(picked * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------

def _logical_axes(name: str) -> Callable[[tuple], tuple]:
    """Logical axes of the generator (``clip_project`` + GPT-2), the discriminator (RoBERTa + head)
    and CLIP, by parameter path; the prefix mapping and the discriminator head are replicated."""

    def axes(path):
        names = tuple(str(getattr(p, "key", p)) for p in path)
        if name == CLIP:
            return clip_model_lib.logical_axes(path)
        head = names[0]
        if head == "gpt":
            return gpt2_lib.logical_axes(names[1:])
        if head == "text_encoder":
            return roberta_lib.logical_axes(names[1:])
        leaf = names[-1] if names[-1] != "value" else names[-2]
        return ("embed", "mlp") if leaf == "kernel" else ("mlp",)

    return axes


@dataclasses.dataclass
class Setup:
    """A built step: its layout (``layout.init(models)`` makes the state) and the jitted update."""

    mesh: Any
    layout: train_state.Layout
    update: Callable  # (state, batch) -> (state, metrics)
    schedules: dict[str, optax.Schedule]

    @property
    def abstract_state(self):
        return self.layout.abstract


def adversarial_batch_spec(batch: int, samples: int, max_tokens: int, prefix_dim: int, clip_context: int,
                           disc_length: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shapes and dtypes of the adversarial step's batch (every array leads with the B images)."""
    b, k = batch, samples
    return {
        "image_embeds": ((b, prefix_dim), jnp.float32),  # CLIP image embeddings (the prefix input)
        "targets": ((b, prefix_dim), jnp.float32),  # CLIP-aggregated targets
        "sampled": ((b, k, max_tokens), jnp.int32),  # the K samples' tokens as drawn
        "lengths": ((b, k), jnp.int32),  # tokens up to and including the stop
        "clip_ids": ((b, k + 1, clip_context), jnp.int32),  # samples, then greedy, CLIP-tokenized
        "fake_ids": ((b, k + 1, disc_length), jnp.int32),  # samples, then greedy, RoBERTa-tokenized
        "fake_mask": ((b, k + 1, disc_length), jnp.int32),
        "real_ids": ((b, k, disc_length), jnp.int32),  # K corpus sentences per image
        "real_mask": ((b, k, disc_length), jnp.int32),
    }


def abstract_batch(spec: Mapping[str, tuple], mesh) -> dict[str, jax.ShapeDtypeStruct]:
    sharding = parallel.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in spec.items()}


def build_adversarial(mesh, abstract_models: Mapping[str, nnx.Module], txs: Mapping[str, optax.GradientTransformation],
                      schedules: Mapping[str, optax.Schedule], rewards: Rewards, *, rules, seed: int = 0) -> Setup:
    """The adversarial update over ``mesh`` for abstract ``{generator, discriminator, clip}`` models and
    the optimizers of the first two (``txs``)."""
    layout = train_state.layout(abstract_models, txs, mesh, rules,
                                {n: _logical_axes(n) for n in abstract_models})
    base_key = jax.random.key(seed)
    r = rewards

    def update(state: train_state.TrainState, batch):
        key = jax.random.fold_in(base_key, state.step)
        g_key, d_key = jax.random.split(key)
        b, k, _ = batch["sampled"].shape
        image_embeds = batch["image_embeds"].astype(jnp.float32)
        targets = batch["targets"].astype(jnp.float32)
        if r.normalize_prefix:
            image_embeds, targets = l2_normalize(image_embeds), l2_normalize(targets)

        # rewards of the K samples and the greedy caption of each image, without gradient
        clip_model = layout.merge(state, CLIP)
        u = clip_model.encode_text(batch["clip_ids"].reshape(b * (k + 1), -1)).reshape(b, k + 1, -1)
        r_sem, parts = semantic_rewards(u, targets[:, None], image_embeds[:, None], clip_model.scale(), r)
        d_params, d_rest = layout.split(state, DISCRIMINATOR)
        critic = layout.module(DISCRIMINATOR, d_params, d_rest)
        critic.eval()
        disc_length = batch["fake_ids"].shape[-1]
        r_nat = critic(batch["fake_ids"].reshape(-1, disc_length),
                       batch["fake_mask"].reshape(-1, disc_length)).reshape(b, k + 1)
        r_sem, r_nat = jax.lax.stop_gradient(r_sem), jax.lax.stop_gradient(r_nat)

        # the discriminator: real corpus sentences (1) against the K samples (0), in train mode
        def d_loss_fn(params):
            d = layout.module(DISCRIMINATOR, params, d_rest)
            d.train()
            ids = jnp.concatenate([batch["real_ids"].reshape(-1, disc_length),
                                   batch["fake_ids"][:, :k].reshape(-1, disc_length)])
            mask = jnp.concatenate([batch["real_mask"].reshape(-1, disc_length),
                                    batch["fake_mask"][:, :k].reshape(-1, disc_length)])
            labels = jnp.concatenate([jnp.ones((b * k,), jnp.float32), jnp.zeros((b * k,), jnp.float32)])
            return captioner_lib.bce_with_logits(d(ids, mask, rngs=nnx.Rngs(dropout=d_key)), labels)

        d_loss, d_grads = jax.value_and_grad(d_loss_fn)(d_params)

        # the generator: self-critical losses of both rewards
        g_params, g_rest = layout.split(state, GENERATOR)
        w = reward_weight(state.step + 1, r)

        def g_loss_fn(params):
            g = layout.module(GENERATOR, params, g_rest)
            g.train()
            lp = sequence_logprobs(g, jnp.repeat(batch["image_embeds"], k, axis=0),
                                   batch["sampled"].reshape(b * k, -1), batch["lengths"].reshape(b * k),
                                   rngs=nnx.Rngs(dropout=g_key), temperature=r.temperature, top_k=r.top_k,
                                   top_p=r.top_p).reshape(b, k)
            loss_sem, loss_nat = scst_loss(lp, r_sem), scst_loss(lp, r_nat)
            return w * loss_sem + (1.0 - w) * loss_nat, (loss_sem, loss_nat, jnp.mean(lp))

        (g_loss, (loss_sem, loss_nat, mean_lp)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(g_params)
        new_state = layout.apply_gradients(state, {GENERATOR: g_grads, DISCRIMINATOR: d_grads})
        metrics = {
            "loss": g_loss, "d_loss": d_loss, "loss_sem": loss_sem, "loss_nat": loss_nat, "reward_weight": w,
            "reward_sem": jnp.mean(r_sem[:, :k]), "cos_score": jnp.mean(parts["cos"][:, :k]),
            "l1_score": jnp.mean(parts["l1"][:, :k]), "clip_score": jnp.mean(parts["clip"][:, :k]),
            "critic_score": jnp.mean(r_nat[:, :k]), "greedy_reward_sem": jnp.mean(r_sem[:, k]),
            "sample_logprob": mean_lp,
            "g_grad_norm": optax.tree.norm(g_grads), "d_grad_norm": optax.tree.norm(d_grads),
            "lr_generator": schedules[GENERATOR](state.step),
        }
        return new_state, metrics

    rep = parallel.replicated(mesh)
    jitted = jax.jit(update, donate_argnums=(0,), out_shardings=(layout.shardings, rep))
    return Setup(mesh=mesh, layout=layout, update=jitted, schedules=dict(schedules))


def build_initialization(mesh, abstract_generator: nnx.Module, tx: optax.GradientTransformation,
                         schedule: optax.Schedule, *, rules, seed: int = 0) -> Setup:
    """The initialization update: batch ``{"prefix_embeds" [B, prefix_dim], "tokens" [B, L], "mask"
    [B, L]}``, GPT-2 in train mode (dropout on, as the reference's ``model.train()``)."""
    layout = train_state.layout({GENERATOR: abstract_generator}, {GENERATOR: tx}, mesh, rules,
                                {GENERATOR: _logical_axes(GENERATOR)})
    base_key = jax.random.key(seed)

    def update(state, batch):
        key = jax.random.fold_in(base_key, state.step)
        params, rest = layout.split(state, GENERATOR)

        def loss_fn(p):
            g = layout.module(GENERATOR, p, rest)
            g.train()
            return teacher_forcing_loss(g, batch["prefix_embeds"], batch["tokens"], batch["mask"],
                                        rngs=nnx.Rngs(dropout=key))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        new_state = layout.apply_gradients(state, {GENERATOR: grads})
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}

    rep = parallel.replicated(mesh)
    jitted = jax.jit(update, donate_argnums=(0,), out_shardings=(layout.shardings, rep))
    return Setup(mesh=mesh, layout=layout, update=jitted, schedules={GENERATOR: schedule})
