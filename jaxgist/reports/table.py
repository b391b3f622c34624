"""The paper-style table of many runs: rows method / head / model, columns dataset x shots.

    t = table.build(complete_runs, metric="test_top1")
    t.cell(("gist", "linear_probe_sgd", "finetuned", ""), ("cub", "5"))   # Cell(mean, std, n, runs)
    table.to_markdown(t); table.to_csv(t)

A cell is one run's figure (``results.json``: ``{method: {model: {head: {metric: value}}}}``) with its
bootstrap std (``<metric>_bootstrap_std``, else ``<metric>_std``), as a percentage. Runs of a sweep
that differ only in a ``seed`` axis (``seed`` or ``*.seed``) share a cell: the mean over them and the
std over them (ddof 1). Any other grid axis that the dataset and shots do not determine (a model, a
learning rate) becomes part of the row (``variant``), so no two settings are ever averaged together.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from typing import Iterable, Sequence

import numpy as np

from jaxgist.core import results
from jaxgist.heads import registry as heads_lib
from jaxgist.methods import gist
from jaxgist.reports.runs import Run

LABEL_AXES = ("dataset", "shots")
# rows in this order where the names are known (results.json keeps its keys sorted), others after
MODEL_ORDER = ("pretrained", "finetuned")
HEAD_ORDER = ("zero_shot", *(f"linear_probe_{p}" for p in gist.PROBES), *heads_lib.HEADS)

Row = tuple[str, str, str, str]  # method, head, model, variant
Column = tuple[str, str]  # dataset, shots


@dataclasses.dataclass(frozen=True)
class Cell:
    mean: float  # %
    std: float | None  # %: the bootstrap std of one run, or the std over seeds
    n: int  # runs averaged (seeds)
    runs: tuple[str, ...]

    def text(self) -> str:
        out = f"{self.mean:.1f}" + (f" ± {self.std:.1f}" if self.std is not None else "")
        return out + (f" (n={self.n})" if self.n > 1 else "")


@dataclasses.dataclass
class Table:
    metric: str
    rows: list[Row]
    columns: list[Column]
    cells: dict[tuple[Row, Column], Cell]

    def cell(self, row: Row, column: Column) -> Cell | None:
        return self.cells.get((row, column))

    def best(self, column: Column) -> Row | None:
        """The row with the highest mean in ``column``."""
        found = [(c.mean, r) for (r, col), c in self.cells.items() if col == column]
        return max(found, key=lambda t: t[0])[1] if found else None

    def datasets(self) -> list[str]:
        return list(dict.fromkeys(d for d, _ in self.columns))


def shots_key(shots: str):
    """Sorts shot counts numerically, ``all`` (and other words) after them."""
    try:
        return (0, float(shots), "")
    except ValueError:
        return (1, 0.0, shots)


def is_seed_axis(key: str) -> bool:
    return key == "seed" or key.endswith(".seed")


def variant_axes(found: Sequence[Run]) -> list[str]:
    """Grid axes that tell runs of the same dataset and shots apart (seeds excluded)."""
    keys = list(dict.fromkeys(k for r in found for k in r.axes if k not in LABEL_AXES and not is_seed_axis(k)))
    out = []
    for key in keys:
        values: dict[Column, set] = {}
        for r in found:
            values.setdefault((r.dataset, r.shots), set()).add(r.axes.get(key))
        if any(len(v) > 1 for v in values.values()):
            out.append(key)
    return out


def _std_of(metrics: dict, metric: str) -> float | None:
    std = metrics.get(f"{metric}_bootstrap_std", metrics.get(f"{metric}_std"))
    return float(std) if isinstance(std, (int, float)) and math.isfinite(std) else None


def build(found: Iterable[Run], metric: str = "test_top1") -> Table:
    """The table of ``metric`` over the complete runs in ``found``."""
    found = [r for r in found if r.complete]
    variants = variant_axes(found)
    values: dict[tuple[Row, Column], list[tuple[float, float | None, str]]] = {}
    seen: dict[int, dict[str, int]] = {0: {}, 1: {}, 2: {}, 3: {}}  # first-seen order of each row label
    for r in found:
        variant = ", ".join(f"{k}={r.axes[k]}" for k in variants if k in r.axes)
        column = (r.dataset, r.shots)
        for method, table in r.results.items():
            if method == results.RUN:
                continue
            for model, heads in table.items():
                for head, metrics in heads.items():
                    value = metrics.get(metric)
                    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                        continue
                    row = (method, head, model, variant)
                    for i, label in enumerate(row):
                        seen[i].setdefault(label, len(seen[i]))
                    values.setdefault((row, column), []).append((100.0 * value, _std_of(metrics, metric), r.name))
    cells = {}
    for key, got in values.items():
        means = np.asarray([v for v, _, _ in got], np.float64)
        if len(got) == 1:
            std = None if got[0][1] is None else 100.0 * got[0][1]
        else:
            std = float(means.std(ddof=1))
        cells[key] = Cell(mean=float(means.mean()), std=std, n=len(got), runs=tuple(n for _, _, n in got))
    def known_first(order: Sequence[str], position: dict[str, int], name: str) -> int:
        return order.index(name) if name in order else len(order) + position[name]

    # rows: by method, variant, head, then model (a head's pretrained and fine-tuned rows side by side)
    rows = sorted({row for row, _ in cells}, key=lambda r: (seen[0][r[0]], seen[3][r[3]],
                                                            known_first(HEAD_ORDER, seen[1], r[1]),
                                                            known_first(MODEL_ORDER, seen[2], r[2])))
    datasets = list(dict.fromkeys(r.dataset for r in found))
    columns = sorted({col for _, col in cells}, key=lambda c: (datasets.index(c[0]), shots_key(c[1])))
    return Table(metric=metric, rows=rows, columns=columns, cells=cells)


def column_title(column: Column) -> str:
    dataset, shots = column
    return f"{dataset} {'full' if shots == 'all' else f'{shots}-shot'}"


def row_titles(table: Table) -> list[str]:
    """The row-label columns: method, head, model, and variant when some row has one."""
    return ["method", "head", "model"] + (["variant"] if any(r[3] for r in table.rows) else [])


def _row_labels(table: Table, row: Row) -> list[str]:
    return list(row[:3]) + ([row[3]] if len(row_titles(table)) == 4 else [])


def to_markdown(table: Table) -> str:
    """A markdown table, the best mean of each column in bold."""
    best = {col: table.best(col) for col in table.columns}
    head = row_titles(table) + [f"{column_title(c)} (%)" for c in table.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.rows:
        cells = []
        for col in table.columns:
            cell = table.cell(row, col)
            text = cell.text() if cell else "-"
            cells.append(f"**{text}**" if cell and best[col] == row else text)
        lines.append("| " + " | ".join(_row_labels(table, row) + cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """The table as CSV: the row labels, then ``<column> mean``, ``<column> std`` (%), ``<column> n``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(row_titles(table) + [f"{column_title(c)} {part}" for c in table.columns
                                         for part in ("mean", "std", "n")])
    for row in table.rows:
        line = _row_labels(table, row)
        for col in table.columns:
            cell = table.cell(row, col)
            if cell is None:
                line += ["", "", ""]
            else:
                line += [f"{cell.mean:.4f}", "" if cell.std is None else f"{cell.std:.4f}", str(cell.n)]
        writer.writerow(line)
    return out.getvalue()
