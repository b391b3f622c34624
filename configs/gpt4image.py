"""GPT4Image: a ResNet-50 or DeiT-B classifier trained with a contrastive loss against the CLIP text
embedding of a description of each training image (huawei-noah/Efficient-Computing, GPT4Image).

    python -m jaxgist --config configs/gpt4image.py:model=resnet50 --workdir runs/g4i-r50 \
        --config.data.folder=/data/imagenet --config.gpt4image.descriptions=imagenet_descriptions.json

``data.folder`` holds ``train/<class>/*`` and ``val/<class>/*`` (ImageNet's val is the test split:
nothing is selected on it; ``minival``, 1% of the training images, is). ``gpt4image.descriptions`` is a
JSON ``{"<class>/<file>": "description"}`` (the ``describe`` job's ``image_descriptions.json``, or the
published MiniGPT-4 descriptions converted to it); the job encodes them with CLIP RN50 first.
TFDS instead (array_record, no TensorFlow): ``--config.data.source=tfds --config.data.tfds_name=imagenet2012
--config.data.eval_split=validation``; description keys are then TFDS file names ("n01440764_10026.JPEG").

Arguments (comma-separated, ``configs/gpt4image.py:<arg>,<arg>``):
  model=resnet50  (default) the reference's ResNet-50 recipe: SGD momentum 0.9, lr 0.1 x batch/256,
                  weight decay 1e-4, cosine over 120 epochs to 1e-5 (stepped per epoch), batch 1024
                  (4 GPUs x 256), RandomResizedCrop + flip, lambda 0.3, tau 0.2, per-device BatchNorm.
  model=deit_b    DeiT-B/16: AdamW 5e-4 x batch/512, weight decay 0.05 (not on biases, norms, class
                  token, position embedding), timm's cosine schedule stepped per epoch as DeiT does
                  (5 warm-up epochs from 1e-6, to 1e-5), 300 epochs, batch 1024 (8 x 128), bicubic
                  crops and resizes, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 (pixel
                  mode), repeated augmentation x3, drop-path 0.1, label smoothing 0.1, mixup 0.8 /
                  cutmix 1.0 (text targets not mixed), EMA 0.99996, lambda 0.3, tau 0.05.
  baseline        the same recipe without the text loss (the paper's baseline).
  runlocal        a tiny ResNet and a tiny random CLIP on generated birds: a CPU smoke run in seconds.
  demo            runlocal-sized, trained with and without the text loss for 3 seeds each
                  (``mode=compare``); results.md has the test top-1 mean and std side by side.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs.common, from any cwd
from configs import common  # noqa: E402
from jaxgist.methods import gpt4image  # noqa: E402

MODELS = ("resnet50", "deit_b")


def _parse(arg: str) -> dict:
    out = {"model": "resnet50", "baseline": False, "runlocal": False, "demo": False}
    for token in filter(None, (t.strip() for t in arg.split(","))):
        if token.startswith("model="):
            out["model"] = token.split("=", 1)[1]
            if out["model"] not in MODELS:
                raise ValueError(f"configs/gpt4image.py: model={out['model']!r} is not one of {MODELS}")
        elif token in ("baseline", "runlocal", "demo"):
            out[token] = True
        else:
            raise ValueError(f"configs/gpt4image.py: unknown argument {token!r}; expected model=resnet50|deit_b, "
                             f"baseline, runlocal, demo")
    return out


def _resnet50(c):
    c.model.arch = "resnet50"
    c.train.update(dict(global_batch=1024, epochs=120))
    c.optim.update(dict(name="sgd", lr=0.1 * 1024 / 256, momentum=0.9, weight_decay=1e-4, schedule="cosine",
                        final_lr_ratio=1e-5 / (0.1 * 1024 / 256), schedule_unit="epoch"))
    c.gpt4image.update(dict(tau=0.2, lamb=0.3))


def _deit_b(c):
    c.model.update(dict(arch="deit_b", drop_path=0.1))
    c.train.update(dict(global_batch=1024, epochs=300))
    lr = 5e-4 * 1024 / 512
    c.optim.update(dict(name="adamw", lr=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
                        decay_exclude=r"(bias|scale|cls_token|pos_embed)$", schedule="timm_cosine",
                        final_lr_ratio=1e-5 / lr, warmup_steps=5, warmup_init_lr=1e-6, schedule_unit="epoch"))
    c.data.update(dict(interpolation="bicubic", randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.25,
                       repeated_augmentation=3))
    c.gpt4image.update(dict(tau=0.05, lamb=0.3, ema_decay=0.99996, label_smoothing=0.1, mixup=0.8, cutmix=1.0))


def _runlocal(c):
    c.model.overrides = dict(layers=(1, 1, 1, 1), width=8) if c.model.arch == "resnet50" else \
        dict(width=64, depth=2, heads=4, patch=8)
    c.clip.init = ""
    c.clip.preset = dict(common.TINY_CLIP)
    c.clip.update(dict(batch=64, part_size=128))
    c.data.source = "synthetic"
    c.data.synthetic.update(dict(num_classes=8, train_per_class=24, val_per_class=2, test_per_class=8,
                                 image_size=48, num_captions=1, shots=()))
    c.data.num_captions = 1
    c.data.update(dict(train_split="train", eval_split="test", image_size=32, eval_resize=36, minival_fraction=0.1,
                       eval_batch=64))
    c.train.update(dict(global_batch=16, epochs=3, log_every=4, keep=1))
    c.gpt4image.ema_decay = 0.9 if c.gpt4image.ema_decay else 0.0
    if c.optim.name == "sgd":
        c.optim.update(dict(lr=0.1, final_lr_ratio=0.01))
    else:
        c.optim.update(dict(lr=1e-3, final_lr_ratio=0.01, warmup_steps=1, warmup_init_lr=1e-5))


def get_config(arg: str = ""):
    a = _parse(arg)
    c = gpt4image.default_config()
    (_resnet50 if a["model"] == "resnet50" else _deit_b)(c)
    if a["runlocal"] or a["demo"]:
        _runlocal(c)
    if a["demo"]:
        c.mode = "compare"
        c.compare.seeds = (0, 1, 2)
        c.data.synthetic.update(dict(num_classes=10, train_per_class=40, test_per_class=20))
        c.train.update(dict(global_batch=32, epochs=8))
    if a["baseline"]:
        c.gpt4image.text_loss = False
    return c
