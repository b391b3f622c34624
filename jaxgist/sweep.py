"""A grid of runs, one workdir per point: ``python -m jaxgist.sweep --config FILE[:ARG] --grid KEY=V1,V2 ...
--workdir ROOT [--config.key=value ...]``.

    python -m jaxgist.sweep --config configs/gist.py --grid 'dataset=cub,flower' --grid 'shots=1,3,5,all' \\
        --workdir runs/gist --config.data.image_dir=...              # runs the 8 points here, one after the other
    python -m jaxgist.sweep ... --launch=slurm                       # writes ROOT/slurm_array.sh (sbatch --array)
    python -m jaxgist.sweep ... --launch=tpu_pod                     # writes ROOT/tpu_pod.sh (launch/tpu_pod.sh per point)
    python -m jaxgist.report runs/gist                               # the table and figures of every point

Grid keys: a key without a dot is an argument of the config file (``configs/gist.py:dataset=cub,shots=1``,
merged into ``FILE:ARG``); a dotted key is a config override (``--grid 'optim.lr=1e-5,1e-6'`` runs
``--config.optim.lr=1e-5`` and ``...=1e-6``). Values are split on commas outside brackets and quotes
(``--grid 'gist.heads=("knn",),("knn","centroid")'``). Points are the product of the axes, in order;
each runs ``python -m jaxgist --config ... --workdir ROOT/<point> ...`` in its own process.

``ROOT/sweep.json`` lists the points; each point's workdir gets ``sweep_point.json`` (its axes and
command) and ``sweep_status.json`` (running / done / failed / stopped, exit status, seconds, log). Running the
same command again skips the points that are done and reruns the others in the same workdirs, where
each job resumes (fine-tuning from its last checkpoint); ``--redo`` reruns done points too. A point
that fails is reported (the last lines of its log) and the sweep goes on with the next; the exit
status is 1 when any point failed. Each point's output goes to ``<point>/sweep.log`` (and, with
``--stream``, to this terminal prefixed by the point's name).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import types
from typing import Sequence

from absl import app, flags

from jaxgist.core import files
from jaxgist.reports import runs

LAUNCHERS = ("local", "slurm", "tpu_pod")
JOB = (sys.executable, "-m", "jaxgist")  # the command of one point, before its --config and --workdir
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FLAGS = None


def _define_flags():
    """The command's flags, defined when it runs rather than on import: ``jaxgist.main`` defines
    ``--config`` and ``--workdir`` too, and a process (the tests) may import both modules."""
    global _FLAGS
    if _FLAGS is None:
        _FLAGS = types.SimpleNamespace(
            config=flags.DEFINE_string("config", None, "Config file of every point, e.g. configs/gist.py[:arg]."),
            grid=flags.DEFINE_multi_string("grid", [], "An axis: KEY=V1,V2,... (repeat for more axes)."),
            workdir=flags.DEFINE_string("workdir", None, "The sweep's folder: one workdir per point inside it."),
            launch=flags.DEFINE_enum("launch", "local", LAUNCHERS, "local: run the points here, one after the "
                                     "other; slurm / tpu_pod: write the launch script of the unfinished points."),
            redo=flags.DEFINE_bool("redo", False, "Rerun points that are done, too."),
            stream=flags.DEFINE_bool("stream", True,
                                     "Also show each point's output here (it always goes to <point>/sweep.log)."),
            dry_run=flags.DEFINE_bool("dry_run", False, "Print each point's command and state; run and write nothing."),
        )
        flags.mark_flags_as_required(["config", "workdir"])
    return _FLAGS


class SweepError(ValueError):
    """A bad grid, config or workdir of the sweep itself."""


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------

def split_values(text: str) -> list[str]:
    """``text`` split on commas that are outside brackets and quotes, each value stripped."""
    out, depth, quote, current = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
            continue
        current += ch
    out.append(current.strip())
    return out


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["dataset=cub,flower", ...]`` -> ``[("dataset", ["cub", "flower"]), ...]``; SweepError naming the
    axis for a missing ``=``, an empty value, a repeated key or value."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
            raise SweepError(f"--grid {spec!r}: expected KEY=V1,V2,... (KEY a config-file argument or a dotted "
                             f"config key such as optim.lr)")
        found = split_values(values)
        if any(not v for v in found):
            raise SweepError(f"--grid {spec!r}: empty value")
        if len(set(found)) != len(found):
            raise SweepError(f"--grid {spec!r}: a value is repeated")
        if key in [k for k, _ in axes]:
            raise SweepError(f"--grid {spec!r}: axis {key!r} is given twice")
        axes.append((key, found))
    return axes


@dataclasses.dataclass
class Point:
    name: str
    axes: dict[str, str]
    config: str  # FILE[:ARG] of this point
    overrides: list[str]  # --config.key=value
    workdir: str

    def command(self) -> list[str]:
        return [*JOB, "--config", self.config, "--workdir", self.workdir, *self.overrides]

    def shown(self) -> str:
        """The command as a person would type it (``python -m jaxgist ...``)."""
        return shlex.join(["python", *self.command()[1:]])


def _merge_arg(spec: str, file_args: dict[str, str]) -> str:
    """``configs/gist.py:root=/data`` with ``{"dataset": "cub"}`` -> ``configs/gist.py:root=/data,dataset=cub``
    (a grid value replaces the same key of ARG)."""
    if not file_args:
        return spec
    path, sep, arg = spec.partition(":")
    given = [item for item in split_values(arg) if item] if sep else []
    kept = [item for item in given if item.partition("=")[0].strip() not in file_args]
    return f"{path}:{','.join(kept + [f'{k}={v}' for k, v in file_args.items()])}"


def _name_part(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", value).strip("-.") or "x"


def plan(config: str, grid: Sequence[tuple[str, list[str]]], overrides: Sequence[str], root: str) -> list[Point]:
    """The points of the grid (the product of the axes, in order), each with its own workdir under ``root``."""
    points, names = [], set()
    for values in itertools.product(*[v for _, v in grid]) if grid else [()]:
        axes = {k: v for (k, _), v in zip(grid, values)}
        name = "_".join(f"{_name_part(k.split('.')[-1])}-{_name_part(v)}" for k, v in axes.items()) or "run"
        base, i = name, 1
        while name in names:
            i += 1
            name = f"{base}.{i}"
        names.add(name)
        file_args = {k: v for k, v in axes.items() if "." not in k}
        point_overrides = list(overrides) + [f"--config.{k}={v}" for k, v in axes.items() if "." in k]
        points.append(Point(name=name, axes=axes, config=_merge_arg(config, file_args), overrides=point_overrides,
                            workdir=os.path.join(root, name)))
    return points


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the ``--config.key=value`` overrides) of a command line."""
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith("--config."):
            if "=" not in arg:
                raise SweepError(f"{arg}: write config overrides as --config.key=value")
            overrides.append(arg)
        else:
            rest.append(arg)
    return rest, overrides


