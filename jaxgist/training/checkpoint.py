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

import contextlib
import hashlib
import json
import os
import time

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from jaxgist.core import files

CHECKSUMS = "jaxgist_checksums.json"  # in each step directory: sha256 of every file the save wrote


class CorruptCheckpoint(RuntimeError):
    """A saved step whose files do not match their checksums or cannot be read."""

    def __init__(self, step: int, directory, reason: str):
        self.step, self.reason = step, reason
        super().__init__(f"checkpoint step {step} in {directory} is damaged: {reason}")


class SaveFailed(RuntimeError):
    """A checkpoint save (written in the background) failed: a full disk, lost permissions, a bucket gone."""


@contextlib.contextmanager
def _saves_named(directory):
    """Re-raises a background save's error as SaveFailed naming the directory (one line for the user)."""
    try:
        yield
    except SaveFailed:
        raise
    except Exception as e:  # noqa: BLE001 - whatever Orbax's thread hit
        raise SaveFailed(f"saving a checkpoint to {directory} failed: {type(e).__name__}: {_first_line(e)}") from e


def _file_digests(step_dir: str) -> dict[str, str]:
    out = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            if name == CHECKSUMS:
                continue
            path = os.path.join(root, name)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            out[os.path.relpath(path, step_dir)] = digest.hexdigest()
    return out


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

    Each finished save of a local directory gets a ``jaxgist_checksums.json`` (sha256 of every file),
    written by process 0 once the save has committed; ``restore`` verifies it first and raises
    ``CorruptCheckpoint`` naming the step and the damage (a changed, truncated or missing file, or
    any error reading the step). ``move_aside`` puts a damaged step beside the checkpoints, never
    deleting it (``training.loop.restore_or_init`` then resumes from the newest good step).
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
        self.read_only = read_only
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

    def _step_dir(self, step: int) -> str:
        return os.path.join(os.fspath(self.directory), str(step))

    def record_checksums(self) -> None:
        """Writes the checksums of every committed step that has none yet (local directories, process 0)."""
        if self.read_only or not files.is_local(self.directory) or jax.process_index() != 0:
            return
        for step in self.manager.all_steps():
            step_dir = self._step_dir(step)
            target = os.path.join(step_dir, CHECKSUMS)
            if not os.path.isdir(step_dir) or os.path.exists(target):
                continue  # not committed yet (still a temporary directory), or done
            try:  # no makedirs: a step the keep policy deletes meanwhile stays deleted
                files.write_json_atomic(target, _file_digests(step_dir), makedirs=False, sort_keys=True)
            except FileNotFoundError:  # the keep policy removed the step while it was being read
                continue

    def verify(self, step: int) -> None:
        """Raises CorruptCheckpoint unless every file of ``step`` matches its recorded checksum (a step
        saved without checksums, e.g. in a bucket, is not checked)."""
        if not files.is_local(self.directory):
            return
        recorded_path = os.path.join(self._step_dir(step), CHECKSUMS)
        if not os.path.exists(recorded_path):
            return
        try:
            with open(recorded_path, encoding="utf-8") as f:
                recorded = json.load(f)
        except (OSError, ValueError) as e:
            raise CorruptCheckpoint(step, self.directory, f"its checksum file cannot be read ({e})") from None
        found = _file_digests(self._step_dir(step))
        missing = sorted(set(recorded) - set(found))
        changed = sorted(k for k in recorded if k in found and found[k] != recorded[k])
        if missing or changed:
            parts = ([f"missing {', '.join(missing[:3])}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")]
                     if missing else [])
            parts += ([f"changed {', '.join(changed[:3])}" + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")]
                      if changed else [])
            raise CorruptCheckpoint(step, self.directory, "; ".join(parts) + " (against the checksums written at save)")

    def move_aside(self, step: int) -> str | None:
        """Moves a damaged step's directory to ``<checkpoints>.damaged/<step>-<time>`` (process 0; kept for
        inspection, never deleted). Returns where it went."""
        if not files.is_local(self.directory) or self.read_only:
            return None
        target = None
        if jax.process_index() == 0 and os.path.isdir(self._step_dir(step)):
            aside = os.fspath(self.directory) + ".damaged"
            os.makedirs(aside, exist_ok=True)
            target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self._step_dir(step), target)
        self.manager.reload()
        return target

    def check(self) -> None:
        """Raises SaveFailed for a background save that failed (cheap: called after every step)."""
        with _saves_named(self.directory):
            self.manager.check_for_errors()
            # Orbax's manager finalizes async saves in a thread of its own that keeps the error until
            # the next save or wait; a finished thread holding one is surfaced now
            ref = getattr(self.manager, "_finalize_thread", None)
            thread = ref.map(lambda t: t) if hasattr(ref, "map") else None
            if thread is not None and not thread.is_alive() and getattr(thread, "exception", None) is not None:
                self.manager.wait_until_finished()  # raises it

    def save(self, step: int, state, data_iter=None, *, metrics: dict[str, float] | None = None,
             force: bool = False) -> bool:
        """Saves if ``step`` is on the interval (or ``force``); returns whether it saved."""
        if not force and step % self.save_every:
            return False
        self.check()
        self.record_checksums()  # of the saves that have committed since the last call
        if step in self.manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if self.best_metric and metrics is not None and self.best_metric not in metrics:
            raise KeyError(f"best_metric {self.best_metric!r} is not among the metrics saved: {sorted(metrics)}")
        with _saves_named(self.directory):
            saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state, data_iter=None):
        """The train state of ``step`` placed as ``abstract_state`` says (ShapeDtypeStructs with
        shardings); also sets ``data_iter``'s position when given."""
        self.verify(step)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax/TensorStore errors of a damaged step: name the step
            raise CorruptCheckpoint(step, self.directory, f"{type(e).__name__}: {_first_line(e)}") from e
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

    def saved_step(self, step: int | None = None) -> int:
        """``step`` (None or negative: the latest) if it is saved; FileNotFoundError naming the saved
        steps otherwise."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        step = steps[-1] if step is None or step < 0 else step
        if step not in steps:
            raise FileNotFoundError(f"step {step} is not saved in {self.directory}; saved steps: {steps}")
        return step

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
        with _saves_named(self.directory):
            self.manager.wait_until_finished()
        self.record_checksums()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else repr(e)


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
        step = ckpt.saved_step(step)
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
