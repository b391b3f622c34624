"""Descriptions from an OpenAI-compatible chat endpoint (``jaxgist.methods.describe``).

    python -m jaxgist --config configs/describe.py:task=class_descriptions,dataset=cub,root=/data/gist \
        --workdir runs/cub-text --config.describe.base_url=http://localhost:11434/v1 \
        --config.describe.model=llama3.1:8b

Arguments (comma-separated key=value):
  task     class_descriptions | summarize | coder_knowledge | image_descriptions
  dataset  cub | flower | aircraft | fitzpatrick40 (GIST's releases, as configs/gist.py) | small
           (the generated birds, for trying a server out)
  root     the folder of GIST's per-dataset folders (default data/gist)

The domain wording of the prompts follows the dataset ("bird species", ...); the CLIP that CODER's
analogous-class filter and confusable pairs use is OpenAI's ViT-B/32 (``model.init``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # noqa: E402
from jaxgist.methods import describe  # noqa: E402

FOLDERS = {"cub": "CUB", "flower": "flower", "aircraft": "aircraft", "fitzpatrick40": "fitzpatrick40"}
DOMAINS = {"cub": "bird species", "flower": "flower species", "aircraft": "aircraft model",
           "fitzpatrick40": "skin condition", "small": "bird species"}


def get_config(arg: str = "task=class_descriptions,dataset=cub"):
    a = {}
    for item in filter(None, arg.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in ("task", "dataset", "root"):
            raise ValueError(f"configs/describe.py argument {item!r}: expected task=..., dataset=..., root=...")
        a[key.strip()] = value.strip()
    task, dataset = a.get("task", "class_descriptions"), a.get("dataset", "cub")
    if task not in describe.TASKS:
        raise ValueError(f"configs/describe.py: task={task!r} is not one of {describe.TASKS}")
    if dataset not in DOMAINS:
        raise ValueError(f"configs/describe.py: dataset={dataset!r} is not one of {sorted(DOMAINS)}")
    c = describe.default_config()
    c.describe.task = task
    c.describe.domain = DOMAINS[dataset]
    if dataset == "small":
        common.small(c, num_captions=2, num_classes=4, train_per_class=3, val_per_class=1, test_per_class=1)
        return c
    folder = os.path.join(a.get("root", os.path.join("data", "gist")), FOLDERS[dataset])
    c.data.source = "gist"
    c.data.metadata = os.path.join(folder, "metadata.csv")
    c.data.image_dir = os.path.join(folder, "images")
    c.describe.captions = os.path.join(folder, "captions_top5.json") if task == "summarize" else ""
    return c
