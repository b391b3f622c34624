"""GPT4Image: an ordinary image classifier (ResNet-50, DeiT) trained with an auxiliary loss that pulls
a projection of its image feature towards the CLIP text embedding of a description of that image.
Inference uses the classifier alone.

The job (``config.method = "gpt4image"``, see ``configs/gpt4image.py``), by ``config.mode``:

- ``embed``: the description embeddings. Every training image's description (``gpt4image.descriptions``,
  a JSON ``{image name: description}`` such as the ``describe`` job's ``image_descriptions.json``) is
  encoded by a CLIP text tower (``clip.init``, OpenAI's RN50 as the reference), truncated at 77
  tokens, L2-normalized, and written to an embedding store keyed by image name
  (``<workdir>/text_embeddings``, or ``gpt4image.embeddings``), in resumable parts.
- ``train`` (default): runs ``embed`` first when the text loss is on and the store is missing, then
  trains (``gpt4image_step``), evaluating top-1/top-5 every epoch on the test split
  (``data.eval_split``: ImageNet's ``val``) and on ``minival``, a held-out part of the training images
  (``data.minival_fraction``). Results: the final epoch, and the epoch chosen on minival top-1 (the
  reference reports the best *test* epoch; we never select on test), for the raw weights and,
  with ``gpt4image.ema_decay``, the EMA weights.
- ``evaluate``: top-1/top-5 of a saved step (``evaluate.step``, -1: the latest) on the test split and
  minival, raw and EMA weights.
- ``compare``: the text loss against the baseline (no text loss), one training run per seed of
  ``compare.seeds`` in ``<workdir>/<variant>/seed_<s>``; the test top-1 mean and std side by side.

Resuming: rerun the same command; training continues from the latest checkpoint (parameters,
optimizer state, BatchNorm statistics, EMA, data-iterator position), the embedding job from its
last finished part, ``compare`` from its unfinished runs.
"""

from __future__ import annotations

import copy
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from jaxgist.core import config as config_lib
from jaxgist.core import files, results
from jaxgist.data import augment, datasets, embedding_store, minival, pipeline, sources, transforms
from jaxgist.evaluation import text_embeddings
from jaxgist.methods import gpt4image_step
from jaxgist.models import clip, deit, projection, resnet
from jaxgist.models.clip import tokenizer as tokenizer_lib
from jaxgist.training import checkpoint, config_checks, loop
from jaxgist.training import metrics as metrics_lib
from jaxgist.training import optim, parallel

MODES = ("embed", "train", "evaluate", "compare")
SCALES_HELP = "'global' or 'reference:N'"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_config() -> ml_collections.ConfigDict:
    """Every key the job reads; defaults: GPT4Image's ResNet-50 recipe on an ImageNet-style folder."""
    c = ml_collections.ConfigDict(dict(method="gpt4image", seed=0, mode="train"))
    c.model = ml_collections.ConfigDict(dict(
        arch="resnet50", init="", num_classes=0, dtype="float32", param_dtype="float32", remat=False,
        drop_path=0.0, overrides={}))
    c.clip = clip.default_model_config("RN50")  # the text tower of the description embeddings
    c.clip.update(dict(batch=256, part_size=4096))
    c.gpt4image = ml_collections.ConfigDict(dict(
        text_loss=True, lamb=0.3, tau=0.2, text_loss_scale="global", bn_sync=False, bn_groups=0, ema_decay=0.0,
        label_smoothing=0.0, mixup=0.0, cutmix=0.0, mixup_switch_prob=0.5, descriptions="", embeddings=""))
    c.data = datasets.default_config()
    c.data.update(dict(source="folder", train_split="train", eval_split="val", image_size=224, eval_resize=0,
                       minival_fraction=0.01, eval_batch=250, interpolation="bilinear", randaugment="",
                       random_erasing=0.0, repeated_augmentation=1))
    c.train = ml_collections.ConfigDict(dict(global_batch=256, epochs=120, steps=0, log_every=50, eval_every_epochs=1,
                                             keep=2, async_checkpoints=True))
    c.evaluate = ml_collections.ConfigDict(dict(step=-1))
    c.compare = ml_collections.ConfigDict(dict(seeds=(0, 1, 2)))
    c.optim = optim.default_config()
    c.optim.update(dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="cosine",
                        final_lr_ratio=1e-4, schedule_unit="epoch"))
    return parallel.add_config(c)


