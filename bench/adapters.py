"""Tip-Adapter's (alpha, beta) grid search: jaxgist's compiled search against the reference's Python loop.

    python bench/adapters.py                                   # 200 classes, 16-shot, 512-d, 500 x 50 grid
    python bench/adapters.py --classes 20 --betas 50 --alphas 10 --reference-betas 5   # a quick smoke run

The embeddings are generated to look like CLIP's: unit vectors made of a shared offset (one for images,
another for texts: the "modality gap"), a class direction and noise, so that image-image cosines are
about 0.8 within a class and 0.6 across classes and image-text cosines about 0.3. ``--shots`` training
images per class (``--views`` augmented views each, averaged into the cache keys), ``--val-per-class``
validation and ``--test-per-class`` test images; the text weights are noisy class directions.

Variants, each searching the grid ``reference_grid(--beta-scale, --betas)`` x
``reference_grid(--alpha-scale, --alphas)`` on the validation split:
- ``jax``: ``tip_adapter.search``, the whole grid in one jitted program. ``first`` is its first call,
  compilation included (what one search costs in a fresh process); ``warm`` the fastest of ``--rounds``
  later calls.
- ``torch_reference``: the reference's ``search_hp`` (GitHub gaopengcuhk/Tip-Adapter, ``utils.py``)
  transcribed: for each beta, for each alpha, the affinities ``features @ cache_keys``, the cache and
  zero-shot logits and ``cls_acc``, keeping a strictly better accuracy; float32 (the reference's cache
  values are fp16 on the GPU), on ``--torch-threads`` threads. At ~0.05 s per pair the full grid takes
  about 21 minutes on 2 shared CPU cores, so by default it runs ``--reference-betas`` betas (evenly
  spaced, all alphas) and its full-grid time is that time per pair times the grid's size (every pair
  does the same work); ``--reference-betas 0`` runs the whole grid (measured once: 1,250 s, against
  1,232 s extrapolated from 10 betas, and the same choice as ``jax``).
- ``numpy_hoisted``: the same loop with the loop-invariant work hoisted (affinities and zero-shot
  logits once, cache logits once per beta, then per alpha the logits and accuracy), on the full grid:
  a stronger baseline than the reference's own code.

Every variant's choice is checked against ``jax``'s on the same grid (the sub-grid for a partial
reference run). Speedups are variant time / ``jax`` time, warm and first call.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_embeddings(classes: int, dim: int, shots: int, views: int, val_per_class: int, test_per_class: int,
                    latent: int, image_noise: float, text_noise: float, seed: int):
    """(train views [V, N, dim], train labels), (val x, y), (test x, y), text weights [C, dim]; float32.

    Classes are Gaussian in a ``latent``-dimensional subspace (fine-grained: many classes, few
    directions), where the images' noise also lives (``image_noise``, relative); the texts are the class
    means plus ``text_noise``. A shared offset per modality and a little isotropic noise complete
    CLIP-like unit vectors."""
    rng = np.random.default_rng(seed)
    image_offset, text_offset = _unit(rng.normal(size=(2, dim)))
    basis = np.linalg.qr(rng.normal(size=(dim, latent)))[0].T  # [latent, dim], orthonormal rows
    means = rng.normal(size=(classes, latent)) / np.sqrt(latent)

    def latent_noise(*shape):
        return rng.normal(size=(*shape, latent)) / np.sqrt(latent)

    def images(per_class, num_views=None):
        y = np.repeat(np.arange(classes), per_class)
        z = means[y] + image_noise * latent_noise(len(y))  # the image
        if num_views is not None:  # augmented views: a little more noise each
            z = z[None] + 0.3 * image_noise * latent_noise(num_views, len(y))
        x = 1.0 * image_offset + z @ basis + 0.3 * _unit(rng.normal(size=(*z.shape[:-1], dim)))
        return _unit(x).astype(np.float32), y

    text = _unit(0.8 * text_offset + (means + text_noise * latent_noise(classes)) @ basis)
    return images(shots, views), images(val_per_class), images(test_per_class), text.astype(np.float32)


def torch_reference_search(features, labels, clip_weights, cache_keys, cache_values, beta_list, alpha_list):
    """The reference's search_hp loop (its layout: clip_weights [D, C], cache_keys [D, N]).
    Returns (best_beta, best_alpha, best_acc, pairs evaluated)."""
    import torch

    def cls_acc(output, target, topk=1):
        pred = output.topk(topk, 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        acc = correct[: topk].reshape(-1).float().sum(0, keepdim=True).item()  # float(...numpy()) in numpy 1
        return 100 * acc / target.shape[0]

    features, labels = torch.tensor(features), torch.tensor(labels)
    clip_weights, cache_keys = torch.tensor(clip_weights), torch.tensor(cache_keys)
    cache_values = torch.tensor(cache_values)
    best_acc, best_beta, best_alpha, pairs = 0, 0, 0, 0
    with torch.no_grad():
        for beta in beta_list:
            for alpha in alpha_list:
                affinity = features @ cache_keys
                cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
                clip_logits = 100. * features @ clip_weights
                tip_logits = clip_logits + cache_logits * alpha
                acc = cls_acc(tip_logits, labels)
                pairs += 1
                if acc > best_acc:
                    best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_beta, best_alpha, best_acc / 100, pairs


def numpy_hoisted_search(features, labels, text, keys, values, beta_list, alpha_list):
    """The same loop, loop-invariant work hoisted. Returns (best_beta, best_alpha, best_acc, pairs)."""
    affinity = features @ keys.T
    clip_logits = 100. * features @ text.T
    best, best_beta, best_alpha, pairs = -1, 0, 0, 0
    for beta in beta_list:
        cache_logits = np.exp(-beta * (1.0 - affinity)) @ values
        for alpha in alpha_list:
            correct = int(np.count_nonzero(np.argmax(clip_logits + alpha * cache_logits, axis=1) == labels))
            pairs += 1
            if correct > best:
                best, best_beta, best_alpha = correct, beta, alpha
    return best_beta, best_alpha, best / len(labels), pairs


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--views", type=int, default=10, help="augmented views averaged into each cache key")
    parser.add_argument("--val-per-class", type=int, default=4)
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--latent", type=int, default=16, help="dimension of the class subspace")
    parser.add_argument("--image-noise", type=float, default=0.8)
    parser.add_argument("--text-noise", type=float, default=0.6)
    parser.add_argument("--betas", type=int, default=500, help="beta grid steps")
    parser.add_argument("--alphas", type=int, default=50, help="alpha grid steps")
    parser.add_argument("--beta-scale", type=float, default=20.0)
    parser.add_argument("--alpha-scale", type=float, default=50.0)
    parser.add_argument("--reference-betas", type=int, default=10,
                        help="betas (evenly spaced, with every alpha) the torch reference loop runs; 0: all")
    parser.add_argument("--rounds", type=int, default=3, help="warm calls of the jax search (fastest kept)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="PyTorch intra-op threads (0: PyTorch's default, one per core)")
    parser.add_argument("--variants", default="jax,torch_reference,numpy_hoisted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    import jax
    import torch

    from jaxgist.evaluation import accuracy as evaluation
    from jaxgist.heads import tip_adapter

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    names = args.variants.split(",")
    unknown = sorted(set(names) - {"jax", "torch_reference", "numpy_hoisted"})
    if unknown or "jax" not in names:
        raise SystemExit(f"unknown variants {unknown}" if unknown else "the jax variant is the baseline: keep it")

    (train_x, train_y), (val_x, val_y), (test_x, test_y), text = make_embeddings(
        args.classes, args.dim, args.shots, args.views, args.val_per_class, args.test_per_class, args.latent,
        args.image_noise, args.text_noise, args.seed)
    keys, values = tip_adapter.build_cache(train_x, train_y, args.classes)
    betas = np.asarray(tip_adapter.reference_grid(args.beta_scale, args.betas))
    alphas = np.asarray(tip_adapter.reference_grid(args.alpha_scale, args.alphas))
    grid_pairs = len(betas) * len(alphas)
    if args.reference_betas and args.reference_betas < len(betas):
        ref_betas = betas[np.unique(np.linspace(0, len(betas) - 1, args.reference_betas).round().astype(int))]
    else:
        ref_betas = betas
    gram = keys @ keys.T
    same_class = train_y[:, None] == train_y[None, :]
    np.fill_diagonal(same_class, False)
    info = {
        "jax_device": str(jax.devices()[0]), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(), "classes": args.classes, "dim": args.dim, "shots": args.shots,
        "views": args.views, "cache": int(keys.shape[0]), "val": len(val_y), "test": len(test_y),
        "grid": [len(betas), len(alphas)], "reference_grid": [len(ref_betas), len(alphas)],
        "affinity_same_class_mean": float(gram[same_class].mean()),
        "affinity_other_class_mean": float(gram[~same_class & ~np.eye(len(train_y), dtype=bool)].mean()),
        "image_text_cosine_own_class_mean": float(np.sum(val_x * text[val_y], axis=1).mean()),
        "image_text_cosine_other_class_mean": float((val_x @ text.T).mean()),
    }
    print(json.dumps(info), flush=True)

    def jax_search(b):
        return tip_adapter.search(val_x, val_y, text, keys, values, alphas, b)

    rows = []
    found, first = timed(lambda: jax_search(betas))
    warm = min(timed(lambda: jax_search(betas))[1] for _ in range(max(1, args.rounds)))
    jax_choice = (found.beta, found.alpha)
    test_logits = tip_adapter.tip_logits(test_x, text, keys, values, found.alpha, found.beta)
    rows.append({"variant": "jax", "grid": [len(betas), len(alphas)], "pairs_timed": grid_pairs, "seconds": warm,
                 "first_s": first, "full_grid_s": warm, "beta": found.beta, "alpha": found.alpha,
                 "val_top1": found.val_accuracy, "same_choice": True,
                 **evaluation.accuracy_summary(test_logits, test_y, resamples=0, ks=(1,))})
    print(json.dumps(rows[-1]), flush=True)

    if "torch_reference" in names:
        (beta, alpha, acc, pairs), seconds = timed(lambda: torch_reference_search(
            _unit(val_x), val_y, text.T.copy(), keys.T.copy(), values, list(ref_betas), list(alphas)))
        sub = found if len(ref_betas) == len(betas) else jax_search(ref_betas)
        rows.append({"variant": "torch_reference", "grid": [len(ref_betas), len(alphas)], "pairs_timed": pairs,
                     "seconds": seconds, "full_grid_s": seconds / pairs * grid_pairs, "beta": beta, "alpha": alpha,
                     "val_top1": acc, "same_choice": (beta, alpha) == (sub.beta, sub.alpha),
                     "jax_choice_on_this_grid": [sub.beta, sub.alpha]})
        print(json.dumps(rows[-1]), flush=True)

    if "numpy_hoisted" in names:
        (beta, alpha, acc, pairs), seconds = timed(lambda: numpy_hoisted_search(
            _unit(val_x), val_y, text, keys, values, list(betas), list(alphas)))
        rows.append({"variant": "numpy_hoisted", "grid": [len(betas), len(alphas)], "pairs_timed": pairs,
                     "seconds": seconds, "full_grid_s": seconds, "beta": beta, "alpha": alpha, "val_top1": acc,
                     "same_choice": (beta, alpha) == jax_choice})
        print(json.dumps(rows[-1]), flush=True)

    zero_shot = evaluation.topk_accuracy(_unit(test_x) @ text.T, test_y)
    print(f"\nTip-Adapter test top-1 at the chosen (alpha={found.alpha:.4g}, beta={found.beta:.4g}): "
          f"{rows[0]['test_top1']:.4f}; zero-shot: {zero_shot:.4f}; validation top-1 {found.val_accuracy:.4f}")
    print(f"\n| variant | grid timed | seconds timed | full {len(betas)}x{len(alphas)} grid s | speedup (jax warm) | "
          f"speedup (jax first call) | chosen (beta, alpha) | val top1 | same choice as jax |")
    print("|---|---|---|---|---|---|---|---|---|")
    def speedup(ratio):
        return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2f}x"

    for r in rows:
        if r["variant"] == "jax":
            timed_text = f"{r['seconds']:.3f} warm, {r['first_s']:.3f} first"
        else:
            timed_text = f"{r['seconds']:.2f}"
        estimate = "" if r["pairs_timed"] == grid_pairs else " (extrapolated)"
        print(f"| {r['variant']} | {r['grid'][0]}x{r['grid'][1]} | {timed_text} | {r['full_grid_s']:.2f}{estimate} | "
              f"{speedup(r['full_grid_s'] / warm)} | {speedup(r['full_grid_s'] / first)} | "
              f"({r['beta']:.4g}, {r['alpha']:.4g}) | {r['val_top1']:.4f} | {r['same_choice']} |")
    for r in rows[1:]:
        print(f"ratio {r['variant']} / jax (warm): {r['full_grid_s'] / warm:.1f}x")
    info["load_average_after"] = os.getloadavg()
    print(f"load average before: {info['load_average_before']}, after: {info['load_average_after']}")
    if not all(r["same_choice"] for r in rows):
        print("WARNING: the variants chose different (alpha, beta)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=2, default=float)


if __name__ == "__main__":
    main()
