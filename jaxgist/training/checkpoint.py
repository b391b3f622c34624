"""Orbax checkpoints of a training run: the train state (every model's variables, optimizer states,
step) and the grain data-iterator state, saved together so a restarted run continues exactly.

    ckpt = Checkpointer(workdir / "checkpoints", save_every=100, keep=3, best_metric="val_top1")
    step = ckpt.latest_step()                                 # None on a fresh run
    state = ckpt.restore(step, abstract_state, data_iter)     # onto the shardings of abstract_state
    models = ckpt.restore_models(step, {"clip": abstract})    # some models' variables, nothing else
    ckpt.save(step, state, data_iter, metrics={...})
    ckpt.close()

A step directory holds ``state/`` (Orbax PyTree: ``{"step", "models": {name: ...}, "opt_states":
{name: ...}}``) and ``data/`` (one JSON per process with its iterator state). Restoring onto another
mesh only needs the abstract arrays to carry the new shardings. ``load_model`` / ``export_hf`` read a
saved CLIP (as a module, or written as a Hugging Face directory).
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from jaxgist.core import files


class Checkpointer:
    """An Orbax ``CheckpointManager`` for train state + data iterator.

    Args:
      directory: where step directories go (created).
      save_every: ``save`` stores a checkpoint when ``step % save_every == 0`` (or ``force``).
      keep: how many of the latest checkpoints to keep (None: all).
      best_metric / best_mode: additionally keep the best checkpoint by this metric of ``save``'s
        ``metrics`` ("max" or "min").
      async_save: write in a background thread (``wait`` blocks until written).
      read_only: only read (evaluation beside a running job): nothing is saved, deleted or cleaned
        up, not even a save in flight that another process is writing.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int = 1000, keep: int | None = 3,
                 best_metric: str | None = None, best_mode: str = "max", async_save: bool = True,
                 read_only: bool = False):
        if save_every < 1:
            raise ValueError(f"checkpoint save_every must be >= 1, got {save_every}")
        if keep is not None and keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1 or None, got {keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"checkpoint best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = files.path(directory)
        if files.is_local(directory):
            self.directory = self.directory.absolute()
        self.save_every, self.best_metric, self.best_mode = save_every, best_metric, best_mode
        keep_policies = [policies.LatestN(n=keep)]
        if best_metric:
            keep_policies.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                                                n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            enable_async_checkpointing=async_save,
            # with a best_fn, Orbax also writes each step's metrics, so the best survives a restart
            best_fn=(lambda m: m[best_metric]) if best_metric else None,
            best_mode=best_mode,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the best ``best_metric`` (None without a metric or saved metrics)."""
        if not self.best_metric:
            return None
        scored = []
        for step in self.manager.all_steps():
            m = self.manager.metrics(step)
            if m and self.best_metric in m:
                scored.append((m[self.best_metric], step))
        if not scored:
            return None
        return (max(scored) if self.best_mode == "max" else min(scored))[1]

    def save(self, step: int, state, data_iter=None, *, metrics: dict[str, float] | None = None,
             force: bool = False) -> bool:
        """Saves if ``step`` is on the interval (or ``force``); returns whether it saved."""
        if not force and step % self.save_every:
            return False
        if step in self.manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if self.best_metric and metrics is not None and self.best_metric not in metrics:
            raise KeyError(f"best_metric {self.best_metric!r} is not among the metrics saved: {sorted(metrics)}")
        saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state, data_iter=None):
        """The train state of ``step`` placed as ``abstract_state`` says (ShapeDtypeStructs with
        shardings); also sets ``data_iter``'s position when given."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        logging.info("checkpoint: restored step %d from %s", step, self.directory)
        return restored["state"]

    def restore_models(self, step: int, abstract_models: dict):
        """The variables of the models named in ``abstract_models`` (name -> abstract nnx.State with
        shardings) at ``step``; optimizer states and the data iterator are not read."""
        target = {"models": dict(abstract_models)}
        # a partial read needs the PyTree handler; this manager's "state" item is bound to the standard one
        reader = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                       item_handlers={"state": ocp.PyTreeCheckpointHandler()})
        try:
            restored = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)))
        finally:
            reader.close()
        return restored["state"]["models"]

    def reload(self) -> None:
        """Sees the steps another process has written since this one opened the directory."""
        if not files.is_local(self.directory):
            from etils.epath.backend import fsspec_backend  # noqa: PLC0415  (gs:// paths only)

            fsspec_backend.fs(str(self.directory)).invalidate_cache()
        self.manager.reload()

    def restore_state_only(self, step: int, abstract_state):
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs of ``tree``'s arrays, with ``shardings`` (a matching tree) when given."""
    if shardings is None:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _run_checkpoints(directory: str | os.PathLike) -> epath.Path:
    directory = files.path(directory)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    return directory


def load_model(directory: str | os.PathLike, model_config, step: int | None = None, *, name: str = "clip"):
    """The CLIP of checkpoint ``step`` (default: latest) of a run: ``directory`` is the run's workdir
    or its ``checkpoints`` folder; ``model_config`` is the run's ``config.model`` (it fixes the
    architecture); ``name`` the model's name in the train state. Only that model's variables are read
    (not the optimizer state). Returns (model, step)."""
    from flax import nnx

    from jaxgist.models import clip

    directory = _run_checkpoints(directory)
    ckpt = Checkpointer(directory, async_save=False, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"step {step} is not saved in {directory}; saved steps: {steps}")
        graphdef, abstract_state = nnx.split(clip.abstract_from_config(model_config))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                        abstract_state)
        model_state = ckpt.restore_models(step, {name: target})[name]
    finally:
        ckpt.close()
    logging.info("loaded model %r of step %d from %s", name, step, directory)
    return nnx.merge(graphdef, model_state), step


def export_hf(directory: str | os.PathLike, model_config, out_dir: str | os.PathLike, step: int | None = None,
              ) -> epath.Path:
    """Writes the parameters of checkpoint ``step`` (default: latest) of the run in ``directory``
    (its workdir or ``checkpoints`` folder) as a Hugging Face CLIP directory."""
    from jaxgist.models import clip

    model, step = load_model(directory, model_config, step)
    path = clip.save_hf(model, out_dir)
    logging.info("exported step %d of %s to %s", step, directory, path)
    return path
