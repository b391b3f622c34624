"""One contrastive CLIP training step (forward, backward, Adam update): ours against HF PyTorch.

Full-size ViT-B/32 (or --preset), batch 8, fp32, the same random weights and the same batch for
both, GIST's optimizer (Adam lr 1e-6, betas 0.9/0.98, eps 1e-6, weight decay 1e-3 as coupled L2).
Prints the median seconds per step of each and the ratio (PyTorch / ours: >1 means ours is faster).

    python bench/clip_step.py [--preset ViT-B/32] [--batch 8] [--steps 10]

Both get the same 77-token padded ids (OpenAI's convention, as GIST tokenizes). Two JAX variants
are timed: the jitted step on those ids as they are, and the same ids with the padding columns that
no text needs dropped on the host inside the timed call (``tokenizer.trim_padding``: rounded up to a
multiple of 8 tokens; exact, since the causal text tower never lets a position see later ones).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

CAPTIONS = [
    "a small bird with a bright red crown, black wings with white bars and a short conical bill",
    "a grey and white seabird with long narrow wings gliding low over the water",
    "a yellow warbler perched on a branch, olive back and faint streaks on the breast",
    "a large dark hawk with a pale tail band, hooked beak and broad rounded wings",
    "a tiny hummingbird hovering by a flower, iridescent green back and a ruby throat",
    "a black and white woodpecker clinging to bark, red patch on the back of the head",
    "a brown sparrow with heavy streaks on the chest and a central breast spot",
    "a blue jay with a crest, white face and a black necklace across the throat",
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ViT-B/32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation (after 2 warm-up)")
    p.add_argument("--skip-torch", action="store_true")
    return p.parse_args()


def timed(fn, steps, warmup=2):
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times), times


def main():
    args = parse_args()
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    import transformers
    from flax import nnx

    from jaxgist.models import clip
    from jaxgist.models.clip import tokenizer

    cfg = clip.PRESETS[args.preset]
    hf_cfg = clip.config_to_hf(cfg)
    torch.manual_seed(0)
    ref = transformers.CLIPModel(transformers.CLIPConfig(**{k: v for k, v in hf_cfg.items() if k != "architectures"}))
    ref.train()
    ours = clip.from_hf_state_dict(cfg, ref.state_dict(), source="HF model")

    rng = np.random.default_rng(0)
    size = cfg.vision.image_size
    pixels = rng.normal(size=(args.batch, size, size, 3)).astype(np.float32)
    ids = tokenizer.load()([CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)])
    longest = int((ids != 0).sum(1).max())
    trimmed_width = tokenizer.trim_padding(ids).shape[1]

    lr, b1, b2, eps, wd = 1e-6, 0.9, 0.98, 1e-6, 1e-3
    print(f"{args.preset}, batch {args.batch}, fp32, {jax.device_count()} {jax.default_backend()} device(s), "
          f"torch threads {torch.get_num_threads()}; text tokens: {ids.shape[1]} padded, {trimmed_width} trimmed "
          f"(longest {longest})", flush=True)

    # --- ours ------------------------------------------------------------------------------
    tx = optax.chain(optax.add_decayed_weights(wd), optax.scale_by_adam(b1, b2, eps), optax.scale(-lr))
    graphdef, params = nnx.split(ours, nnx.Param)
    opt_state = tx.init(params)

    def loss_fn(params, pixels, ids):
        model = nnx.merge(graphdef, params)
        per_image, per_text = model(pixels, ids)
        labels = jnp.arange(per_image.shape[0])
        return (optax.softmax_cross_entropy_with_integer_labels(per_image, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(per_text, labels).mean()) / 2

    @jax.jit
    def step(params, opt_state, pixels, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, pixels, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
    first_loss = float(jax.jit(loss_fn)(params, jnp.asarray(pixels), jnp.asarray(ids)))
    results = {}
    pix = jnp.asarray(pixels)
    for name, prepare in (("jax", lambda x: x), ("jax (trimmed text)", tokenizer.trim_padding)):
        t = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, pix, jnp.asarray(prepare(ids)))
        loss.block_until_ready()
        compile_s = time.perf_counter() - t
        state = {"p": params, "o": opt_state}

        def run():
            state["p"], state["o"], loss = step(state["p"], state["o"], pix, jnp.asarray(prepare(ids)))
            state["loss"] = loss
            loss.block_until_ready()

        med, _ = timed(run, args.steps)
        params, opt_state = state["p"], state["o"]
        results[name] = med
        print(f"{name:>20}: {med:.3f} s/step (first call incl. compile {compile_s:.1f} s), "
              f"loss {float(state['loss']):.4f}", flush=True)
    del params, opt_state, ours

    if args.skip_torch:
        return
    # --- HF PyTorch --------------------------------------------------------------------------
    def torch_loss(batch_ids):
        out = ref(input_ids=batch_ids, pixel_values=pt_pix)
        return (torch.nn.functional.cross_entropy(out.logits_per_image, labels)
                + torch.nn.functional.cross_entropy(out.logits_per_text, labels)) / 2

    pt_pix = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    labels = torch.arange(args.batch)
    with torch.no_grad():
        ref_first = float(torch_loss(torch.from_numpy(ids.astype(np.int64))))
    print(f"{'initial loss':>20}: jax {first_loss:.6f}, pytorch {ref_first:.6f} (same weights, same batch)")
    opt = torch.optim.Adam(ref.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for name, prepare in (("pytorch (HF)", lambda x: x), ("pytorch (trimmed)", tokenizer.trim_padding)):

        def torch_step():
            opt.zero_grad(set_to_none=True)
            loss = torch_loss(torch.from_numpy(prepare(ids).astype(np.int64)))
            loss.backward()
            opt.step()

        med, _ = timed(torch_step, args.steps)
        results[name] = med
        print(f"{name:>20}: {med:.3f} s/step", flush=True)
    print(f"ratio pytorch/jax on the same padded ids: {results['pytorch (HF)'] / results['jax']:.2f}x")
    print(f"ratio pytorch/jax, jax trimming the padding: {results['pytorch (HF)'] / results['jax (trimmed text)']:.2f}x")
    print(f"ratio pytorch/jax, both trimming: {results['pytorch (trimmed)'] / results['jax (trimmed text)']:.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
