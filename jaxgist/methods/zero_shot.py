"""The zero-shot job (``config.method = "zero_shot"``): a CLIP scored on generated classes with
prompt-template class embeddings (``jaxgist.evaluation.zero_shot``).

    results = zero_shot.run(config, workdir)     # {"zero_shot": {"test_top1", "test_top5", ...}}
"""

from __future__ import annotations

import time

from absl import logging

from jaxgist.evaluation import embeddings
from jaxgist.core import results
from jaxgist.models.clip import tokenizer
from jaxgist.data import synthetic, transforms
from jaxgist.evaluation.zero_shot import class_embeddings, topk_accuracy
from jaxgist.models import clip


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
