"""Zero-shot classification: class text embeddings from prompt templates, cosine logits, top-k.

    weights = zero_shot.class_embeddings(model, tokenize, class_names, templates)   # [C, E], unit rows
    top1 = zero_shot.topk_accuracy(100 * image_emb @ weights.T, labels, k=1)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxgist.core import arrays
from jaxgist.evaluation import accuracy, embeddings

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def class_embeddings(model, tokenize, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                     batch_size: int = 256) -> np.ndarray:
    """[C, E]: per class, the normalized mean of its normalized template embeddings (CLIP's recipe)."""
    if not classnames or not templates:
        raise ValueError("class_embeddings needs at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates without a '{{}}' placeholder for the class name: {bad}")
    texts = [t.format(name) for name in classnames for t in templates]
    emb = embeddings.encode_texts(model, tokenize(texts), batch_size=batch_size)
    emb = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)
    return arrays.l2_normalize(emb)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose label is among the k highest logits (``accuracy.topk_accuracy``)."""
    return accuracy.topk_accuracy(logits, labels, min(k, np.asarray(logits).shape[1]))
