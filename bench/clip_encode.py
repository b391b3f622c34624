"""Image-embedding throughput: our CLIP image towers against OpenAI's ``clip`` model in PyTorch.

RN50 (ModifiedResNet) and ViT-B/32 at full size, batch 64, fp32, on this machine's CPU: the same
random weights (OpenAI's reference model, its BatchNorm statistics randomized, saved as a state dict
and loaded by ``clip.load``) and the same images for both. Prints the median seconds per batch, the
images per second of each, the ratio (ours / PyTorch images per second: >1 means ours is faster) and
the largest feature difference. The two implementations take turns batch by batch, each timed batch
after a 1 s pause.

    python bench/clip_encode.py [--models RN50,ViT-B/32] [--batch 64] [--repeats 5]

Needs torch and OpenAI's reference code (``pip install torch; pip install --no-deps clip-anytorch``),
the README's test dependencies.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

PAUSE_S = 1.0  # before each timed call

# (embed_dim, image_resolution, vision_layers, vision_width, patch, context, vocab, text_width, text_heads,
# text_layers): OpenAI's published sizes
ARGS = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="RN50,ViT-B/32", help=f"comma-separated, of {sorted(ARGS)}")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5,
                   help="timed batches per implementation, the two taking turns (after 1 warm-up each)")
    return p.parse_args()


def reference_module():
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("OpenAI's reference CLIP code is not installed: pip install --no-deps clip-anytorch==2.6.0")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)  # without torchvision
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def interleaved(fns, repeats: int) -> list[float]:
    """The median seconds of each of ``fns``, timed in turn within each repeat (after one warm-up call
    each, which compiles ours), so that a drift in the machine's speed reaches every side alike. Each
    timed call starts after a pause: without it the side that runs second is slowed by what the first
    leaves running (up to 15% measured here)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main():
    args = parse_args()
    from jaxgist.core import xla_flags

    print(xla_flags.describe(xla_flags.apply_defaults()))  # the launcher's XLA flags, before jax starts
    import jax
    import jax.numpy as jnp
    import torch

    from jaxgist.models import clip

    module = reference_module()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; batch {args.batch}, fp32")
    for name in args.models.split(","):
        torch.manual_seed(0)
        ref = module.CLIP(*ARGS[name])
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in ref.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
        ref = ref.eval()
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(ref.state_dict(), f"{tmp}/weights.pt")
            ours = clip.load(f"{tmp}/weights.pt", act="quick_gelu")
        res = ARGS[name][1]
        pixels = np.random.default_rng(0).normal(size=(args.batch, res, res, 3)).astype(np.float32)
        pt_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
        encode = jax.jit(lambda m, x: m.encode_image(x))
        x = jnp.asarray(pixels)

        def run_ours():
            return encode(ours, x).block_until_ready()

        def run_ref():
            with torch.no_grad():
                return ref.encode_image(pt_pixels)

        t_ours, t_ref = interleaved([run_ours, run_ref], args.repeats)
        diff = float(np.abs(np.asarray(run_ours()) - run_ref().numpy()).max())
        print(f"{name:9s} ours {t_ours:.3f} s/batch ({args.batch / t_ours:6.1f} img/s)   "
              f"PyTorch {t_ref:.3f} s/batch ({args.batch / t_ref:6.1f} img/s)   ratio {t_ref / t_ours:.2f}x   "
              f"max |feature diff| {diff:.1e}")


if __name__ == "__main__":
    main()
