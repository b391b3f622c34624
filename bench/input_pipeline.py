"""Training input pipeline throughput: decode + augment + tokenize + batch, grain against torch.

Measures images/s of the GIST training pipeline (``jaxgist.data.pipeline.train_dataset``: JPEG
decode, RandomResizedCrop + flip at 224 px, CLIP normalization, caption tokenization, batching)
with 0, 1 and 2 grain worker processes, against a ``torch.utils.data.DataLoader`` doing the same
work with ``num_workers`` 0, 1 and 2, on the same JPEG files in the same run.

    python bench/input_pipeline.py [--num_images 512] [--batch_size 32] [--batches 30]
                                   [--warmup 2] [--workers 0,1,2] [--repeats 1]

The script first writes a GIST-format dataset into a temporary directory (or ``--data_dir``):
synthetic photo-like JPEGs of CUB-like sizes (long side 500 px, short side 280-400 px; a smooth
colour field, texture, shapes and sensor noise, so decoding costs what a photo costs rather than
what a flat colour costs), a metadata CSV and a captions JSON. Both sides read it through
``GistSource(..., split="train", captions=..., num_captions=...)`` and
``pipeline.PairedCaptions``, so the grain side runs the product code path unchanged
(``shard_index=0, shard_count=1`` are passed explicitly, which is what a single process gets, so
that the benchmark does not start a JAX backend before torch forks its workers).

The torch side makes each example with the same functions (``images.load_image``,
``transforms.train_preprocess``, the tokenizer from ``jaxgist.models.clip.tokenizer.load()``), visits the
records in grain's shuffled order and gives each one the per-record random stream grain's
``random_map`` gives it (Philox keyed by the seed, counter set to the record's position). So both
sides do the same work, and the first batch of every configuration is checked against examples
recomputed in this process: pixels, token ids, labels and pair ids must be identical. torch
batches with its default collate (tensors in shared memory) and, as a second variant, with a numpy
``np.stack`` collate (what grain's ``batch`` does; the batch is then pickled through a pipe).
torch's main process runs with 1 intra-op thread (``--torch_threads``; its workers always do): the
default collate's ``torch.stack`` runs there at 0 workers, and with 2 OpenMP threads on a busy
2-core machine one stack of a batch can take hundreds of milliseconds of spin-waiting.

Timing per configuration: ``startup s`` is from creating the iterator to receiving the first batch
(worker start-up included: grain spawns its workers and re-imports JAX in each, torch forks);
``steady img/s`` counts the ``--batches`` batches after ``--warmup`` batches (the first batch is
the first warm-up batch); ``overall img/s`` counts every batch from iterator creation. The loop
does nothing with a batch but check it, so the numbers are the pipeline's production rate. With
``--repeats`` > 1 the configurations run interleaved and the median of each column is reported.

Notes for reading the numbers: grain with 0 workers still decodes in 2 threads of the main process
(``ReadOptions(num_threads=2)`` in the pipeline), torch with 0 workers is strictly sequential. On a
2-core machine, 2 workers plus the main process (which receives and, for grain, interleaves the
batches) oversubscribe the cores, and other processes on the machine take their share too: the
load average is printed before and after.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from jaxgist.data import images, transforms

# Only light imports at module level (no torch, no JAX): grain spawns its worker processes, and
# each re-imports this file.

SPECIES = [
    "Black footed Albatross", "Laysan Albatross", "Sooty Albatross", "Groove billed Ani",
    "Crested Auklet", "Least Auklet", "Parakeet Auklet", "Rhinoceros Auklet",
    "Brewer Blackbird", "Red winged Blackbird", "Rusty Blackbird", "Yellow headed Blackbird",
]
_COLOURS = ["black", "white", "grey", "brown", "red", "yellow", "olive", "blue", "buff", "rufous"]
_PARTS = ["crown", "wings", "breast", "back", "tail", "throat", "nape", "belly", "bill", "eyering"]
_EXTRAS = ["perched on a thin branch", "standing on wet sand", "flying low over the water",
           "among dense green leaves", "with a short conical bill", "with long pointed wings",
           "with faint streaks on the flanks", "against a pale sky"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_images", type=int, default=512, help="JPEG files to generate")
    p.add_argument("--num_captions", type=int, default=2, help="captions per image (pairs = images x captions)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts, for both loaders")
    p.add_argument("--batches", type=int, default=30, help="timed batches per configuration, after warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (>= 1; includes the first batch)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repetitions; medians are reported")
    p.add_argument("--torch_collate", default="default,numpy",
                   help="comma-separated torch collate variants: default (torch tensors) and/or numpy")
    p.add_argument("--torch_threads", type=int, default=1,
                   help="torch intra-op threads in the main process (0: torch's default); see the docstring")
    p.add_argument("--skip_torch", action="store_true", help="time grain only")
    p.add_argument("--prefetch", type=int, default=2, help="train_dataset's prefetch (grain buffers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default=None, help="write the dataset here instead of a temporary directory")
    args = p.parse_args()
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    args.torch_collate = [c.strip() for c in args.torch_collate.split(",") if c.strip()]
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first batch is always a warm-up batch)")
    if any(w < 0 for w in args.workers):
        p.error("--workers must be non-negative")
    if not set(args.torch_collate) <= {"default", "numpy"}:
        p.error("--torch_collate takes 'default' and/or 'numpy'")
    return args


# ---------------------------------------------------------------------------------------------
# Dataset generation
# ---------------------------------------------------------------------------------------------


def _photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3]: a photo-like picture (smooth colour field, texture, shapes, noise)."""
    coarse = rng.integers(30, 230, size=(int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3), dtype=np.uint8)
    base = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        x1, y1 = x0 + rng.uniform(20, width / 2), y0 + rng.uniform(20, height / 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            pts = [(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))) for _ in range(int(rng.integers(3, 6)))]
            draw.polygon(pts, fill=colour)
    img = np.asarray(base, np.float32)
    # texture at 1/4 resolution (foliage, feathers, sand), then per-pixel sensor noise
    tex = rng.normal(0, 18, size=(height // 4 + 1, width // 4 + 1)).astype(np.float32)
    tex = np.asarray(Image.fromarray(tex, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    img += tex[..., None]
    img += rng.normal(0, 5, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _caption(rng: np.random.Generator) -> str:
    c1, c2 = rng.choice(_COLOURS, 2, replace=False)
    p1, p2 = rng.choice(_PARTS, 2, replace=False)
    return f"this bird has a {c1} {p1} and {c2} {p2}, {rng.choice(_EXTRAS)}"


def make_dataset(data_dir: str, num_images: int, num_captions: int, seed: int) -> dict:
    """Writes images/*.jpg, metadata.csv and captions.json; returns paths and size statistics."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(data_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    rows, captions, sizes, nbytes = [], {}, [], []
    for i in range(num_images):
        label = i % len(SPECIES)
        long_side, short_side = 500, int(rng.integers(280, 401))
        h, w = (short_side, long_side) if rng.random() < 0.7 else (long_side, short_side)
        filename = f"{label:03d}.{SPECIES[label].replace(' ', '_')}/img_{i:05d}.jpg"
        path = os.path.join(image_dir, filename)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(_photo(rng, h, w)).save(path, quality=90)
        rows.append((filename, label, SPECIES[label], "train"))
        captions[filename] = [_caption(rng) for _ in range(num_captions)]
        sizes.append((h, w))
        nbytes.append(os.path.getsize(path))
    metadata = os.path.join(data_dir, "metadata.csv")
    with open(metadata, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label", "species", "split"])
        writer.writerows(rows)
    captions_file = os.path.join(data_dir, "captions.json")
    with open(captions_file, "w") as f:
        json.dump(captions, f)
    sizes = np.array(sizes)
    return {"metadata": metadata, "image_dir": image_dir, "captions": captions_file,
            "mean_hw": sizes.mean(0), "mean_kb": float(np.mean(nbytes)) / 1024}


# ---------------------------------------------------------------------------------------------
# The torch side
# ---------------------------------------------------------------------------------------------


class RecordRng:
    """The random stream of record ``index``, as grain's ``random_map`` makes it: a Philox generator
    keyed by the seed with its counter set to (0, 0, 0, index). One generator, reset per record."""

    def __init__(self, seed: int):
        self.seed = seed
        self._rng = None

    def __call__(self, index: int) -> np.random.Generator:
        if self._rng is None:  # created lazily, so each worker process makes its own
            self._rng = np.random.Generator(np.random.Philox(self.seed))
        state = self._rng.bit_generator.state
        state["state"]["counter"] = np.array([0, 0, 0, index], dtype=np.uint64)
        state["buffer"] = np.zeros(4, dtype=np.uint64)
        state["buffer_pos"] = 4
        state["has_uint32"] = 0
        state["uinteger"] = 0
        self._rng.bit_generator.state = state
        return self._rng


class TrainExamples:
    """Map-style dataset for ``torch.utils.data.DataLoader``: item ``i`` is the training example
    grain's pipeline makes at position ``i`` (record ``paired[order[i]]``, random stream ``i``)."""

    def __init__(self, paired, order: np.ndarray, length: int, image_size: int, tokenize, seed: int):
        self.paired, self.order, self.length = paired, order, length
        self.image_size, self.tokenize, self.rng = image_size, tokenize, RecordRng(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        record = self.paired[int(self.order[i % len(self.order)])]
        image = images.load_image(record["path"])
        return {
            "image": transforms.train_preprocess(image, self.image_size, self.rng(i)),
            "ids": self.tokenize([record["text"]])[0],
            "label": np.int32(record["label"]),
            "pair": np.int64(record["index"] * self.paired.num_captions + record["caption_index"]),
        }


def numpy_collate(examples: list[dict]) -> dict:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def as_numpy(batch: dict) -> dict:
    return {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in batch.items()}


def time_loader(make_iter, close, total_batches: int, warmup: int) -> dict:
    """Pulls ``total_batches`` batches; returns timings, counts, batch shapes and the first batch."""
    t0 = time.perf_counter()
    it = make_iter()
    stamps, shapes, images = [], set(), 0
    first = None
    for b in range(total_batches):
        batch = next(it)
        stamps.append(time.perf_counter())
        image = batch["image"]
        shapes.add((tuple(image.shape), tuple(batch["ids"].shape)))
        images += image.shape[0]
        if b == 0:
            first = {k: np.array(v) for k, v in as_numpy(batch).items()}  # copy out of shared memory
    close(it)
    timed_images = images - first["image"].shape[0] * warmup if len(shapes) == 1 else float("nan")
    steady_s = stamps[-1] - stamps[warmup - 1]
    return {
        "startup_s": stamps[0] - t0,
        "steady": timed_images / steady_s if steady_s > 0 else float("nan"),
        "overall": images / (stamps[-1] - t0),
        "batches": total_batches,
        "images": images,
        "shapes": shapes,
        "first": first,
    }


def check_first_batch(first: dict, reference: list[dict]) -> str:
    expected = numpy_collate(reference)
    problems = []
    for key, want in expected.items():
        got = first.get(key)
        if got is None or got.shape != want.shape:
            problems.append(f"{key} shape {None if got is None else got.shape} != {want.shape}")
        elif not np.array_equal(got, want):
            diff = np.abs(got.astype(np.float64) - want.astype(np.float64)).max()
            problems.append(f"{key} differs (max |diff| {diff:.3g})")
    return "identical" if not problems else "MISMATCH: " + "; ".join(problems)


def stage_costs(paired, order, image_size: int, tokenize, seed: int, n: int = 24) -> dict:
    """Median milliseconds per image of each stage, single-threaded in this process."""
    rng = RecordRng(seed)
    costs = {k: [] for k in ("read file", "decode", "crop+resize+flip", "normalize", "tokenize")}
    for i in range(min(n, len(order))):
        record = paired[int(order[i])]
        t = time.perf_counter()
        with open(record["path"], "rb") as f:
            data = f.read()
        t1 = time.perf_counter()
        pixels = images.decode_image(data)
        t2 = time.perf_counter()
        crop = transforms.random_resized_crop_flip(pixels, image_size, rng(i))
        t3 = time.perf_counter()
        transforms.normalize(crop)
        t4 = time.perf_counter()
        tokenize([record["text"]])
        t5 = time.perf_counter()
        for k, a, b in zip(costs, (t, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
            costs[k].append(b - a)
    return {k: 1e3 * statistics.median(v) for k, v in costs.items()}


def main():
    args = parse_args()
    import grain
    import PIL
    from absl import flags

    # grain reads absl flags (e.g. when starting workers); this script parses its own arguments
    # with argparse, so let absl take its defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])

    from jaxgist.data import pipeline
    from jaxgist.data.sources import GistSource
    from jaxgist.models.clip import tokenizer

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_before = os.getloadavg()
    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="jaxgist_input_bench_")
        data_dir = tmp.name
    else:
        data_dir = args.data_dir
    t = time.perf_counter()
    data = make_dataset(data_dir, args.num_images, args.num_captions, args.seed)
    gen_s = time.perf_counter() - t

    source = GistSource(data["metadata"], data["image_dir"], split="train", captions=data["captions"],
                        num_captions=args.num_captions)
    paired = pipeline.PairedCaptions(source, args.num_captions)
    tok = tokenizer.load()
    bs = args.batch_size
    total_batches = args.warmup + args.batches
    # grain's record order: shuffle then repeat, as the pipeline does, over positions instead of
    # records (the permutation depends only on the number of pairs, the seed and the epoch).
    positions = grain.MapDataset.range(len(paired)).shuffle(seed=args.seed).repeat(None)
    order = np.array([positions[i] for i in range(total_batches * bs)], dtype=np.int64)
    examples = TrainExamples(paired, order, total_batches * bs, args.image_size, tok, args.seed)

    h, w = data["mean_hw"]
    print(f"data: {len(source)} JPEGs (mean {h:.0f}x{w:.0f} px, {data['mean_kb']:.0f} KiB, written in {gen_s:.1f} s "
          f"to {data_dir}), {args.num_captions} captions each -> {len(paired)} pairs")
    print(f"batches: {bs} x {args.image_size} px float32 ({bs * args.image_size ** 2 * 3 * 4 / 2 ** 20:.1f} MiB) "
          f"+ 77 token ids; {args.warmup} warm-up + {args.batches} timed batches per configuration, "
          f"{args.repeats} repeat(s)")
    costs = stage_costs(paired, order, args.image_size, tok, args.seed)
    per_image = sum(costs.values())
    print("per image, one thread (median): " + ", ".join(f"{k} {v:.2f} ms" for k, v in costs.items())
          + f"; total {per_image:.2f} ms (~{1e3 / per_image:.0f} img/s per busy core)")
    torch = None
    if not args.skip_torch:
        import torch

        if args.torch_threads > 0:
            torch.set_num_threads(args.torch_threads)
    print(f"machine: {cores} CPU core(s), load average {load_before[0]:.2f} before the run; "
          f"grain {getattr(grain, '__version__', '?')}, "
          + (f"torch {torch.__version__} ({torch.get_num_threads()} intra-op thread(s) in this process), " if torch else "")
          + f"Pillow {PIL.__version__}, numpy {np.__version__}", flush=True)

    configs = []
    for workers in args.workers:
        configs.append(("grain", workers, "grain"))
        if torch is not None:
            configs.extend(("torch", workers, c) for c in args.torch_collate)

    def run(loader, workers, collate):
        if loader == "grain":
            ds = pipeline.train_dataset(source, image_size=args.image_size, tokenize=tok, global_batch=bs,
                                        num_captions=args.num_captions, seed=args.seed, workers=workers,
                                        prefetch=args.prefetch, shard_index=0, shard_count=1)
            return time_loader(lambda: iter(ds), lambda it: it.close() if hasattr(it, "close") else None,
                               total_batches, args.warmup)
        dl = torch.utils.data.DataLoader(examples, batch_size=bs, shuffle=False, drop_last=True,
                                         num_workers=workers,
                                         collate_fn=numpy_collate if collate == "numpy" else None)

        def close(it):
            if hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()

        return time_loader(lambda: iter(dl), close, total_batches, args.warmup)

    results = {c: [] for c in configs}
    for r in range(args.repeats):
        for c in configs:
            res = run(*c)
            results[c].append(res)
            print(f"  [{r + 1}/{args.repeats}] {c[0]:<5} workers={c[1]} batching={c[2]:<7}: startup "
                  f"{res['startup_s']:.2f} s, steady {res['steady']:.1f} img/s", flush=True)

    # --- correctness: counts, shapes, first batch ---------------------------------------------
    shapes = set().union(*(res["shapes"] for rs in results.values() for res in rs))
    counts = {res["images"] for rs in results.values() for res in rs}
    first_check = {}
    for c, rs in results.items():
        loader, workers, _ = c
        # grain's workers each batch their own slice (worker k: positions k, k + n, ...); worker 0's
        # batch comes first. torch hands out contiguous batches in order.
        step = workers if loader == "grain" and workers > 1 else 1
        reference = [examples[i] for i in range(0, bs * step, step)]
        first_check[c] = check_first_batch(rs[0]["first"], reference)

    # --- report ---------------------------------------------------------------------------------
    med = lambda c, key: statistics.median(res[key] for res in results[c])  # noqa: E731
    print()
    print(f"{'loader':<6} {'workers':>7} {'batching':<8} {'startup s':>9} {'steady img/s':>12} "
          f"{'overall img/s':>13} {'images':>6}  first batch vs. recomputed")
    for c in configs:
        print(f"{c[0]:<6} {c[1]:>7} {c[2]:<8} {med(c, 'startup_s'):>9.2f} "
              f"{med(c, 'steady'):>12.1f} {med(c, 'overall'):>13.1f} {results[c][0]['images']:>6}  {first_check[c]}")
    print()
    ok_shapes = len(shapes) == 1
    print(f"batches: {'all' if ok_shapes else 'NOT all'} the same shape {sorted(shapes)}; images per configuration: "
          f"{sorted(counts)}{'' if len(counts) == 1 else ' (DIFFER)'}")
    if torch is not None:
        for workers in args.workers:
            g = ("grain", workers, "grain")
            parts = []
            for collate in args.torch_collate:
                tc = ("torch", workers, collate)
                parts.append(f"steady {med(g, 'steady') / med(tc, 'steady'):.2f}x, overall "
                             f"{med(g, 'overall') / med(tc, 'overall'):.2f}x vs {collate} collate")
            print(f"grain/torch img/s, {workers} worker(s): " + "; ".join(parts))
        print("(> 1: grain is faster)")
    load_after = os.getloadavg()
    note = ""
    if any(w >= cores for w in args.workers):
        note = (f"; with {max(args.workers)} worker(s) on {cores} core(s), the workers and the main process "
                f"(which receives the batches) compete for the cores")
    print(f"load average {load_after[0]:.2f} after the run (1 minute){note}")
    bad = [c for c, msg in first_check.items() if msg != "identical"]
    if tmp is not None:
        tmp.cleanup()
    if bad or not ok_shapes or len(counts) != 1:
        print("CHECK FAILED: the loaders did not produce the same batches", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
