"""python -m jaxgist.report: the page, its table and figures from finished workdirs, unfinished ones
listed, and the page as headless Chromium renders it."""

import base64
import html.parser
import io
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from jaxgist.reports import build
from tests.reports import fixtures

REPO = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    fixtures.sweep_folder(root / "sweep", fixtures.birds(root / "birds"))
    return root / "sweep"


class _References(html.parser.HTMLParser):
    """Every img src and a href of a page, and its text."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "a":
            self.links.append(attrs.get("href", ""))

    def handle_data(self, data):
        self.text.append(data)


def check_references(index: pathlib.Path) -> _References:
    """Every image of the page decodes; every link that is not an anchor is a file beside the page."""
    page = _References()
    page.feed(index.read_text())
    assert page.images
    for src in page.images:
        assert src.startswith("data:image/"), src[:60]  # self-contained
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    for href in page.links:
        if not href.startswith("#"):
            assert "://" not in href and (index.parent / href).is_file(), href
    return page


def test_report_of_a_sweep_folder(sweep_root, tmp_path):
    out = tmp_path / "report"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "old.png").write_bytes(b"x")  # a figure of an earlier report that this one does not draw
    report = build.write_report([sweep_root], str(out), gallery_images=5)
    statuses = {r.name: r.status for r in report.runs}
    assert statuses == {"shots-1": "complete", "shots-3": "complete", "shots-2": "incomplete",
                        "shots-all": "failed", "shots-5": "incomplete"}
    names = sorted(os.path.basename(p) for f in report.figures for p in f.values())
    stems = ("accuracy_vs_shots-synthetic", "shots-1-heads", "shots-1-per_class", "shots-1-confusion",
             "shots-1-training", "shots-3-heads", "shots-3-per_class", "shots-3-confusion")
    assert names == sorted(f"{stem}.{ext}" for stem in stems for ext in ("png", "svg"))
    assert sorted(os.listdir(out / "figures")) == names  # and old.png is gone
    page = check_references(out / "index.html")
    text = " ".join(page.text)
    assert "results.json is not valid JSON" in text and "DataError: no rows" in text and "not started" in text
    assert "matched descriptions: 5 of 12 training images" in text
    assert (out / "table.md").read_text() == build.table.to_markdown(report.table)
    assert (out / "table.csv").read_text() == build.table.to_csv(report.table)


def test_damaged_predictions_and_metrics_are_notes_not_crashes(tmp_path, sweep_root):
    workdir = tmp_path / "damaged"
    shutil.copytree(sweep_root / "shots-1", workdir)
    npz = workdir / "predictions" / "finetuned.npz"
    npz.write_bytes(npz.read_bytes()[:100])  # cut off
    with open(workdir / "finetune" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')  # a job killed mid-line
    report = build.write_report([workdir], str(tmp_path / "out"), gallery_images=0)
    page = (tmp_path / "out" / "index.html").read_text()
    assert "predictions not read (BadZipFile" in page and "1 unreadable line(s) skipped" in page
    assert [r.status for r in report.runs] == ["complete"] and len(report.figures) == 2  # heads, training


def _chromium() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if found is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return found


def _chromium_run(chromium: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_page_renders_in_headless_chromium(sweep_root, tmp_path):
    chromium = _chromium()
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "jaxgist.report", str(sweep_root), "--out", str(out),
                           "--gallery_images", "8"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "failed: shots-all: the job exited with status 1" in done.stdout
    assert "report: " in done.stdout and "(5 run(s), 2 complete;" in done.stdout
    check_references(out / "index.html")
    url = (out / "index.html").resolve().as_uri()

    dom = _chromium_run(chromium, "--enable-logging=stderr", "--v=0", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<table>" in dom.stdout and "linear_probe_ridge" in dom.stdout and "shots-all" in dom.stdout
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "net::ERR" in line]
    assert console == [], console

    shot = tmp_path / "page.png"
    done = _chromium_run(chromium, "--screenshot=" + str(shot), "--window-size=1280,2400", "--hide-scrollbars", url)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1280)
    colors = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colors) > 500, len(colors)  # text, tables, plots: not a blank or error page
    assert (pixels < 128).any(axis=2).mean() > 0.005  # dark pixels (text, lines) over a real share of the page
