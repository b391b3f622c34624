"""Faults and bad input through ``python -m jaxgist``, as a user meets them: preemption (SIGTERM,
SIGINT) and SIGKILL, damaged checkpoints, two jobs on one workdir, the rerun of a finished job,
unreadable images on GIST, and each error's last line.

Every command shares one persistent compilation cache (``--compilation_cache``) and one generated
dataset, so a run after the first compiles little."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxgist.training import metrics
from tests.methods.test_finetune import assert_trees_equal, saved_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAST_HINT = "  (JAXGIST_TRACEBACK=1 shows where)"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def birds(tmp_path_factory):
    """One generated dataset shared by the module's runs."""
    return str(tmp_path_factory.mktemp("synthetic") / "birds")


def command(workdir, birds, cache, *overrides, config="configs/finetune.py:small", steps=12, save_every=1000):
    return [sys.executable, "-m", "jaxgist", "--config", str(ROOT / config), "--workdir", str(workdir),
            f"--compilation_cache={cache}", f"--config.data.synthetic.dir={birds}", f"--config.train.steps={steps}",
            f"--config.train.save_every={save_every}", "--config.train.log_every=1", "--config.train.eval_every=0",
            *overrides]


def env():
    out = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out.pop("JAXGIST_TRACEBACK", None)
    return out


