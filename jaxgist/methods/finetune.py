"""Contrastive fine-tuning of CLIP on image / matched-caption pairs (GIST's fine-tuning stage).

The job (``config.method = "finetune"``, see ``configs/finetune.py``):

1. builds the mesh (after ``jax.distributed.initialize()`` on multi-process jobs), the train
   source (each image paired with its first ``data.num_captions`` matched captions) and the
   jitted, sharded train step (``jaxgist.training.train_state``);
2. resumes from the latest checkpoint in ``workdir/checkpoints`` if there is one (parameters,
   optimizer state, step and data-iterator position), else starts from ``model.init``
   (pretrained weights) or a random ``model.preset``;
3. trains for ``train.steps`` (or ``train.epochs`` passes over the pairs), logging loss, learning
   rate, images/s, step time, MFU and ETA, evaluating every ``train.eval_every`` steps and saving
   every ``train.save_every`` steps and at the end;
4. stops with ``FloatingPointError`` on a non-finite loss, before saving anything of that step;
5. writes ``results.json`` (and, with ``train.export_hf``, the final parameters as a Hugging Face
   CLIP directory in ``workdir/hf``).
"""

from __future__ import annotations

import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from jaxgist.training import checkpoint
from jaxgist.core import config as config_lib
from jaxgist.training import metrics as metrics_lib
from jaxgist.training import optim
from jaxgist.training import parallel
from jaxgist.core import results
from jaxgist.models.clip import tokenizer
from jaxgist.training import train_state as train
from jaxgist.data import datasets, pipeline
from jaxgist.models import clip

EVAL_TEMPLATE = "a photo of a {}."


def default_config() -> ml_collections.ConfigDict:
    """Every key the fine-tuning job reads, with GIST's recipe as the defaults."""
    c = ml_collections.ConfigDict()
    c.method = "finetune"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        init="ViT-L/14@336px", preset=None, tokenizer="", dtype="float32", compute_dtype="", remat=False))
    c.data = datasets.default_config()
    c.train = ml_collections.ConfigDict(dict(
        global_batch=32, epochs=10, steps=0, log_every=10, eval_every=0, eval_batch=64, save_every=1000,
        keep=3, best_metric="", async_checkpoints=True, export_hf=False))
    c.optim = optim.default_config()
    c.mesh = (("data", -1), ("fsdp", 1))
    c.sharding = ml_collections.ConfigDict(dict(rules=parallel.DEFAULT_RULES))
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=-1, process_id=-1, cpu_collectives=""))
    return c


def validate(config, num_devices: int | None = None, *, check_data: bool = True) -> None:
    """Fails with a message naming the key for unknown keys and bad values. The mesh is checked
    against ``num_devices`` (default: this job's devices); ``check_data=False`` leaves out the data
    section's files (ahead-of-time compilation reads no data)."""
    config_lib.check_keys(config, default_config(), free=("model.preset", "mesh", "sharding.rules"))
    t = config.train
    req = config_lib.require
    req(t.global_batch >= 1, f"config.train.global_batch={t.global_batch} must be >= 1")
    req(t.steps >= 0 and t.epochs >= 0, "config.train.steps and config.train.epochs must be >= 0")
    req(t.steps > 0 or t.epochs > 0, "set config.train.steps or config.train.epochs")
    for key in ("log_every", "save_every", "eval_batch", "keep"):
        req(t[key] >= 1, f"config.train.{key}={t[key]} must be >= 1")
    req(t.eval_every >= 0, f"config.train.eval_every={t.eval_every} must be >= 0")
    req(not t.best_metric or t.eval_every > 0,
        f"config.train.best_metric={t.best_metric!r} needs evaluation: set config.train.eval_every")
    req("test" not in config.data.train_split and not config.data.eval_split.startswith("test"),
        f"config.data.train_split={config.data.train_split!r} / eval_split={config.data.eval_split!r}: the "
        f"test split is never trained or selected on")
    req(bool(config.model.init) or bool(config.model.preset),
        "config.model.init (pretrained weights) or config.model.preset (random init) must be set")
    for key in ("dtype", "compute_dtype"):
        value = config.model[key]
        req(not value or value in ("float32", "bfloat16", "float16"),
            f"config.model.{key}={value!r} is not one of float32, bfloat16, float16")
    try:
        optim.validate(config.optim)
        parallel.check_rules(config.sharding.rules)
        parallel.parse_mesh(config.mesh, jax.device_count() if num_devices is None else num_devices)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    if check_data:
        datasets.validate(config.data)