def family(arch: str) -> str:
    if arch in resnet.PRESETS:
        return "resnet"
    if arch in deit.PRESETS:
        return "deit"
    raise config_lib.ConfigError(f"config.model.arch={arch!r} is not one of {sorted(resnet.PRESETS) + sorted(deit.PRESETS)}")


def validate(config, num_devices: int | None = None, *, check_data: bool = True) -> None:
    config_lib.check_keys(config, default_config(), free=("model.overrides", "clip.preset", "mesh", "sharding.rules",
                                                          "compare.seeds"))
    clip.check_model_config(config.clip)
    req = config_lib.require
    req(config.mode in MODES, f"config.mode={config.mode!r} is not one of {MODES}")
    family(config.model.arch)
    for key in ("dtype", "param_dtype"):
        req(config.model[key] in _DTYPES, f"config.model.{key}={config.model[key]!r} is not one of {tuple(_DTYPES)}")
    req(config.model.num_classes >= 0, f"config.model.num_classes={config.model.num_classes} must be >= 0")
    req(0.0 <= config.model.drop_path < 1.0, f"config.model.drop_path={config.model.drop_path} must be in [0, 1)")
    g = config.gpt4image
    gpt4image_step.text_weight(g.text_loss_scale, g.lamb)
    req(g.tau > 0, f"config.gpt4image.tau={g.tau} must be > 0")
    req(g.lamb >= 0, f"config.gpt4image.lamb={g.lamb} must be >= 0")
    req(g.bn_groups >= 0, f"config.gpt4image.bn_groups={g.bn_groups} must be >= 0 (0: one per data-parallel device)")
    req(0.0 <= g.ema_decay < 1.0, f"config.gpt4image.ema_decay={g.ema_decay} must be in [0, 1)")
    req(0.0 <= g.label_smoothing < 1.0, f"config.gpt4image.label_smoothing={g.label_smoothing} must be in [0, 1)")
    req(g.mixup >= 0 and g.cutmix >= 0, "config.gpt4image.mixup and config.gpt4image.cutmix (Beta alphas) must be >= 0")
    req(0.0 <= g.mixup_switch_prob <= 1.0, f"config.gpt4image.mixup_switch_prob={g.mixup_switch_prob} must be in [0, 1]")
    t = config.train
    req(t.global_batch >= 1, f"config.train.global_batch={t.global_batch} must be >= 1")
    req(t.steps >= 0 and t.epochs >= 0 and (t.steps > 0 or t.epochs > 0),
        "set config.train.epochs or config.train.steps (>= 0 both, one of them > 0)")
    for key in ("log_every", "eval_every_epochs", "keep"):
        req(t[key] >= 1, f"config.train.{key}={t[key]} must be >= 1")
    d = config.data
    req(0.0 <= d.minival_fraction < 0.5, f"config.data.minival_fraction={d.minival_fraction} must be in [0, 0.5)")
    req(d.image_size >= 32 and d.eval_batch >= 1, "config.data.image_size must be >= 32 and eval_batch >= 1")
    req(d.eval_resize == 0 or d.eval_resize >= d.image_size,
        f"config.data.eval_resize={d.eval_resize} must be 0 (image_size / 0.875) or >= image_size")
    req(d.train_split != d.eval_split, "config.data.train_split and config.data.eval_split must differ")
    req(d.interpolation in transforms.INTERPOLATIONS,
        f"config.data.interpolation={d.interpolation!r} is not one of {transforms.INTERPOLATIONS}")
    req(0.0 <= d.random_erasing <= 1.0, f"config.data.random_erasing={d.random_erasing} must be in [0, 1]")
    req(d.repeated_augmentation >= 1, f"config.data.repeated_augmentation={d.repeated_augmentation} must be >= 1")
    if d.randaugment:
        try:
            augment.RandAugment.parse(d.randaugment)
        except ValueError as e:
            raise config_lib.ConfigError(f"config.data.randaugment: {e}") from None
    req(config.evaluate.step >= -1, f"config.evaluate.step={config.evaluate.step} must be a saved step or -1")
    req(len(config.compare.seeds) >= 1, "config.compare.seeds must name at least one seed")
    config_checks.check_training(config, num_devices, check_data=check_data)


