"""FLIP's caption-only fine-tuning (configs/flip.py, jaxgist.methods.flip): the train split only."""

import os
import pathlib
import subprocess
import sys

import pytest

from jaxgist.core import config as config_lib
from jaxgist.data import datasets, sources
from jaxgist.methods import finetune, flip

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from configs import flip as flip_config  # noqa: E402

# --------------------------------------------------------------------------------------------------
# configs/flip.py: FLIP's caption-only fine-tuning, train split only
# --------------------------------------------------------------------------------------------------


def test_flip_config_recipe_and_small_validates():
    c = flip_config.get_config()
    assert c.method == "flip" and c.model.init == "ViT-B/32"
    assert (c.data.num_captions, c.data.template, c.data.train_split) == (1, "{caption}", "train")
    optim = c.optim
    assert (optim.name, optim.lr, optim.b2, optim.eps, optim.weight_decay) == ("adam", 5e-7, 0.98, 1e-6, 1e-3)
    assert (c.train.global_batch, c.train.epochs) == (32, 30)
    small = flip_config.get_config("small")
    assert small.data.source == "synthetic"
    finetune.validate(small)
    flip.validate(small)
    with pytest.raises(ValueError, match="unknown argument"):
        flip_config.get_config("large")


@pytest.mark.parametrize("key, value, message", [
    ("data.train_split", "test", "train split only"),
    ("data.train_split", "train+test", "train split only"),
    ("data.train_split", "val", "train split only"),
    ("data.eval_split", "test", "must not be used"),
    ("method", "finetune", "'flip' method"),
])
def test_flip_config_rejects_the_test_split(key, value, message):
    c = flip_config.get_config("small")
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        flip.check_finetune_splits(c)


def test_flip_finetune_reads_the_train_split_only(tmp_path, monkeypatch):
    c = flip_config.get_config("small")
    c.data.synthetic.dir = str(tmp_path / "birds")
    source = datasets.source(c.data, "train", tmp_path, with_captions=True)
    flip.check_train_only(source)
    assert {r["split"] for r in source} == {"train"} and len(source) == 64
    paths = datasets.paths(c.data, tmp_path)
    for split in (None, ("train", "test"), "test"):
        with pytest.raises(config_lib.ConfigError, match="train split only"):
            flip.check_train_only(sources.GistSource(paths["metadata"], paths["image_dir"], split=split))
    # flip.run checks, then hands over to the fine-tuning job (whose run is tested in test_finetune;
    # configs/flip.py:small with train.steps=2 runs in 10-20 s on 2 cores, too slow for this file).
    calls = []
    monkeypatch.setattr(finetune, "run", lambda config, workdir: calls.append(workdir) or {"finetune": {}})
    assert flip.run(c, str(tmp_path / "work")) == {"finetune": {}} and calls == [str(tmp_path / "work")]
    bad = flip_config.get_config("small")
    bad.data.synthetic.dir = c.data.synthetic.dir
    bad.data.train_split = "test"
    with pytest.raises(config_lib.ConfigError, match="test split is never trained"):
        flip.run(bad, str(tmp_path / "bad"))
    assert len(calls) == 1


@pytest.mark.parametrize("override", ["--config.data.train_split=test", "--config.data.eval_split=test"])
def test_command_line_overrides_cannot_put_the_test_split_back(tmp_path, override):
    """configs/flip.py runs as method "flip", whose job checks the splits after the overrides."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jaxgist", "--config", "configs/flip.py:small", "--workdir",
                           str(tmp_path / "work"), f"--config.data.synthetic.dir={tmp_path / 'birds'}", override],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "test split" in proc.stderr and not (tmp_path / "work" / "checkpoints").exists(), proc.stderr[-2000:]