def run(cmd, check=True):
    """Runs ``cmd`` from / (the config files find their own helpers) and returns the finished process."""
    proc = subprocess.run(cmd, cwd="/", env=env(), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def start(cmd):
    return subprocess.Popen(cmd, cwd="/", env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def logged_steps(workdir) -> int:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((r["step"] for r in metrics.read_jsonl(path) if "train/loss" in r), default=0)


def committed(workdir) -> list[int]:
    """Steps whose checkpoint Orbax has finished (in-flight saves live in temporary directories)."""
    path = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []


def train_rows(workdir) -> list[int]:
    return [r["step"] for r in metrics.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl") if "train/loss" in r]


def assert_same_state(workdir_a, workdir_b, step):
    assert_trees_equal(saved_state(workdir_a, step), saved_state(workdir_b, step))


def results(workdir) -> dict:
    text = (pathlib.Path(workdir) / "results.json").read_text()
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"results.json holds {name}"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, birds, cache):
    """An uninterrupted 12-step run, saved at the end only; it fills the compilation cache."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run(command(workdir, birds, cache))
    assert len(list(pathlib.Path(cache).iterdir())) > 5  # the train step and the rest were cached
    return workdir


# ---------------------------------------------------------------------------------------------
# Preemption and SIGKILL
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_preemption_saves_the_step_and_the_rerun_redoes_none(tmp_path, birds, cache, uninterrupted, signum):
    """SIGTERM (TPU maintenance, spot VMs, SLURM) or SIGINT at a random step: the job finishes that
    step, saves it (no save is due: save_every=1000), exits 128+signal with one clear line; the rerun
    starts from that step and ends with the uninterrupted run's parameters, bit for bit."""
    steps, workdir = 12, tmp_path / "preempted"
    cmd = command(workdir, birds, cache)
    stop_after = int(np.random.default_rng(int(time.time()) + int(signum)).integers(2, 9))
    proc = start(cmd)
    try:
        deadline = time.time() + 300
        while logged_steps(workdir) < stop_after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before step {stop_after}: {proc.stderr.read()[-3000:]}"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, err[-3000:]
    saved = committed(workdir)
    assert len(saved) == 1 and stop_after <= saved[0] < steps, (saved, stop_after)
    assert last_line(err) == (f"jaxgist: stopped by {signal.Signals(signum).name} after step {saved[0]}, which is "
                              f"saved in {workdir / 'checkpoints'}; run the same command to resume from it")

    run(cmd)
    assert results(workdir)["run"]["finetune"]["start_step"] == saved[0]  # no step is redone
    assert_same_state(workdir, uninterrupted, steps)
    assert train_rows(workdir) == list(range(1, steps + 1))


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_restart_ends_identical(tmp_path, birds, cache, uninterrupted):
    steps, workdir = 12, tmp_path / "killed"
    cmd = command(workdir, birds, cache, save_every=2)
    kill_after = int(np.random.default_rng(int(time.time())).integers(3, 10))
    proc = start(cmd)
    try:
        deadline = time.time() + 300
        # past a random step, and with one checkpoint committed (on a loaded machine the async save of
        # step 2 can still be in flight at step 4: killing then would restart from scratch)
        while ((logged_steps(workdir) < kill_after or not committed(workdir)) and proc.poll() is None
               and time.time() < deadline):
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before step {kill_after}: {proc.stderr.read()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = logged_steps(workdir)
    assert killed_at < steps and not (workdir / "results.json").exists()

    run(cmd)
    assert 0 < results(workdir)["run"]["finetune"]["start_step"] <= killed_at
    assert_same_state(workdir, uninterrupted, steps)
    # the steps logged after the restored checkpoint and redone are replaced, not repeated
    assert train_rows(workdir) == list(range(1, steps + 1))


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints, a finished job, two jobs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_twice(tmp_path_factory, birds, cache):
    """A finished 4-step run that saved steps 2 and 4, and its command."""
    workdir = tmp_path_factory.mktemp("saved_twice") / "work"
    cmd = command(workdir, birds, cache, steps=4, save_every=2)
    run(cmd)
    assert committed(workdir) == [2, 4]
    return workdir, cmd


def _damage(step_dir: pathlib.Path, how: str) -> str:
    """Damages one step's files; returns what the warning must say about it."""
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.name != "_METADATA"),
               key=lambda p: p.stat().st_size)
    rel = str(data.relative_to(step_dir))
    if how == "flip":  # 64 flipped bytes: Orbax would read them without complaint
        raw = bytearray(data.read_bytes())
        for i in range(64):
            raw[len(raw) // 2 + i] ^= 0xFF
        data.write_bytes(bytes(raw))
        return rel
    if how == "truncate":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        return rel
    (step_dir / "state" / "_METADATA").unlink()
    return "state/_METADATA"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flip", "truncate", "delete_metadata"])
def test_a_damaged_newest_checkpoint_is_named_moved_aside_and_the_job_resumes_before_it(tmp_path, saved_twice, how):
    base, cmd = saved_twice
    workdir = tmp_path / "work"
    shutil.copytree(base, workdir)
    cmd = [a.replace(str(base), str(workdir)) for a in cmd]
    named = _damage(workdir / "checkpoints" / "4", how)

    proc = run(cmd)
    warning = next(line for line in proc.stderr.splitlines() if "is damaged" in line)
    assert f"checkpoint step 4 in {workdir / 'checkpoints'} is damaged: " in warning and named in warning, warning
    assert "moved it to " in warning and "trying the step before it" in warning
    assert "Traceback" not in proc.stderr
    aside = list((workdir / "checkpoints.damaged").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("4-")  # kept, not deleted
    assert results(workdir)["run"]["finetune"]["start_step"] == 2
    assert committed(workdir) == [2, 4]
    assert_same_state(workdir, base, 4)  # steps 3 and 4 redone give the same bits
    assert train_rows(workdir) == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_rerun_of_a_finished_job_keeps_its_results(saved_twice):
    workdir, cmd = saved_twice
    before = {name: (workdir / name).read_text() for name in ("results.json", "results.md", "metrics.jsonl")}
    proc = run(cmd)
    assert "nothing to train" in proc.stderr
    for name, text in before.items():
        assert (workdir / name).read_text() == text, name  # no NaN loss, no 0 images/s written over the figures
    figures = results(workdir)["run"]["finetune"]
    assert np.isfinite(figures["final_loss"]) and figures["images_per_s"] > 0


@pytest.mark.slow
def test_two_jobs_on_one_workdir(tmp_path, birds, cache, uninterrupted):
    """The second job refuses to start, naming the first; once the first is killed its lock is stale."""
    workdir = tmp_path / "work"
    first = start(command(workdir, birds, cache, steps=400))
    try:
        deadline = time.time() + 300
        while not (workdir / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()[-3000:]
        second = run(command(workdir, birds, cache, steps=400), check=False)
        assert second.returncode == 1
        assert last_line(second.stderr).startswith(
            f"jaxgist: error: WorkdirBusy: workdir {workdir} is in use by process {first.pid} on "), second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = run(command(workdir, birds, cache, steps=2))
    assert f"taking over the lock of workdir {workdir} from process {first.pid}" in third.stderr
    assert not (workdir / ".lock").exists()


# ---------------------------------------------------------------------------------------------
# GIST with unreadable images
# ---------------------------------------------------------------------------------------------

GIST_CONFIG = '''
from jaxgist.methods import gist


def get_config(arg=""):
    c = gist.default_config()
    c.model.init, c.gist.match_model = {init!r}, ""
    c.gist.update(dict(stages=("match", "finetune", "embed", "evaluate"), probes=("ridge",), bootstrap=10,
                       match_k=2, batch_size=16))
    c.data.update(dict(source="synthetic", num_captions=2))
    c.data.synthetic.update(dict(num_classes=4, train_per_class=3, val_per_class=1, test_per_class=1,
                                 image_size=48, num_captions=2, shots=(), dir={birds!r}))
    c.train.update(dict(global_batch=8, epochs=1, save_every=100, log_every=1))
    return c
'''


@pytest.mark.slow
def test_gist_skips_an_unreadable_image_in_every_stage_when_asked(tmp_path, cache):
    """Without data.skip_unreadable the job stops before matching, naming the file and the flag; with
    it every stage runs on the other images and the skip is counted once."""
    from configs import common
    from jaxgist.data import datasets, sources
    from jaxgist.models import clip

    init = clip.save_hf(clip.create(common.TINY_CLIP, seed=0), tmp_path / "tiny")
    config_file = tmp_path / "gist_tiny.py"
    config_file.write_text(GIST_CONFIG.format(init=str(init), birds=str(tmp_path / "birds")))
    sys.path.insert(0, str(tmp_path))
    try:
        import gist_tiny
    finally:
        sys.path.remove(str(tmp_path))
    paths = datasets.paths(gist_tiny.get_config().data, tmp_path / "scratch")  # generates the images
    broken = next(iter(sources.GistSource(paths["metadata"], paths["image_dir"], split="train")))["path"]
    pathlib.Path(broken).write_bytes(b"not an image")

    base = [sys.executable, "-m", "jaxgist", "--config", str(config_file), f"--compilation_cache={cache}"]
    refused = run(base + ["--workdir", str(tmp_path / "refused")], check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    line = last_line(refused.stderr)
    assert line.startswith("jaxgist: error: ") and broken in line and "--config.data.skip_unreadable=True" in line, line

    workdir = tmp_path / "work"
    run(base + ["--workdir", str(workdir), "--config.data.skip_unreadable=True"])
    written = results(workdir)
    stages = written["run"]["gist"]["stages"]
    assert stages["match"]["images"] == 11 and stages["match"]["skipped_unreadable"] == 1
    assert stages["embed"]["pretrained"]["train"] == 11 and stages["embed"]["finetuned"]["test"] == 4
    assert 0.0 <= written["gist"]["finetuned"]["linear_probe_ridge"]["test_top1"] <= 1.0
    captions = json.loads((workdir / "match" / "captions_top2.json").read_text())
    assert len(captions) == 11 and not any(key in broken for key in captions)


# ---------------------------------------------------------------------------------------------
# One line per error
# ---------------------------------------------------------------------------------------------

def _bad_metadata(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "meta.csv").write_text("filename,label,species,split\na.jpg,0,sparrow,train\nb.jpg,zero,sparrow,train\n")
    (tmp_path / "captions.json").write_text(json.dumps({"a.jpg": ["a bird"], "b.jpg": ["a bird"]}))
    return [f"--config.data.metadata={tmp_path / 'meta.csv'}", f"--config.data.image_dir={tmp_path / 'images'}",
            f"--config.data.captions={tmp_path / 'captions.json'}"]


@pytest.mark.parametrize("case", ["value", "override_typo", "workdir_is_a_file", "bad_csv_row",
                                  pytest.param("diverges", marks=pytest.mark.slow)])
def test_each_error_ends_with_one_clear_line(tmp_path, birds, cache, case):
    """Exit status 1 and a last line that names the key, file, row or step; no traceback, and no
    shutdown noise from background threads (Orbax's saves) after it."""
    workdir, extra = tmp_path / "work", []
    if case == "value":
        extra, want = ["--config.train.global_batch=0"], "ConfigError: config.train.global_batch=0 must be >= 1"
    elif case == "override_typo":
        extra, want = ["--config.train.epoch=3"], "a --config override or the config file: no such key: epoch"
    elif case == "workdir_is_a_file":
        workdir.write_text("")
        want = f"ConfigError: --workdir={workdir} is a file, not a directory"
    elif case == "bad_csv_row":
        extra = ["--config.data.source=gist", *_bad_metadata(tmp_path)]
        want = f"DataError: {tmp_path / 'meta.csv'}, line 3"
    else:  # the loss explodes after two asynchronous saves: Orbax's threads are running at the error
        extra = ["--config.optim.lr=1e30"]
        want = "FloatingPointError: loss is nan at step 2; stopping. Last good checkpoint: step 1"
    proc = run(command(workdir, birds, cache, *extra, save_every=1), check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = last_line(proc.stderr)
    assert line.startswith("jaxgist: error: " + want) and line.endswith(LAST_HINT), line