def compile_inputs(config, mesh):
    """(jitted train step, abstract (state, batch), numerics) for ahead-of-time compilation
    (``python -m jaxgist.aot``): ``model.num_classes`` classes (0: ImageNet's 1000) and text embeddings
    of ``config.clip``'s width (1024 when it cannot be read offline). Reads no data."""
    import types

    validate(config, num_devices=mesh.size, check_data=False)
    config_checks.check_batch(config, mesh)
    num_classes = config.model.num_classes or 1000
    text_dim = (_clip_embed_dim(config) or 1024) if config.gpt4image.text_loss else 0
    per_epoch = 1000
    setup, _ = _setup(config, mesh, num_classes, text_dim, config.train.steps or 100 * per_epoch, per_epoch)
    batch = setup.abstract_batch(config.train.global_batch, config.data.image_size, text_dim)
    numerics = types.SimpleNamespace(param_dtype=_DTYPES[config.model.param_dtype], dtype=_DTYPES[config.model.dtype],
                                     remat=bool(config.model.remat))
    return setup.step, (setup.abstract_state, batch), numerics


def run(config, workdir: str) -> dict:
    parallel.initialize_distributed(config)
    validate(config)
    if config.mode == "embed":
        return {config.method: {"embed": embed(config, workdir)}}
    if config.mode == "train":
        return train(config, workdir)
    if config.mode == "evaluate":
        return evaluate_checkpoint(config, workdir)
    return compare(config, workdir)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def _source(config, split: str, workdir):
    return datasets.source(config.data, split, workdir, with_captions=False)


def splits(config, workdir):
    """(train, minival, test) sources."""
    full = _source(config, config.data.train_split, workdir)
    train_src, minival_src = minival.split(full, config.data.minival_fraction)
    return full, train_src, minival_src, _source(config, config.data.eval_split, workdir)


def store_dir(config, workdir) -> str:
    return config.gpt4image.embeddings or os.path.join(os.fspath(workdir), "text_embeddings")


def descriptions(config, workdir, names) -> dict[str, str]:
    """{image name: description} for the training images ``names``. From ``gpt4image.descriptions``;
    for the synthetic data without it, each image's first generated caption (they name what was drawn),
    written to ``<workdir>/image_descriptions.json``."""
    path = config.gpt4image.descriptions
    if not path:
        if config.data.source != "synthetic":
            raise config_lib.ConfigError(
                "config.gpt4image.descriptions must name a JSON {image name: description} for the training images "
                "(e.g. the image_descriptions.json of python -m jaxgist --config configs/describe.py:task="
                "image_descriptions)")
        captions = sources.read_captions(datasets.paths(config.data, workdir)["captions"])
        path = os.path.join(os.fspath(workdir), "image_descriptions.json")
        if jax.process_index() == 0:
            files.write_json_atomic(path, {n: captions[n][0] for n in names if n in captions})
        parallel.sync("jaxgist image descriptions written")
    texts = sources.read_image_descriptions(path)
    missing = [n for n in names if n not in texts]
    if missing:
        raise sources.DataError(f"{path}: {len(missing)} of {len(names)} training image(s) have no description, e.g. "
                                f"{', '.join(repr(m) for m in missing[:5])}")
    return {n: texts[n] for n in names}


def embed(config, workdir) -> dict:
    """Writes the description-embedding store (module docstring); returns its figures."""
    full = _source(config, config.data.train_split, workdir)
    texts = descriptions(config, workdir, full.filenames)
    c = config.clip
    model = clip.from_config(c, seed=config.seed)
    tokenize = tokenizer_lib.load(c.tokenizer or None)
    directory = store_dir(config, workdir)
    logging.info("gpt4image: encoding %d descriptions with CLIP %s into %s", len(texts), c.init, directory)
    figures = text_embeddings.build_store(model, tokenize, texts, directory, part_size=c.part_size, batch_size=c.batch,
                                          pad_id=tokenize.pad_id, model_id=c.init or repr(c.preset))
    return {**figures, "store": directory}


def _clip_embed_dim(config) -> int | None:
    """The joint-embedding width of ``config.clip`` (what the store's vectors must have), or None when
    it cannot be told without the checkpoint (a hub name, offline)."""
    try:
        return clip.config_from_model_config(config.clip).embed_dim
    except (OSError, ValueError) as e:
        logging.warning("gpt4image: cannot read the width of config.clip (%s); not checking the store's", e)
        return None


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def backbone(arch: str) -> gpt4image_step.Backbone:
    if family(arch) == "resnet":
        return gpt4image_step.Backbone(features=lambda m, x, rngs: m.features(x), classify=lambda m, f: m.fc(f),
                                       logical_axes=resnet.logical_axes)
    return gpt4image_step.Backbone(features=lambda m, x, rngs: m.features(x, rngs=rngs),
                                   classify=lambda m, f: m.head(f), logical_axes=deit.logical_axes)


