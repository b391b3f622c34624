"""Zero-shot classification of a dataset's test split with CLIP and prompt templates.

    python -m jaxgist --config configs/zero_shot.py --workdir runs/zs-cub \
        --config.data.metadata=data/gist/CUB/metadata.csv --config.data.image_dir=/data/CUB_200_2011/images

Arguments (``configs/zero_shot.py:<arg>``):
  (none)   CLIP ViT-B/32 (``model.init``) on GIST-format data, "a photo of a {}." prompts
           (``zero_shot.templates``; ``jaxgist.evaluation.templates`` has CLIP's 80 ImageNet ones).
  small    a tiny random CLIP on generated fine-grained birds; CPU, seconds.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs.common, from any cwd
from configs import common  # noqa: E402
from jaxgist.methods import zero_shot  # noqa: E402


def get_config(arg: str = ""):
    common.check_arg("configs/zero_shot.py", arg)
    c = zero_shot.default_config()
    c.data.source = "gist"
    if arg == "small":
        common.small(c, num_captions=1, num_classes=10, train_per_class=2, val_per_class=1, test_per_class=4)
        c.zero_shot.bootstrap = 100
    return c
