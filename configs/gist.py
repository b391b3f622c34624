"""GIST on its four datasets: caption matching, contrastive fine-tuning, embeddings, probes, zero-shot.

    python -m jaxgist --config configs/gist.py:dataset=cub,shots=5 --workdir runs/gist-cub-5shot \
        --config.data.image_dir=/data/CUB_200_2011/images

Arguments (comma-separated key=value):
  dataset  cub | flower | aircraft | fitzpatrick40
  shots    all | 5 | 3 | 1       (the GIST release's metadata.csv / metadata_{k}shot.csv)
  root     the folder holding the GIST release's per-dataset folders (default data/gist):
           <root>/<CUB|flower|aircraft|fitzpatrick40>/{metadata*.csv, captions_top5.json,
           long_captions.json}; images default to <root>/<folder>/images (set data.image_dir).

Models as in GIST's code: descriptions matched with open_clip's ViT-B-32/laion2b_s34b_b79k (GELU), CLIP
ViT-L/14@336px fine-tuned
(Adam lr 1e-6, betas 0.9/0.98, eps 1e-6, weight decay 0.001, batch 32, top-5 matched captions), then
GIST's linear probe (SGD lr 0.5, 1000 epochs, batch 64, best validation epoch). Datasets whose release
has no class descriptions (flower, aircraft) skip matching and fine-tune on the released
captions_top5.json.
"""

import os

from jaxgist.methods import gist

FOLDERS = {"cub": "CUB", "flower": "flower", "aircraft": "aircraft", "fitzpatrick40": "fitzpatrick40"}


def _parse(arg: str) -> dict:
    out = {}
    for item in filter(None, arg.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"configs/gist.py argument {item!r} is not key=value")
        out[key.strip()] = value.strip()
    unknown = set(out) - {"dataset", "shots", "root"}
    if unknown:
        raise ValueError(f"configs/gist.py: unknown argument(s) {sorted(unknown)}; expected dataset, shots, root")
    return out


def get_config(arg: str = "dataset=cub,shots=5"):
    a = _parse(arg)
    dataset, shots = a.get("dataset", "cub"), a.get("shots", "5")
    if dataset not in FOLDERS:
        raise ValueError(f"configs/gist.py: dataset={dataset!r} is not one of {sorted(FOLDERS)}")
    if shots not in ("all", "5", "3", "1"):
        raise ValueError(f"configs/gist.py: shots={shots!r} is not one of all, 5, 3, 1")
    folder = os.path.join(a.get("root", os.path.join("data", "gist")), FOLDERS[dataset])

    c = gist.default_config()
    c.model.init = "ViT-L/14@336px"
    c.gist.match_model = "ViT-B-32/laion2b_s34b_b79k"  # open_clip's LAION ViT-B/32 (GELU), as GIST's code
    c.data.source = "gist"
    c.data.metadata = os.path.join(folder, "metadata.csv" if shots == "all" else f"metadata_{shots}shot.csv")
    c.data.image_dir = os.path.join(folder, "images")
    c.data.num_captions = 5
    if dataset in ("cub", "fitzpatrick40"):
        c.data.descriptions = os.path.join(folder, "long_captions.json")
    else:
        c.gist.stages = ("finetune", "embed", "evaluate")
        c.data.captions = os.path.join(folder, "captions_top5.json")
    c.train.global_batch = 32
    c.train.epochs = 10
    c.train.save_every = 500
    return c