def _model_kwargs(config, num_classes: int) -> dict:
    m = config.model
    kw = dict(num_classes=num_classes, dtype=_DTYPES[m.dtype], param_dtype=_DTYPES[m.param_dtype],
              image_size=config.data.image_size, **dict(m.overrides))
    if family(m.arch) == "deit":
        kw["drop_path"] = m.drop_path
    if m.remat:
        kw["remat"] = True
    return kw


def make_classifier(config, num_classes: int, *, seed: int):
    """The classifier: ``model.init`` (a checkpoint; its head replaced for ``num_classes``) or a random one."""
    m = config.model
    lib = resnet if family(m.arch) == "resnet" else deit
    if m.init:
        model = lib.load(m.init, num_classes=num_classes, reset_head=True, dtype=_DTYPES[m.dtype])
        if family(m.arch) == "deit" and m.drop_path:
            logging.warning("config.model.drop_path applies to random models; %s keeps its own", m.init)
        return model
    return lib.create(m.arch, seed=seed, **_model_kwargs(config, num_classes))


def make_projection(config, feature_dim: int, text_dim: int, *, seed: int):
    kw = dict(dtype=_DTYPES[config.model.dtype], param_dtype=_DTYPES[config.model.param_dtype],
              rngs=nnx.Rngs(seed + 1))
    if family(config.model.arch) == "resnet":
        return projection.ProjectionMLP.for_resnet(feature_dim, text_dim, **kw)
    return projection.ProjectionMLP.for_deit(feature_dim, text_dim, **kw)


def num_classes_of(config, source) -> int:
    n = config.model.num_classes or source.num_classes
    config_lib.require(n >= source.num_classes, f"config.model.num_classes={n} is fewer than the "
                       f"{source.num_classes} classes of the data")
    return n


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def _schedule(config, num_train: int) -> tuple[int, int]:
    """(total steps, steps per epoch)."""
    per_epoch = num_train // config.train.global_batch
    config_lib.require(per_epoch >= 1 or config.train.steps,
                       f"config.train.global_batch={config.train.global_batch} exceeds the {num_train} training images")
    per_epoch = max(per_epoch, 1)
    return (config.train.steps or config.train.epochs * per_epoch), per_epoch


def _setup(config, mesh, num_classes: int, text_dim: int, total: int, per_epoch: int):
    bb = backbone(config.model.arch)
    abstract_classifier = nnx.eval_shape(lambda: make_classifier_abstract(config, num_classes))
    feature_dim = abstract_classifier.feature_dim
    abstract_proj = (nnx.eval_shape(lambda: make_projection(config, feature_dim, text_dim, seed=0))
                     if config.gpt4image.text_loss else None)
    return gpt4image_step.build(config, mesh, total, abstract_classifier=abstract_classifier,
                                abstract_projection=abstract_proj, backbone=bb, steps_per_epoch=per_epoch,
                                num_classes=num_classes), feature_dim


def make_classifier_abstract(config, num_classes: int):
    """A classifier of the configured architecture (random; for shapes only when abstract)."""
    lib = resnet if family(config.model.arch) == "resnet" else deit
    return lib.create(config.model.arch, seed=0, **_model_kwargs(config, num_classes))


