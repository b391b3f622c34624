"""GPT4Image's train step on ResNet-50: ours against a PyTorch step of the same work, in one run.

Both: full-size ResNet-50 (torchvision v1.5 layout, 1000 classes) with GPT4Image's projection
(Linear 2048x2048 no bias, BatchNorm, ReLU, Linear 2048x1024), cross-entropy plus the symmetric text
loss against unit 1024-d text embeddings (lambda 0.3, tau 0.2), SGD momentum 0.9, weight decay 1e-4,
BatchNorm in training mode; the same random weights (HF ``ResNetForImageClassification``, converted)
and the same batch. PyTorch runs HF's ResNet with the projection as torch modules. Prints the first
step's losses of both, the median seconds per step and the ratio (PyTorch s/step / ours: > 1 means
ours is faster).

    python bench/resnet_step.py [--batch 16] [--size 224] [--steps 5] [--dtype float32|bfloat16]

On a GPU (``--dtype bfloat16``, no PyTorch run with ``--no-torch``) it also prints images/s and MFU
against the device's bf16 peak (``jaxgist.training.metrics.PEAK_BF16_FLOPS``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5, help="timed steps per implementation (after 1 warm-up)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="our compute dtype")
    p.add_argument("--no-torch", action="store_true", help="time ours only (e.g. on a GPU)")
    return p.parse_args()


def main():
    args = parse_args()
    from jaxgist.core import xla_flags

    print(xla_flags.describe(xla_flags.apply_defaults()))  # the launcher's XLA flags, before jax starts
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxgist.methods import gpt4image, gpt4image_step
    from jaxgist.models import projection, resnet
    from jaxgist.training import metrics, parallel

    rng = np.random.default_rng(0)
    b, s = args.batch, args.size
    pixels = rng.normal(size=(b, s, s, 3)).astype(np.float32)
    labels = rng.integers(0, 1000, b).astype(np.int32)
    text = rng.normal(size=(b, 1024)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)

    ref = None
    if not args.no_torch:
        import torch
        import transformers

        torch.manual_seed(0)
        ref = transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=1000)).train()
        sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
        ours = resnet.from_hf_state_dict(sd, ref.config.to_dict())
    else:
        ours = resnet.create("resnet50", num_classes=1000, seed=0)
    if args.dtype == "bfloat16":
        ours = _with_compute_dtype(ours, jnp.bfloat16)
    proj = projection.ProjectionMLP.for_resnet(2048, 1024, rngs=nnx.Rngs(1))

    c = gpt4image.default_config()
    c.optim.update(dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="constant", schedule_unit="step"))
    c.gpt4image.update(dict(bn_sync=True, lamb=0.3, tau=0.2))
    mesh = parallel.make_mesh((("data", 1),), devices=jax.devices()[:1])
    setup = gpt4image_step.build(c, mesh, 100, abstract_classifier=nnx.eval_shape(lambda: ours),
                                 abstract_projection=nnx.eval_shape(lambda: proj),
                                 backbone=gpt4image.backbone("resnet50"))
    with jax.set_mesh(mesh):
        state = setup.init_state(ours, proj)
    batch = {"image": jnp.asarray(pixels), "label": jnp.asarray(labels), "text_embedding": jnp.asarray(text)}
    compiled = setup.step.lower(setup.abstract_state, setup.abstract_batch(b, s, 1024)).compile()
    flops = metrics.compiled_flops(compiled)
    holder = {"state": state}

    def run_ours():
        holder["state"], m = compiled(holder["state"], batch)
        return float(m["loss"])

    t0 = time.perf_counter()
    first_ours = run_ours()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; batch {b}, {s}px, ours in {args.dtype}; "
          f"first step (compiled ahead) {time.perf_counter() - t0:.2f} s")
    ours_times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        run_ours()
        ours_times.append(time.perf_counter() - t0)
    t_ours = statistics.median(ours_times)
    line = f"ours    {t_ours:.3f} s/step ({b / t_ours:7.1f} img/s)"
    peak = metrics.peak_flops()
    if flops and peak:
        line += f"   MFU {flops / t_ours / peak:.1%} of the bf16 peak"
    print(line)
    if ref is None:
        return

    import torch
    import torch.nn.functional as F

    tproj = torch.nn.Sequential(torch.nn.Linear(2048, 2048, bias=False), torch.nn.BatchNorm1d(2048), torch.nn.ReLU(),
                                torch.nn.Linear(2048, 1024)).train()
    with torch.no_grad():
        tproj[0].weight.copy_(torch.from_numpy(np.array(proj.fc1.kernel[...]).T))
        tproj[3].weight.copy_(torch.from_numpy(np.array(proj.fc2.kernel[...]).T))
        tproj[3].bias.copy_(torch.from_numpy(np.array(proj.fc2.bias[...])))
    opt = torch.optim.SGD(list(ref.parameters()) + list(tproj.parameters()), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(labels).long()
    e = torch.from_numpy(text)

    def run_torch():
        out = ref.resnet(x)
        feat = out.pooler_output.flatten(1)
        ce = F.cross_entropy(ref.classifier(out.pooler_output), y)
        z = F.normalize(tproj(feat), dim=-1)
        logits = z @ e.T / 0.2
        t = torch.arange(b)
        loss = ce + 0.3 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    first_torch = run_torch()
    torch_times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        run_torch()
        torch_times.append(time.perf_counter() - t0)
    t_torch = statistics.median(torch_times)
    print(f"PyTorch {t_torch:.3f} s/step ({b / t_torch:7.1f} img/s), torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads")
    print(f"first-step loss: ours {first_ours:.6f}, PyTorch {first_torch:.6f}")
    print(f"ratio (PyTorch s/step / ours): {t_torch / t_ours:.2f}x")


def _with_compute_dtype(model, dtype):
    """The same parameters with matmuls and convolutions in ``dtype`` (parameters stay float32)."""
    from flax import nnx

    from jaxgist.models import resnet

    fresh = nnx.eval_shape(lambda: resnet.create(model.config, dtype=dtype))
    graphdef, _ = nnx.split(fresh)
    return nnx.merge(graphdef, nnx.state(model))


if __name__ == "__main__":
    main()
