"""Optimizers from a config: optax transformations, learning-rate schedules, frozen groups.

``config.optim`` keys (defaults in ``default_config``):

- ``name``: ``"adam"`` is PyTorch's ``torch.optim.Adam``, whose ``weight_decay`` is a coupled L2
  term added to the gradient before the moment estimates (GIST's recipe: lr 1e-6, betas 0.9/0.98,
  eps 1e-6, weight decay 0.001); ``"adamw"`` decouples the decay (PyTorch ``AdamW``); ``"sgd"``
  with ``momentum``.
- ``lr``, ``schedule`` (``"constant"``, ``"cosine"``, ``"linear"``: decay from ``lr`` to
  ``lr * final_lr_ratio`` at the last step), ``warmup_steps`` (linear from ``warmup_init_lr``,
  default 0).
- ``schedule="timm_cosine"`` (with ``schedule_unit="epoch"``): timm's ``CosineLRScheduler`` as DeiT's
  training script steps it. ``f(t)`` rises linearly from ``warmup_init_lr`` by ``(lr - warmup_init_lr) /
  warmup_steps`` per epoch for ``t < warmup_steps``, then is ``min + (lr - min) (1 + cos(pi t / T)) / 2``
  with ``t`` counted from the start (timm's ``warmup_prefix=False``), ``min = lr * final_lr_ratio`` and
  ``T`` the number of epochs; DeiT calls ``scheduler.step(epoch)`` after each epoch, so epoch ``e``
  trains at ``f(max(e - 1, 0))`` (epochs 0 and 1 both at ``f(0)``).
- ``schedule_unit``: ``"step"`` (default) moves the learning rate every update; ``"epoch"`` holds it
  for an epoch, as a PyTorch scheduler stepped once per epoch (``CosineAnnealingLR(T_max=epochs)``):
  the schedule then counts epochs, ``warmup_steps`` included.
- ``weight_decay``; ``decay_exclude``: a regex of parameter paths with no weight decay (e.g.
  ``r"(bias|scale|embedding|logit_scale)$"``); empty decays everything, as GIST does.
- ``grad_clip_norm``: clip the global gradient norm (0: off).
- ``accumulate_steps``: apply the update every k steps with the mean gradient of k batches
  (each batch's contrastive loss uses its own in-batch negatives).
- ``freeze``: a regex of parameter paths that are not trained (no update, no optimizer state,
  no weight decay), e.g. ``r"^(text_model|text_projection)\\."`` locks the text tower.

Parameter paths are the dotted HF-style names, e.g. ``vision_model.encoder.layers.0.fc1.kernel``.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

NAMES = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear", "timm_cosine")


def default_config() -> ml_collections.ConfigDict:
    """GIST's fine-tuning optimizer."""
    return ml_collections.ConfigDict(dict(
        name="adam", lr=1e-6, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.001, decay_exclude="",
        momentum=0.9, schedule="constant", warmup_steps=0, warmup_init_lr=0.0, final_lr_ratio=0.0, grad_clip_norm=0.0,
        accumulate_steps=1, freeze="", schedule_unit="step",
    ))