class Evaluator:
    """Top-1/top-5 of a classifier state on a source (classifier preprocessing: resize, center crop,
    ImageNet normalization), on any mesh."""

    def __init__(self, config, setup: gpt4image_step.Setup, sources_by_name: dict):
        self.setup, self.sources = setup, sources_by_name
        dp = parallel.data_size(setup.mesh)
        self.batch = int(math.ceil(config.data.eval_batch / dp) * dp)
        self.local_batch = self.batch // jax.process_count()
        self.image_size = config.data.image_size
        self.resize = config.data.eval_resize or None
        self.interpolation = config.data.interpolation
        self.workers, self.prefetch = config.data.workers, config.data.prefetch
        self.skip_unreadable = config.data.skip_unreadable
        graphdef = setup.layout.graphdefs[gpt4image_step.CLASSIFIER]
        bb = backbone(config.model.arch)
        rep, bs = parallel.replicated(setup.mesh), parallel.batch_sharding(setup.mesh)

        def correct(model_state, images, labels, mask):
            model = nnx.merge(graphdef, model_state)
            logits = bb.classify(model, bb.features(model, images, None)).astype(jnp.float32)
            return (jnp.sum(gpt4image_step.topk_correct(logits, labels, 1) & mask),
                    jnp.sum(gpt4image_step.topk_correct(logits, labels, 5) & mask))

        shardings = setup.layout.shardings.models[gpt4image_step.CLASSIFIER]
        self._correct = jax.jit(correct, in_shardings=(shardings, bs, bs, bs), out_shardings=(rep, rep))

    def accuracy(self, model_state, source) -> dict[str, float]:
        per_process = math.ceil(len(source) / jax.process_count())
        num_batches = math.ceil(per_process / self.local_batch)
        it = iter(pipeline.eval_dataset(source, image_size=self.image_size, batch_size=self.local_batch,
                                        workers=self.workers, prefetch=self.prefetch, preprocess="imagenet",
                                        resize=self.resize, interpolation=self.interpolation,
                                        skip_unreadable=self.skip_unreadable))
        top1 = top5 = seen = 0
        s = self.image_size
        for _ in range(num_batches):
            batch = next(it, None)
            n = 0 if batch is None else len(batch["label"])
            images = np.zeros((self.local_batch, s, s, 3), np.float32)
            labels = np.zeros((self.local_batch,), np.int32)
            mask = np.zeros((self.local_batch,), bool)
            if n:
                images[:n], labels[:n], mask[:n] = batch["image"], batch["label"], True
            g = pipeline.to_global({"images": images, "labels": labels, "mask": mask}, self.setup.mesh,
                                   parallel.DATA_AXES)
            c1, c5 = self._correct(model_state, g["images"], g["labels"], g["mask"])
            top1, top5, seen = top1 + int(c1), top5 + int(c5), seen + n
        seen = int(np.sum(_all_processes(seen)))
        return {"top1": top1 / max(seen, 1), "top5": top5 / max(seen, 1), "images": float(seen)}

    def __call__(self, state) -> dict[str, float]:
        out = {}
        for weights in (gpt4image_step.CLASSIFIER, gpt4image_step.EMA):
            if weights not in state.models:
                continue
            prefix = "" if weights == gpt4image_step.CLASSIFIER else "ema_"
            for name, source in self.sources.items():
                if len(source) == 0:
                    continue
                acc = self.accuracy(state.models[weights], source)
                out[f"{prefix}{name}_top1"], out[f"{prefix}{name}_top5"] = acc["top1"], acc["top5"]
        return out


def _all_processes(x: int) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray([x])
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def checkpointer(config, workdir, per_epoch: int) -> checkpoint.Checkpointer:
    t = config.train
    return checkpoint.Checkpointer(files.join(workdir, "checkpoints"), save_every=per_epoch * t.eval_every_epochs,
                                   keep=t.keep, async_save=t.async_checkpoints)


