"""Description-embedding throughput: ``jaxgist.evaluation.text_embeddings.encode`` against OpenAI's
``encode_text`` in a batched PyTorch loop (what GPT4Image's ``description2embedding.py`` runs), in one run.

Both encode the same texts with the same random weights of CLIP RN50's text tower (12 layers, width
512, 1024-d output; the image tower is built but unused), fp32, on this machine's CPU: PyTorch on the
77-token ids of ``clip.tokenize(..., truncate=True)`` (our tokenizer's ids, which equal it), batch 64;
ours sorts the texts by length and trims each batch to its longest text (exact: the tower is causal).
Texts: LLM-written class descriptions of GIST's CUB release (``../shared/data``), else generated
sentences. Prints the token-length distribution, texts/s of each, the ratio (ours / PyTorch) and the
largest difference between the unit embeddings.

    python bench/describe_embed.py [--texts 1024] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    return p.parse_args()


def load_texts(n: int) -> tuple[list[str], str]:
    path = SHARED / "gist" / "CUB" / "long_captions.json"
    if path.is_file():
        data = json.loads(path.read_text())
        texts = [t for values in data.values() for t in values]
        return [texts[i % len(texts)] for i in range(n)], str(path)
    rng = np.random.default_rng(0)
    words = "a small bird with a red crown and black wings perched on a branch near water".split()
    return [" ".join(rng.choice(words, int(rng.integers(5, 60)))) for _ in range(n)], "generated"


def main():
    args = parse_args()
    import importlib.util

    import torch

    from jaxgist.evaluation import text_embeddings
    from jaxgist.models import clip
    from jaxgist.models.clip import tokenizer as tokenizer_lib

    spec = importlib.util.find_spec("clip")
    if spec is None:
        sys.exit("OpenAI's reference CLIP code is not installed: pip install --no-deps clip-anytorch==2.6.0")
    module_spec = importlib.util.spec_from_file_location(
        "openai_clip_model", pathlib.Path(list(spec.submodule_search_locations)[0]) / "model.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)

    texts, where = load_texts(args.texts)
    tokenize = tokenizer_lib.load(str(SHARED / "clip_tokenizer") if (SHARED / "clip_tokenizer").is_dir() else None)
    ids = np.asarray(tokenize(texts))
    lengths = (ids != 0).sum(axis=1)
    print(f"{len(texts)} texts from {where}: tokens (with start/end) median {int(np.median(lengths))}, "
          f"90th percentile {int(np.percentile(lengths, 90))}, {int((lengths >= 77).sum())} truncated at 77")

    torch.manual_seed(0)
    ref = module.CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12).eval()  # RN50's sizes
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(ref.state_dict(), f"{tmp}/rn50.pt")
        ours = clip.load(f"{tmp}/rn50.pt", act="quick_gelu")

    def run_torch():
        out = []
        with torch.no_grad():
            for i in range(0, len(ids), args.batch):
                e = ref.encode_text(torch.from_numpy(ids[i:i + args.batch]).long())
                out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
        return np.concatenate(out)

    def run_ours():
        return text_embeddings.encode(ours, tokenize, texts, batch_size=args.batch)

    run_ours()  # compile every trimmed width once
    t0 = time.perf_counter()
    got = run_ours()
    t_ours = time.perf_counter() - t0
    run_torch()
    t0 = time.perf_counter()
    expected = run_torch()
    t_torch = time.perf_counter() - t0
    print(f"ours    {t_ours:.2f} s ({len(texts) / t_ours:7.1f} texts/s)")
    print(f"PyTorch {t_torch:.2f} s ({len(texts) / t_torch:7.1f} texts/s), torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads")
    print(f"ratio (ours / PyTorch texts/s): {t_torch / t_ours:.2f}x   max |embedding diff| "
          f"{float(np.abs(got - expected).max()):.1e}")


if __name__ == "__main__":
    main()
