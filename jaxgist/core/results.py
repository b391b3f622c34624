"""Writing a job's results: ``results.json`` (machine) and ``results.md`` (a table for people)."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping


def _rows(results: Mapping[str, Any], prefix: str = ""):
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _rows(value, name + " / ")
        else:
            yield name, value


def markdown_table(results: Mapping[str, Any]) -> str:
    lines = ["| method / metric | value |", "|---|---|"]
    for name, value in _rows(results):
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {name} | {shown} |")
    return "\n".join(lines) + "\n"


def write_results(workdir: str | pathlib.Path, results: Mapping[str, Any]) -> pathlib.Path:
    """Merges ``results`` into ``workdir/results.json`` and rewrites ``results.md``."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "results.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(results)
    path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    (workdir / "results.md").write_text(markdown_table(merged))
    return path
