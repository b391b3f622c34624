"""Contrastive fine-tuning of CLIP on image / matched-caption pairs (GIST's fine-tuning stage), and
the evaluation of its checkpoints.

The job (``config.method = "finetune"``, see ``configs/finetune.py``), by ``config.mode``:

- ``train`` (default): builds the mesh, the train source (each image paired with its first
  ``data.num_captions`` matched captions) and the contrastive step (``finetune_step``); resumes from
  the latest checkpoint in ``workdir/checkpoints`` (parameters, optimizer state, step, data-iterator
  position) or starts from ``model.init`` / a random ``model.preset``; runs the training loop
  (``training.loop``: progress, zero-shot evaluation every ``train.eval_every`` steps, checkpoints
  every ``train.save_every`` steps and at the end, a non-finite loss stops it); writes ``results.json``
  (and, with ``train.export_hf``, a Hugging Face CLIP directory in ``workdir/hf``).
- ``evaluate``: zero-shot top-1 on ``data.eval_split`` of checkpoint ``evaluate.step`` (-1: the latest).
- ``watch``: evaluates each checkpoint as training writes it (a sidecar job beside a pod run), until
  the last step is evaluated or no new checkpoint comes for ``evaluate.watch_timeout_s`` seconds.

Results (``jaxgist.core.results``): ``results.json`` holds ``finetune.step_<N>.zero_shot`` (``val_top1``,
``val_images``) for each evaluated step (the last evaluation of training, or the evaluate/watch
modes) and the training figures under ``run.finetune``. Evaluations of the evaluate/watch modes also
go to ``workdir/eval/`` (``metrics.jsonl``, TensorBoard).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from jaxgist import methods
from jaxgist.core import config as config_lib
from jaxgist.core import files, results
from jaxgist.data import datasets, pipeline
from jaxgist.methods import finetune_step
from jaxgist.models import clip
from jaxgist.models.clip import tokenizer
from jaxgist.training import checkpoint, config_checks, loop
from jaxgist.training import metrics as metrics_lib
from jaxgist.training import optim, parallel

EVAL_TEMPLATE = "a photo of a {}."
MODES = ("train", "evaluate", "watch")


def default_config() -> ml_collections.ConfigDict:
    """Every key the fine-tuning job reads, with GIST's recipe as the defaults."""
    c = methods.clip_job_config("finetune", "ViT-L/14@336px")
    c.mode = "train"
    c.train = ml_collections.ConfigDict(dict(
        global_batch=32, epochs=10, steps=0, log_every=10, eval_every=0, eval_batch=64, save_every=1000,
        keep=3, best_metric="", async_checkpoints=True, export_hf=False))
    c.evaluate = ml_collections.ConfigDict(dict(step=-1, watch_interval_s=30.0, watch_timeout_s=3600.0))
    c.optim = optim.default_config()
    return parallel.add_config(c)


def validate(config, num_devices: int | None = None, *, check_data: bool = True) -> None:
    """Fails with a message naming the key for unknown keys and bad values. The mesh is checked
    against ``num_devices`` (default: this job's devices); ``check_data=False`` leaves out the data
    section's files (ahead-of-time compilation reads no data)."""
    config_lib.check_keys(config, default_config(), free=("model.preset", "mesh", "sharding.rules"))
    t = config.train
    req = config_lib.require
    req(config.mode in MODES, f"config.mode={config.mode!r} is not one of {MODES}")
    req(t.global_batch >= 1, f"config.train.global_batch={t.global_batch} must be >= 1")
    req(t.steps >= 0 and t.epochs >= 0, "config.train.steps and config.train.epochs must be >= 0")
    req(t.steps > 0 or t.epochs > 0, "set config.train.steps or config.train.epochs")
    for key in ("log_every", "save_every", "eval_batch", "keep"):
        req(t[key] >= 1, f"config.train.{key}={t[key]} must be >= 1")
    req(t.eval_every >= 0, f"config.train.eval_every={t.eval_every} must be >= 0")
    req(not t.best_metric or t.eval_every > 0,
        f"config.train.best_metric={t.best_metric!r} needs evaluation: set config.train.eval_every")
    e = config.evaluate
    req(e.step >= -1, f"config.evaluate.step={e.step} must be a saved step or -1 (the latest)")
    req(e.watch_interval_s > 0 and e.watch_timeout_s > 0,
        "config.evaluate.watch_interval_s and config.evaluate.watch_timeout_s must be > 0")
    req("test" not in config.data.train_split and not config.data.eval_split.startswith("test"),
        f"config.data.train_split={config.data.train_split!r} / eval_split={config.data.eval_split!r}: the "
        f"test split is never trained or selected on")
    clip.check_model_config(config.model)
    if config.train.export_hf and clip.config_from_model_config(config.model).is_resnet:
        raise config_lib.ConfigError("config.train.export_hf: HF's CLIPModel has no ResNet image tower; a ResNet "
                                     "CLIP stays in its Orbax checkpoints")
    config_checks.check_training(config, num_devices, check_data=check_data)


