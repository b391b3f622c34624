"""Finished and unfinished runs, read from their workdirs.

    found = runs.read_runs(["runs/gist", "runs/other-run"])   # a sweep's folder expands to its points
    for r in found:
        print(r.name, r.status, r.reason, r.dataset, r.shots)  # status: complete | incomplete | failed

A workdir is a folder holding ``results.json``, ``config.json`` or ``sweep_point.json``; any other
folder is searched (two levels deep) for workdirs, in the order of its ``sweep.json`` when it has one.
A run is *complete* when its ``results.json`` parses, follows the results schema and holds at least one
test figure; a missing, partial or malformed file makes it *incomplete* with the reason, and a sweep
point whose job exited with an error is *failed* (``sweep_status.json``). Nothing here raises for a
bad workdir: the report lists it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from jaxgist.core import files, results

MARKERS = ("results.json", "config.json", "sweep_point.json")  # any of these makes a folder a workdir
POINT_FILE = "sweep_point.json"  # the sweep's definition of a point: name, axes, command
STATUS_FILE = "sweep_status.json"  # how the point's job ended: status, returncode, seconds, log
SWEEP_FILE = "sweep.json"  # a sweep's folder: the grid and its points in order


@dataclasses.dataclass
class Run:
    """One workdir as the report sees it."""

    path: str
    name: str
    status: str  # "complete" | "incomplete" | "failed"
    reason: str = ""  # why it is not complete
    results: dict = dataclasses.field(default_factory=dict)
    config: dict = dataclasses.field(default_factory=dict)
    axes: dict = dataclasses.field(default_factory=dict)  # the sweep point's grid values
    dataset: str = "-"
    shots: str = "-"
    log: str = ""  # the sweep's log of the point's job, when there is one

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def join(self, *parts: str):
        return files.join(self.path, *parts)


def _read_json(path) -> tuple[Any, str]:
    """(data, "") or (None, why not) for a JSON file."""
    if not files.exists(path):
        return None, f"no {os.path.basename(os.fspath(path))}"
    try:
        text = files.read_text(path)
    except OSError as e:
        return None, f"{os.fspath(path)}: unreadable ({e})"
    if not text.strip():
        return None, f"{os.fspath(path)} is empty"
    try:
        return json.loads(text), ""
    except ValueError as e:
        return None, f"{os.fspath(path)} is not valid JSON ({e})"


def read_status(workdir) -> dict:
    """The sweep's ``sweep_status.json`` of a point ({} when there is none or it is unreadable)."""
    status, _ = _read_json(files.join(workdir, STATUS_FILE))
    return status if isinstance(status, dict) else {}


def is_workdir(path) -> bool:
    return any(files.exists(files.join(path, m)) for m in MARKERS)


def find_workdirs(path, depth: int = 2) -> list[str]:
    """The workdirs at or under ``path``: ``path`` itself if it is one, else the points its
    ``sweep.json`` lists (started or not) and the workdirs among its subfolders, ``depth`` levels deep."""
    p = files.path(path)
    if is_workdir(p):
        return [os.fspath(p)]
    found: list[str] = []
    sweep, _ = _read_json(p / SWEEP_FILE)
    if isinstance(sweep, dict):
        for point in sweep.get("points", []):
            if isinstance(point, dict) and point.get("name"):
                found.append(os.fspath(p / point["name"]))
    if depth > 0 and p.is_dir():
        for child in sorted(p.iterdir(), key=lambda c: c.name):
            if child.is_dir() and not child.name.startswith("."):
                found += [w for w in find_workdirs(child, depth - 1) if w not in found]
    return found


def dataset_label(config: dict) -> str:
    """The dataset of a resolved config (``config.json``): GIST folder, TFDS name, image folder, or
    ``synthetic``."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    source = data.get("source", "")
    if source == "synthetic":
        return "synthetic"
    if source == "tfds":
        return str(data.get("tfds_name") or "tfds")
    if source == "folder" and data.get("folder"):
        return os.path.basename(os.path.normpath(str(data["folder"])))
    if data.get("metadata"):
        return os.path.basename(os.path.dirname(os.path.abspath(str(data["metadata"])))).lower()
    return "-"


def shots_label(config: dict) -> str:
    """Training images per class of a resolved config: ``k`` of a GIST ``metadata_{k}shot.csv``, the
    synthetic data's ``train_per_class``, else ``all``."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    if data.get("source") == "synthetic" and isinstance(data.get("synthetic"), dict):
        per_class = data["synthetic"].get("train_per_class")
        return str(per_class) if per_class is not None else "all"
    match = re.search(r"_(\d+)shot\.csv$", str(data.get("metadata", "")))
    if match:
        return match.group(1)
    return "all" if data else "-"