def train(config, workdir) -> dict:
    """Trains the classifier as ``config`` says; returns and writes the results."""
    t_start = time.perf_counter()
    workdir = files.path(workdir)
    mesh = parallel.make_mesh(config.mesh)
    config_checks.check_batch(config, mesh)
    full, train_src, minival_src, test_src = splits(config, workdir)
    num_classes = num_classes_of(config, full)
    text_on = bool(config.gpt4image.text_loss)
    text_dim = 0
    source = train_src
    if text_on:
        directory = store_dir(config, workdir)
        if not embedding_store.exists(directory):
            embed(config, workdir)
        store = embedding_store.EmbeddingStore(directory)
        text_dim = store.dim
        source = embedding_store.WithEmbeddings(train_src, store, dim=_clip_embed_dim(config))
    total, per_epoch = _schedule(config, len(train_src))
    logging.info("gpt4image: %s, %d classes, %d train / %d minival / %d %s images, %d steps (%d per epoch) of %d, "
                 "text loss %s, mesh %s, %s", config.model.arch, num_classes, len(train_src), len(minival_src),
                 len(test_src), config.data.eval_split, total, per_epoch, config.train.global_batch,
                 f"on (lambda {config.gpt4image.lamb}, tau {config.gpt4image.tau}, {config.gpt4image.text_loss_scale})"
                 if text_on else "off", dict(mesh.shape), jax.devices()[0].device_kind)
    setup, feature_dim = _setup(config, mesh, num_classes, text_dim, total, per_epoch)
    ckpt = checkpointer(config, workdir, per_epoch)
    data_iter = iter(pipeline.classifier_train_dataset(
        source, image_size=config.data.image_size, global_batch=config.train.global_batch, seed=config.seed,
        interpolation=config.data.interpolation, randaugment=config.data.randaugment,
        erasing_prob=config.data.random_erasing, repeats=config.data.repeated_augmentation,
        skip_unreadable=config.data.skip_unreadable, workers=config.data.workers, prefetch=config.data.prefetch))

    def init():
        model = make_classifier(config, num_classes, seed=config.seed)
        proj = make_projection(config, feature_dim, text_dim, seed=config.seed) if text_on else None
        return setup.init_state(model, proj)

    state, start = loop.restore_or_init(ckpt, setup.abstract_state, init, data_iter)
    evaluator = Evaluator(config, setup, {"test": test_src, "minival": minival_src})
    if start < total:
        compiled = setup.step.lower(setup.abstract_state, setup.abstract_batch(
            config.train.global_batch, config.data.image_size, text_dim)).compile()
        logger = metrics_lib.MetricsLogger(workdir, total_steps=total, global_batch=config.train.global_batch,
                                           log_every=config.train.log_every,
                                           flops_per_step=metrics_lib.compiled_flops(compiled),
                                           resume_step=start if start else None)

        def to_device(batch):
            keys = ("image", "label", "text_embedding") if text_on else ("image", "label")
            return pipeline.to_global({k: batch[k] for k in keys}, mesh, parallel.DATA_AXES)

        try:
            result = loop.run(state, compiled, data_iter, to_device=to_device, checkpointer=ckpt, logger=logger,
                              total_steps=total, start_step=start, eval_every=per_epoch * config.train.eval_every_epochs,
                              evaluate=evaluator)
        finally:
            logger.close()
            ckpt.close()
        last_train = result.last_train
        train_seconds, steps_run = result.train_seconds, result.steps_run
    else:
        ckpt.close()
        logging.info("gpt4image: step %d of %d is saved in %s; nothing to train", start, total, ckpt.directory)
        last_train, train_seconds, steps_run = {}, 0.0, 0
    table, chosen = _epoch_table(workdir, per_epoch)
    out = {"steps": total, "steps_per_epoch": per_epoch, "start_step": start, "num_classes": num_classes,
           "train_images": len(train_src), "minival_images": len(minival_src), "test_images": len(test_src),
           "text_loss": "on" if text_on else "off", "seconds": round(time.perf_counter() - t_start, 2),
           **({"final_loss": last_train["loss"]} if "loss" in last_train else {}),
           **({"images_per_s": round(steps_run * config.train.global_batch / train_seconds, 2)}
              if steps_run and train_seconds else {}), **chosen}
    if jax.process_index() == 0 and table:
        results.write(workdir, config.method, {_model_name(config): table}, run=_run_metadata(out))
    return {config.method: {_model_name(config): table, "run": out}}


def _model_name(config) -> str:
    return config.model.arch + ("" if config.gpt4image.text_loss else " (baseline)")


def _epoch_table(workdir, per_epoch: int) -> tuple[dict, dict]:
    """From the evaluations in metrics.jsonl: the final epoch's and the minival-chosen epoch's figures,
    for the raw and (when present) EMA weights."""
    records = [r for r in metrics_lib.read_jsonl(files.join(workdir, "metrics.jsonl")) if "val/test_top1" in r]
    by_step = {int(r["step"]): r for r in records}
    if not by_step:
        return {}, {}
    table, chosen = {}, {}
    final_step = max(by_step)
    for prefix, head in (("", "raw"), ("ema_", "ema")):
        if f"val/{prefix}test_top1" not in by_step[final_step]:
            continue
        best_step = max(sorted(by_step), key=lambda s: by_step[s].get(f"val/{prefix}minival_top1", -1.0))
        for label, step in (("final", final_step), ("minival_chosen", best_step)):
            r = by_step[step]
            table[f"{head}_{label}"] = {
                "test_top1": r[f"val/{prefix}test_top1"], "test_top5": r[f"val/{prefix}test_top5"],
                **({"minival_top1": r[f"val/{prefix}minival_top1"], "minival_top5": r[f"val/{prefix}minival_top5"]}
                   if f"val/{prefix}minival_top1" in r else {}),
                "epoch": step / per_epoch}
        chosen[f"{head}_chosen_epoch"] = best_step / per_epoch
    return table, chosen


