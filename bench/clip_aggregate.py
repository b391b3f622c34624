"""CgT-GAN's CLIP-aggregated targets: ``jaxgist.methods.clip_aggregate.aggregate`` (float32, blockwise
online softmax over a memory-mapped corpus) against the float64 reference formula, in one run.

For every image embedding v, ``sum_j softmax_j(t cos(v, c_j)) c_j`` over the whole corpus (CgT-GAN,
``preprocess/generate_embedding.py``: t = 100 COCO, 125 Flickr30k, 175 GCC). The inputs are random
CLIP-like embeddings (Gaussian noise plus a shared direction: image-sentence cosines ~0.26 +- 0.04,
corpus rows of varied norms), written to ``.npy`` files in a temporary directory; every
implementation runs in its own child process, reading the images with ``np.load`` and the corpus with
``np.load(mmap_mode="r")``, so that its peak resident memory (``ru_maxrss`` of the child) is its own (the
data are written by another child: a child's ``ru_maxrss`` starts at its parent's peak):

- ``ours``: ``clip_aggregate.aggregate`` (jit; the corpus read block by block, its mapping released
  after each block). Time includes compilation.
- ``reference``: ``clip_aggregate.reference_aggregate``, CgT-GAN's arithmetic in NumPy float64
  (cosines, ``exp(cos * t)`` without max subtraction, weights / sum, sum of unnormalized ``c_j w_j``),
  vectorized over image blocks; it holds the corpus in memory as float64, as the reference holds it on
  its GPU. (The reference's own loop, one image at a time, would take hours here.)
- ``torch`` (``--torch``): the same blockwise online softmax as ours written in PyTorch float32,
  eager, with the same block sizes.

Printed: seconds and images/s of each, the speedup of ours over the reference (reference seconds /
ours), the largest differences from the reference (max |diff|, and relative to the largest |target|),
and each child's peak resident memory.

    python bench/clip_aggregate.py [--images 10000] [--corpus 500000] [--dim 768] [--temperature 100]
                                   [--torch] [--image_block 1024] [--corpus_block 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

IMPLEMENTATIONS = ("ours", "reference", "torch")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--corpus", type=int, default=500000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--temperature", type=float, default=100.0)
    p.add_argument("--image_block", type=int, default=1024, help="ours and torch")
    p.add_argument("--corpus_block", type=int, default=16384, help="ours and torch")
    p.add_argument("--torch", action="store_true", help="also run the PyTorch float32 blockwise version")
    p.add_argument("--skip_reference", action="store_true", help="no reference run (then no differences)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=IMPLEMENTATIONS + ("data",), help=argparse.SUPPRESS)  # internal: run one
    p.add_argument("--dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def write_data(directory, n, m, d, seed, chunk=65536):
    """images.npy [n, d] and corpus.npy [m, d] float32, written in chunks (the parent stays small)."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=d)
    shared *= 0.6 * np.sqrt(d) / np.linalg.norm(shared)  # cos(image, sentence) ~ 0.36 / 1.36 ~ 0.26
    for name, rows, scaled in (("images", n, False), ("corpus", m, True)):
        out = np.lib.format.open_memmap(os.path.join(directory, f"{name}.npy"), mode="w+", dtype=np.float32,
                                        shape=(rows, d))
        for a in range(0, rows, chunk):
            k = min(chunk, rows - a)
            x = rng.standard_normal((k, d), dtype=np.float32) + shared.astype(np.float32)
            if scaled:
                x *= rng.uniform(0.5, 2.0, size=(k, 1)).astype(np.float32)
            out[a:a + k] = x
        out.flush()
        del out


# ------------------------------------------------------------------------------------------------
# The implementations (each in a child process)
# ------------------------------------------------------------------------------------------------

def torch_aggregate(images, corpus, t, image_block, corpus_block):
    """The blockwise online softmax of ours, in PyTorch float32 (eager)."""
    import torch

    x = torch.from_numpy(np.asarray(images, np.float32))
    x = x / x.norm(dim=1, keepdim=True)
    n, d = x.shape
    m_run = torch.full((n,), -float("inf"))
    s_run = torch.zeros(n)
    acc = torch.zeros(n, d)
    with torch.no_grad():
        for a in range(0, corpus.shape[0], corpus_block):
            c = torch.from_numpy(np.array(corpus[a:a + corpus_block], np.float32))
            u = c / c.norm(dim=1, keepdim=True)
            for b in range(0, n, image_block):
                logits = t * (x[b:b + image_block] @ u.T)
                m_new = torch.maximum(m_run[b:b + image_block], logits.max(dim=1).values)
                p = torch.exp(logits - m_new[:, None])
                scale = torch.exp(m_run[b:b + image_block] - m_new)
                s_run[b:b + image_block] = s_run[b:b + image_block] * scale + p.sum(dim=1)
                acc[b:b + image_block] = acc[b:b + image_block] * scale[:, None] + p @ c
                m_run[b:b + image_block] = m_new
    return (acc / s_run[:, None]).numpy()