def check_batch(config, mesh) -> None:
    """The global batch must split evenly over the mesh's data-parallel devices (``data`` x ``fsdp``)."""
    dp = parallel.data_size(mesh)
    config_lib.require(config.train.global_batch % dp == 0,
                       f"config.train.global_batch={config.train.global_batch} is not divisible by the "
                       f"{dp} data-parallel devices of mesh {dict(mesh.shape)}")


def total_steps(config, num_pairs: int) -> tuple[int, int]:
    """(train steps, steps per epoch) for ``num_pairs`` image/caption pairs."""
    per_epoch = num_pairs // config.train.global_batch
    if per_epoch == 0 and not config.train.steps:
        raise config_lib.ConfigError(f"config.train.global_batch={config.train.global_batch} exceeds the "
                                     f"{num_pairs} image/caption pairs of one epoch")
    return (config.train.steps or config.train.epochs * per_epoch), per_epoch


def run(config, workdir: str) -> dict:
    """Fine-tunes CLIP as ``config`` says; returns and writes the results."""
    t_start = time.perf_counter()
    parallel.initialize_distributed(config)
    validate(config)
    workdir = pathlib.Path(workdir)
    mesh = parallel.make_mesh(config.mesh)
    check_batch(config, mesh)

    source = datasets.source(config.data, config.data.train_split, workdir, with_captions=True)
    num_pairs = len(source) * config.data.num_captions
    steps, per_epoch = total_steps(config, num_pairs)
    logging.info("finetune: %d images x %d captions = %d pairs, %d steps (%d per epoch) of %d, mesh %s, %s",
                 len(source), config.data.num_captions, num_pairs, steps, per_epoch, config.train.global_batch,
                 dict(mesh.shape), jax.devices()[0].device_kind)

    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_every=config.train.save_every,
                                   keep=config.train.keep, best_metric=config.train.best_metric or None,
                                   async_save=config.train.async_checkpoints)
    resume_step = ckpt.latest_step()
    model = None
    if resume_step is None:
        model = clip.from_config(config.model, seed=config.seed)
        model_cfg = model.config
    else:
        model_cfg = clip.config_from_model_config(config.model)
    setup = train.build(config, mesh, steps, model_cfg=model_cfg)
    logging.info("sharding: %s", parallel.describe(setup.state_shardings.params))

    tokenize = tokenizer.load(config.model.tokenizer or None)
    data_iter = iter(pipeline.train_dataset(
        source, image_size=setup.image_size, tokenize=tokenize, global_batch=config.train.global_batch,
        num_captions=config.data.num_captions, template=config.data.template, seed=config.seed,
        skip_unreadable=config.data.skip_unreadable, workers=config.data.workers, prefetch=config.data.prefetch))

    if resume_step is None:
        state = setup.init_state(model)
        del model
        start = 0
    else:
        state = train.TrainState.from_dict(ckpt.restore(resume_step, setup.abstract_state.as_dict(), data_iter))
        start = int(jax.device_get(state.step))
        logging.info("resumed from step %d of %d", start, steps)

    compiled = setup.step.lower(setup.abstract_state, setup.abstract_batch(config.train.global_batch)).compile()
    flops = metrics_lib.compiled_flops(compiled)
    logger = metrics_lib.MetricsLogger(workdir, total_steps=steps, global_batch=config.train.global_batch,
                                       log_every=config.train.log_every, flops_per_step=flops)
    evaluator = Evaluator(config, setup, workdir, tokenize) if config.train.eval_every else None

    last, eval_metrics = {}, {}

    def finish(step, device_metrics):
        """Host side of a step: read its metrics, stop on a non-finite loss, log."""
        nonlocal last
        last = train.host_metrics(device_metrics)
        if not np.isfinite(last["loss"]):
            good = ckpt.latest_step()
            raise FloatingPointError(
                f"loss is {last['loss']} at step {step}; stopping. Last good checkpoint: "
                + (f"step {good} in {ckpt.directory}" if good is not None else "none (no step was saved)")
                + ". Lower config.optim.lr, set config.optim.grad_clip_norm, or check the data.")
        logger.step(step, last)

    t_train = time.perf_counter()
    pending = None  # (step, device metrics) read one step late, so the host never idles the devices
    try:
        for step in range(start + 1, steps + 1):
            batch = next(data_iter)
            state, m = compiled(state, pipeline.to_global({"image": batch["image"], "ids": batch["ids"]}, mesh,
                                                          parallel.DATA_AXES))
            if pending is not None:
                finish(*pending)
            pending = (step, m)
            evaluate = evaluator is not None and (step % config.train.eval_every == 0 or step == steps)
            if not (evaluate or step % config.train.save_every == 0 or step == steps):
                continue
            finish(*pending)  # this step's state is evaluated or saved: its loss must be known good
            pending = None
            if evaluate:
                eval_metrics = evaluator(state)
                logger.write(step, {f"val/{k}": v for k, v in eval_metrics.items()})
                logging.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
            ckpt.save(step, state.as_dict(), data_iter, metrics=eval_metrics or None, force=step == steps)
            logger.restart_clock()
        ckpt.wait()
    finally:
        logger.close()
        ckpt.close()
    train_seconds = time.perf_counter() - t_train

    out = {
        "steps": steps,
        "start_step": start,
        "final_loss": last.get("loss", float("nan")),
        "images_per_s": round((steps - start) * config.train.global_batch / train_seconds, 2) if steps > start else 0.0,
        "pairs": num_pairs,
        "seconds": round(time.perf_counter() - t_start, 2),
        **{f"val_{k}": v for k, v in eval_metrics.items()},
    }
    if config.train.export_hf and jax.process_index() == 0:
        path = clip.save_hf(setup.model(state), workdir / "hf")
        out["export_hf"] = str(path)
    if jax.process_index() == 0:
        results.write_results(workdir, {"finetune": out})
    return {"finetune": out}