# ---------------------------------------------------------------------------------------------
# State of the points
# ---------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def read_status(point: Point) -> dict:
    return runs.read_status(point.workdir)


def write_status(point: Point, **status) -> None:
    files.write_json_atomic(files.join(point.workdir, runs.STATUS_FILE), status, indent=2, newline=True)


def is_done(point: Point) -> bool:
    return read_status(point).get("status") == "done"


def write_plan(root: str, config: str, grid, overrides: Sequence[str], points: Sequence[Point]) -> None:
    """``root/sweep.json`` and each point's ``sweep_point.json``."""
    for p in points:
        files.write_json_atomic(files.join(p.workdir, runs.POINT_FILE),
                                dict(name=p.name, axes=p.axes, config=p.config, overrides=p.overrides,
                                     command=p.shown()), indent=2, newline=True)
    files.write_json_atomic(files.join(root, runs.SWEEP_FILE),
                            dict(config=config, grid=[[k, v] for k, v in grid], overrides=list(overrides),
                                 points=[dict(name=p.name, axes=p.axes) for p in points], written=_now()),
                            indent=2, newline=True)


def check_configs(points: Sequence[Point]) -> dict[str, str]:
    """{point name: why its config does not load} (the config file, its argument, the override keys),
    checked as ``python -m jaxgist`` loads them, before any point runs."""
    from jaxgist import config_loading, methods
    from jaxgist.core.config import ConfigError

    bad = {}
    for p in points:
        try:
            config = config_loading.load(p.config, p.overrides)
            methods.get(config.get("method"))
        except (ConfigError, ValueError) as e:
            bad[p.name] = str(e)
    return bad


