"""GIST's contrastive fine-tuning of CLIP on image / matched-caption pairs, for any GIST-format dataset.

    python -m jaxgist --config configs/finetune.py --workdir runs/cub \
        --config.data.metadata=data/CUB/metadata.csv --config.data.image_dir=data/CUB/images \
        --config.data.captions=data/CUB/captions_top5.json

Arguments (``configs/finetune.py:<arg>``):
  (none)   the GIST recipe: CLIP ViT-L/14@336px, each training image paired with its top
           ``num_captions`` matched captions ("<species>: <caption>"), Adam lr 1e-6, betas 0.9/0.98,
           eps 1e-6, weight decay 0.001 (PyTorch Adam's coupled L2), batch 32.
  small    a tiny random CLIP on generated fine-grained birds; runs on CPU in well under a minute.

Restarting the same command resumes from the latest checkpoint in ``workdir/checkpoints``.
Any key can be overridden on the command line, e.g. ``--config.train.epochs=5``,
``--config.mesh='(("data", 4), ("fsdp", 2))'``, ``--config.optim.freeze='^text_'``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs.common, from any cwd
from configs import common  # noqa: E402
from jaxgist.methods import finetune  # noqa: E402


def get_config(arg: str = ""):
    common.check_arg("configs/finetune.py", arg)
    c = finetune.default_config()
    if arg == "small":
        common.small(c, num_captions=2, num_classes=8, train_per_class=8, val_per_class=2, test_per_class=2,
                     shots=(1,))
        common.small_training(c, eval_every=4)
    return c