def total_steps(config, num_pairs: int) -> tuple[int, int]:
    """(train steps, steps per epoch) for ``num_pairs`` image/caption pairs."""
    per_epoch = num_pairs // config.train.global_batch
    if per_epoch == 0 and not config.train.steps:
        raise config_lib.ConfigError(f"config.train.global_batch={config.train.global_batch} exceeds the "
                                     f"{num_pairs} image/caption pairs of one epoch")
    return (config.train.steps or config.train.epochs * per_epoch), per_epoch


def checkpointer(config, workdir) -> checkpoint.Checkpointer:
    """The run's checkpoints (``workdir/checkpoints``) as ``config.train`` keeps them."""
    t = config.train
    return checkpoint.Checkpointer(files.join(workdir, "checkpoints"), save_every=t.save_every, keep=t.keep,
                                   best_metric=t.best_metric or None, async_save=t.async_checkpoints)


def compile_inputs(config, mesh):
    """(jitted step, abstract arguments, model config) of the train step: what ahead-of-time
    compilation (``python -m jaxgist.aot``) lowers. Reads no data and creates no parameters."""
    validate(config, num_devices=mesh.size, check_data=False)
    config_checks.check_batch(config, mesh)
    model_cfg = clip.config_from_model_config(config.model)
    # the schedule's length does not change any shape: a placeholder when the job counts epochs
    setup = finetune_step.build(config, mesh, config.train.steps or 1000, model_cfg=model_cfg)
    return setup.step, (setup.abstract_state, setup.abstract_batch(config.train.global_batch)), model_cfg


def run(config, workdir: str) -> dict:
    """Runs ``config.mode`` (train, evaluate or watch); returns the results it wrote."""
    parallel.initialize_distributed(config)
    validate(config)
    if config.mode == "train":
        return train(config, workdir)
    return evaluate_checkpoints(config, workdir, watch=config.mode == "watch")


