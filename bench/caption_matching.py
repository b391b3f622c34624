"""Caption matching throughput: ``jaxgist.methods.caption_matching`` against GIST's per-image loop in PyTorch.

GIST's ``caption_matching.py`` (github.com/emu1729/GIST) encodes the descriptions of every class
once before its loop (per class, plus once more all together for a score it no longer uses), then
for each training image, one at a time: opens and preprocesses the image, encodes it, normalizes,
computes ``softmax(100 * image @ class_texts.T)`` against the descriptions of the image's own
class, and keeps ``np.argsort(-probs)[:5]``. It also rewrites the whole output JSON after every
image (``--gist_json_dumps`` reproduces that; off by default, so that the reference's time is its
model work).

This script reproduces that loop with Hugging Face's PyTorch ``CLIPModel`` (a small random model,
``save_pretrained`` to a temporary directory) and ``CLIPImageProcessor`` (``--reference_preprocess
hf``; ``ours`` uses ``jaxgist.data.transforms.clip_eval_preprocess``, the same pixels, faster), and
runs ``caption_matching.match_indices`` on a ``jaxgist.models.clip.load`` of the same directory
(identical weights), over the same generated dataset: ``synthetic.write_dataset`` JPEGs and, per
class, a number of distinct synthetic descriptions drawn from ``--descriptions`` (GIST's CUB file
has 6 per class, its Fitzpatrick40 file 50 to 110, mean 78.5). Both sides tokenize with
``jaxgist.models.clip.tokenizer`` (OpenAI's ids, as open_clip gives GIST).

    python bench/caption_matching.py [--model tiny] [--num_classes 20] [--images_per_class 40]
                                     [--descriptions 6,80] [--k 5] [--batch_size 64]

Reported: images/s of the reference (text encoding + loop), of ours cold (first call: jit
compilation included) and warm (second call), the speedup warm and cold, and agreement: for every
image, whether both give the same top-k in the same order; disagreements are split into near-ties
(the reference's scores of the differing descriptions within ``--tie_tol``) and real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

MODELS = {
    # (vision: image, patch, width, layers, heads, mlp), (text: width, layers, heads, mlp), projection
    "tiny": ((224, 32, 64, 2, 2, 256), (64, 2, 2, 256), 64),
    "small": ((224, 32, 256, 4, 4, 1024), (256, 4, 4, 1024), 256),
    "vit-b-32": ((224, 32, 768, 12, 12, 3072), (512, 12, 8, 2048), 512),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--num_classes", type=int, default=20)
    p.add_argument("--images_per_class", type=int, default=60)
    p.add_argument("--image_px", type=int, default=224, help="side of the generated JPEGs")
    p.add_argument("--descriptions", default="6,80", help="min,max distinct descriptions per class")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="grain decoding processes for ours")
    p.add_argument("--reference_preprocess", default="hf", choices=("hf", "ours"))
    p.add_argument("--reference_images", type=int, default=None,
                   help="time the reference on only the first N images (its rate is per image; agreement "
                        "is then checked on those)")
    p.add_argument("--gist_json_dumps", action="store_true",
                   help="the reference rewrites the output JSON after every image, as GIST's script does")
    p.add_argument("--torch_threads", type=int, default=1,
                   help="torch intra-op threads for the reference (0: torch's default). At batch 1 a small "
                        "model gains nothing from more, and on a busy machine OpenMP spin-waiting can make "
                        "2 threads many times slower than 1")
    p.add_argument("--tie_tol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default=None, help="write the dataset here instead of a temporary directory")
    return p.parse_args()


def make_descriptions(class_names, species, lo, hi, seed):
    """Distinct synthetic descriptions per class, counts uniform in [lo, hi]."""
    from jaxgist.data import synthetic

    rng = np.random.default_rng(seed)
    out = []
    for sp in species:
        n = int(rng.integers(lo, hi + 1))
        texts = list(dict.fromkeys(synthetic.class_descriptions(sp, 3 * n)))
        j = 0
        while len(texts) < n:  # top up with variants if the templates repeat
            texts.append(f"{texts[j % len(texts)]} Seen from angle {j}.")
            j += 1
        out.append(texts[:n])
    assert [sp.name for sp in species] == list(class_names)
    return out


def save_hf_model(directory, spec, seed):
    import torch
    import transformers

    (img, patch, vw, vl, vh, vm), (tw, tl, th, tm), proj = spec
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        vision_config=dict(image_size=img, patch_size=patch, hidden_size=vw, num_hidden_layers=vl,
                           num_attention_heads=vh, intermediate_size=vm, hidden_act="quick_gelu"),
        text_config=dict(vocab_size=49408, max_position_embeddings=77, hidden_size=tw, num_hidden_layers=tl,
                         num_attention_heads=th, intermediate_size=tm, hidden_act="quick_gelu",
                         eos_token_id=2),  # 2: pool at the argmax id (OpenAI's end token)
        projection_dim=proj)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # HF's tiny init std makes near-identical embeddings; spread them out
        for prm in model.parameters():
            if prm.ndim > 0:
                prm.add_(0.05 * torch.randn_like(prm))
    model.save_pretrained(directory)
    return model


def _features(out):
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


def reference_matching(model, descriptions, ids_all, ids_by_class, records, k, image_size, preprocess,
                       json_path):
    """GIST's loop: texts once (all together, then per class), then one image at a time."""
    import torch
    from PIL import Image

    from jaxgist.data import images, transforms

    if preprocess == "hf":
        from transformers import CLIPImageProcessor

        processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                       crop_size={"height": image_size, "width": image_size})

        def pixels(path):
            return processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
    else:
        def pixels(path):
            x = transforms.clip_eval_preprocess(images.load_image(path), image_size)
            return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]

    t0 = time.perf_counter()
    with torch.no_grad():
        all_features = _features(model.get_text_features(input_ids=torch.from_numpy(ids_all).long()))
        all_features /= all_features.norm(dim=-1, keepdim=True)  # GIST computes it; the result is unused
        class_features = []
        for ids in ids_by_class:
            f = _features(model.get_text_features(input_ids=torch.from_numpy(ids).long()))
            class_features.append(f / f.norm(dim=-1, keepdim=True))
    t_text = time.perf_counter() - t0

    top, cos, out = [], [], {}
    t1 = time.perf_counter()
    for r in records:
        x = pixels(r["path"])
        with torch.no_grad():
            f = _features(model.get_image_features(pixel_values=x))
            f /= f.norm(dim=-1, keepdim=True)
            texts = class_features[r["label"]]
            sims = (f @ texts.T).flatten()
            probs = (100.0 * sims).softmax(dim=-1).numpy()
        order = np.argsort(-probs)[:k]
        top.append(order)
        cos.append(sims.numpy())
        if json_path:
            out[r["filename"]] = [descriptions[r["label"]][i] for i in order]
            with open(json_path, "w") as f_out:
                json.dump(out, f_out)
    t_loop = time.perf_counter() - t1
    return top, cos, t_text, t_loop