# ---------------------------------------------------------------------------------------------
# Running here
# ---------------------------------------------------------------------------------------------

class _Stop:
    """SIGTERM while a point runs: passed on to its job (which saves and exits); the sweep then stops."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.signal: int | None = None

    def __call__(self, signum, frame) -> None:
        self.signal = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)


def _last_error(log_path: str) -> str:
    """The job's one-line error (``jaxgist: error: ...``) or the last line of its log."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = [line.rstrip() for line in f if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("jaxgist: error:") or "Error:" in line]
    return (errors or lines or [""])[-1][:500]


def run_point(point: Point, stop: _Stop, *, stream: bool) -> tuple[int, float]:
    """Runs one point's job in its own process; (exit status, seconds)."""
    os.makedirs(point.workdir, exist_ok=True)
    log_path = os.path.join(point.workdir, "sweep.log")
    write_status(point, status="running", started=_now(), log=log_path, command=shlex.join(point.command()))
    t0 = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {_now()} {shlex.join(point.command())}\n")
        log.flush()
        child = subprocess.Popen(point.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 bufsize=1, errors="replace")
        stop.child = child
        try:
            for line in child.stdout:
                log.write(line)
                if stream:
                    sys.stdout.write(f"[{point.name}] {line}")
                    sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C reached the job too: let it save and exit
            stop.signal = signal.SIGINT
        code = child.wait()
        stop.child = None
    seconds = time.perf_counter() - t0
    fields = dict(returncode=code, seconds=round(seconds, 1), finished=_now(), log=log_path,
                  command=shlex.join(point.command()))
    if code == 0:
        write_status(point, status="done", **fields)
    elif stop.signal is not None:
        write_status(point, status="stopped", **fields)
    else:
        write_status(point, status="failed", error=_last_error(log_path), **fields)
    return code, seconds


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def run_local(points: Sequence[Point], todo: Sequence[Point], *, stream: bool) -> dict[str, str]:
    """Runs ``todo`` one after the other; {name: outcome}. A failed point does not stop the others; a
    signal (Ctrl-C, SIGTERM) stops the sweep after the running job has saved."""
    stop = _Stop()
    previous = signal.signal(signal.SIGTERM, stop)
    outcome = {}
    try:
        for i, p in enumerate(todo, 1):
            print(f"sweep: [{i}/{len(todo)}] {p.name}: running ({p.shown()}; "
                  f"log {os.path.join(p.workdir, 'sweep.log')})", flush=True)
            code, seconds = run_point(p, stop, stream=stream)
            if code == 0:
                outcome[p.name] = f"done in {_duration(seconds)}"
            elif stop.signal is not None:
                outcome[p.name] = f"stopped by signal {stop.signal} after {_duration(seconds)}"
            else:
                outcome[p.name] = f"FAILED (exit {code}) after {_duration(seconds)}: {read_status(p).get('error', '')}"
            print(f"sweep: [{i}/{len(todo)}] {p.name}: {outcome[p.name]}", flush=True)
            if stop.signal is not None:
                print("sweep: stopped; run the same command again to resume", flush=True)
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
    return outcome


# ---------------------------------------------------------------------------------------------
# Launch scripts
# ---------------------------------------------------------------------------------------------

_STATUS_FUNCTION = r'''
status() {  # status WORKDIR STATE RETURNCODE: the point's sweep_status.json, as python -m jaxgist.sweep writes it
  mkdir -p "$1" && printf '{"status": "%s", "returncode": %s, "finished": "%s", "launcher": "%s"}\n' \
    "$2" "$3" "$(date +%Y-%m-%dT%H:%M:%S)" "$LAUNCHER" > "$1/sweep_status.json"
}
'''


def _array_ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    out = []
    for _, group in itertools.groupby(enumerate(indices), key=lambda t: t[1] - t[0]):
        run = [i for _, i in group]
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def _point_words(p: Point) -> str:
    return shlex.join([p.config, p.workdir, *p.overrides])


