"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot state, no
display needed) and saved as PNG and SVG.

    fig = figures.accuracy_vs_shots(t, "cub")           # a matplotlib Figure (None when nothing to draw)
    paths = figures.save(fig, "report/figures", "accuracy_vs_shots-cub")   # {"png": ..., "svg": ...}

Accuracies are in %, error bars are the cell's std (bootstrap, or over seeds).
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxgist.reports import table as table_lib

DPI = 110
_LABELLED_CLASSES = 40  # class names on the axes up to this many classes


def save(fig: Figure, out_dir: str | os.PathLike, stem: str) -> dict[str, str]:
    """Writes ``<out_dir>/<stem>.png`` and ``.svg`` (without creation dates or random ids, so the same
    figure gives the same files) and returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    FigureCanvasAgg(fig)  # Agg renders (no display, no pyplot state)
    out = {}
    with matplotlib.rc_context({"svg.hashsalt": "jaxgist", "svg.fonttype": "none"}):
        for ext, metadata in (("png", {"Software": None}), ("svg", {"Date": None})):
            path = os.path.join(os.fspath(out_dir), f"{stem}.{ext}")
            fig.savefig(path, dpi=DPI, metadata=metadata)
            out[ext] = path
    return out


def _model_styles(models: Sequence[str]) -> dict[str, str]:
    """A line style per model: pretrained dashed, the others solid, dotted, dash-dotted."""
    others = iter(("-", ":", "-."))
    return {m: "--" if m == "pretrained" else next(others, "-") for m in models}


def _colors(n: int):
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def accuracy_vs_shots(t: table_lib.Table, dataset: str) -> Figure | None:
    """Accuracy against shots for ``dataset``: one line per head (colour) and model (line style), error
    bars from each cell's std; ``all`` (the full training set) on the right. None with fewer than two
    shot counts."""
    columns = [c for c in t.columns if c[0] == dataset]
    rows = [r for r in t.rows if any(t.cell(r, c) for c in columns)]
    if len(columns) < 2 or not rows:
        return None  # one shot count: the run's heads figure shows it
    heads = list(dict.fromkeys(r[1] for r in rows))
    styles = _model_styles(list(dict.fromkeys(r[2] for r in rows)))
    colors = dict(zip(heads, _colors(len(heads))))
    fig = Figure(layout="constrained", figsize=(7.5 + (2.5 if len(rows) > 8 else 0), 4.2))
    ax = fig.add_subplot()
    x_of = {c: i for i, c in enumerate(columns)}
    for row in rows:
        cells = [(x_of[c], t.cell(row, c)) for c in columns if t.cell(row, c)]
        x = [i for i, _ in cells]
        y = [c.mean for _, c in cells]
        err = [c.std if c.std is not None else 0.0 for _, c in cells]
        label = f"{row[1]} ({row[2]})" + (f" {row[3]}" if row[3] else "")
        if len(t.datasets()) > 1 or len({r[0] for r in rows}) > 1:
            label = f"{row[0]}: {label}"
        ax.errorbar(x, y, yerr=err, color=colors[row[1]], linestyle=styles[row[2]], marker="o", markersize=4,
                    capsize=3, linewidth=1.4, label=label)
    ax.set_xticks(range(len(columns)), ["full" if c[1] == "all" else c[1] for c in columns])
    ax.set_xlim(-0.4, len(columns) - 0.6)
    ax.set_xlabel("training images per class (shots)")
    ax.set_ylabel(f"{t.metric} (%)")
    ax.set_title(f"{dataset}: {t.metric} against shots (error bars: bootstrap std, or std over seeds)",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(rows) // 24, frameon=False)
    return fig


def heads_comparison(t: table_lib.Table, column: table_lib.Column, run_name: str) -> Figure | None:
    """One run's heads side by side (horizontal bars per model, bootstrap std as error bars)."""
    rows = [r for r in t.rows if t.cell(r, column)]
    if not rows:
        return None
    labels = list(dict.fromkeys((r[0], r[1], r[3]) for r in rows))
    models = list(dict.fromkeys(r[2] for r in rows))
    fig = Figure(layout="constrained", figsize=(7.5, 1.2 + 0.32 * len(labels) * max(1, len(models)) ** 0.5))
    ax = fig.add_subplot()
    height = 0.8 / len(models)
    colors = _colors(max(len(models), 2))
    methods = {m for m, _, _ in labels}
    for j, model in enumerate(models):
        y, width, err = [], [], []
        for i, (method, head, variant) in enumerate(labels):
            cell = t.cell((method, head, model, variant), column)
            if cell is not None:
                y.append(i + (j - (len(models) - 1) / 2) * height)
                width.append(cell.mean)
                err.append(cell.std or 0.0)
        ax.barh(y, width, height=height * 0.95, xerr=err, color=colors[j], label=model, capsize=2,
                error_kw=dict(linewidth=0.8))
    names = [(f"{m}: " if len(methods) > 1 else "") + h + (f" {v}" if v else "") for m, h, v in labels]
    ax.set_yticks(range(len(labels)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{t.metric} (%)")
    ax.set_title(f"{run_name}: {t.metric} by head ({table_lib.column_title(column)})", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def per_class_accuracy(labels: np.ndarray, class_names: Sequence[str]) -> Callable[[np.ndarray], np.ndarray]:
    """A function of predictions giving the accuracy (%) of each class (NaN for a class without test images)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=len(class_names)).astype(np.float64)

    def accuracy(pred) -> np.ndarray:
        correct = np.bincount(labels[np.asarray(pred) == labels], minlength=len(class_names)).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return 100.0 * correct / counts

    return accuracy


def per_class(class_names: Sequence[str], labels: np.ndarray, preds: Mapping[str, np.ndarray], head: str,
              run_name: str) -> Figure:
    """Per-class test accuracy of ``head`` under each model, classes sorted by the last model's accuracy
    (bars), the other models as markers."""
    accuracy = per_class_accuracy(labels, class_names)
    models = list(preds)
    acc = {m: accuracy(preds[m]) for m in models}
    order = np.argsort(-np.nan_to_num(acc[models[-1]], nan=-1.0), kind="stable")
    n = len(class_names)
    fig = Figure(layout="constrained", figsize=(min(14.0, max(6.5, 0.18 * n + 2.0)), 4.0))
    ax = fig.add_subplot()
    x = np.arange(n)
    colors = _colors(max(len(models), 2))
    ax.bar(x, acc[models[-1]][order], width=0.85, color=colors[len(models) - 1], alpha=0.75,
           label=f"{models[-1]} (mean {np.nanmean(acc[models[-1]]):.1f}%)")
    for j, m in enumerate(models[:-1]):
        ax.plot(x, acc[m][order], linestyle="none", marker="o", markersize=3 if n > 60 else 4, color=colors[j],
                label=f"{m} (mean {np.nanmean(acc[m]):.1f}%)")
    if n <= _LABELLED_CLASSES:
        ax.set_xticks(x, [class_names[i] for i in order], rotation=90, fontsize=7)
    else:
        ax.set_xlabel(f"{n} classes, sorted by {models[-1]} accuracy")
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{run_name}: per-class accuracy of {head}", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return fig


def confusion(class_names: Sequence[str], labels: np.ndarray, preds: Mapping[str, np.ndarray], head: str,
              run_name: str) -> Figure:
    """The row-normalized test confusion matrix of ``head`` under each model, side by side."""
    n = len(class_names)
    models = list(preds)
    side = 4.2 if n <= 30 else 5.0
    fig = Figure(layout="constrained", figsize=(side * len(models) + 2.2, side + (1.6 if n <= 30 else 0.6)))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    labels = np.asarray(labels)
    counts = np.maximum(np.bincount(labels, minlength=n), 1)[:, None]
    image = None
    for ax, m in zip(axes, models):
        matrix = np.zeros((n, n), np.float64)
        np.add.at(matrix, (labels, np.asarray(preds[m])), 1.0)
        image = ax.imshow(matrix / counts, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        accuracy = 100.0 * float(np.mean(np.asarray(preds[m]) == labels))
        ax.set_title(f"{m} ({accuracy:.1f}%)", fontsize=9)
        if n <= 30:
            ax.set_xticks(range(n), class_names, rotation=90, fontsize=6)
            ax.set_yticks(range(n), class_names if ax is axes[0] else [], fontsize=6)
        ax.set_xlabel("predicted class")
        if ax is axes[0]:
            ax.set_ylabel("true class")
    fig.suptitle(f"{run_name}: confusion of {head} (rows: true class, normalized)", fontsize=10)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="fraction of the class's test images")
    return fig


def _series(rows: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if key in r and isinstance(r.get("step"), (int, float))]
    pairs.sort()
    return [p[0] for p in pairs], [p[1] for p in pairs]


def training_curves(curves: Mapping[str, Sequence[Mapping]], run_name: str) -> Figure | None:
    """Loss, learning rate and zero-shot accuracy against step, one line per ``metrics.jsonl`` (``curves``:
    label -> its rows). None when no row has a loss."""
    panels = [("train/loss", "loss", False), ("train/lr", "learning rate", False)]
    evals = list(dict.fromkeys(k for rows in curves.values() for r in rows for k in r
                               if k.startswith("val/") and k.endswith("top1")))
    panels += [(k, k[len("val/"):].replace("_", " ") + " (%)", True) for k in evals[:2]]
    if not any(_series(rows, "train/loss")[0] for rows in curves.values()):
        return None
    fig = Figure(layout="constrained", figsize=(3.6 * len(panels), 3.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = _colors(max(len(curves), 2))
    for ax, (key, title, percent) in zip(axes, panels):
        for color, (label, rows) in zip(colors, curves.items()):
            x, y = _series(rows, key)
            if x:
                y = [100.0 * v for v in y] if percent else y
                ax.plot(x, y, color=color, marker="o" if len(x) < 12 else None, markersize=3, linewidth=1.3,
                        label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{run_name}: training curves (metrics.jsonl)", fontsize=10)
    return fig