def run_child(args):
    if args.child == "data":
        return write_data(args.dir, args.images, args.corpus, args.dim, args.seed)
    images = np.load(os.path.join(args.dir, "images.npy"))
    corpus = np.load(os.path.join(args.dir, "corpus.npy"), mmap_mode="r")
    if args.child == "ours":
        from jaxgist.methods import clip_aggregate

        t0 = time.perf_counter()
        out = clip_aggregate.aggregate(images, corpus, args.temperature, image_block=args.image_block,
                                       corpus_block=args.corpus_block)
        seconds = time.perf_counter() - t0
    elif args.child == "reference":
        from jaxgist.methods import clip_aggregate

        t0 = time.perf_counter()
        out = clip_aggregate.reference_aggregate(images, corpus, args.temperature)
        seconds = time.perf_counter() - t0
    else:
        import torch

        t0 = time.perf_counter()
        out = torch_aggregate(images, corpus, args.temperature, args.image_block, args.corpus_block)
        seconds = time.perf_counter() - t0
        args.child = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    np.save(os.path.join(args.dir, f"out_{args.child.split()[0]}.npy"), out)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"name": args.child, "seconds": seconds, "peak_mb": peak_mb}))


def child(args, which):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--dir", args.dir,
           "--temperature", str(args.temperature), "--image_block", str(args.image_block),
           "--corpus_block", str(args.corpus_block), "--images", str(args.images), "--corpus", str(args.corpus),
           "--dim", str(args.dim), "--seed", str(args.seed)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{which} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) if which != "data" else None


# ------------------------------------------------------------------------------------------------

def main():
    args = parse_args()
    if args.child:
        return run_child(args)
    n, m, d = args.images, args.corpus, args.dim
    print(f"cpu cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f} "
          f"(the machine is shared: other processes take their share)")
    with tempfile.TemporaryDirectory() as tmp:
        args.dir = tmp
        t0 = time.perf_counter()
        child(args, "data")  # in a child: Linux keeps a parent's peak resident size in the ru_maxrss of
        # the children it starts (vfork + exec), and writing the corpus maps all of it
        corpus_mb = m * d * 4 / 2**20
        print(f"data: {n} images x {m} corpus sentences, {d}-d float32 (corpus file {corpus_mb:.0f} MB, memory-"
              f"mapped), t = {args.temperature:g}, ours/torch blocks {args.image_block} images x "
              f"{args.corpus_block} sentences [{time.perf_counter() - t0:.1f} s]", flush=True)
        runs = {}
        for which in ("ours",) + (("torch",) if args.torch else ()) + (() if args.skip_reference else ("reference",)):
            runs[which] = child(args, which)
            r = runs[which]
            print(f"{r['name']:<32} {r['seconds']:8.1f} s ({n / r['seconds']:8.1f} images/s)   peak memory "
                  f"{r['peak_mb']:7.0f} MB", flush=True)
        if "reference" in runs:
            ref = np.load(os.path.join(tmp, "out_reference.npy"))
            scale = np.abs(ref).max()
            print(f"speedup (reference s / ours s): {runs['reference']['seconds'] / runs['ours']['seconds']:.2f}x")
            for which in runs:
                if which == "reference":
                    continue
                diff = np.abs(np.load(os.path.join(tmp, f"out_{which}.npy")) - ref)
                big = np.abs(ref) > 0.1 * scale
                print(f"{which} vs reference: max |diff| {diff.max():.3g} (max |target| {scale:.3g}: "
                      f"{diff.max() / scale:.2e} of it), max relative diff where |target| > 10% of that: "
                      f"{(diff[big] / np.abs(ref[big])).max():.2e}")
        if "torch" in runs:
            print(f"ratio torch s / ours s: {runs['torch']['seconds'] / runs['ours']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