def train(config, workdir: str) -> dict:
    """Fine-tunes CLIP as ``config`` says; returns and writes the results."""
    t_start = time.perf_counter()
    config_lib.require(not config.train.export_hf or files.is_local(workdir),
                       f"config.train.export_hf writes a Hugging Face directory with local file APIs; with the "
                       f"bucket workdir {workdir}, export a saved step afterwards with "
                       f"jaxgist.training.checkpoint.export_hf(workdir, config.model, local_dir)")
    workdir = files.path(workdir)
    mesh = parallel.make_mesh(config.mesh)
    config_checks.check_batch(config, mesh)

    source = datasets.source(config.data, config.data.train_split, workdir, with_captions=True)
    num_pairs = len(source) * config.data.num_captions
    steps, per_epoch = total_steps(config, num_pairs)
    logging.info("finetune: %d images x %d captions = %d pairs, %d steps (%d per epoch) of %d, mesh %s, %s",
                 len(source), config.data.num_captions, num_pairs, steps, per_epoch, config.train.global_batch,
                 dict(mesh.shape), jax.devices()[0].device_kind)

    ckpt = checkpointer(config, workdir)
    fresh = ckpt.latest_step() is None
    model = clip.from_config(config.model, seed=config.seed) if fresh else None
    setup = finetune_step.build(config, mesh, steps, model_cfg=model.config if fresh else
                                clip.config_from_model_config(config.model))
    logging.info("sharding: %s", parallel.describe(setup.param_shardings))

    tokenize = tokenizer.load(config.model.tokenizer or None)
    data_iter = iter(pipeline.train_dataset(
        source, image_size=setup.image_size, tokenize=tokenize, global_batch=config.train.global_batch,
        num_captions=config.data.num_captions, template=config.data.template, seed=config.seed,
        skip_unreadable=config.data.skip_unreadable, workers=config.data.workers, prefetch=config.data.prefetch))
    state, start = loop.restore_or_init(ckpt, setup.abstract_state, lambda: setup.init_state(model), data_iter)
    model = None  # the state holds a copy
    if start >= steps:  # a finished run: its results stand
        ckpt.close()
        logging.info("finetune: nothing to train, step %d of %d is saved in %s; keeping its results", start, steps,
                     ckpt.directory)
        previous = results.load(workdir).get(results.RUN, {}).get(config.method, {})
        return {config.method: {k: v for k, v in previous.items() if k != "written"} or
                {"steps": steps, "start_step": start}}

    compiled = setup.step.lower(setup.abstract_state, setup.abstract_batch(config.train.global_batch)).compile()
    logger = metrics_lib.MetricsLogger(workdir, total_steps=steps, global_batch=config.train.global_batch,
                                       log_every=config.train.log_every,
                                       flops_per_step=metrics_lib.compiled_flops(compiled),
                                       resume_step=start if start else None)
    evaluator = Evaluator(config, setup, workdir, tokenize) if config.train.eval_every else None

    def to_device(batch):
        return pipeline.to_global({"image": batch["image"], "ids": batch["ids"]}, mesh, parallel.DATA_AXES)

    try:
        result = loop.run(state, compiled, data_iter, to_device=to_device, checkpointer=ckpt, logger=logger,
                          total_steps=steps, start_step=start, eval_every=config.train.eval_every,
                          evaluate=evaluator)
    finally:
        logger.close()
        ckpt.close()

    out = {
        "steps": steps,
        "start_step": start,
        "final_loss": result.last_train.get("loss", float("nan")),
        "images_per_s": round(result.steps_run * config.train.global_batch / result.train_seconds, 2)
        if result.steps_run else 0.0,
        "pairs": num_pairs,
        "seconds": round(time.perf_counter() - t_start, 2),
        **{f"val_{k}": v for k, v in result.last_eval.items()},
    }
    if config.train.export_hf and jax.process_index() == 0:
        out["export_hf"] = str(clip.save_hf(setup.model(result.state), workdir / "hf"))
    if jax.process_index() == 0:
        table = {}
        if result.last_eval:
            table[f"step_{result.last_eval_step}"] = {"zero_shot": _eval_metrics(config, result.last_eval)}
        results.write(workdir, config.method, table, run=run_metadata(out))
    return {config.method: out}


def _eval_metrics(config, metrics: dict) -> dict:
    """The Evaluator's figures as results metrics: ``<eval split>_top1`` and ``<eval split>_images``."""
    split = config.data.eval_split.split("[")[0]
    return {f"{split}_top1": metrics["zero_shot_top1"], f"{split}_images": metrics["images"]}


