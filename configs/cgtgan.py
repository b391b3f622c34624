"""CgT-GAN: a CLIP-prefix GPT-2 captioner trained without paired data, against a RoBERTa discriminator
and CLIP rewards (Lihr747/CgtGAN; settings of its README).

    python -m jaxgist --config configs/cgtgan.py:images=coco,corpus=coco --workdir runs/cgtgan-coco \
        --config.data.karpathy_json=/data/coco/dataset_coco.json --config.data.image_root=/data/coco

``data.karpathy_json`` is Karpathy's split file (``dataset_coco.json``, ``dataset_flickr30k.json``),
``data.image_root`` the folder its ``filepath/filename`` entries are under. ``corpus=coco`` / ``f30k``
use the training images' own captions as the text corpus (the reference's in-domain settings);
``corpus=gcc`` reads ``--config.data.corpus=<one sentence a line>`` with the reference's GCC filter.
CLIP is ViT-L/14 (768-wide prefixes), GPT-2 base and RoBERTa base come from the HF hub.

Arguments (comma-separated, ``configs/cgtgan.py:<arg>,<arg>``):
  images=coco|f30k   the image set (default coco); sets the aggregation temperature with the corpus
  corpus=coco|f30k|gcc  the text corpus (default: the images' own); t = 100 (COCO), 125 (Flickr30k), 175 (GCC)
  runlocal           a tiny CLIP trained from scratch on 20 other generated species (no pretrained CLIP
                     offline), tiny random GPT-2 and RoBERTa with BPE vocabularies trained on the corpus,
                     on generated birds with captions naming what was drawn: a CPU smoke run in about a minute.
  demo               runlocal-sized, longer: initialization, then adversarial training; results.md has
                     the val/test metrics of the initialized and the adversarially trained generator,
                     captions/examples.md example captions beside their images.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs.common, from any cwd
from configs import common  # noqa: E402
from jaxgist.methods import cgtgan  # noqa: E402

IMAGES = ("coco", "f30k")
CORPORA = ("coco", "f30k", "gcc")
TEMPERATURE = {"coco": 100.0, "f30k": 125.0, "gcc": 175.0}
EPOCHS = {"coco": 50, "f30k": 50, "gcc": 80}


def _parse(arg: str) -> dict:
    out = {"images": "coco", "corpus": "", "runlocal": False, "demo": False}
    for token in filter(None, (t.strip() for t in arg.split(","))):
        key, eq, value = token.partition("=")
        if eq and key == "images" and value in IMAGES:
            out["images"] = value
        elif eq and key == "corpus" and value in CORPORA:
            out["corpus"] = value
        elif not eq and token in ("runlocal", "demo"):
            out[token] = True
        else:
            raise ValueError(f"configs/cgtgan.py: unknown argument {token!r}; expected images={'|'.join(IMAGES)}, "
                             f"corpus={'|'.join(CORPORA)}, runlocal, demo")
    out["corpus"] = out["corpus"] or out["images"]
    return out


def _small(c, *, demo: bool):
    c.data.images = "synthetic"
    c.data.synthetic.update(dict(num_classes=8, train_per_class=24 if demo else 8, val_per_class=2,
                                 test_per_class=4 if demo else 2, image_size=48, num_captions=5, shots=()))
    c.clip.init = ""
    c.clip.preset = dict(common.TINY_CLIP)
    c.clip.update(dict(batch=64, part_size=512))
    # no pretrained CLIP offline: the tiny one is trained first on 20 other generated species
    c.pretrain.update(dict(steps=300 if demo else 40, global_batch=64, lr=1e-3, warmup_steps=30 if demo else 4))
    c.pretrain.synthetic.update(dict(first_class=20, num_classes=20, train_per_class=20 if demo else 4, image_size=48))
    c.tokenizers.update(dict(gpt2="train", roberta="train", vocab_size=400))
    c.generator.update(dict(init="", prefix_length=4,
                            overrides=dict(width=64, layers=2, heads=4, n_positions=64)))
    c.discriminator.update(dict(init="", overrides=dict(width=64, layers=2, heads=4, mlp_dim=128, max_positions=40)))
    c.cgtgan.update(dict(samples=3, max_tokens=16, clip_context=32, gan_steps=4 if demo else 1,
                         gan_warm_steps=20 if demo else 2, agg_part_size=256))
    c.initialize.update(dict(global_batch=16, epochs=6 if demo else 1, log_every=20))
    c.initialize.optim.update(dict(lr=2e-3, warmup_steps=10))
    c.train.update(dict(global_batch=16, epochs=6 if demo else 1, log_every=4, keep=1))
    c.optim.update(dict(lr=2e-4, warmup_steps=2))
    c.evaluate.update(dict(batch=16, metrics=("BLEU", "ROUGE_L", "CIDEr"), val_metrics=("BLEU", "CIDEr"),
                           examples=6))


def get_config(arg: str = ""):
    a = _parse(arg)
    c = cgtgan.default_config()
    c.cgtgan.agg_temperature = TEMPERATURE[a["corpus"]]
    c.train.epochs = EPOCHS[a["corpus"]]
    if a["corpus"] == "gcc":
        c.data.corpus_style = "gcc"
    if a["runlocal"] or a["demo"]:
        _small(c, demo=a["demo"])
    return c
