"""GIST's caption matching alone: each training image's top-k descriptions of its own class under CLIP.

    python -m jaxgist --config configs/caption_matching.py --workdir runs/match-cub \
        --config.data.metadata=data/gist/CUB/metadata.csv --config.data.image_dir=/data/CUB_200_2011/images \
        --config.data.descriptions=data/gist/CUB/long_captions.json

writes ``runs/match-cub/captions_top5.json`` (GIST's format; ``data.captions`` of a fine-tuning job).

Arguments (``configs/caption_matching.py:<arg>``):
  (none)   CLIP ViT-B/32 as GIST matches (``model.init``), top ``match.k`` = 5.
  small    a tiny random CLIP on generated fine-grained birds; CPU, seconds.
"""

from jaxgist.methods import caption_matching


def get_config(arg: str = ""):
    c = caption_matching.default_config()
    c.data.source = "gist"
    if arg == "small":
        c.model.init = ""
        c.model.preset = dict(
            vision=dict(image_size=32, patch_size=16, width=64, layers=1, heads=2, mlp_dim=128),
            text=dict(context_length=77, width=64, layers=1, heads=2, mlp_dim=128),
            embed_dim=32,
        )
        c.data.source = "synthetic"
        c.data.synthetic.update(dict(num_classes=6, train_per_class=4, val_per_class=1, test_per_class=1,
                                     image_size=48, num_captions=1, shots=()))
        c.data.num_captions = 1
        c.match.k = 3
    elif arg:
        raise ValueError(f"unknown argument {arg!r} for configs/caption_matching.py; expected '' or 'small'")
    return c