def run_metadata(figures: dict) -> dict:
    """A run's record for results.json: its figures, the jax version and the devices."""
    return {**figures, "jax": jax.__version__, "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "processes": jax.process_count()}


# ---------------------------------------------------------------------------------------------
# Evaluating checkpoints: --config.mode=evaluate | watch
# ---------------------------------------------------------------------------------------------

def evaluate_checkpoints(config, workdir: str, *, watch: bool) -> dict:
    """Zero-shot evaluation of one saved step (``evaluate``) or of each new one (``watch``)."""
    workdir = files.path(workdir)
    mesh = parallel.make_mesh(config.mesh)
    config_checks.check_batch(config, mesh)
    source = datasets.source(config.data, config.data.train_split, workdir, with_captions=True)
    steps, _ = total_steps(config, len(source) * config.data.num_captions)
    setup = finetune_step.build(config, mesh, steps, model_cfg=clip.config_from_model_config(config.model))
    evaluator = Evaluator(config, setup, workdir, tokenizer.load(config.model.tokenizer or None))
    # read-only: a watcher must never clean up the save the training job has in flight
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False, read_only=True)
    logger = metrics_lib.MetricsLogger(workdir / "eval", total_steps=steps, global_batch=config.train.eval_batch)
    done: dict[str, dict] = {}

    def one(step: int) -> None:
        models = ckpt.restore_models(step, {finetune_step.MODEL: setup.abstract_state.models[finetune_step.MODEL]})
        state = setup.abstract_state.replace(models=models)
        metrics = evaluator(state)
        logger.write(step, {f"val/{k}": v for k, v in metrics.items()})
        logging.info("evaluated step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        done[f"step_{step}"] = {"zero_shot": _eval_metrics(config, metrics)}
        if jax.process_index() == 0:
            results.write(workdir, config.method, {f"step_{step}": done[f"step_{step}"]})

    try:
        if not watch:
            one(ckpt.saved_step(config.evaluate.step))
        else:
            _watch(ckpt, one, final_step=steps, interval=config.evaluate.watch_interval_s,
                   timeout=config.evaluate.watch_timeout_s)
    finally:
        logger.close()
        ckpt.close()
    return {config.method: done}


def _watch(ckpt: checkpoint.Checkpointer, evaluate_step, *, final_step: int, interval: float, timeout: float) -> None:
    """Evaluates each checkpoint as it appears, oldest first, until ``final_step`` is evaluated or no
    new checkpoint comes for ``timeout`` seconds. A step deleted (by the keep policy) before it could
    be read is skipped with a warning."""
    evaluated: set[int] = set()
    last_new = time.monotonic()
    logging.info("watching %s for new checkpoints (every %.0f s, up to step %d)", ckpt.directory, interval, final_step)
    while final_step not in evaluated:
        ckpt.reload()
        for step in [s for s in ckpt.all_steps() if s not in evaluated]:
            try:
                evaluate_step(step)
            except FileNotFoundError as e:
                logging.warning("step %d vanished before it could be evaluated (%s); skipping it", step, e)
            evaluated.add(step)
            last_new = time.monotonic()
        if final_step in evaluated:
            break
        if time.monotonic() - last_new > timeout:
            logging.warning("no new checkpoint in %s for %.0f s; stopping (evaluated steps %s)", ckpt.directory,
                            timeout, sorted(evaluated))
            break
        time.sleep(interval)


class Evaluator:
    """Zero-shot top-1 on the eval split with "a photo of a {class}." prompts, using the current
    parameters; works on any mesh (each process feeds its shard, padded to equal batch counts)."""

    def __init__(self, config, setup: finetune_step.Setup, workdir, tokenize):
        self.setup = setup
        self.source = datasets.source(config.data, config.data.eval_split, workdir, with_captions=False)
        dp = parallel.data_size(setup.mesh)
        self.batch = int(math.ceil(config.train.eval_batch / dp) * dp)
        self.local_batch = self.batch // jax.process_count()
        self.class_ids = tokenize([EVAL_TEMPLATE.format(n) for n in self.source.class_names])
        self.workers, self.prefetch = config.data.workers, config.data.prefetch
        self.crop_rounding = config.data.crop_rounding
        graphdef = setup.graphdef
        rep = parallel.replicated(setup.mesh)
        bs = parallel.batch_sharding(setup.mesh)

        def correct(model_state, class_ids, images, labels, mask):
            model = nnx.merge(graphdef, model_state)
            txt = clip.normalize(model.encode_text(class_ids))
            img = clip.normalize(model.encode_image(images))
            pred = jnp.argmax(img @ txt.T, axis=-1)
            return jnp.sum((pred == labels) & mask)

        self._correct = jax.jit(correct, in_shardings=(setup.state_shardings.models[finetune_step.MODEL], rep, bs, bs,
                                                       bs), out_shardings=rep)

    def __call__(self, state) -> dict[str, float]:
        per_process = math.ceil(len(self.source) / jax.process_count())
        num_batches = math.ceil(per_process / self.local_batch)
        it = iter(pipeline.eval_dataset(self.source, image_size=self.setup.image_size, batch_size=self.local_batch,
                                        workers=self.workers, prefetch=self.prefetch,
                                        crop_rounding=self.crop_rounding))
        ids = jax.device_put(self.class_ids, parallel.replicated(self.setup.mesh))
        model_state = state.models[finetune_step.MODEL]
        total, seen = 0, 0
        for _ in range(num_batches):
            batch = next(it, None)
            n = 0 if batch is None else len(batch["label"])
            s = self.setup.image_size
            images = np.zeros((self.local_batch, s, s, 3), np.float32)
            labels = np.zeros((self.local_batch,), np.int32)
            mask = np.zeros((self.local_batch,), bool)
            if n:
                images[:n], labels[:n], mask[:n] = batch["image"], batch["label"], True
            g = pipeline.to_global({"images": images, "labels": labels, "mask": mask}, self.setup.mesh,
                                   parallel.DATA_AXES)
            total += int(self._correct(model_state, ids, g["images"], g["labels"], g["mask"]))
            seen += n
        seen = int(np.sum(_all_processes(seen)))
        return {"zero_shot_top1": total / max(seen, 1), "images": float(seen)}


def _all_processes(x: int) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray([x])
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))
