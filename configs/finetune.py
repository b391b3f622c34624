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

from jaxgist.methods import finetune


def get_config(arg: str = ""):
    c = finetune.default_config()
    if arg == "small":
        c.model.init = ""
        c.model.preset = dict(
            vision=dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=128),
            text=dict(context_length=77, width=64, layers=2, heads=4, mlp_dim=128),
            embed_dim=32,
        )
        c.data.source = "synthetic"
        c.data.synthetic.update(dict(num_classes=8, train_per_class=8, val_per_class=2, test_per_class=2,
                                     image_size=48, num_captions=2, shots=(1,)))
        c.data.num_captions = 2
        c.data.check_files = True
        c.train.global_batch = 16
        c.train.epochs = 2
        c.train.log_every = 2
        c.train.eval_every = 4
        c.train.eval_batch = 16
        c.train.save_every = 4
        c.optim.lr = 1e-4
    elif arg:
        raise ValueError(f"unknown argument {arg!r} for configs/finetune.py; expected '' or 'small'")
    return c