def _run_metadata(figures: dict) -> dict:
    return {**figures, "jax": jax.__version__, "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "processes": jax.process_count()}


# ---------------------------------------------------------------------------------------------
# Evaluating a checkpoint
# ---------------------------------------------------------------------------------------------

def evaluate_checkpoint(config, workdir) -> dict:
    workdir = files.path(workdir)
    mesh = parallel.make_mesh(config.mesh)
    full, train_src, minival_src, test_src = splits(config, workdir)
    num_classes = num_classes_of(config, full)
    text_dim = 0
    if config.gpt4image.text_loss:
        text_dim = embedding_store.EmbeddingStore(store_dir(config, workdir)).dim
    total, per_epoch = _schedule(config, len(train_src))
    setup, _ = _setup(config, mesh, num_classes, text_dim, total, per_epoch)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False, read_only=True)
    try:
        step = ckpt.saved_step(config.evaluate.step)
        names = [n for n in (gpt4image_step.CLASSIFIER, gpt4image_step.EMA) if n in setup.abstract_state.models]
        models = ckpt.restore_models(step, {n: setup.abstract_state.models[n] for n in names})
    finally:
        ckpt.close()
    state = setup.abstract_state.replace(models=models)
    metrics = Evaluator(config, setup, {"test": test_src, "minival": minival_src})(state)
    table = {}
    for prefix, head in (("", "raw"), ("ema_", "ema")):
        if f"{prefix}test_top1" in metrics:
            table[f"{head}_step_{step}"] = {k[len(prefix):]: v for k, v in metrics.items()
                                            if k.startswith(prefix) and (prefix or not k.startswith("ema_"))}
            table[f"{head}_step_{step}"]["epoch"] = step / per_epoch
    if jax.process_index() == 0:
        results.write(workdir, config.method, {_model_name(config): table})
    return {config.method: {_model_name(config): table}}


# ---------------------------------------------------------------------------------------------
# Text loss against the baseline, over seeds
# ---------------------------------------------------------------------------------------------

def compare(config, workdir) -> dict:
    """One training run per (variant, seed) in its own workdir; mean and std of the test top-1 of the
    final and the minival-chosen epochs (raw weights)."""
    workdir = files.path(workdir)
    runs: dict[str, list[dict]] = {"text_loss": [], "baseline": []}
    shared_store = store_dir(config, workdir)
    for variant in runs:
        for seed in config.compare.seeds:
            c = copy.deepcopy(config)
            c.mode, c.seed = "train", int(seed)
            c.gpt4image.text_loss = variant == "text_loss"
            c.gpt4image.embeddings = shared_store
            if c.data.source == "synthetic" and not c.data.synthetic.dir:
                c.data.synthetic.dir = os.fspath(workdir / "synthetic")
            if c.gpt4image.text_loss and not c.gpt4image.descriptions and c.data.source == "synthetic":
                c.gpt4image.descriptions = ""  # written into the run's workdir by ``descriptions``
            sub = workdir / variant / f"seed_{seed}"
            logging.info("gpt4image compare: %s, seed %s -> %s", variant, seed, sub)
            out = train(c, os.fspath(sub))[config.method]
            runs[variant].append(out[_model_name(c)])
    table = {}
    for variant, outs in runs.items():
        row = {}
        for label in ("final", "minival_chosen"):
            values = np.asarray([o[f"raw_{label}"]["test_top1"] for o in outs], np.float64)
            key = "test_top1" if label == "final" else "chosen_test_top1"
            row[key], row[f"{key}_std"] = float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
            row[f"{key}_seeds"] = ", ".join(f"{100 * v:.1f}" for v in values)
        row["seeds"] = len(outs)
        table[variant] = row
    if jax.process_index() == 0:
        results.write(workdir, config.method, {config.model.arch: table},
                      run=_run_metadata({"seeds": list(config.compare.seeds)}))
    return {config.method: {config.model.arch: table}}
