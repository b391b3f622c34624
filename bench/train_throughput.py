"""Training throughput: the real fine-tuning loop (grain pipeline, host-to-device transfer, metrics,
checkpoint at the end) against the bare jitted step on a batch already on the devices.

    python bench/train_throughput.py                                  # tiny and ViT-B/32, fp32, CPU
    python bench/train_throughput.py --models ViT-B/16,ViT-L/14 --compute_dtype bfloat16 --batch 64 --steps 30

For each model it writes a generated fine-grained dataset (JPEGs at 1.25x the model's resolution,
so every image is decoded, cropped and resized), runs ``jaxgist.methods.finetune.run`` for ``--steps`` steps
(the loop's step time is the mean of its logged windows after the first, so neither compilation,
pipeline warm-up nor the final checkpoint is counted; the whole run's images/s is printed too) and then, in the same process, times ``--steps`` calls of the
same compiled step on one in-memory batch. The ratio loop/bare shows what the input pipeline and
the loop cost. MFU is printed where jaxgist knows the device's bf16 peak (GPUs, TPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

from jaxgist.methods import finetune_step  # noqa: E402
from jaxgist.methods import finetune
from jaxgist.models import clip  # noqa: E402
from jaxgist.training import metrics, parallel

TINY = dict(vision=dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=128),
            text=dict(context_length=77, width=64, layers=2, heads=4, mlp_dim=128), embed_dim=32)


def config_for(model: str, args, data_dir: str):
    c = finetune.default_config()
    c.model.init = ""
    c.model.preset = TINY if model == "tiny" else model
    c.model.compute_dtype = args.compute_dtype
    c.model.remat = args.remat
    size = clip.config_from_model_config(c.model).vision.image_size
    c.data.source = "synthetic"
    c.data.synthetic.update(dict(dir=os.path.join(data_dir, f"{size}px"), num_classes=8,
                                 train_per_class=max(2, -(-args.batch * args.steps // (8 * 2))),
                                 val_per_class=1, test_per_class=1, image_size=int(size * 1.25), num_captions=2,
                                 shots=(1,)))
    c.data.num_captions = 2
    c.data.workers = args.workers
    c.train.global_batch = args.batch
    c.train.steps = args.steps
    c.train.log_every = max(1, args.steps // 5)
    c.train.save_every = 10**9  # only the final checkpoint
    c.train.async_checkpoints = True
    return c


def bare_step_time(c, steps: int) -> tuple[float, float | None]:
    """Seconds per call of the compiled step on a batch already on the devices, and its FLOPs."""
    mesh = parallel.make_mesh(c.mesh)
    model = clip.from_config(c.model, seed=0)
    setup = finetune_step.build(c, mesh, steps, model_cfg=model.config)
    state = setup.init_state(model)
    compiled = setup.step.lower(setup.abstract_state, setup.abstract_batch(c.train.global_batch)).compile()
    rng = np.random.default_rng(0)
    s, length = setup.image_size, setup.context_length
    ids = np.zeros((c.train.global_batch, length), np.int32)
    ids[:, 0], ids[:, 1:20], ids[:, 20] = 49406, rng.integers(300, 40000, (c.train.global_batch, 19)), 49407
    sharding = parallel.batch_sharding(mesh)
    batch = {"image": jax.device_put(rng.normal(size=(c.train.global_batch, s, s, 3)).astype(np.float32), sharding),
             "ids": jax.device_put(ids, sharding)}
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, batch)
        float(m["loss"])  # the loop reads the loss every step too
    return (time.perf_counter() - t0) / steps, metrics.compiled_flops(compiled)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,ViT-B/32", help="comma-separated: tiny or preset names")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="grain worker processes")
    p.add_argument("--compute_dtype", default="", help="'' (= float32) or bfloat16")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--data_dir", default="", help="where the generated datasets go (default: a temp dir)")
    args = p.parse_args()
    flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.WARNING)

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="jaxgist-bench-")
    device = jax.devices()[0]
    print(f"{jax.device_count()} x {device.device_kind} ({jax.default_backend()}), batch {args.batch}, "
          f"{args.steps} steps, compute {args.compute_dtype or 'float32'}, workers {args.workers}")
    rows = []
    for model in args.models.split(","):
        c = config_for(model, args, data_dir)
        with tempfile.TemporaryDirectory() as workdir:
            loop = finetune.run(c, workdir)["finetune"]
            windows = [r["train/step_time_s"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
                       if "train/step_time_s" in r]
        # the loop's own step-time windows, leaving out the first (pipeline warm-up) and the final
        # checkpoint; whole-run images/s (everything after compilation) is loop["images_per_s"]
        loop_s = float(np.mean(windows[1:] if len(windows) > 1 else windows))
        bare_s, flops = bare_step_time(c, args.steps)
        loop_ips = args.batch / loop_s
        bare_ips = args.batch / bare_s
        peak = metrics.peak_flops(device)
        mfu = flops / bare_s / peak if flops and peak else None
        rows.append(dict(model=model, loop_step_s=loop_s, run_images_per_s=loop["images_per_s"], bare_step_s=bare_s, loop_images_per_s=loop_ips,
                         bare_images_per_s=bare_ips, loop_over_bare=loop_ips / bare_ips,
                         bare_mfu=mfu, final_loss=loop["final_loss"]))
    print(f"\n{'model':10s} {'loop s/step':>12s} {'bare s/step':>12s} {'loop img/s':>11s} {'bare img/s':>11s} "
          f"{'loop/bare':>10s} {'MFU (bare)':>11s} {'run img/s':>10s}")
    for r in rows:
        mfu = f"{100 * r['bare_mfu']:.1f}%" if r["bare_mfu"] is not None else "n/a"
        print(f"{r['model']:10s} {r['loop_step_s']:12.3f} {r['bare_step_s']:12.3f} {r['loop_images_per_s']:11.1f} "
              f"{r['bare_images_per_s']:11.1f} {r['loop_over_bare']:9.2f}x {mfu:>11s} {r['run_images_per_s']:10.1f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
