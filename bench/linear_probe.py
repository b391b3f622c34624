"""Linear probes: GIST's PyTorch SGD probe against jaxgist's probes, on the same embeddings.

    python bench/linear_probe.py                       # 200 classes, 5-shot, 768-d (CUB-5-shot-like)
    python bench/linear_probe.py --classes 20 --epochs 50 --rounds 1   # a quick smoke run

The embeddings are generated: ``--classes`` Gaussian class means (norm about ``--separation``) plus
anisotropic Gaussian noise (variance ~ 1 / sqrt(rank) in a random basis, expected norm 1) and a shared
offset, with ``--shots`` training, ``--val-per-class`` validation and ``--test-per-class`` test
examples per class (defaults follow GIST's CUB 5-shot split: 1,000 / 600 / 5,800 examples, 768-d
features as from CLIP ViT-L/14@336px). The defaults are moderately separable: GIST's SGD probe reaches
about 82% top-1.

Variants, all choosing their hyperparameter on the validation split only:
- ``torch_sgd``: GIST's ``linear_probe.py`` loop (``nn.Linear``, ``CrossEntropyLoss``, ``optim.SGD``
  lr 0.5, ``DataLoader`` batches of 64 shuffled, validation accuracy after every epoch, a deep copy
  of the ``state_dict`` kept when it is >= the best so far), on ``--torch-threads`` CPU threads (default
  1: on a small, shared machine PyTorch's default of one thread per core loses far more to contention
  on 64-row matmuls than it gains; pass 0 to time PyTorch's default);
- ``jax_sgd``: ``probes.sgd_probe``, the same algorithm in one jitted scan;
- ``jax_ridge``: ``probes.ridge_probe`` (closed form, 33 L2s); ``jax_lbfgs``: ``probes.lbfgs_probe``
  (L-BFGS logistic regression, 15 L2s).

Wall time covers the whole fit (JAX: host-to-device copy, fit and the copy back). The variants run in
``--rounds`` interleaved rounds (so that a change in the machine's load hits all of them alike).
JAX's ``first`` is round 1, compilation included (what one fit costs in a fresh process); ``warm`` is
the fastest later round, with the compiled functions cached. PyTorch compiles nothing: its time is
its fastest round. Speedups are torch time / our time. Test accuracy is reported with the bootstrap
of ``jaxgist.evaluation.accuracy`` (1,000 resamples, mean and std).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np


def make_embeddings(classes: int, dim: int, shots: int, val_per_class: int, test_per_class: int,
                    separation: float, seed: int):
    """Train/val/test (features float32 [n, dim], labels int64 [n]) from shared Gaussian classes."""
    rng = np.random.default_rng(seed)
    offset = rng.normal(size=dim) / np.sqrt(dim)
    means = rng.normal(size=(classes, dim)) * (separation / np.sqrt(dim))
    # Anisotropic noise, as in real embeddings: variances ~ 1 / sqrt(rank) in a random basis, total 1.
    variances = 1.0 / np.sqrt(np.arange(1, dim + 1))
    noise_map = np.sqrt(variances / variances.sum())[:, None] * np.linalg.qr(rng.normal(size=(dim, dim)))[0].T

    def split(per_class):
        y = np.repeat(np.arange(classes), per_class)
        x = offset + means[y] + rng.normal(size=(len(y), dim)) @ noise_map
        return x.astype(np.float32), y.astype(np.int64)

    return split(shots), split(val_per_class), split(test_per_class)


def torch_gist_probe(train, val, num_classes: int, epochs: int, lr: float, batch_size: int, seed: int):
    """GIST's linear probe loop, written the way its ``linear_probe.py`` does it. Returns a logits fn."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    x_train, y_train = torch.tensor(train[0]), torch.tensor(train[1])
    x_val, y_val = torch.tensor(val[0]), torch.tensor(val[1])
    data_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True)
    data_loader_val = DataLoader(TensorDataset(x_val, y_val), batch_size=batch_size, shuffle=False)
    net = torch.nn.Linear(x_train.shape[1], num_classes)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    best_accuracy, best_weights, best_epoch = 0.0, None, 0
    for epoch in range(epochs):
        running_loss = 0.0
        for inputs, labels in data_loader:
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
        correct = total = 0
        with torch.no_grad():
            for inputs, labels in data_loader_val:
                _, predicted = torch.max(net(inputs).data, 1)
                total += labels.size(0)
                correct += (predicted == labels).sum().item()
        accuracy = correct / total
        if accuracy >= best_accuracy:
            best_accuracy, best_epoch = accuracy, epoch + 1
            best_weights = copy.deepcopy(net.state_dict())
    net.load_state_dict(best_weights)

    def predict_logits(x):
        with torch.no_grad():
            return net(torch.tensor(x)).numpy()

    return predict_logits, {"epoch": best_epoch}, best_accuracy


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--val-per-class", type=int, default=3)
    parser.add_argument("--test-per-class", type=int, default=29)
    parser.add_argument("--separation", type=float, default=0.3, help="class-mean norm over noise norm")
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2,
                        help="timed rounds; each round runs every variant once, in turn")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="PyTorch intra-op threads (0: PyTorch's default, one per core)")
    parser.add_argument("--variants", default="torch_sgd,jax_sgd,jax_ridge,jax_lbfgs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    import jax
    import torch

    from jaxgist.evaluation import accuracy as evaluation
    from jaxgist.heads import probes

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    train, val, test = make_embeddings(args.classes, args.dim, args.shots, args.val_per_class,
                                       args.test_per_class, args.separation, args.seed)
    info = {
        "jax_device": str(jax.devices()[0]), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average": os.getloadavg(), "train": len(train[1]), "val": len(val[1]), "test": len(test[1]),
        "dim": args.dim, "classes": args.classes, "epochs": args.epochs,
    }
    print(json.dumps(info))

    sgd_kw = dict(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    jax_fits = {
        "jax_sgd": lambda: probes.sgd_probe(*train, *val, args.classes, **sgd_kw),
        "jax_ridge": lambda: probes.ridge_probe(*train, *val, args.classes),
        "jax_lbfgs": lambda: probes.lbfgs_probe(*train, *val, args.classes),
    }
    def fit(name):
        """(logits function, chosen hyperparameters, validation top-1) of one variant."""
        if name == "torch_sgd":
            return torch_gist_probe(train, val, args.classes, args.epochs, args.lr, args.batch_size, args.seed)
        probe = jax_fits[name]()
        return probe.predict_logits, {k: v for k, v in probe.hparams.items() if k in ("epoch", "l2")}, \
            probe.val_accuracy

    names = args.variants.split(",")
    unknown = [n for n in names if n != "torch_sgd" and n not in jax_fits]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}")
    # Rounds interleave the variants, so that a change in the machine's load hits all of them alike.
    times = {name: [] for name in names}
    fitted = {}
    for _ in range(max(1, args.rounds)):
        for name in names:
            fitted[name], seconds = timed(lambda: fit(name))
            times[name].append(seconds)
    rows = []
    for name in names:
        logits_fn, hparams, val_acc = fitted[name]
        metrics = evaluation.accuracy_summary(logits_fn(test[0]), test[1], prefix="test")
        if name == "torch_sgd":  # no compiler: every round is a full run
            first = warm = min(times[name])
        else:  # the first round compiles; later rounds reuse the compiled functions
            first, warm = times[name][0], (min(times[name][1:]) if len(times[name]) > 1 else None)
        rows.append({"variant": name, "first_s": first, "warm_s": warm, "times_s": times[name],
                     "val_top1": val_acc, "hparams": hparams, **metrics})
        print(json.dumps(rows[-1]), flush=True)

    base = next((r for r in rows if r["variant"] == "torch_sgd"), None)
    base_s = base["warm_s"] if base else None
    print("\n| variant | first call s | warm s | speedup first | speedup warm | chosen | val top1 | "
          "test top1 (bootstrap mean ± std) | test top3 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        warm = r["warm_s"]
        sp_first = f"{base_s / r['first_s']:.1f}x" if base else "-"
        sp_warm = f"{base_s / warm:.1f}x" if base and warm else "-"
        chosen = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["hparams"].items())
        warm_text = f"{warm:.2f}" if warm is not None else "-"
        print(f"| {r['variant']} | {r['first_s']:.2f} | {warm_text} | {sp_first} | {sp_warm} | {chosen} | "
              f"{r['val_top1']:.4f} | {r['test_top1']:.4f} ({r['test_top1_bootstrap_mean']:.4f} ± "
              f"{r['test_top1_bootstrap_std']:.4f}) | {r['test_top3']:.4f} |")
    print(f"load average after: {os.getloadavg()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
