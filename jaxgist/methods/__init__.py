"""The jobs ``python -m jaxgist`` runs, by ``config.method``.

Each job module exposes ``default_config()``, ``validate(config)`` and ``run(config, workdir)``;
``get(name)`` imports the module of a method name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# config.method -> the module of its job
REGISTRY = {
    "caption_matching": "jaxgist.methods.caption_matching",
    "zero_shot": "jaxgist.methods.zero_shot",
    "finetune": "jaxgist.methods.finetune",
    "flip": "jaxgist.methods.flip",
    "gist": "jaxgist.methods.gist",
}


def get(name: str | None) -> ModuleType:
    """The job module of method ``name``; ValueError naming the known methods otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"config.method={name!r} is not one of {sorted(REGISTRY)}")
    return importlib.import_module(REGISTRY[name])
