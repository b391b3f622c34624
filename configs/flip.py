"""FLIP's caption-only contrastive fine-tuning of CLIP, on the train split only.

    python -m jaxgist --config configs/flip.py --workdir runs/flip-cub \
        --config.data.metadata=data/gist/CUB/metadata.csv --config.data.image_dir=/data/CUB_200_2011/images \
        --config.data.captions=data/cub_text_first_line.json

FLIP (github.com/rohit901/flip, ``CLIP_CUB_zeroshot_KNN.ipynb``) fine-tunes CLIP ViT-B/32 with CLIP's
contrastive loss on (image, caption) pairs whose caption is the first line of the image's human-written
description (Reed et al.'s CUB text; no class name, no prompt template), with PyTorch Adam lr 5e-7,
betas 0.9/0.98, eps 1e-6, weight decay 0.001 (coupled L2), batch 32, 30 epochs. ``data.captions`` is
a JSON ``{filename: [caption, ...]}`` (the first caption is used; convert the description files to it).

Differences from FLIP's notebook, on purpose:
- FLIP pairs every CUB image (``glob(images/**/*.jpg)``), test images included. Here only the
  ``train`` split is read: the job is ``method = "flip"`` (``jaxgist.methods.flip``), which checks
  ``data.train_split`` is "train" and ``data.eval_split`` is not "test" after command-line
  overrides, and that the data source itself reads the train split only.
- fp32 weights (FLIP: fp16 on GPU with fp32 optimizer steps), the pairs shuffled every epoch (FLIP's
  DataLoader did not shuffle), and our training pipeline's random resized crop and flip (FLIP: CLIP's
  eval preprocessing only).

Arguments (``configs/flip.py:<arg>``):
  (none)   FLIP's recipe above (set data.metadata, data.image_dir and data.captions).
  small    a tiny random CLIP on generated fine-grained birds (data.source="synthetic"), one caption
           per image, CPU, well under a minute.
  heads    FLIP's heads on frozen CLIP embeddings, run by GIST's embed and evaluate stages
           (method "gist"): k-NN, nearest centroid and the hybrid image + caption head, whose captions
           are one description per image of every split (set gist.image_descriptions to the file
           configs/describe.py:task=image_descriptions writes; descriptions are label-free, so test
           images may have them), beside an L-BFGS linear probe. model.init is the CLIP to embed with
           (ViT-B/32, or a fine-tuned export); set data.metadata and data.image_dir.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs.common, from any cwd
from configs import common  # noqa: E402
from jaxgist.methods import flip  # noqa: E402


def heads_config():
    from jaxgist.methods import gist

    c = gist.default_config()
    c.model.init = "ViT-B/32"
    c.data.source = "gist"
    c.gist.update(dict(stages=("embed", "evaluate"), match_model="", probes=("lbfgs",),
                       heads=("knn", "centroid", "hybrid")))
    return c


def get_config(arg: str = ""):
    common.check_arg("configs/flip.py", arg, ("", "small", "heads"))
    if arg == "heads":
        return heads_config()
    c = flip.default_config()
    c.model.init = "ViT-B/32"
    c.data.source = "gist"
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.num_captions = 1  # the first line of each image's description
    c.data.template = "{caption}"  # the caption as it is: no class name, no prompt
    c.train.global_batch = 32
    c.train.epochs = 30
    c.train.save_every = 1000
    c.optim.update(dict(name="adam", lr=5e-7, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.001, schedule="constant",
                        warmup_steps=0, grad_clip_norm=0.0))
    if arg == "small":
        common.small(c, num_captions=1, num_classes=8, train_per_class=8, val_per_class=2, test_per_class=2,
                     shots=(1,))
        common.small_training(c, eval_every=0)
    flip.check_finetune_splits(c)
    return c
