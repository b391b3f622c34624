"""FLIP's caption-only contrastive fine-tuning (``configs/flip.py``): the fine-tuning job, checked to
read the train split only.

FLIP (github.com/rohit901/flip, ``CLIP_CUB_zeroshot_KNN.ipynb``) pairs every CUB image with the first
line of its description, test images included; here only the train split is read
(``check_finetune_splits`` on the config, ``check_train_only`` on the source). FLIP's heads on frozen
embeddings (k-NN, nearest centroid, the image + caption hybrid MLP) are ``jaxgist.heads.flip``.

    flip.finetune(config, workdir)     # validate, check the source, then methods.finetune.run

FLIP's recipe and where we differ from it: docs/methods/flip.md.
"""

from __future__ import annotations

import re

from jaxgist.core import config as config_lib
from jaxgist.data import datasets
from jaxgist.methods import finetune as finetune_lib

_TRAIN_SPLIT = re.compile(r"train(\[[^\]+,]*\])?")  # "train", or a TFDS slice of it ("train[:80%]")


def check_finetune_splits(config) -> None:
    """FLIP's fine-tuning read every CUB image, test included; ours must read the train split only.

    Raises ``ConfigError`` unless ``config.method`` is "finetune", ``config.data.train_split`` is
    "train" (or a TFDS slice of it, no "+" unions) and ``config.data.eval_split`` (zero-shot scoring
    during fine-tuning, which ``train.best_metric`` may select checkpoints on) is not "test".
    """
    req = config_lib.require
    req(config.get("method") == "finetune",
        f"config.method={config.get('method')!r}: FLIP's fine-tuning is the 'finetune' method")
    split = config.data.train_split
    req(isinstance(split, str) and _TRAIN_SPLIT.fullmatch(split.strip()) is not None,
        f"config.data.train_split={split!r}: FLIP fine-tunes on the train split only (FLIP's own notebook "
        f"also trains on the test images; that leak is not reproduced)")
    req(config.data.eval_split.strip().split("[")[0] != "test",
        f"config.data.eval_split={config.data.eval_split!r}: the test split must not be used during "
        f"fine-tuning; evaluate on 'val'")


def validate_finetune(config) -> None:
    """``jaxgist.methods.finetune.validate`` plus ``check_finetune_splits``."""
    finetune_lib.validate(config)
    check_finetune_splits(config)


def check_train_only(source) -> None:
    """The source a fine-tuning job reads selects the train split and nothing else (``GistSource.split``,
    ``TfdsSource``'s split); raises ``ConfigError`` otherwise (a source selecting every row included)."""
    split = getattr(source, "split", None)
    names = (split,) if isinstance(split, str) else tuple(split) if split is not None else ()
    config_lib.require(bool(names) and all(_TRAIN_SPLIT.fullmatch(str(s).strip()) for s in names),
                       f"the fine-tuning source selects split(s) {split!r}; FLIP's fine-tuning must read the "
                       f"train split only")


def finetune(config, workdir: str) -> dict:
    """FLIP's caption-only fine-tuning: checks that only the train split is read, then runs the
    fine-tuning job (``jaxgist.methods.finetune.run``). ``python -m jaxgist --config configs/flip.py`` runs the
    same job through the generic launcher (``configs/flip.py`` checks the splits it sets; this entry
    point also checks command-line overrides and the source itself)."""
    validate_finetune(config)
    check_train_only(datasets.source(config.data, config.data.train_split, workdir, with_captions=True))
    return finetune_lib.run(config, workdir)
