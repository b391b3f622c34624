"""A job's results: ``results.json`` for machines, ``results.md`` rendered from it for people.

    results.write(workdir, "gist", {"finetuned": {"linear_probe_sgd": {"test_top1": 0.81, ...}}},
                  run={"seconds": 812.4, "stages": {...}})
    table = results.load(workdir)["gist"]                 # {model: {head: {metric: value}}}
    print(results.comparison_table(table))                # one row per (head, model)

One schema for every job: ``{method: {model: {head: {metric: value}}}}`` (a value is a number, or
a string for a chosen hyperparameter such as a feature transform) plus ``"run"``, the run's
metadata (``run[method]``: seconds, stage or training figures, jax version, devices, time). ``write``
checks the schema, merges into what the workdir already holds (key by key at every depth: a stage or
evaluation run later adds to the results) and replaces both files atomically.
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
from typing import Any, Mapping

from jaxgist.core import files

RUN = "run"  # the key of the run metadata in results.json
# the metrics a table shows, in this order, with their bootstrap std when there is one
TABLE_METRICS = ("test_top1", "test_top3", "test_top5", "val_top1", "val_zero_shot_top1", "zero_shot_top1",
                 "chosen_test_top1", "minival_top1",
                 # captioning (x 100, as papers print them)
                 "test_Bleu_4", "test_METEOR", "test_ROUGE_L", "test_CIDEr", "test_SPICE", "val_CIDEr")


class ResultsError(ValueError):
    """Results that do not follow ``{method: {model: {head: {metric: value}}}}``."""


def check(method: str, table: Mapping[str, Any]) -> None:
    """Raises ResultsError naming the first entry of ``table`` (``{model: {head: {metric: value}}}``,
    values numbers or strings) that does not fit the schema."""
    if not isinstance(method, str) or not method or method == RUN:
        raise ResultsError(f"results method name {method!r} must be a non-empty string other than {RUN!r}")
    for model, heads in table.items():
        if not isinstance(heads, Mapping):
            raise ResultsError(f"results[{method!r}][{model!r}] must map heads to metrics, got {heads!r:.80}")
        for head, metrics in heads.items():
            if not isinstance(metrics, Mapping):
                raise ResultsError(f"results[{method!r}][{model!r}][{head!r}] must map metric names to values, "
                                   f"got {metrics!r:.80}")
            for name, value in metrics.items():
                if value is not None and not isinstance(value, (numbers.Number, str)):
                    raise ResultsError(f"results[{method!r}][{model!r}][{head!r}][{name!r}] = {value!r:.80} is "
                                       f"not a number or a string")


def merge(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """``new`` over ``old``, key by key at every depth."""
    out = dict(old)
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _strict(value):
    """Non-finite floats as null: results.json is strict JSON (NaN and Infinity are not JSON)."""
    if isinstance(value, Mapping):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def load(workdir) -> dict[str, Any]:
    """``workdir/results.json`` ({} when there is none yet)."""
    path = files.join(workdir, "results.json")
    return json.loads(files.read_text(path)) if files.exists(path) else {}


def write(workdir, method: str, table: Mapping[str, Any], *, run: Mapping[str, Any] | None = None) -> dict:
    """Merges ``{method: table}`` and ``{"run": {method: run}}`` into ``workdir/results.json`` and
    renders ``results.md`` from the merged whole. Returns the merged results."""
    check(method, table)
    new: dict[str, Any] = {method: dict(table)}
    if run is not None:
        new[RUN] = {method: {**run, "written": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")}}
    merged = _strict(merge(load(workdir), new))
    files.write_json_atomic(files.join(workdir, "results.json"), merged, newline=True, indent=2, sort_keys=True,
                            allow_nan=False)
    files.write_text_atomic(files.join(workdir, "results.md"), markdown(merged))
    return merged


def _cell(metrics: Mapping[str, Any], key: str) -> str:
    if metrics.get(key) is None:
        return "-"
    value = metrics[key]
    std = metrics.get(f"{key}_bootstrap_std", metrics.get(f"{key}_std"))  # bootstrap, or over seeds
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def comparison_table(table: Mapping[str, Any]) -> str:
    """Markdown: one row per (head, model) of one method's results, heads in order of first
    appearance, accuracies in % (± bootstrap std), only the columns some row has."""
    rows = [(head, model, metrics) for model, heads in table.items() for head, metrics in heads.items()]
    order = {head: i for i, head in reversed(list(enumerate(h for h, _, _ in rows)))}
    rows.sort(key=lambda r: (list(table).index(r[1]), order[r[0]]))
    columns = [k for k in TABLE_METRICS if any(k in m for _, _, m in rows)]
    lines = ["| head | model | " + " | ".join(f"{c} (%)" for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for head, model, metrics in rows:
        lines.append(f"| {head} | {model} | " + " | ".join(_cell(metrics, c) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _run_lines(run: Mapping[str, Any], prefix: str = ""):
    for key, value in run.items():
        if isinstance(value, Mapping):
            yield from _run_lines(value, f"{prefix}{key}.")
        else:
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            yield f"- {prefix}{key}: {shown}"


def markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: each method's comparison table, then the run metadata."""
    parts = []
    for method, table in results.items():
        if method == RUN:
            continue
        parts.append(f"## {method}\n\n{comparison_table(table)}")
    for method, run in results.get(RUN, {}).items():
        parts.append(f"## run: {method}\n\n" + "\n".join(_run_lines(run)) + "\n")
    return "\n".join(parts)
