"""The dataset a job config names: ``config.data`` -> a random-access source of records.

``data.source`` picks the kind:

- ``"gist"``: a GIST-format dataset (``metadata`` CSV, ``image_dir``, ``captions`` JSON).
- ``"synthetic"``: the generated fine-grained birds of ``jaxgist.data.synthetic``, written in the
  GIST format under ``synthetic.dir`` (default ``<workdir>/synthetic``) on first use and then read
  exactly like ``"gist"``.
- ``"tfds"``: ``tfds_name`` (e.g. ``caltech_birds2011``) from ``tfds_dir``, with an optional
  ``captions`` JSON joined by file name.
- ``"folder"``: an image folder with one subdirectory per class (``folder``; if it has a
  subdirectory named like the split, that one is used). No captions.
"""

from __future__ import annotations

import os
import pathlib

import jax
import ml_collections

from jaxgist.core.config import ConfigError, require
from jaxgist.data import synthetic, transforms
from jaxgist.data.sources import GistSource, ImageFolderSource

SOURCES = ("gist", "synthetic", "tfds", "folder")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        source="gist",
        metadata="", image_dir="", captions="", descriptions="",
        tfds_name="", tfds_dir="", folder="",
        synthetic=dict(dir="", first_class=0, num_classes=20, train_per_class=30, val_per_class=5, test_per_class=10,
                       image_size=112, seed=0, num_captions=5, shots=(1, 3, 5)),
        num_captions=5, template="{species}: {caption}", train_split="train", eval_split="val",
        missing_captions="error", check_files=True, skip_unreadable=False, workers=0, prefetch=2,
        # evaluation preprocessing: "torchvision" (OpenAI's clip, open_clip: the seed methods) or "hf"
        # (CLIPImageProcessor): center-crop rounding and resize-before-RGB, see jaxgist.data.transforms
        crop_rounding="torchvision",
    ))


def validate(c) -> None:
    require(c.source in SOURCES, f"config.data.source={c.source!r} is not one of {SOURCES}")
    require(c.num_captions >= 1, f"config.data.num_captions={c.num_captions} must be >= 1")
    require("{caption}" in c.template, f"config.data.template={c.template!r} has no {{caption}} field")
    require(c.missing_captions in ("error", "skip"),
            f"config.data.missing_captions={c.missing_captions!r} is not 'error' or 'skip'")
    require(c.workers >= 0 and c.prefetch >= 1, "config.data.workers must be >= 0 and config.data.prefetch >= 1")
    require(c.crop_rounding in transforms.CROP_ROUNDINGS,
            f"config.data.crop_rounding={c.crop_rounding!r} is not one of {transforms.CROP_ROUNDINGS}")
    if c.source == "gist":
        for key in ("metadata", "image_dir"):
            require(bool(c[key]), f"config.data.{key} must be set for config.data.source='gist'")
        for key in ("metadata", "captions", "descriptions"):
            if c[key] and not os.path.isfile(c[key]):
                raise ConfigError(f"config.data.{key}={c[key]!r}: no such file")
        if not os.path.isdir(c.image_dir):
            raise ConfigError(f"config.data.image_dir={c.image_dir!r}: no such directory")
    elif c.source == "tfds":
        require(bool(c.tfds_name), "config.data.tfds_name must be set for config.data.source='tfds'")
    elif c.source == "folder":
        require(bool(c.folder), "config.data.folder must be set for config.data.source='folder'")
    elif c.source == "synthetic":
        require(c.synthetic.num_captions >= c.num_captions,
                f"config.data.num_captions={c.num_captions} exceeds the {c.synthetic.num_captions} captions per "
                f"image config.data.synthetic.num_captions writes")


def write_synthetic(c, workdir: str | os.PathLike) -> synthetic.SyntheticDataset:
    """Writes (or reuses) the synthetic dataset; process 0 writes, the others wait for it."""
    s = c.synthetic
    if not s.dir and "://" in os.fspath(workdir):
        raise ConfigError(f"config.data.synthetic.dir must be set to a local directory: the generated images "
                          f"are not written into a bucket workdir ({os.fspath(workdir)})")
    root = pathlib.Path(s.dir or pathlib.Path(workdir) / "synthetic")
    kwargs = dict(first_class=s.first_class, num_classes=s.num_classes, train_per_class=s.train_per_class, val_per_class=s.val_per_class,
                  test_per_class=s.test_per_class, image_size=s.image_size, seed=s.seed,
                  num_captions=s.num_captions, shots=tuple(s.shots))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            synthetic.write_dataset(root, **kwargs)
        multihost_utils.sync_global_devices("jaxgist synthetic dataset written")
    return synthetic.write_dataset(root, **kwargs)


def paths(c, workdir: str | os.PathLike) -> dict[str, str]:
    """metadata / image_dir / captions / descriptions of a GIST-format config (synthetic included), and
    coder_knowledge: the synthetic dataset's CODER knowledge file ("" for other sources)."""
    if c.source == "synthetic":
        ds = write_synthetic(c, workdir)
        return {"metadata": ds.metadata, "image_dir": ds.image_dir, "captions": ds.captions,
                "descriptions": ds.descriptions, "coder_knowledge": ds.coder_knowledge}
    return {"metadata": c.metadata, "image_dir": c.image_dir, "captions": c.captions, "descriptions": c.descriptions,
            "coder_knowledge": ""}


def source(c, split: str, workdir: str | os.PathLike, *, with_captions: bool):
    """The records of ``split``; with captions (the first ``num_captions`` of each) for training."""
    if c.source in ("gist", "synthetic"):
        p = paths(c, workdir)
        if with_captions and not p["captions"]:
            raise ConfigError("config.data.captions must be set: training pairs images with their matched captions")
        return GistSource(p["metadata"], p["image_dir"], split=split,
                          captions=p["captions"] if with_captions else None,
                          num_captions=c.num_captions if with_captions else None,
                          missing_captions=c.missing_captions, check_files=c.check_files)
    if c.source == "tfds":
        from jaxgist.data.tfds_source import TfdsSource

        if with_captions and not c.captions:
            raise ConfigError("config.data.captions must be set: training pairs images with their matched captions")
        return TfdsSource(c.tfds_name, split, data_dir=c.tfds_dir or None,
                          captions=c.captions if with_captions else None,
                          num_captions=c.num_captions if with_captions else None,
                          missing_captions=c.missing_captions)
    if with_captions:
        raise ConfigError("config.data.source='folder' has no captions; use a GIST-format or TFDS source")
    root = pathlib.Path(c.folder)
    return ImageFolderSource(root / split if (root / split).is_dir() else root, split=split)
