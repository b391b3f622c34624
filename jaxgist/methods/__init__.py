"""The jobs ``python -m jaxgist`` runs, by ``config.method``.

Each job module exposes ``default_config()``, ``validate(config)`` and ``run(config, workdir)``;
``get(name)`` imports the module of a method name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import ml_collections

# config.method -> the module of its job
REGISTRY = {
    "caption_matching": "jaxgist.methods.caption_matching",
    "zero_shot": "jaxgist.methods.zero_shot",
    "finetune": "jaxgist.methods.finetune",
    "flip": "jaxgist.methods.flip",
    "gist": "jaxgist.methods.gist",
    "describe": "jaxgist.methods.describe",
    "gpt4image": "jaxgist.methods.gpt4image",
    "cgtgan": "jaxgist.methods.cgtgan",
}


def clip_job_config(method: str, init: str = "ViT-B/32", **sections) -> ml_collections.ConfigDict:
    """The keys every CLIP job has (``method``, ``seed``, ``model`` from ``init``, ``data``) and its own
    ``sections`` (name -> dict of defaults)."""
    from jaxgist.data import datasets
    from jaxgist.models import clip

    c = ml_collections.ConfigDict(dict(method=method, seed=0))
    c.model = clip.default_model_config(init)
    c.data = datasets.default_config()
    for name, fields in sections.items():
        c[name] = ml_collections.ConfigDict(fields) if isinstance(fields, dict) else fields
    return c


def get(name: str | None) -> ModuleType:
    """The job module of method ``name``; ValueError naming the known methods otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"config.method={name!r} is not one of {sorted(REGISTRY)}")
    return importlib.import_module(REGISTRY[name])
