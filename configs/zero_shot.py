"""Zero-shot classification of a dataset's test split with CLIP and prompt templates.

    python -m jaxgist --config configs/zero_shot.py --workdir runs/zs-cub \
        --config.data.metadata=data/gist/CUB/metadata.csv --config.data.image_dir=/data/CUB_200_2011/images

Arguments (``configs/zero_shot.py:<arg>``):
  (none)   CLIP ViT-B/32 (``model.init``) on GIST-format data, "a photo of a {}." prompts
           (``zero_shot.templates``; ``jaxgist.evaluation.templates`` has CLIP's 80 ImageNet ones).
  small    a tiny random CLIP on generated fine-grained birds; CPU, seconds.
"""

from jaxgist.methods import zero_shot


def get_config(arg: str = ""):
    c = zero_shot.default_config()
    c.data.source = "gist"
    if arg == "small":
        c.model.init = ""
        c.model.preset = dict(
            vision=dict(image_size=32, patch_size=16, width=64, layers=1, heads=2, mlp_dim=128),
            text=dict(context_length=77, width=64, layers=1, heads=2, mlp_dim=128),
            embed_dim=32,
        )
        c.data.source = "synthetic"
        c.data.synthetic.update(dict(num_classes=10, train_per_class=2, val_per_class=1, test_per_class=4,
                                     image_size=48, num_captions=1, shots=()))
        c.data.num_captions = 1
        c.zero_shot.bootstrap = 100
    elif arg:
        raise ValueError(f"unknown argument {arg!r} for configs/zero_shot.py; expected '' or 'small'")
    return c
