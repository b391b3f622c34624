"""The embedded default job: runs offline on CPU in a minute.

Zero-shot classification of procedurally drawn images (coloured shapes) with a tiny CLIP.
The CLIP is randomly initialized (no pretrained weights offline), so accuracy is near chance:
this exercises the whole path (model, tokenizer, batched jitted encoding, results) end to end.

    python -m jaxgist --config configs/demo.py --workdir /tmp/jaxgist-demo
    python -m jaxgist --config configs/demo.py:runlocal --workdir /tmp/jaxgist-demo  # smaller, for tests
"""

import ml_collections


def get_config(arg: str = ""):
    runlocal = arg == "runlocal"
    c = ml_collections.ConfigDict()
    c.method = "zero_shot"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.init = ""  # a hub name, HF directory or OpenAI .pt; empty: random init from `preset`
    c.model.tokenizer = ""  # empty: the bundled OpenAI CLIP vocabulary
    c.model.dtype = "float32"
    c.model.preset = dict(
        vision=dict(image_size=64, patch_size=16, width=128, layers=2, heads=4, mlp_dim=512),
        text=dict(context_length=77, width=128, layers=2, heads=2, mlp_dim=512),
        embed_dim=128,
    )

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"
    c.data.num_classes = 10
    c.data.per_class = 4 if runlocal else 50

    c.zero_shot = ml_collections.ConfigDict()
    c.zero_shot.templates = ("a photo of a {}.", "a drawing of a {}.", "a {} on a textured background.")
    c.zero_shot.batch_size = 64
    return c