class Evaluator:
    """Zero-shot top-1 on the eval split with "a photo of a {class}." prompts, using the current
    parameters; works on any mesh (each process feeds its shard, padded to equal batch counts)."""

    def __init__(self, config, setup: train.Setup, workdir, tokenize):
        self.setup = setup
        self.source = datasets.source(config.data, config.data.eval_split, workdir, with_captions=False)
        self.batch = config.train.eval_batch
        dp = parallel.data_size(setup.mesh)
        self.batch = int(math.ceil(self.batch / dp) * dp)
        self.local_batch = self.batch // jax.process_count()
        self.class_ids = tokenize([EVAL_TEMPLATE.format(n) for n in self.source.class_names])
        self.workers, self.prefetch = config.data.workers, config.data.prefetch
        graphdef = setup.graphdef
        rep = parallel.replicated(setup.mesh)
        bs = parallel.batch_sharding(setup.mesh)

        def correct(params, class_ids, images, labels, mask):
            model = nnx.merge(graphdef, params)
            txt = clip.normalize(model.encode_text(class_ids))
            img = clip.normalize(model.encode_image(images))
            pred = jnp.argmax(img @ txt.T, axis=-1)
            return jnp.sum((pred == labels) & mask)

        self._correct = jax.jit(correct, in_shardings=(setup.state_shardings.params, rep, bs, bs, bs),
                                out_shardings=rep)

    def __call__(self, state: train.TrainState) -> dict[str, float]:
        per_process = math.ceil(len(self.source) / jax.process_count())
        num_batches = math.ceil(per_process / self.local_batch)
        it = iter(pipeline.eval_dataset(self.source, image_size=self.setup.image_size, batch_size=self.local_batch,
                                        workers=self.workers, prefetch=self.prefetch))
        ids = jax.device_put(self.class_ids, parallel.replicated(self.setup.mesh))
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
            total += int(self._correct(state.params, ids, g["images"], g["labels"], g["mask"]))
            seen += n
        seen = int(np.sum(_all_processes(seen)))
        return {"zero_shot_top1": total / max(seen, 1), "images": float(seen)}


def _all_processes(x: int) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray([x])
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))
