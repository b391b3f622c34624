"""The zero-shot job (``config.method = "zero_shot"``, ``configs/zero_shot.py``): a CLIP scored on a
dataset's split with prompt-template class embeddings (``jaxgist.evaluation.zero_shot``).

    python -m jaxgist --config configs/zero_shot.py:small --workdir /tmp/zs
    results = zero_shot.run(config, workdir)   # {"zero_shot": {"<model>": {"zero_shot": {"test_top1", ...}}}}

The data section is the fine-tuning job's (``data.source``: gist, tfds, folder or synthetic); the
images of ``zero_shot.split`` are encoded with CLIP's eval preprocessing. Results are written by
process 0 only.
"""

from __future__ import annotations

import time

import jax
import ml_collections
from absl import logging

from jaxgist import methods
from jaxgist.core import config as config_lib
from jaxgist.core import results
from jaxgist.data import datasets
from jaxgist.evaluation import accuracy, embeddings
from jaxgist.evaluation.zero_shot import DEFAULT_TEMPLATES, class_embeddings
from jaxgist.models import clip
from jaxgist.models.clip import tokenizer


def default_config() -> ml_collections.ConfigDict:
    return methods.clip_job_config("zero_shot", "ViT-B/32", zero_shot=dict(
        split="test", templates=DEFAULT_TEMPLATES, batch_size=64, bootstrap=1000))


def validate(config) -> None:
    config_lib.check_keys(config, default_config(), free=("model.preset",))
    z = config.zero_shot
    req = config_lib.require
    clip.check_model_config(config.model)
    req(len(z.templates) > 0 and all("{}" in t for t in z.templates),
        f"config.zero_shot.templates={tuple(z.templates)!r}: each template needs a '{{}}' for the class name")
    req(z.batch_size >= 1 and z.bootstrap >= 0, "config.zero_shot.batch_size must be >= 1 and bootstrap >= 0")
    datasets.validate(config.data)


def run(config, workdir: str) -> dict:
    """Zero-shot classification of ``config.data``'s ``zero_shot.split``; writes results into ``workdir``."""
    validate(config)
    t0 = time.perf_counter()
    z = config.zero_shot
    model = clip.from_config(config.model, seed=config.seed)
    tokenize = tokenizer.load(config.model.tokenizer or None)
    source = datasets.source(config.data, z.split, workdir, with_captions=False)
    logging.info("zero-shot: %d %s images of %d classes, %s", len(source), z.split, len(source.class_names),
                 embeddings.device_summary())
    images = embeddings.encode_source(model, source, batch_size=z.batch_size, workers=config.data.workers,
                                      skip_unreadable=config.data.skip_unreadable,
                                      crop_rounding=config.data.crop_rounding)
    weights = class_embeddings(model, tokenize, source.class_names, tuple(z.templates))
    ks = tuple(sorted({1, min(5, len(source.class_names))}))
    metrics = accuracy.accuracy_summary(100.0 * images["x"] @ weights.T, images["y"], prefix=z.split, ks=ks,
                                        resamples=z.bootstrap, seed=config.seed)
    metrics.update(chance_top1=1.0 / len(source.class_names), images=int(len(images["y"])),
                   classes=len(source.class_names))
    table = {model_name(config.model): {"zero_shot": metrics}}
    if jax.process_index() == 0:
        results.write(workdir, "zero_shot", table, run={"seconds": round(time.perf_counter() - t0, 2)})
    return {"zero_shot": table}


def model_name(model_config) -> str:
    """The results' name of a model: its init (hub name or path) or "preset"."""
    return str(model_config.init) if model_config.init else "preset"
