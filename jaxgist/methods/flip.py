"""FLIP's caption-only contrastive fine-tuning (``config.method = "flip"``, ``configs/flip.py``): the
fine-tuning job (``methods.finetune``), checked to read the train split only, whatever the command
line overrides.

    python -m jaxgist --config configs/flip.py --workdir runs/flip-cub --config.data.metadata=...
    flip.run(config, workdir)      # validate (splits included), check the source, then fine-tune

FLIP (github.com/rohit901/flip) pairs every CUB image with the first line of its description, test
images included; here only the train split is read (``check_finetune_splits`` on the config,
``check_train_only`` on the source). FLIP's heads on frozen embeddings are ``jaxgist.heads.flip``.
Its recipe and where we differ from it: docs/methods/flip.md.
"""

from __future__ import annotations

import re

from jaxgist.core import config as config_lib
from jaxgist.data import datasets
from jaxgist.methods import finetune as finetune_lib

_TRAIN_SPLIT = re.compile(r"train(\[[^\]+,]*\])?")  # "train", or a TFDS slice of it ("train[:80%]")


def check_finetune_splits(config) -> None:
    """FLIP's fine-tuning read every CUB image, test included; ours must read the train split only.

    Raises ``ConfigError`` unless ``config.method`` is "flip", ``config.data.train_split`` is
    "train" (or a TFDS slice of it, no "+" unions) and ``config.data.eval_split`` (zero-shot scoring
    during fine-tuning, which ``train.best_metric`` may select checkpoints on) is not "test".
    """
    req = config_lib.require
    req(config.get("method") == "flip",
        f"config.method={config.get('method')!r}: FLIP's fine-tuning is the 'flip' method")
    split = config.data.train_split
    req(isinstance(split, str) and _TRAIN_SPLIT.fullmatch(split.strip()) is not None,
        f"config.data.train_split={split!r}: FLIP fine-tunes on the train split only (FLIP's own notebook "
        f"also trains on the test images; that leak is not reproduced)")
    req(config.data.eval_split.strip().split("[")[0] != "test",
        f"config.data.eval_split={config.data.eval_split!r}: the test split must not be used during "
        f"fine-tuning; evaluate on 'val'")


def default_config():
    """The fine-tuning job's keys (``methods.finetune.default_config``) with ``method = "flip"``."""
    c = finetune_lib.default_config()
    c.method = "flip"
    return c


def validate(config, num_devices: int | None = None, *, check_data: bool = True) -> None:
    """``methods.finetune.validate`` plus ``check_finetune_splits``."""
    finetune_lib.validate(config, num_devices, check_data=check_data)
    check_finetune_splits(config)


validate_finetune = validate


def compile_inputs(config, mesh):
    """The fine-tuning step, for ahead-of-time compilation (``python -m jaxgist.aot``)."""
    check_finetune_splits(config)
    return finetune_lib.compile_inputs(config, mesh)


def check_train_only(source) -> None:
    """The source a fine-tuning job reads selects the train split and nothing else (``GistSource.split``,
    ``TfdsSource``'s split); raises ``ConfigError`` otherwise (a source selecting every row included)."""
    split = getattr(source, "split", None)
    names = (split,) if isinstance(split, str) else tuple(split) if split is not None else ()
    config_lib.require(bool(names) and all(_TRAIN_SPLIT.fullmatch(str(s).strip()) for s in names),
                       f"the fine-tuning source selects split(s) {split!r}; FLIP's fine-tuning must read the "
                       f"train split only")


def run(config, workdir: str) -> dict:
    """FLIP's caption-only fine-tuning: checks the config and that the source reads the train split
    only, then runs the fine-tuning job (``methods.finetune.run``, any ``config.mode``)."""
    validate(config)
    check_train_only(datasets.source(config.data, config.data.train_split, workdir, with_captions=True))
    return finetune_lib.run(config, workdir)


finetune = run
