"""GIST's caption matching alone: each training image's top-k descriptions of its own class under CLIP.

    python -m jaxgist --config configs/caption_matching.py --workdir runs/match-cub \
        --config.data.metadata=data/gist/CUB/metadata.csv --config.data.image_dir=/data/CUB_200_2011/images \
        --config.data.descriptions=data/gist/CUB/long_captions.json

writes ``runs/match-cub/captions_top5.json`` (GIST's format; ``data.captions`` of a fine-tuning job).

Arguments (``configs/caption_matching.py:<arg>``):
  (none)   open_clip's ViT-B-32/laion2b_s34b_b79k as GIST matches (``model.init``), top ``match.k`` = 5.
  small    a tiny random CLIP on generated fine-grained birds; CPU, seconds.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs.common, from any cwd
from configs import common  # noqa: E402
from jaxgist.methods import caption_matching  # noqa: E402


def get_config(arg: str = ""):
    common.check_arg("configs/caption_matching.py", arg)
    c = caption_matching.default_config()
    c.data.source = "gist"
    if arg == "small":
        common.small(c, num_captions=1, num_classes=6, train_per_class=4, val_per_class=1, test_per_class=1)
        c.match.k = 3
    return c
