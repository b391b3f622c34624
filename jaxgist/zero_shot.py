"""Zero-shot classification: class text embeddings from prompt templates, cosine logits, top-k.

Public API: ``class_embeddings``, ``topk_accuracy``, and ``run(config, workdir)`` (the job).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
from absl import logging

from jaxgist import embeddings, evaluation, results, tokenizer
from jaxgist.data import synthetic, transforms
from jaxgist.models import clip

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
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose label is among the k highest logits (``evaluation.topk_accuracy``)."""
    return evaluation.topk_accuracy(logits, labels, min(k, np.asarray(logits).shape[1]))


def run(config, workdir: str) -> dict:
    """Zero-shot classification of the configured dataset; writes results into ``workdir``."""
    t0 = time.perf_counter()
    model = clip.from_config(config.model, seed=config.seed)
    tokenize = tokenizer.load(config.model.get("tokenizer") or None)
    data = config.data
    if data.source != "synthetic":
        raise ValueError(f"data.source={data.source!r}: the zero-shot job reads 'synthetic' data for now")
    size = model.config.vision.image_size
    images, labels, names = synthetic.make_images(data.num_classes, data.per_class, size, seed=config.seed)
    logging.info("zero-shot: %d images of %d classes at %dpx, %s", len(images), len(names), size,
                 embeddings.device_summary())
    img = embeddings.encode_images(model, transforms.normalize(images), batch_size=config.zero_shot.batch_size)
    cls = class_embeddings(model, tokenize, names, tuple(config.zero_shot.templates))
    logits = 100.0 * img @ cls.T
    metrics = {
        "test_top1": topk_accuracy(logits, labels, 1),
        "test_top5": topk_accuracy(logits, labels, 5),
        "chance_top1": 1.0 / len(names),
        "num_images": int(len(images)),
        "num_classes": len(names),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    results.write_results(workdir, {"zero_shot": metrics})
    return {"zero_shot": metrics}
