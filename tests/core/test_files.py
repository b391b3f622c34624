"""Workdir files: atomic writes keep the old file on failure, URLs need their client."""

import json
import os

import pytest

from jaxgist.core import files


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "results.json"
    files.write_json_atomic(target, {"a": 1}, indent=2)
    files.write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert os.listdir(target.parent) == ["results.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "results.json"
    files.write_json_atomic(target, {"a": 1})
    with pytest.raises(TypeError):
        files.write_json_atomic(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]


def test_workdir_urls_need_their_client(monkeypatch):
    files.check_workdir("/tmp/run")
    with pytest.raises(ValueError, match="local paths or gs:// URLs"):
        files.check_workdir("s3://bucket/run")
    real = files.importlib.util.find_spec
    monkeypatch.setattr(files.importlib.util, "find_spec", lambda name: None if name == "gcsfs" else real(name))
    with pytest.raises(ValueError, match=r'need gcsfs: pip install -e "\.\[gcs\]"'):
        files.check_workdir("gs://bucket/run")
    assert not files.is_local("gs://bucket/run") and files.is_local("runs/a")


def test_a_workdir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(files.ConfigError, match=r"--workdir=.*run is a file, not a directory"):
        files.check_workdir(tmp_path / "run")


def test_one_job_per_workdir_and_a_stale_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    with files.WorkdirLock(tmp_path) as lock:
        assert lock.held and json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        with files.WorkdirLock(tmp_path):  # the same process again (a job inside a job): fine
            pass
        assert (tmp_path / ".lock").exists()
    assert not (tmp_path / ".lock").exists()

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": holder.pid, "host": files.socket.gethostname(),
                                                    "started": "then"}))
        with pytest.raises(files.WorkdirBusy, match=rf"in use by process {holder.pid} on .* \(since then\)"):
            files.WorkdirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over
    with files.WorkdirLock(tmp_path) as lock:
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(files.WorkdirBusy, match="another-host"):  # cannot be checked from here: live
        files.WorkdirLock(tmp_path).acquire()
    assert files.WorkdirLock("gs://bucket/run").acquire().path is None  # no lock in a bucket