def slurm_script(root: str, points: Sequence[Point], todo: Sequence[Point]) -> str:
    """An sbatch array script: task i runs point i with ``launch/slurm.sh`` (the resources of its
    ``#SBATCH`` lines, which sbatch options override)."""
    with open(os.path.join(REPO, "launch", "slurm.sh"), encoding="utf-8") as f:
        resources = [line.rstrip() for line in f if line.startswith("#SBATCH") and
                     not line.startswith(("#SBATCH --output", "#SBATCH --job-name"))]
    indices = [points.index(p) for p in todo]
    cases = "\n".join(f"  {i}) set -- {_point_words(p)} ;;" for i, p in enumerate(points))
    return "\n".join([
        "#!/usr/bin/env bash",
        "#SBATCH --job-name=jaxgist-sweep",
        *resources,
        f"#SBATCH --output={os.path.abspath(root)}/slurm-%A_%a.out",
        f"#SBATCH --array={_array_ranges(indices)}",
        "#",
        f"# The sweep {os.path.abspath(root)}: one array task per point (written by python -m jaxgist.sweep;",
        "# rerun it to rewrite this file with only the unfinished points). Submit from the repository root:",
        f"#   sbatch {os.path.join(root, 'slurm_array.sh')}",
        "# sbatch options (--nodes, --gpus-per-node, --array=...%4 to run 4 points at a time) override the lines above.",
        "set -uo pipefail",
        f"repo=${{JAXGIST_REPO:-{shlex.quote(REPO)}}}",
        "LAUNCHER=slurm",
        _STATUS_FUNCTION,
        'case "${SLURM_ARRAY_TASK_ID:?submit this script with sbatch (it is an array job)}" in',
        cases,
        '  *) echo "no sweep point $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
        "esac",
        'status "$2" running null',
        'bash "$repo/launch/slurm.sh" "$@"',
        "code=$?",
        'if [ "$code" = 0 ]; then status "$2" done 0; else status "$2" failed "$code"; fi',
        'exit "$code"',
        ""])


def tpu_pod_script(root: str, todo: Sequence[Point]) -> str:
    """A script running the points one after the other on a TPU pod slice with ``launch/tpu_pod.sh``."""
    lines = "\n".join(f"run_point {_point_words(p)}" for p in todo)
    return "\n".join([
        "#!/usr/bin/env bash",
        f"# The sweep {os.path.abspath(root)}: its unfinished points, one after the other, on a TPU pod slice",
        "# (written by python -m jaxgist.sweep; rerun it to rewrite this file with only the unfinished points).",
        f"#   bash {os.path.join(root, 'tpu_pod.sh')} [launch/tpu_pod.sh options, e.g. --zone us-central2-b --sync] TPU_NAME",
        "# The workdirs must be on a filesystem every worker mounts (relative ones are relative to the workers'",
        "# checkout, --remote-dir); a failed point does not stop the others.",
        "set -uo pipefail",
        'if [ $# -lt 1 ]; then echo "usage: $0 [launch/tpu_pod.sh options] TPU_NAME" >&2; exit 2; fi',
        'options=("${@:1:$#-1}") tpu=${!#}',
        f"repo=${{JAXGIST_REPO:-{shlex.quote(REPO)}}}",
        "LAUNCHER=tpu_pod",
        "failed=0",
        _STATUS_FUNCTION,
        "run_point() {  # run_point CONFIG WORKDIR [--config.key=value ...]",
        '  local config=$1 workdir=$2 code=0; shift 2',
        '  echo "sweep: $workdir" >&2',
        '  status "$workdir" running null',
        '  "$repo/launch/tpu_pod.sh" "${options[@]+"${options[@]}"}" "$tpu" "$config" "$workdir" "$@" || code=$?',
        '  if [ "$code" != 0 ]; then failed=$((failed + 1)); echo "sweep: $workdir FAILED (exit $code)" >&2; fi',
        '  if [ "$code" = 0 ]; then status "$workdir" done 0; else status "$workdir" failed "$code"; fi',
        "}",
        lines,
        'echo "sweep: done, $failed point(s) failed" >&2',
        '[ "$failed" = 0 ]',
        ""])