def path_name(path) -> str:
    """A tree path (tuple of keys or jax key entries) as a dotted name."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                k = getattr(k, attr)
                break
        parts.append(str(k))
    if len(parts) > 1 and parts[-1] == "value":  # a leaf inside an nnx.Variable
        parts.pop()
    return ".".join(parts)


def _compile(pattern: str, key: str):
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"config.optim.{key}={pattern!r} is not a valid regex: {e}") from None


def validate(c) -> None:
    """Raises ValueError naming the first bad ``config.optim`` value."""
    if c.name not in NAMES:
        raise ValueError(f"config.optim.name={c.name!r} is not one of {NAMES}")
    if c.get("schedule_unit", "step") not in ("step", "epoch"):
        raise ValueError(f"config.optim.schedule_unit={c.schedule_unit!r} is not 'step' or 'epoch'")
    if c.schedule not in SCHEDULES:
        raise ValueError(f"config.optim.schedule={c.schedule!r} is not one of {SCHEDULES}")
    if c.schedule == "timm_cosine" and c.get("schedule_unit", "step") != "epoch":
        raise ValueError("config.optim.schedule='timm_cosine' counts epochs: set config.optim.schedule_unit='epoch'")
    if not c.lr > 0:
        raise ValueError(f"config.optim.lr={c.lr} must be > 0")
    for key in ("b1", "b2"):
        if not 0 <= c[key] < 1:
            raise ValueError(f"config.optim.{key}={c[key]} must be in [0, 1)")
    for key in ("eps", "weight_decay", "grad_clip_norm", "warmup_steps", "warmup_init_lr", "final_lr_ratio"):
        if c[key] < 0:
            raise ValueError(f"config.optim.{key}={c[key]} must be >= 0")
    if int(c.accumulate_steps) < 1:
        raise ValueError(f"config.optim.accumulate_steps={c.accumulate_steps} must be >= 1")
    _compile(c.decay_exclude, "decay_exclude")
    _compile(c.freeze, "freeze")


def schedule(c, total_steps: int) -> optax.Schedule:
    """Learning rate by optimizer update (after accumulation), or by epoch for ``schedule_unit="epoch"``."""
    warmup = int(c.warmup_steps)
    start = float(c.get("warmup_init_lr", 0.0))
    if c.schedule == "timm_cosine":
        return _timm_cosine(c.lr, start, warmup, c.lr * c.final_lr_ratio, max(int(total_steps), 1))
    decay_steps = max(int(total_steps) - warmup, 1)
    if c.schedule == "constant":
        main = optax.constant_schedule(c.lr)
    elif c.schedule == "cosine":
        main = optax.cosine_decay_schedule(c.lr, decay_steps, alpha=c.final_lr_ratio)
    else:
        main = optax.linear_schedule(c.lr, c.lr * c.final_lr_ratio, decay_steps)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(start, c.lr, warmup), main], [warmup])


def _timm_cosine(lr: float, warmup_lr: float, warmup: int, min_lr: float, epochs: int) -> optax.Schedule:
    """Epoch -> learning rate of timm's cosine schedule as DeiT steps it (module docstring)."""

    def f(t):
        warm = warmup_lr + t * ((lr - warmup_lr) / max(warmup, 1))
        cosine = min_lr + 0.5 * (lr - min_lr) * (1 + jnp.cos(jnp.pi * jnp.minimum(t, epochs) / epochs))
        return jnp.where(t < warmup, warm, cosine)

    return lambda epoch: f(jnp.maximum(jnp.asarray(epoch, jnp.float32) - 1, 0))


def _labels(params, pattern: str, yes: Any, no: Any):
    rx = re.compile(pattern) if pattern else None
    return jax.tree_util.tree_map_with_path(
        lambda p, _: yes if rx is not None and rx.search(path_name(p)) else no, params)


def frozen_names(params, c) -> list[str]:
    """Dotted names of the parameters ``config.optim.freeze`` matches."""
    if not c.freeze:
        return []
    rx = re.compile(c.freeze)
    names = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    return [n for n in names if rx.search(n)]


def make(c, params, total_steps: int, steps_per_epoch: int = 1) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule) for ``params`` (a pytree; only its structure and path
    names are used) from ``config.optim`` ``c``; ``total_steps`` counts optimizer updates, of which
    an epoch has ``steps_per_epoch`` (used with ``schedule_unit="epoch"``)."""
    validate(c)
    if c.get("schedule_unit", "step") == "epoch":
        per_epoch = max(int(steps_per_epoch), 1)
        by_epoch = schedule(c, -(-int(total_steps) // per_epoch))
        lr = lambda step: by_epoch(step // per_epoch)  # noqa: E731
    else:
        lr = schedule(c, total_steps)
    decay_mask = _labels(params, c.decay_exclude, False, True) if c.decay_exclude else None
    if c.name == "adam":
        parts = [optax.add_decayed_weights(c.weight_decay, mask=decay_mask)] if c.weight_decay else []
        tx = optax.chain(*parts, optax.scale_by_adam(c.b1, c.b2, c.eps), optax.scale_by_learning_rate(lr))
    elif c.name == "adamw":
        tx = optax.adamw(lr, c.b1, c.b2, c.eps, weight_decay=c.weight_decay, mask=decay_mask)
    else:
        parts = [optax.add_decayed_weights(c.weight_decay, mask=decay_mask)] if c.weight_decay else []
        tx = optax.chain(*parts, optax.sgd(lr, momentum=c.momentum or None))
    if c.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)
    if c.freeze:
        if not frozen_names(params, c):
            raise ValueError(f"config.optim.freeze={c.freeze!r} matches no parameter")
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   _labels(params, c.freeze, "frozen", "train"))
    if int(c.accumulate_steps) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(c.accumulate_steps))
    return tx, lr
