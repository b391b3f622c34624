"""Caption decoding throughput: our jitted KV-cache decoding against HF PyTorch ``generate``.

GPT-2 base with random weights (the same for both: HF's ``GPT2LMHeadModel`` init, converted), B
prefixes of 10 input embeddings (a CLIP prefix's shape), CgT-GAN's settings: K samples per prefix of
at most 20 new tokens (temperature 1, no top-k/top-p filtering, stop at "." = 13, padding with
<|endoftext|>), with dropout on (the reference samples in training mode; HF's model in ``train()``);
then greedy decoding of the B prefixes (dropout off). Both use a KV cache. Prints the median seconds
of each, our compile time (the first call, excluded), and the ratio (PyTorch seconds / ours: >1
means ours is faster).

    python bench/caption_sampling.py [--batch 64] [--samples 5] [--repeats 2] [--no-dropout]

Needs torch and transformers (the README's test dependencies).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="prefixes (images)")
    p.add_argument("--samples", type=int, default=5, help="sampled captions per prefix")
    p.add_argument("--tokens", type=int, default=20, help="at most this many new tokens")
    p.add_argument("--prefix", type=int, default=10, help="prefix length (input embeddings)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per implementation (after 1 warm-up)")
    p.add_argument("--no-dropout", action="store_true", help="sample without dropout (both implementations)")
    return p.parse_args()


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call's seconds, median seconds of the next ``repeats``)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def main():
    args = parse_args()
    import jax
    import torch
    import transformers

    from jaxgist.models import gpt2

    dropout = not args.no_dropout
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, transformers {transformers.__version__}; GPT-2 base (random), fp32, "
          f"{args.batch} prefixes of {args.prefix} x {args.samples} samples of <= {args.tokens} tokens, "
          f"dropout {'on' if dropout else 'off'} when sampling")
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    model = gpt2.from_hf_state_dict(ref.state_dict(), ref.config)
    prefix = np.random.default_rng(0).normal(scale=0.1, size=(args.batch, args.prefix, 768)).astype(np.float32)
    prefix_t = torch.from_numpy(prefix)
    mask_t = torch.ones(args.batch, args.prefix, dtype=torch.long)
    common = dict(max_new_tokens=args.tokens, eos_token_id=13, pad_token_id=50256, use_cache=True)

    def ours_sample():
        out = gpt2.decode.sample(model, prefix, jax.random.key(0), num_samples=args.samples, dropout=dropout,
                                 max_new_tokens=args.tokens)
        return jax.block_until_ready(out)

    def ours_greedy():
        return jax.block_until_ready(gpt2.decode.greedy(model, prefix, max_new_tokens=args.tokens))

    def hf_sample():
        ref.train(dropout)
        with torch.no_grad():
            return ref.generate(inputs_embeds=prefix_t, attention_mask=mask_t, do_sample=True, temperature=1.0,
                                top_k=0, top_p=1.0, num_return_sequences=args.samples, **common)

    def hf_greedy():
        ref.eval()
        with torch.no_grad():
            return ref.generate(inputs_embeds=prefix_t, attention_mask=mask_t, do_sample=False, **common)

    for name, ours, theirs, n in (("sampling", ours_sample, hf_sample, args.batch * args.samples),
                                  ("greedy", ours_greedy, hf_greedy, args.batch)):
        first, ours_s = timed(ours, args.repeats)
        _, hf_s = timed(theirs, args.repeats)
        print(f"{name:8s} {n} sequences: ours {ours_s:.2f} s (first call {first:.1f} s, compile included), "
              f"HF generate {hf_s:.2f} s; ratio {hf_s / ours_s:.2f}x")
    out = ours_greedy()
    hf = hf_greedy().numpy()
    same = sum(np.array_equal(s[:n], h[:n]) for s, h, n in zip(np.asarray(out.sampled), hf, np.asarray(out.lengths)))
    print(f"greedy: our tokens (up to each stop) equal HF generate's for {same} of {len(hf)} prefixes")


if __name__ == "__main__":
    main()