def write_launch_script(launcher: str, root: str, points: Sequence[Point], todo: Sequence[Point]) -> str:
    path = os.path.join(root, "slurm_array.sh" if launcher == "slurm" else "tpu_pod.sh")
    text = slurm_script(root, points, todo) if launcher == "slurm" else tpu_pod_script(root, todo)
    files.write_text_atomic(path, text)
    os.chmod(path, 0o755)
    return path


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def sweep(config: str, grid_specs: Sequence[str], root: str, overrides: Sequence[str], *, launch: str = "local",
          redo: bool = False, stream: bool = True, dry_run: bool = False) -> int:
    """The whole command; returns the exit status (0: every point done or launched, 1: some failed)."""
    if not files.is_local(root):
        raise SweepError(f"--workdir={root}: the sweep's folder is a directory (local, or a shared filesystem), "
                         f"not a URL")
    if os.path.exists(root) and not os.path.isdir(root):
        raise SweepError(f"--workdir={root} is a file, not a directory")
    grid = parse_grid(grid_specs)
    points = plan(config, grid, overrides, root)
    print(f"sweep: {len(points)} point(s) of {config} in {root}", flush=True)
    bad = check_configs(points)
    if bad and len(bad) == len(points):
        first = next(iter(bad.values()))
        raise SweepError(first if len(points) == 1 else f"no point's config loads, e.g. {first}")
    done = [p for p in points if not redo and p.name not in bad and is_done(p)]
    todo = [p for p in points if p not in done and p.name not in bad]
    for p in points:
        state = "bad config: " + bad[p.name] if p.name in bad else "done, skipped" if p in done else \
            read_status(p).get("status", "new")
        print(f"sweep:   {p.name}: {state}" + (f"\n    {p.shown()}" if dry_run else ""), flush=True)
    if dry_run:
        return 0
    write_plan(root, config, grid, overrides, points)
    for p in points:
        if p.name in bad:
            write_status(p, status="failed", returncode=None, error=f"bad config: {bad[p.name]}", finished=_now())
    if launch != "local":
        if not todo:
            print("sweep: every point is done; nothing to launch", flush=True)
            return 1 if bad else 0
        path = write_launch_script(launch, root, points, todo)
        how = (f"sbatch {path}" if launch == "slurm" else f"bash {path} [--zone ZONE ...] TPU_NAME")
        print(f"sweep: wrote {path} for {len(todo)} unfinished point(s); start it with: {how}", flush=True)
        return 1 if bad else 0
    outcome = run_local(points, todo, stream=stream)
    failed = [p.name for p in todo if outcome.get(p.name, "").startswith("FAILED")] + list(bad)
    stopped = len(outcome) < len(todo) or any(o.startswith("stopped") for o in outcome.values())
    print(f"sweep: {len(done)} skipped (done), {sum(o.startswith('done') for o in outcome.values())} done now, "
          f"{len(failed)} failed" + (", stopped before the end" if stopped else ""), flush=True)
    for name in failed:
        print(f"sweep:   failed: {name}: {outcome.get(name) or bad.get(name)}", flush=True)
    print(f"sweep: the report: python -m jaxgist.report {root}", flush=True)
    if stopped:
        return 130
    return 1 if failed else 0


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        f = _define_flags()
        code = sweep(f.config.value, f.grid.value, f.workdir.value, _OVERRIDES, launch=f.launch.value,
                     redo=f.redo.value, stream=f.stream.value, dry_run=f.dry_run.value)
    except (SweepError, OSError) as e:
        if os.environ.get("JAXGIST_TRACEBACK") == "1":
            raise
        print(f"jaxgist.sweep: error: {e}", file=sys.stderr, flush=True)
        code = 1 if isinstance(e, OSError) else 2
    sys.exit(code)


_OVERRIDES: list[str] = []


def cli() -> None:
    global _OVERRIDES
    _define_flags()
    try:
        argv, _OVERRIDES = split_overrides(sys.argv)
    except SweepError as e:
        print(f"jaxgist.sweep: error: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(main, argv=argv)


if __name__ == "__main__":
    cli()
