"""Pod readiness table: per-chip memory, fits or not, and FLOPs per step of GIST's fine-tuning step,
compiled ahead of time for TPU topologies (``python -m jaxgist.aot``; needs ``pip install -e ".[tpu]"``).

    python bench/aot_table.py                        # the full table -> docs/pod_readiness.md
    python bench/aot_table.py --models ViT-B/16 --batches 256 --topologies v5e:2x2 --no-max-batch

Rows: every model x global batch x strategy x topology. Strategies: ``dp`` replicates parameters and
optimizer state on every chip (mesh ``(("data", -1), ("fsdp", 1))``); ``fsdp`` shards them over all
chips (mesh ``(("data", 1), ("fsdp", -1))``). Both split the batch over every chip. Then, for
``--max-batch-model`` on ``--max-batch-topology``, the largest global batch that fits with each
strategy, to ``--max-batch-resolution`` per chip (starting from the table's rows, per-chip batch
doubled until it fails, then bisected).

Each compile runs ``python -m jaxgist.aot`` in its own process (the CLI users run; memory is given
back between compiles) and is cached as JSON in ``--cache`` so an interrupted run picks up where it
stopped. Compiles are single-threaded; ``--jobs 2`` runs two at once (compile times then include the
contention). ``--fill-missing`` compiles only the rows the doc marks "not compiled yet" (or lacks) and
keeps the doc's compiled rows and finished max-batch results as written, so the table can be completed
across machines whose cache is gone. The configuration is GIST's recipe from ``configs/finetune.py``:
fp32 parameters and compute, Adam, no rematerialization.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
GiB = 1024**3

STRATEGIES = {
    "dp": '(("data", -1), ("fsdp", 1))',
    "fsdp": '(("data", 1), ("fsdp", -1))',
}
TOPOLOGY_LABELS = {"v5e:4x4": "v5e-16", "v5e:16x16": "v5e-256", "v4:4x4x4": "v4 4x4x4 (64 chips)", "v5e:2x2": "v5e-4"}


def topology_label(topology: str) -> str:
    """How the doc names a topology ("v5e:16x16" -> "v5e-256")."""
    return TOPOLOGY_LABELS.get(topology, topology)


class NotCompiled(Exception):
    """--cached-only and this row is not in the cache."""


class CompileFailed(RuntimeError):
    """jaxgist.aot ended without a report (a bad config, or the host ran out of memory compiling)."""


def compile_one(model: str, batch: int, strategy: str, topology: str, cache: pathlib.Path, extra: list[str],
                cached_only: bool = False) -> dict:
    args = ["--config", str(ROOT / "configs" / "finetune.py"), "--topology", topology,
            f"--config.model.init={model}", f"--config.train.global_batch={batch}",
            f"--config.mesh={STRATEGIES[strategy]}", *extra]
    key = hashlib.sha1(json.dumps(args[2:]).encode()).hexdigest()[:16]
    out = cache / f"{key}.json"
    if out.exists():
        return json.loads(out.read_text())
    if cached_only:
        raise NotCompiled(f"{model} {batch} {strategy} {topology}")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jaxgist.aot", *args, "--json", str(out) + ".tmp"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 2 or not os.path.exists(str(out) + ".tmp"):
        why = (f"killed by signal {-proc.returncode} (SIGKILL: likely the host's out-of-memory killer; "
               f"compile this row alone or on a machine with more memory)" if proc.returncode < 0
               else f"exit status {proc.returncode}")
        raise CompileFailed(f"jaxgist.aot {' '.join(args)} failed, {why}:\n{proc.stderr[-3000:]}")
    report = json.loads(pathlib.Path(str(out) + ".tmp").read_text())
    report.update(strategy=strategy, wall_seconds=round(time.perf_counter() - t, 1))
    out.write_text(json.dumps(report, indent=1))
    os.remove(str(out) + ".tmp")
    return report


def gib(b) -> str:
    return "?" if b is None else f"{b / GiB:.2f}"


def row(r: dict) -> str:
    flops = r["flops_total"]
    est = "" if r["flops_per_device"] else "~"
    return (f"| {r['model']} | {r['global_batch']} | {r['strategy']} | {topology_label(r['topology'])} "
            f"| {r['per_device_batch']} | {gib(r['argument_bytes'])} | {gib(r['temp_bytes'])} | {gib(r['total_bytes'])} "
            f"/ {gib(r['hbm_bytes'])} | {'yes' if r['fits'] else '**no**'} "
            f"| {est}{flops / 1e12:.1f} | {r['compile_seconds']:.0f} |")


def not_compiled_row(model, batch, strategy, topology) -> str:
    return (f"| {model} | {batch} | {strategy} | {topology_label(topology)} | - | - | - | - "
            f"| not compiled yet | - | - |")


BEGIN, END = "<!-- aot-table:begin -->", "<!-- aot-table:end -->"


def doc_rows(path: pathlib.Path) -> tuple[dict, dict]:
    """The compiled rows of the doc's generated table, by (model, batch, strategy, topology label), and
    its finished max-batch rows, by (model, strategy, topology label); lines as written."""
    text = path.read_text() if path.exists() else ""
    if BEGIN not in text:
        return {}, {}
    body = text.split(BEGIN, 1)[1].split(END, 1)[0]
    table, maxes = {}, {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or cells[0] == "model" or cells[0].startswith("---"):
            continue
        if len(cells) == 11 and cells[8] != "not compiled yet":
            table[(cells[0], cells[1], cells[2], cells[3])] = line
        elif len(cells) == 6 and not cells[3].startswith("search not finished"):
            maxes[(cells[0], cells[1], cells[2])] = line
    return table, maxes


HEADER = ("| model | global batch | strategy | topology | per chip | arguments GiB | temporaries GiB | total / usable "
          "GiB | fits | TFLOPs per step (all chips) | compile s |\n|---|---:|---|---|---:|---:|---:|---:|---|---:|---:|")
MAX_HEADER = ("| model | strategy | topology | largest global batch that fits | per-chip memory there "
              "| smallest tried that does not fit |\n|---|---|---|---|---|---:|")


def max_batch(model: str, strategy: str, topology: str, chips: int, cache, extra, log, known: list[dict],
              resolution: int, cached_only: bool = False) -> tuple[int, list[dict], bool]:
    """Largest global batch (a multiple of the chip count) that fits, to ``resolution`` per chip: the
    table's own rows for this model, strategy and topology bracket it first, then per-chip batches
    are doubled until one does not fit and the bracket is bisected."""
    tried = [r for r in known if r["model"] == model and r["strategy"] == strategy and r["topology"] == topology]

    def fits(per_chip: int) -> bool:
        r = compile_one(model, per_chip * chips, strategy, topology, cache, extra, cached_only)
        tried.append(r)
        log(f"  max batch {model} {strategy} {topology}: {per_chip}/chip -> "
            f"{'fits' if r['fits'] else 'does not fit'} ({gib(r['total_bytes'])} GiB)")
        return r["fits"]

    lo = max((r["per_device_batch"] for r in tried if r["fits"]), default=0)
    hi = min((r["per_device_batch"] for r in tried if not r["fits"]), default=None)
    try:
        if lo == 0:
            if not fits(1):
                return 0, tried, True
            lo = 1
        if hi is None:
            hi = lo * 2
            while fits(hi):
                lo, hi = hi, hi * 2
        while hi - lo > resolution:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
    except NotCompiled:  # --cached-only: the search is not finished
        return lo * chips, tried, False
    except CompileFailed as e:
        log(f"FAILED max batch {model} {strategy} {topology}: {e}")
        return lo * chips, tried, False
    return lo * chips, tried, True


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="ViT-B/16,ViT-L/14,ViT-L/14@336px")
    p.add_argument("--batches", default="256,4096")
    p.add_argument("--strategies", default="dp,fsdp")
    p.add_argument("--topologies", default="v5e:4x4,v5e:16x16,v4:4x4x4")
    p.add_argument("--max-batch-model", default="ViT-L/14@336px")
    p.add_argument("--max-batch-topology", default="v5e:16x16")
    p.add_argument("--max-batch-chips", type=int, default=256)
    p.add_argument("--max-batch-resolution", type=int, default=1, help="per-chip batch resolution of the search")
    p.add_argument("--no-max-batch", action="store_true")
    p.add_argument("--cached-only", action="store_true",
                   help="compile nothing: render the rows already in the cache (others: 'not compiled yet')")
    p.add_argument("--fill-missing", action="store_true",
                   help="compile only the rows the doc does not have figures for; keep its other rows as written")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--cache", default=str(ROOT / "bench" / ".aot_cache"))
    p.add_argument("--output", default=str(ROOT / "docs" / "pod_readiness.md"))
    p.add_argument("--extra", default="", help="more jaxgist.aot flags, space separated (e.g. --config.model.remat=True)")
    a = p.parse_args()
    cache = pathlib.Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    extra = a.extra.split()
    log = lambda s: print(s, flush=True)  # noqa: E731

    jobs = [(m, int(b), s, t) for t in a.topologies.split(",") for m in a.models.split(",")
            for b in a.batches.split(",") for s in a.strategies.split(",")]
    label = lambda j: (j[0], str(j[1]), j[2], topology_label(j[3]))  # noqa: E731
    kept, kept_max = doc_rows(pathlib.Path(a.output)) if a.fill_missing else ({}, {})
    todo = [j for j in jobs if label(j) not in kept]
    if a.fill_missing:
        log(f"--fill-missing: {len(jobs) - len(todo)} rows kept from {a.output}, {len(todo)} to compile")
    t0 = time.perf_counter()
    results = {}
    missing, failed = [], []
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        futures = {pool.submit(compile_one, *j, cache, extra, a.cached_only): j for j in todo}
        for f in concurrent.futures.as_completed(futures):
            try:
                r = f.result()
            except NotCompiled:
                missing.append(futures[f])
                continue
            except CompileFailed as e:  # the row stays "not compiled yet"; the others go on
                failed.append(futures[f])
                log(f"FAILED {' '.join(map(str, futures[f]))}: {e}")
                continue
            results[futures[f]] = r
            log(f"[{len(results)}/{len(todo)}] {row(r)}")
    lines = [HEADER] + [row(results[j]) if j in results else kept.get(label(j)) or not_compiled_row(*j)
                        for j in jobs]

    max_lines = []
    if not a.no_max_batch:
        with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
            topo_label = topology_label(a.max_batch_topology)
            futs = {s: pool.submit(max_batch, a.max_batch_model, s, a.max_batch_topology, a.max_batch_chips, cache,
                                   extra, log, list(results.values()), a.max_batch_resolution, a.cached_only)
                    for s in a.strategies.split(",") if (a.max_batch_model, s, topo_label) not in kept_max}
            by_strategy = {s: kept_max[(a.max_batch_model, s, topo_label)] for s in a.strategies.split(",")
                           if s not in futs}
            for s, f in futs.items():
                best, tried, done = f.result()
                fit = [r for r in tried if r["global_batch"] == best]
                over = min((r["global_batch"] for r in tried if not r["fits"] and r["global_batch"] > best),
                           default=None)
                detail = f"{gib(fit[0]['total_bytes'])} of {gib(fit[0]['hbm_bytes'])} GiB" if fit else "-"
                found = f"{best} ({best // a.max_batch_chips} per chip)"
                if not done:
                    found = f"search not finished: {found} fits so far"
                by_strategy[s] = (f"| {a.max_batch_model} | {s} | {topo_label} "
                                  f"| {found} | {detail} | {over} |")
            max_lines = [by_strategy[s] for s in a.strategies.split(",")]
    elapsed = time.perf_counter() - t0
    print("\n".join(lines))
    if max_lines:
        print("\n".join([MAX_HEADER, *max_lines]))
    print(f"{len(todo)} rows in {elapsed:.0f} s (cached rows are free; {len(jobs) - len(todo)} kept from the doc)")
    write_doc(pathlib.Path(a.output), lines, max_lines, a)
    if failed:
        sys.exit(f"{len(failed)} rows failed to compile (left 'not compiled yet'): "
                 + "; ".join(" ".join(map(str, j)) for j in failed))


def write_doc(path: pathlib.Path, lines, max_lines, a) -> None:
    """Replaces the generated part of the doc (between the markers), keeping the prose around it."""
    cmd = "python bench/aot_table.py" + (f" --extra '{a.extra}'" if a.extra else "")
    body = [BEGIN, f"Generated by `{cmd}`.", "", *lines]
    if max_lines:
        body += ["", MAX_HEADER, *max_lines]
    body.append(END)
    text = path.read_text() if path.exists() else f"# Pod readiness\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + "\n".join(body) + tail)


if __name__ == "__main__":
    main()
