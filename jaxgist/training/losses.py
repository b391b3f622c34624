"""Contrastive (CLIP) loss and in-batch retrieval accuracy.

    logits_per_image, _ = model(pixels, ids)                # [B, B], already times the logit scale
    loss = losses.clip_loss(logits_per_image)               # mean of image->text and text->image CE, fp32
    acc = losses.retrieval_accuracy(logits_per_image)       # {"image_to_text_top1", "text_to_image_top1"}
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def clip_loss(logits_per_image: jax.Array) -> jax.Array:
    """CLIP's symmetric cross-entropy: image i matches text i.

    ``logits_per_image`` [B, B] (already multiplied by the logit scale). Returns the mean of the
    image-to-text and text-to-image cross-entropies, computed in float32.
    """
    logits = logits_per_image.astype(jnp.float32)
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"clip_loss needs square [B, B] logits, got shape {logits.shape}")
    diag = jnp.diagonal(logits)
    image_to_text = jax.nn.logsumexp(logits, axis=1) - diag
    text_to_image = jax.nn.logsumexp(logits, axis=0) - diag
    return 0.5 * (image_to_text.mean() + text_to_image.mean())


def retrieval_accuracy(logits_per_image: jax.Array) -> dict[str, jax.Array]:
    """Top-1 in-batch retrieval: how often image i's best text is text i, and text i's best image is
    image i. (With several captions of one image in a batch these are lower bounds.)"""
    n = logits_per_image.shape[0]
    target = jnp.arange(n)
    return {
        "image_to_text_top1": jnp.mean(jnp.argmax(logits_per_image, axis=1) == target),
        "text_to_image_top1": jnp.mean(jnp.argmax(logits_per_image, axis=0) == target),
    }