def main():
    args = parse_args()
    lo, hi = (int(x) for x in args.descriptions.split(","))
    import torch  # (before JAX starts its threads)

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    from jaxgist.data import synthetic
    from jaxgist.data.sources import GistSource
    from jaxgist.methods import caption_matching
    from jaxgist.models import clip
    from jaxgist.models.clip import tokenizer

    print(f"cpu cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f} "
          f"(the machine is shared: other processes take their share)")
    tmp = tempfile.TemporaryDirectory()
    data_dir = args.data_dir or os.path.join(tmp.name, "data")
    t0 = time.perf_counter()
    ds = synthetic.write_dataset(data_dir, num_classes=args.num_classes, train_per_class=args.images_per_class,
                                 val_per_class=0, test_per_class=0, image_size=args.image_px, seed=args.seed,
                                 shots=())
    species = synthetic.species_list(args.num_classes)
    descriptions = make_descriptions(ds.class_names, species, lo, hi, args.seed)
    counts = [len(d) for d in descriptions]
    source = GistSource(ds.metadata, ds.image_dir, split="train")
    print(f"data: {len(source)} train images ({args.image_px}px JPEG) of {args.num_classes} classes, "
          f"{sum(counts)} descriptions ({min(counts)} to {max(counts)} per class), k={args.k} "
          f"[{time.perf_counter() - t0:.1f} s]")

    model_dir = os.path.join(tmp.name, "model")
    ref = save_hf_model(model_dir, MODELS[args.model], args.seed)
    ours = clip.load(model_dir)
    size = ours.config.vision.image_size
    tok = tokenizer.load()
    print(f"model: random HF CLIPModel '{args.model}' ({sum(p.numel() for p in ref.parameters()) / 1e6:.1f}M "
          f"parameters, {size}px), loaded into jaxgist from the same directory")

    # Reference.
    records = list(source)[: args.reference_images]
    ids_all = tok([t for d in descriptions for t in d])
    ids_by_class = [tok(d) for d in descriptions]
    json_path = os.path.join(tmp.name, "ref.json") if args.gist_json_dumps else None
    ref_top, ref_cos, t_text, t_loop = reference_matching(
        ref, descriptions, ids_all, ids_by_class, records, args.k, size, args.reference_preprocess, json_path)
    # Images/s over the whole dataset (the loop's time extrapolated when it ran on a prefix).
    ref_rate = len(source) / (t_text + t_loop * len(source) / len(records))
    print(f"reference (GIST loop, PyTorch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"preprocess={args.reference_preprocess}{', JSON rewritten per image' if json_path else ''}): "
          f"texts {t_text:.2f} s + {len(records)} images {t_loop:.2f} s -> {ref_rate:.1f} images/s "
          f"({len(records) / t_loop:.1f} images/s in the loop alone)")

    # Ours: cold (compiles) then warm.
    def run():
        t = time.perf_counter()
        m = caption_matching.match_indices(ours, tok, source, descriptions, k=args.k, batch_size=args.batch_size,
                                           workers=args.workers)
        return m, time.perf_counter() - t

    m, t_cold = run()
    m, t_warm = run()
    n = len(m.filenames)
    cold_rate, warm_rate = n / t_cold, n / t_warm
    print(f"ours (jaxgist, batch {args.batch_size}, {args.workers} grain workers): cold {t_cold:.2f} s -> "
          f"{cold_rate:.1f} images/s (jit compilation included); warm {t_warm:.2f} s -> {warm_rate:.1f} images/s")

    # Agreement.
    same = near_tie = differ = 0
    worst = []
    for i, r in enumerate(records):
        assert m.filenames[i] == r["filename"]
        a, b = list(ref_top[i]), list(m.slots[i, : m.counts[i]])
        if a == b:
            same += 1
            continue
        cos = ref_cos[i]
        # Where they first differ, are the two descriptions' reference scores within the tolerance?
        j = next(j for j in range(len(a)) if a[j] != b[j])
        gap = abs(float(cos[a[j]]) - float(cos[b[j]]))
        if gap <= args.tie_tol:
            near_tie += 1
        else:
            differ += 1
            worst.append((r["filename"], a, b, gap))
    print(f"agreement: {same}/{len(records)} images with the same top-{args.k} in the same order, "
          f"{near_tie} differing only at near-ties (|cos gap| <= {args.tie_tol}), {differ} real disagreements")
    for name, a, b, gap in worst[:5]:
        print(f"  {name}: reference {a}, ours {b} (cos gap {gap:.2e})")
    print(f"speedup: {warm_rate / ref_rate:.1f}x warm, {cold_rate / ref_rate:.1f}x cold "
          f"(load average after: {os.getloadavg()[0]:.2f})")
    tmp.cleanup()
    return 0 if differ == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
