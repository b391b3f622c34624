"""GPT4Image's train step: a classifier trained with cross-entropy plus a contrastive loss between a
projection of its image feature and the CLIP text embedding of a description of the same image.

    setup = gpt4image_step.build(config, mesh, total_steps, steps_per_epoch, num_classes, text_dim)
    state = setup.init_state(classifier, projection)      # TrainState {"classifier", "projection"[, "ema"]}
    state, metrics = setup.step(state, batch)             # batch: {"image", "label"[, "text_embedding"]}

Loss, over the global batch (``text_loss`` below):

    CE(logits, labels) + w * 0.5 * [CE(z e^T / tau, I) + CE(e z^T / tau, I)]

with ``z`` the L2-normalized projection and ``e`` the L2-normalized text embedding. ``w`` is
``gpt4image.lamb`` with ``text_loss_scale="global"`` (one program over the global batch: the loss the
paper writes). GPT4Image's code gathers the other GPUs' features without gradient, puts the local
slice back and lets DDP average the gradients, so each feature's gradient is divided by the number of
GPUs N: ``text_loss_scale="reference:N"`` uses ``w = lamb / N`` and reproduces a run on N GPUs.

BatchNorm (the ResNet's and the projection's) uses per-device statistics by default, as the
reference (PyTorch DDP without ``--sync_bn``): the global batch is normalized in ``bn_groups`` groups
(0: one per data-parallel device); ``bn_sync`` normalizes over the global batch (SyncBatchNorm).
With ``ema_decay`` > 0 an EMA copy of the classifier (every variable, BatchNorm statistics included,
as timm's ``ModelEma``) rides in the state as ``"ema"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxgist.core import arrays
from jaxgist.core.config import ConfigError
from jaxgist.models import layers, projection
from jaxgist.training import optim, parallel, train_state

CLASSIFIER, PROJECTION, EMA = "classifier", "projection", "ema"


def text_weight(scale: str, lamb: float) -> float:
    """The text loss's weight for ``text_loss_scale`` ("global", or "reference:N" for N GPUs)."""
    if scale == "global":
        return float(lamb)
    if scale.startswith("reference:"):
        try:
            n = int(scale.split(":", 1)[1])
        except ValueError:
            n = 0
        if n >= 1:
            return float(lamb) / n
    raise ConfigError(f"config.gpt4image.text_loss_scale={scale!r} is not 'global' or 'reference:N' (N >= 1: the "
                      f"number of GPUs of the run to reproduce)")


def text_loss(z, e, tau: float):
    """Symmetric InfoNCE between unit ``z`` [B, D] and unit ``e`` [B, D] at temperature ``tau``; row i of
    each is a positive pair."""
    z = arrays.l2_normalize(z.astype(jnp.float32))
    e = arrays.l2_normalize(e.astype(jnp.float32))
    logits = z @ e.T / tau
    labels = jnp.arange(logits.shape[0])
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def cross_entropy(logits, targets, label_smoothing: float = 0.0):
    """Mean cross-entropy against integer labels [B] or soft targets [B, C]; ``label_smoothing`` mixes
    integer labels with the uniform distribution (timm's ``LabelSmoothingCrossEntropy``)."""
    logits = logits.astype(jnp.float32)
    if targets.ndim == 1 and not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    if targets.ndim == 1:
        targets = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def topk_correct(logits, labels, k: int):
    """[B] bool: the label is among the ``k`` largest logits (ties to the smaller index, as argmax)."""
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)
    idx = jnp.arange(logits.shape[1])[None, :]
    beats = (logits > label_logit) | ((logits == label_logit) & (idx < labels[:, None]))
    return jnp.sum(beats, axis=1) < k


