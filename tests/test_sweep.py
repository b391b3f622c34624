"""python -m jaxgist.sweep: the grid, one workdir per point, skipping finished points, resuming the others,
going on past a failed one; the SLURM array and TPU pod scripts."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxgist import sweep
from jaxgist.reports import build, runs

REPO = pathlib.Path(__file__).resolve().parents[1]

FAKE_CONFIG = '''
import ml_collections


def get_config(arg=""):
    items = dict(item.split("=") for item in arg.split(",") if item)
    return ml_collections.ConfigDict(dict(method="zero_shot", mode=items.get("mode", "ok"), value=0.5))
'''

# a job as the launcher runs it: ok writes results, fail exits 1 with the launcher's one-line error, flaky
# fails the first time only (a job killed and resumed)
FAKE_JOB = '''
import os, sys
args = sys.argv[1:]
config, workdir = args[args.index("--config") + 1], args[args.index("--workdir") + 1]
overrides = [a for a in args if a.startswith("--config.")]
mode = dict(i.split("=") for i in config.partition(":")[2].split(",") if i).get("mode")
os.makedirs(workdir, exist_ok=True)
count = os.path.join(workdir, "runs.txt")
n = int(open(count).read()) + 1 if os.path.exists(count) else 1
open(count, "w").write(str(n))
print(f"fake job {mode}: run {n} {overrides}", flush=True)
if mode == "fail" or (mode == "flaky" and n == 1):
    print("jaxgist: error: DataError: broken data", file=sys.stderr, flush=True)
    sys.exit(1)
from jaxgist.core import results
value = float(overrides[-1].split("=")[1])
results.write(workdir, "zero_shot", {"preset": {"zero_shot": {"test_top1": value, "test_top1_bootstrap_std": 0.01}}})
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    config = tmp_path / "fake_config.py"
    config.write_text(FAKE_CONFIG)
    job = tmp_path / "fake_job.py"
    job.write_text(FAKE_JOB)
    monkeypatch.setattr(sweep, "JOB", (sys.executable, str(job)))
    return config


def test_values_split_outside_brackets_and_quotes():
    assert sweep.split_values("cub, flower") == ["cub", "flower"]
    assert sweep.split_values('("knn",),("knn","centroid"),"a,b"') == ['("knn",)', '("knn","centroid")', '"a,b"']
    assert sweep.parse_grid(["dataset=cub,flower", "optim.lr=1e-5,1e-6"]) == [
        ("dataset", ["cub", "flower"]), ("optim.lr", ["1e-5", "1e-6"])]
    for bad, message in (("dataset", "expected KEY=V1"), ("x=a,,b", "empty value"), ("x=a,a", "repeated")):
        with pytest.raises(sweep.SweepError, match=message):
            sweep.parse_grid([bad])
    with pytest.raises(sweep.SweepError, match="given twice"):
        sweep.parse_grid(["x=1", "x=2"])
    with pytest.raises(sweep.SweepError, match="--config.key=value"):
        sweep.split_overrides(["--config.train.epochs", "2"])


def test_points_merge_file_arguments_and_overrides(tmp_path):
    grid = sweep.parse_grid(["dataset=cub,flower", "shots=1,all", "model.init=ViT-B/16"])
    points = sweep.plan("configs/gist.py:root=/data,shots=5", grid, ["--config.train.epochs=2"], str(tmp_path))
    assert [p.name for p in points] == ["dataset-cub_shots-1_init-ViT-B-16", "dataset-cub_shots-all_init-ViT-B-16",
                                        "dataset-flower_shots-1_init-ViT-B-16", "dataset-flower_shots-all_init-ViT-B-16"]
    p = points[1]
    assert p.config == "configs/gist.py:root=/data,dataset=cub,shots=all"
    assert p.overrides == ["--config.train.epochs=2", "--config.model.init=ViT-B/16"]
    assert p.command()[-6:] == ["--config", p.config, "--workdir", str(tmp_path / p.name),
                                "--config.train.epochs=2", "--config.model.init=ViT-B/16"]
    assert p.axes == {"dataset": "cub", "shots": "all", "model.init": "ViT-B/16"}


def test_configs_of_the_points_are_loaded_as_the_launcher_loads_them(tmp_path):
    points = sweep.plan("configs/gist.py", sweep.parse_grid(["dataset=cub,nope"]), ["--config.train.epochs=2"],
                        str(tmp_path))
    bad = sweep.check_configs(points)
    assert list(bad) == ["dataset-nope"] and "dataset='nope' is not one of" in bad["dataset-nope"]
    with pytest.raises(sweep.SweepError, match="no such key"):  # every point has the same typo: one error
        sweep.sweep("configs/gist.py", ["shots=1,5"], str(tmp_path), ["--config.train.epoch=2"])


def _status(root, name):
    return json.loads((root / name / runs.STATUS_FILE).read_text())


def test_rerun_skips_finished_points_resumes_the_others_and_a_failure_stops_nothing(fake, tmp_path, capsys):
    root = tmp_path / "sweep"
    args = (str(fake), ["mode=ok,fail,flaky"], str(root), ["--config.value=0.75"])
    assert sweep.sweep(*args) == 1
    out = capsys.readouterr().out
    assert "[mode-ok] fake job ok: run 1 ['--config.value=0.75']" in out
    assert "mode-fail: FAILED (exit 1)" in out and "jaxgist: error: DataError: broken data" in out
    assert _status(root, "mode-ok")["status"] == "done" and _status(root, "mode-flaky")["status"] == "failed"
    assert "DataError: broken data" in _status(root, "mode-fail")["error"]
    ok_results = (root / "mode-ok" / "results.json").read_text()
    assert json.loads(ok_results)["zero_shot"]["preset"]["zero_shot"]["test_top1"] == 0.75
    assert "fake job ok" in (root / "mode-ok" / "sweep.log").read_text()
    point = json.loads((root / "mode-ok" / runs.POINT_FILE).read_text())
    assert point["axes"] == {"mode": "ok"} and point["command"].startswith("python ")

    assert sweep.sweep(*args, stream=False) == 1  # again: ok is skipped, flaky now finishes, fail fails again
    out = capsys.readouterr().out
    assert "mode-ok: done, skipped" in out and "1 skipped (done), 1 done now, 1 failed" in out
    assert [(root / n / "runs.txt").read_text() for n in ("mode-ok", "mode-fail", "mode-flaky")] == ["1", "2", "2"]
    assert (root / "mode-ok" / "results.json").read_text() == ok_results
    assert _status(root, "mode-flaky")["status"] == "done"

    report = build.write_report([root], str(tmp_path / "report"), gallery_images=0)
    assert {r.name: r.status for r in report.runs} == {"mode-ok": "complete", "mode-fail": "failed",
                                                       "mode-flaky": "complete"}
    assert sweep.sweep(*args, redo=True, stream=False) == 1
    assert (root / "mode-ok" / "runs.txt").read_text() == "2"


def test_dry_run_writes_nothing(fake, tmp_path, capsys):
    assert sweep.sweep(str(fake), ["mode=ok"], str(tmp_path / "s"), [], dry_run=True) == 0
    assert "fake_config.py:mode=ok --workdir" in capsys.readouterr().out and not (tmp_path / "s").exists()


def _fake_launcher(repo: pathlib.Path, name: str) -> None:
    """launch/<name>: records its arguments and fails for workdirs whose name has 'fail'."""
    (repo / "launch").mkdir(parents=True, exist_ok=True)
    script = repo / "launch" / name
    script.write_text('#!/usr/bin/env bash\necho "$@" >> "$(dirname "$0")/calls.txt"\n'
                      'for a in "$@"; do case $a in *fail*) exit 3 ;; esac; done\nexit 0\n')
    script.chmod(0o755)


def test_slurm_array_script(fake, tmp_path):
    root = tmp_path / "sweep"
    assert sweep.sweep(str(fake), ["mode=ok,fail,flaky"], str(root), ["--config.value=0.5"], stream=False) == 1
    assert sweep.sweep(str(fake), ["mode=ok,fail,flaky"], str(root), ["--config.value=0.5"], launch="slurm") == 0
    script = root / "slurm_array.sh"
    text = script.read_text()
    assert "#SBATCH --array=1-2" in text and "#SBATCH --nodes=2" in text  # ok is done; resources of launch/slurm.sh
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    repo = tmp_path / "repo"
    _fake_launcher(repo, "slurm.sh")
    env = dict(os.environ, JAXGIST_REPO=str(repo), SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_JOB_ID="7")
    assert subprocess.run(["bash", str(script)], env=env).returncode == 0
    assert _status(root, "mode-flaky") | {"finished": ""} == {"status": "done", "returncode": 0, "finished": "",
                                                              "launcher": "slurm"}
    call = (repo / "launch" / "calls.txt").read_text().split()
    assert call == [f"{fake}:mode=flaky", str(root / "mode-flaky"), "--config.value=0.5"]
    env["SLURM_ARRAY_TASK_ID"] = "1"
    assert subprocess.run(["bash", str(script)], env=env).returncode == 3
    assert _status(root, "mode-fail")["status"] == "failed" and _status(root, "mode-fail")["returncode"] == 3


def test_tpu_pod_script_runs_every_unfinished_point(fake, tmp_path):
    root = tmp_path / "sweep"
    assert sweep.sweep(str(fake), ["mode=ok,fail,flaky"], str(root), [], launch="tpu_pod") == 0
    script = root / "tpu_pod.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    repo = tmp_path / "repo"
    _fake_launcher(repo, "tpu_pod.sh")
    done = subprocess.run(["bash", str(script), "--zone", "z1", "my-v4-32"], env=dict(os.environ, JAXGIST_REPO=str(repo)),
                          capture_output=True, text=True)
    assert done.returncode == 1 and "1 point(s) failed" in done.stderr
    calls = [line.split() for line in (repo / "launch" / "calls.txt").read_text().splitlines()]
    assert [c[:3] for c in calls] == [["--zone", "z1", "my-v4-32"]] * 3
    assert [c[3] for c in calls] == [f"{fake}:mode={m}" for m in ("ok", "fail", "flaky")]
    assert [_status(root, f"mode-{m}")["status"] for m in ("ok", "fail", "flaky")] == ["done", "failed", "done"]


@pytest.mark.slow
def test_a_real_sweep_and_its_report(tmp_path):
    """Two points of the tiny zero-shot job, one with a template the job refuses: the other's results
    stand, and the report's table shows them."""
    root = tmp_path / "zs"
    done = subprocess.run(
        [sys.executable, "-m", "jaxgist.sweep", "--config", "configs/zero_shot.py:small", "--workdir", str(root),
         "--grid", 'zero_shot.templates=("a photo of a {}.",),("a photo",)', "--config.zero_shot.bootstrap=20",
         "--nostream"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    good, bad = (p.name for p in sweep.plan("x", sweep.parse_grid(['zero_shot.templates=("a photo of a {}.",),'
                                                                    '("a photo",)']), [], str(root)))
    assert f"failed: {bad}" in done.stdout and "needs a '{}'" in done.stdout
    assert _status(root, good)["status"] == "done" and _status(root, bad)["status"] == "failed"
    written = json.loads((root / good / "results.json").read_text())["zero_shot"]["preset"]["zero_shot"]
    report = build.write_report([root], str(tmp_path / "report"))
    cell = report.table.cell(("zero_shot", "zero_shot", "preset", ""), ("synthetic", "2"))
    assert cell.mean == pytest.approx(100 * written["test_top1"])
    assert cell.std == pytest.approx(100 * written["test_top1_bootstrap_std"])
