"""The embedded default: all of GIST on generated fine-grained birds, offline, on CPU.

    python -m jaxgist --config configs/demo.py --workdir /tmp/jaxgist-demo
    python -m jaxgist --config configs/demo.py:runlocal --workdir /tmp/jaxgist-demo-small   # tests, ~2 min

There are no pretrained weights offline, so a tiny CLIP is first trained from scratch on the
captions of 20 other synthetic species (stage ``pretrain``). Then GIST runs on 20 new species,
5 shots each: descriptions are matched to each training image, the CLIP is fine-tuned on the
image / matched-caption pairs, and zero-shot and linear probes on pretrained and fine-tuned image
embeddings are compared on the test split (top-1/top-3 with bootstrap std), together with
Tip-Adapter(-F), CODER (zero-shot, re-ranked, few-shot) and k-NN / nearest-centroid heads.
The report (table, figures, matched-caption gallery) is written to ``DIR/report/index.html``.
"""

from jaxgist.methods import gist


def get_config(arg: str = ""):
    if arg not in ("", "runlocal"):
        raise ValueError(f"configs/demo.py: unknown argument {arg!r}; expected '' or 'runlocal'")
    runlocal = arg == "runlocal"
    c = gist.default_config()
    c.gist.stages = ("pretrain", "match", "finetune", "embed", "evaluate")
    c.gist.match_model = ""  # the pretrained tiny CLIP
    c.gist.probes = ("sgd", "ridge", "lbfgs")
    c.gist.heads = ("tip_adapter", "tip_adapter_f", "coder", "coder_rerank", "coder_tip_adapter", "knn", "centroid")
    c.gist.augment_views = 2 if runlocal else 10
    c.gist.sgd.epochs = 200 if runlocal else 1000
    c.gist.bootstrap = 200 if runlocal else 1000
    c.gist.batch_size = 64
    c.gist.zero_shot_templates = ("a photo of a {}, a type of bird.", "a {}.")
    c.report = True  # DIR/report/: python -m jaxgist.report DIR

    c.model.init = ""
    c.model.preset = dict(
        vision=dict(image_size=64, patch_size=8, width=128, layers=3, heads=4, mlp_dim=512),
        text=dict(context_length=77, width=128, layers=3, heads=4, mlp_dim=512),
        embed_dim=128,
    )

    # runlocal still pretrains enough for the features to be learned (probes well above chance and
    # zero-shot raised by fine-tuning), which the demo test checks
    c.pretrain.synthetic.update(dict(first_class=20, num_classes=20, train_per_class=20 if runlocal else 30,
                                     image_size=80, seed=1, num_captions=5))
    c.pretrain.steps = 200 if runlocal else 500
    c.pretrain.global_batch = 64
    c.pretrain.lr = 1e-3
    c.pretrain.warmup_steps = 20 if runlocal else 50

    c.data.source = "synthetic"
    c.data.synthetic.update(dict(first_class=0, num_classes=20, train_per_class=5,
                                 val_per_class=3 if runlocal else 5, test_per_class=5 if runlocal else 15,
                                 image_size=80, seed=0, num_captions=5, shots=()))
    c.data.num_captions = 5

    c.train.global_batch = 32
    c.train.epochs = 4 if runlocal else 10
    c.train.log_every = 5
    c.train.save_every = 50
    c.optim.lr = 1e-4
    return c