def mixup_cutmix(mixup_alpha: float, cutmix_alpha: float, switch_prob: float, label_smoothing: float,
                 num_classes: int):
    """timm's ``Mixup`` in its "batch" mode with probability 1, as a ``targets_fn(labels, images, key)``:
    each batch is mixed with itself reversed, by cutmix (with probability ``switch_prob`` when both are
    on; lambda ~ Beta(cutmix_alpha, cutmix_alpha), a box of area 1 - lambda pasted, lambda then set to
    the box's true share) or by mixup (lambda ~ Beta(mixup_alpha, mixup_alpha)); targets are the same mix
    of the two label-smoothed one-hots. The reference mixes within each GPU's batch; here the global
    batch is reversed (the same distribution of pairs). Text embeddings are not mixed."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None

    def targets_fn(labels, images, key):
        k_switch, k_lam, k_y, k_x = jax.random.split(key, 4)
        b, h, w = images.shape[:3]
        if mixup_alpha > 0 and cutmix_alpha > 0:
            use_cutmix = jax.random.uniform(k_switch) < switch_prob
        else:
            use_cutmix = jnp.asarray(cutmix_alpha > 0)
        lam_mix = jax.random.beta(k_lam, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
        lam_cut = jax.random.beta(k_lam, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
        # cutmix box (timm's rand_bbox): side ratio sqrt(1 - lam), centre uniform, clipped to the image
        ratio = jnp.sqrt(1.0 - lam_cut)
        cut_h, cut_w = (h * ratio).astype(jnp.int32), (w * ratio).astype(jnp.int32)
        cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
        y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
        x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
        rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # [H, W]
        lam_box = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
        flipped = images[::-1]
        cut = jnp.where(box[None, :, :, None], flipped, images)
        mixed = lam_mix * images + (1.0 - lam_mix) * flipped
        images = jnp.where(use_cutmix, cut, mixed.astype(images.dtype))
        lam = jnp.where(use_cutmix, lam_box, lam_mix)
        soft = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
        return images, lam * soft + (1.0 - lam) * soft[::-1]

    return targets_fn


@dataclasses.dataclass(frozen=True)
class Backbone:
    """How the step calls a classifier family: ``features(model, images, rngs)`` -> [B, D] and
    ``classify(model, features)`` -> logits."""

    features: Callable[[Any, Any, Any], Any]
    classify: Callable[[Any, Any], Any]
    logical_axes: Callable[[tuple], tuple]


def ema_update(ema: nnx.State, new: nnx.State, decay: float) -> nnx.State:
    """``decay * ema + (1 - decay) * new`` for every floating variable (integers: the new value)."""
    def one(e, n):
        if jnp.issubdtype(n.dtype, jnp.floating):
            return (decay * e.astype(jnp.float32) + (1.0 - decay) * n.astype(jnp.float32)).astype(n.dtype)
        return n
    return jax.tree.map(one, ema, new)


def make_step_fn(layout: train_state.Layout, backbone: Backbone, lr_schedule: optax.Schedule, *, text_on: bool,
                 weight: float, tau: float, ema_decay: float, label_smoothing: float = 0.0, targets_fn=None,
                 seed: int = 0):
    """The pure step ``(state, batch) -> (state, metrics)``. ``targets_fn(labels, images, key)`` ->
    (images, soft targets) mixes images (mixup / cutmix; None: the batch as it is)."""
    base_key = jax.random.key(seed)

    def loss_fn(params, rests, batch, key):
        model = layout.module(CLASSIFIER, params[CLASSIFIER], rests[CLASSIFIER])
        model.train()
        aug_key, drop_key = jax.random.split(key)
        images, targets = batch["image"], batch["label"]
        if targets_fn is not None:
            images, targets = targets_fn(batch["label"], images, aug_key)
        feats = backbone.features(model, images, nnx.Rngs(dropout=drop_key))
        logits = backbone.classify(model, feats)
        ce = cross_entropy(logits, targets, label_smoothing)
        new_rests = {CLASSIFIER: nnx.state(model, nnx.Not(nnx.Param))}
        aux = {"ce_loss": ce, "logits": logits}
        loss = ce
        if text_on:
            proj = layout.module(PROJECTION, params[PROJECTION], rests[PROJECTION])
            proj.train()
            tl = text_loss(proj(feats), batch["text_embedding"], tau)
            new_rests[PROJECTION] = nnx.state(proj, nnx.Not(nnx.Param))
            aux["text_loss"] = tl
            loss = loss + weight * tl
        return loss, (aux, new_rests)

    trained = (CLASSIFIER, PROJECTION) if text_on else (CLASSIFIER,)

    def step_fn(state: train_state.TrainState, batch):
        split = {name: layout.split(state, name) for name in trained}
        params = {name: split[name][0] for name in trained}
        rests = {name: split[name][1] for name in trained}
        key = jax.random.fold_in(base_key, state.step)
        (loss, (aux, new_rests)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rests, batch, key)
        new_state = layout.apply_gradients(state, grads, rest=new_rests)
        if ema_decay > 0:
            new_state = new_state.replace(models={
                **new_state.models, EMA: ema_update(state.models[EMA], new_state.models[CLASSIFIER], ema_decay)})
        labels = batch["label"]
        metrics = {"loss": loss, "ce_loss": aux["ce_loss"], "grad_norm": optax.tree.norm(grads),
                   "lr": lr_schedule(state.step), "train_top1": jnp.mean(topk_correct(aux["logits"], labels, 1))}
        if text_on:
            metrics["text_loss"] = aux["text_loss"]
        return new_state, metrics

    return step_fn


@dataclasses.dataclass
class Setup:
    config: Any
    mesh: Mesh
    layout: train_state.Layout
    lr_schedule: optax.Schedule
    step: Any
    text_on: bool
    bn_groups: int

    @property
    def abstract_state(self) -> train_state.TrainState:
        return self.layout.abstract

    def init_state(self, classifier, proj=None) -> train_state.TrainState:
        models = {CLASSIFIER: classifier}
        if self.text_on:
            models[PROJECTION] = proj
        if EMA in self.layout.graphdefs:
            models[EMA] = classifier  # the EMA starts as the classifier (Layout.init gives it its own buffers)
        for m in models.values():
            layers.set_batchnorm_groups(m, self.bn_groups)
        return self.layout.init(models)

    def abstract_batch(self, global_batch: int, image_size: int, text_dim: int) -> dict:
        sharding = parallel.batch_sharding(self.mesh)
        out = {"image": jax.ShapeDtypeStruct((global_batch, image_size, image_size, 3), jnp.float32, sharding=sharding),
               "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sharding)}
        if self.text_on:
            out["text_embedding"] = jax.ShapeDtypeStruct((global_batch, text_dim), jnp.float32, sharding=sharding)
        return out

    def model(self, state, name: str = CLASSIFIER):
        return self.layout.merge(state, name)


def _num_classes(model) -> int:
    return int(getattr(model, "config").num_classes)


def bn_groups(config, mesh: Mesh) -> int:
    g = config.gpt4image
    if g.bn_sync:
        return 1
    return int(g.bn_groups) or parallel.data_size(mesh)


def build(config, mesh: Mesh, total_steps: int, *, abstract_classifier, abstract_projection, backbone: Backbone,
          steps_per_epoch: int = 1, num_classes: int | None = None) -> Setup:
    """Optimizers, layout and the jitted step on ``mesh``, from abstract models (no parameters are
    created). The learning rate follows ``config.optim`` by step, or by epoch with
    ``optim.schedule_unit="epoch"`` (PyTorch schedulers stepped once per epoch, as the reference's)."""
    g = config.gpt4image
    text_on = bool(g.text_loss)
    groups = bn_groups(config, mesh)
    targets_fn = mixup_cutmix(g.mixup, g.cutmix, g.mixup_switch_prob, g.label_smoothing,
                              num_classes or _num_classes(abstract_classifier))
    models = {CLASSIFIER: abstract_classifier}
    axes = {CLASSIFIER: backbone.logical_axes}
    if text_on:
        models[PROJECTION] = abstract_projection
        axes[PROJECTION] = projection.logical_axes
    if g.ema_decay > 0:
        models[EMA] = abstract_classifier
        axes[EMA] = backbone.logical_axes
    for m in models.values():
        layers.set_batchnorm_groups(m, groups)
    txs, lr = {}, None
    for name in ((CLASSIFIER, PROJECTION) if text_on else (CLASSIFIER,)):
        params = nnx.state(models[name], nnx.Param)
        txs[name], lr = optim.make(config.optim, params, total_steps, steps_per_epoch=steps_per_epoch)
    rules = config.sharding.rules
    layout = train_state.layout(models, txs, mesh, rules, axes)
    batch_sharding = parallel.batch_sharding(mesh)
    batch_shardings = {"image": batch_sharding, "label": batch_sharding}
    if text_on:
        batch_shardings["text_embedding"] = batch_sharding
    step = jax.jit(
        make_step_fn(layout, backbone, lr, text_on=text_on, weight=text_weight(g.text_loss_scale, g.lamb), tau=g.tau,
                     ema_decay=float(g.ema_decay), label_smoothing=float(g.label_smoothing), targets_fn=targets_fn,
                     seed=int(config.seed)),
        in_shardings=(layout.shardings, batch_shardings),
        out_shardings=(layout.shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )
    return Setup(config=config, mesh=mesh, layout=layout, lr_schedule=lr, step=step, text_on=text_on,
                 bn_groups=groups)
