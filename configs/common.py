"""What the config files share: the tiny random CLIP and the generated-birds data of their ``small``
variants (CPU, seconds), and the check of a config file's argument.

    c = common.small(finetune.default_config(), num_captions=2, num_classes=8, train_per_class=8)
    common.small_training(c, eval_every=4)
    common.check_arg("configs/x.py", arg, ("", "small"))
"""

# A tiny CLIP: 32px images in 8px patches, 2+2 layers of width 64, 32-d joint embedding.
TINY_CLIP = dict(
    vision=dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=128),
    text=dict(context_length=77, width=64, layers=2, heads=4, mlp_dim=128),
    embed_dim=32,
)


def small(c, *, num_captions: int, **synthetic):
    """``c`` with the tiny random CLIP and generated birds (``data.synthetic`` fields as keywords, 48px
    images, no few-shot subsets by default), each image paired with ``num_captions`` captions."""
    c.model.init = ""
    c.model.preset = dict(TINY_CLIP)
    c.data.source = "synthetic"
    c.data.synthetic.update(dict(dict(image_size=48, num_captions=num_captions, shots=()), **synthetic))
    c.data.num_captions = num_captions
    return c


def small_training(c, *, eval_every: int):
    """Fine-tuning settings of the ``small`` variants: batch 16, 2 epochs, saves every 4 steps, lr 1e-4."""
    c.data.check_files = True
    c.train.update(dict(global_batch=16, epochs=2, log_every=2, eval_every=eval_every, eval_batch=16, save_every=4))
    c.optim.lr = 1e-4
    return c


def check_arg(name: str, arg: str, known=("", "small")) -> None:
    if arg not in known:
        raise ValueError(f"unknown argument {arg!r} for {name}; expected one of {', '.join(repr(a) for a in known)}")