def has_test_figures(res: dict) -> bool:
    return any(isinstance(value, (int, float)) and key.startswith(("test_", "chosen_test_"))
               for method, table in res.items() if method != results.RUN and isinstance(table, dict)
               for heads in table.values() if isinstance(heads, dict)
               for metrics in heads.values() if isinstance(metrics, dict)
               for key, value in metrics.items())


def read_run(path, name: str | None = None) -> Run:
    """The run in workdir ``path`` (never raises for a missing or damaged file: the run is then
    incomplete, with the reason)."""
    path = os.fspath(path)
    run = Run(path=path, name=name or os.path.basename(os.path.normpath(path)), status="incomplete")
    config, _ = _read_json(files.join(path, "config.json"))
    run.config = config if isinstance(config, dict) else {}
    point, _ = _read_json(files.join(path, POINT_FILE))
    if isinstance(point, dict):
        run.axes = {str(k): str(v) for k, v in (point.get("axes") or {}).items()}
        run.name = name or str(point.get("name") or run.name)
    run.dataset = run.axes.get("dataset") or dataset_label(run.config)
    run.shots = run.axes.get("shots") or shots_label(run.config)
    status = read_status(path)
    run.log = str(status.get("log", ""))
    if not files.exists(path):
        run.reason = "not started (no workdir yet)"
        return run
    res, why = _read_json(files.join(path, "results.json"))
    if res is None:
        run.reason = why + (" yet (the job has not finished)" if why == "no results.json" else "")
    elif not isinstance(res, dict):
        run.reason = f"{files.join(path, 'results.json')}: expected an object, got {type(res).__name__}"
    else:
        try:
            for method, table in res.items():
                if method != results.RUN:
                    if not isinstance(table, dict):
                        raise results.ResultsError(f"results[{method!r}] must map models to heads, got {table!r:.60}")
                    results.check(method, table)
        except results.ResultsError as e:
            run.reason = f"{files.join(path, 'results.json')}: {e}"
        else:
            run.results = res
            if not has_test_figures(res):
                run.reason = "results.json has no test figures yet (evaluation has not run)"
    state = status.get("status")
    if state == "failed":
        run.status = "failed"
        code = status.get("returncode")
        run.reason = f"the job exited with status {code}" + (f": {status['error']}" if status.get("error") else "")
    elif state == "running":
        run.status = "incomplete"
        run.reason = f"started {status.get('started', '?')} and not finished (running, or stopped: rerun the sweep)"
    elif state == "stopped":
        run.status = "incomplete"
        run.reason = "stopped by a signal after it saved; rerun the sweep to resume it"
    elif not run.reason:
        run.status = "complete"
    return run


def read_runs(paths) -> list[Run]:
    """Every run at or under ``paths`` (workdirs or sweep folders), in order, each once. A path that does
    not exist or holds no workdir is listed as an incomplete run with the reason."""
    out: list[Run] = []
    seen: set[str] = set()
    for given in paths:
        if not files.exists(given):
            out.append(Run(path=os.fspath(given), name=os.fspath(given), status="incomplete",
                           reason=f"{os.fspath(given)} does not exist"))
            continue
        found = find_workdirs(given)
        if not found:
            out.append(Run(path=os.fspath(given), name=os.fspath(given), status="incomplete",
                           reason=f"no workdir in {os.fspath(given)} (no results.json, config.json or {POINT_FILE})"))
        for workdir in found:
            key = os.path.abspath(workdir) if files.is_local(workdir) else workdir
            if key not in seen:
                seen.add(key)
                out.append(read_run(workdir))
    _unique_names(out)
    return out


def _unique_names(found: list[Run]) -> None:
    """Runs of different folders with one name (``seed_0`` under two variants) get their parent's name too."""
    counts: dict[str, int] = {}
    for r in found:
        counts[r.name] = counts.get(r.name, 0) + 1
    for r in found:
        if counts[r.name] > 1:
            parent = os.path.basename(os.path.dirname(os.path.normpath(r.path)))
            r.name = f"{parent}/{r.name}" if parent else r.name
