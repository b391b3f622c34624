"""The whole report of one or more workdirs (or sweep folders).

    report = build.write_report(["runs/gist"], "report")   # report/index.html, table.md, table.csv, figures/
    print(report.index, len(report.figures), [r.name for r in report.runs if not r.complete])

What it holds: every run with its status (incomplete and failed runs named, with the reason); the
paper-style table (``table.md``, ``table.csv``); accuracy against shots per dataset; for each run its
heads side by side, the per-class accuracy and confusion matrix of its best head (chosen on
validation) pretrained vs fine-tuned (from ``predictions/*.npz`` of GIST's evaluate stage), its
training curves (every ``metrics.jsonl``) and a gallery of its training images with the text the
method leaned on.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
import zipfile
from typing import Sequence

from absl import logging

from jaxgist.core import files
from jaxgist.methods import gist
from jaxgist.reports import figures, gallery, html, runs, table

FIGURES = "figures"


@dataclasses.dataclass
class Report:
    out_dir: str
    index: str
    runs: list[runs.Run]
    table: table.Table
    figures: list[dict[str, str]]  # {"png": path, "svg": path} of each figure
    seconds: float


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "run"


def read_metrics_jsonl(path) -> tuple[list[dict], int]:
    """(rows, lines skipped): the rows of a ``metrics.jsonl``; a line that is not a JSON object (a job
    killed while writing it) is skipped and counted."""
    rows, bad = [], 0
    for line in files.read_text(path).splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def training_logs(run: runs.Run) -> dict[str, str]:
    """label -> path of each ``metrics.jsonl`` in the workdir, two levels deep (``finetune/``, ``pretrain/``,
    ``eval/``)."""
    root = files.path(run.path)
    found = {}
    for pattern in ("metrics.jsonl", "*/metrics.jsonl", "*/*/metrics.jsonl"):
        for p in sorted(root.glob(pattern), key=os.fspath):
            rel = os.path.relpath(os.fspath(p.parent), os.fspath(root))
            found["job" if rel == "." else rel.replace(os.sep, "/")] = os.fspath(p)
    return found


def predictions(run: runs.Run) -> tuple[list[str], object, dict[str, dict]]:
    """(class names, test labels, {model: {head: top-1 classes}}) from ``predictions/*.npz`` (models in the
    order pretrained, finetuned, others)."""
    folder = files.join(run.path, "predictions")
    if not folder.is_dir():
        return [], None, {}
    paths = sorted(folder.glob("*.npz"), key=lambda p: ({"pretrained": 0, "finetuned": 1}.get(p.stem, 2), p.stem))
    names, labels, out = [], None, {}
    for p in paths:
        names, labels, heads = gist.load_predictions(os.fspath(p))
        out[p.stem] = heads
    return names, labels, out


def best_head(run: runs.Run, heads: Sequence[str], models: Sequence[str], metric: str) -> tuple[str, str]:
    """(head, how chosen): among ``heads``, the highest validation top-1 under the last of ``models``
    (fine-tuned); the test ``metric`` only when no head has a validation figure."""
    def figure(head: str, key: str) -> float | None:
        for method, t in run.results.items():
            value = t.get(models[-1], {}).get(head, {}).get(key) if method != "run" and isinstance(t, dict) else None
            if isinstance(value, (int, float)):
                return float(value)
        return None

    for key, how in (("val_top1", "chosen on validation top-1"), (metric, f"no validation figure: chosen on {metric}")):
        scored = [(figure(h, key), h) for h in heads if figure(h, key) is not None]
        if scored:
            return max(scored, key=lambda t: t[0])[1], how
    return heads[0], "first head"


def _clear_old_figures(folder: str, keep: set[str]) -> None:
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith((".png", ".svg")) and os.path.join(folder, name) not in keep:
                os.remove(os.path.join(folder, name))


def write_report(paths: Sequence[str], out_dir: str = "report", *, metric: str = "test_top1",
                 gallery_images: int = 24, thumbnail_size: int = 112, title: str = "") -> Report:
    """Reads the runs at ``paths`` and writes ``out_dir/index.html`` (self-contained), ``table.md``,
    ``table.csv`` and ``figures/*.{png,svg}``."""
    if not files.is_local(out_dir):
        raise ValueError(f"the report is written to a local directory, not {out_dir}")
    t0 = time.perf_counter()
    found = runs.read_runs(paths)
    counts = {s: sum(r.status == s for r in found) for s in ("complete", "incomplete", "failed")}
    logging.info("report: %d run(s): %d complete, %d incomplete, %d failed", len(found), counts["complete"],
                 counts["incomplete"], counts["failed"])
    for r in found:
        if not r.complete:
            logging.info("report: %s is %s: %s", r.name, r.status, r.reason)
    t = table.build(found, metric)
    fig_dir = os.path.join(out_dir, FIGURES)
    os.makedirs(fig_dir, exist_ok=True)
    files.write_text_atomic(os.path.join(out_dir, "table.md"), table.to_markdown(t))
    files.write_text_atomic(os.path.join(out_dir, "table.csv"), table.to_csv(t))
    written: list[dict[str, str]] = []
    stems: set[str] = set()

    def draw(fig, stem: str, caption: str) -> str:
        if fig is None:
            return ""
        base, i = stem, 1
        while stem in stems:  # two run names that read the same as file names
            i += 1
            stem = f"{base}-{i}"
        stems.add(stem)
        paths_ = figures.save(fig, fig_dir, stem)
        written.append(paths_)
        return html.figure(paths_, out_dir, caption)

    parts = [html.section("Runs", html.runs(found), anchor="runs")]
    links = '<p class="meta">Also as <a href="table.md">table.md</a> and <a href="table.csv">table.csv</a>.</p>'
    parts.append(html.section(f"Table: {metric} (%), mean ± bootstrap std (or std over seeds, n)",
                              html.table(t) + links, anchor="table"))
    shots = [draw(figures.accuracy_vs_shots(t, d), f"accuracy_vs_shots-{slug(d)}", f"{d}: {metric} against shots")
             for d in t.datasets()]
    if any(shots):
        parts.append(html.section("Accuracy against shots", "\n".join(s for s in shots if s), anchor="shots"))
    per_run = []
    for i, r in enumerate(found, 1):
        logging.info("report: run %d/%d %s", i, len(found), r.name)
        per_run.append(_run_section(r, draw, metric, gallery_images, thumbnail_size))
    parts.append(html.section("Runs in detail", "\n".join(per_run), anchor="details"))
    _clear_old_figures(fig_dir, {p for paths_ in written for p in paths_.values()})
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    subtitle = (f"{len(found)} run(s): {counts['complete']} complete, {counts['incomplete']} incomplete, "
                f"{counts['failed']} failed; from {', '.join(os.fspath(p) for p in paths)}; written {now}")
    index = files.write_text_atomic(os.path.join(out_dir, "index.html"),
                                    html.page(title or "jaxgist report", subtitle, parts))
    seconds = time.perf_counter() - t0
    logging.info("report: wrote %s (%d figures) in %.1f s", index, len(written), seconds)
    return Report(out_dir=out_dir, index=index, runs=found, table=t, figures=written, seconds=seconds)


def _run_section(r: runs.Run, draw, metric: str, gallery_images: int, thumbnail_size: int) -> str:
    """One run: status, heads, per-class and confusion of the best head, training curves, gallery."""
    stem = slug(r.name)
    body = [html.paragraph(f"{r.status}{': ' + r.reason if r.reason else ''} · dataset {r.dataset}, shots {r.shots}"
                           + (f" · {', '.join(f'{k}={v}' for k, v in r.axes.items())}" if r.axes else "")
                           + f" · {r.path}", "meta")]
    if r.complete:
        body.append(draw(figures.heads_comparison(table.build([r], metric), (r.dataset, r.shots), r.name),
                         f"{stem}-heads", f"{r.name}: {metric} of every head (bootstrap std)"))
    try:
        names, labels, preds = predictions(r)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # a file cut off or not ours
        names, labels, preds = [], None, {}
        body.append(html.paragraph(f"predictions not read ({type(e).__name__}: {e})", "meta"))
    if preds:
        models = list(preds)
        heads = [h for h in preds[models[0]] if all(h in preds[m] for m in models)]
        if heads:
            head, how = best_head(r, heads, models, metric)
            chosen = {m: preds[m][head] for m in models}
            body.append(draw(figures.per_class(names, labels, chosen, head, r.name), f"{stem}-per_class",
                             f"{r.name}: per-class test accuracy of {head} ({how}), sorted"))
            body.append(draw(figures.confusion(names, labels, chosen, head, r.name), f"{stem}-confusion",
                             f"{r.name}: confusion matrix of {head} ({how})"))
    curves, skipped = {}, 0
    for label, path in training_logs(r).items():
        try:
            rows, bad = read_metrics_jsonl(path)
        except (OSError, ValueError) as e:
            body.append(html.paragraph(f"{path} not read ({type(e).__name__}: {e})", "meta"))
            continue
        curves[label], skipped = rows, skipped + bad
    if curves:
        body.append(draw(figures.training_curves(curves, r.name), f"{stem}-training",
                         f"{r.name}: loss, learning rate and zero-shot accuracy from "
                         f"{', '.join(f'{k}/metrics.jsonl' if k != 'job' else 'metrics.jsonl' for k in curves)}"
                         + (f" ({skipped} unreadable line(s) skipped)" if skipped else "")))
    for make in (gallery.matched, gallery.captioning):
        try:
            g = make(r, limit=gallery_images, size=thumbnail_size)
        except ValueError as e:
            body.append(html.paragraph(f"gallery not shown: {e}", "meta"))
            continue
        if g is not None:
            body.append(html.details(g.title, html.gallery(g), open_=len(g.items) <= 30))
    return html.section(r.name, "\n".join(b for b in body if b), level=3, anchor=html.anchor(r))
