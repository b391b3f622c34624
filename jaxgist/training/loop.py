"""The one training loop: resume, step, periodic evaluation, checkpoints, best metric, non-finite stop,
progress and TensorBoard. A method supplies its compiled step, its batches and its evaluator.

    ckpt = checkpoint.from_config(workdir / "checkpoints", config.train)
    state, start = loop.restore_or_init(ckpt, layout.abstract, lambda: layout.init(models), data_iter)
    result = loop.run(state, step, data_iter, to_device=..., checkpointer=ckpt, logger=logger,
                      total_steps=steps, start_step=start, eval_every=..., evaluate=evaluator)

``step(state, batch) -> (state, metrics)`` with a ``"loss"`` metric; metrics are read one step late so
the host never idles the devices, except at a step that is evaluated or saved, whose loss must be
known to be finite first. A non-finite loss raises ``FloatingPointError`` naming the step and the last
good checkpoint, before anything of that step is saved. A checkpoint carries the evaluation metrics of
its own step only (``best_metric`` never keeps a step that was not evaluated), and with a
``best_metric`` every evaluated step is saved, on the save interval or not.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from absl import logging

from jaxgist.training import checkpoint as checkpoint_lib
from jaxgist.training import metrics as metrics_lib
from jaxgist.training import train_state


@dataclasses.dataclass
class Result:
    """What ``run`` returns."""

    state: Any
    start_step: int  # steps done before this run (resumed from)
    end_step: int
    last_train: dict[str, float]  # the last step's train metrics (empty when no step ran)
    last_eval: dict[str, float]  # the last evaluation's metrics (empty without evaluation)
    last_eval_step: int | None
    train_seconds: float

    @property
    def steps_run(self) -> int:
        return self.end_step - self.start_step


def restore_or_init(checkpointer: checkpoint_lib.Checkpointer, abstract_state, init: Callable[[], Any],
                    data_iter=None) -> tuple[Any, int]:
    """(state, steps done): the newest good checkpoint restored onto ``abstract_state``'s shardings (and
    ``data_iter``'s position), or ``init()`` when there is none. A damaged step (checksums, unreadable
    files) is named, moved aside and the next older one tried."""
    while (step := checkpointer.latest_step()) is not None:
        try:
            restored = checkpointer.restore(step, abstract_state.as_dict(), data_iter)
        except checkpoint_lib.CorruptCheckpoint as e:
            where = checkpointer.move_aside(step)
            logging.warning("%s; moved it to %s and trying the step before it", e, where or "(left in place)")
            if where is None:  # cannot be moved (a bucket, read-only): do not loop on it
                raise
            continue
        state = type(abstract_state).from_dict(restored)
        logging.info("resumed from step %d of %s", step, checkpointer.directory)
        return state, step
    return init(), 0


class Preempted(Exception):
    """The run stopped on SIGTERM or SIGINT after saving the step it had finished."""

    def __init__(self, signum: int, step: int, directory):
        self.signum, self.step, self.directory = signum, step, directory
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}, which is saved in {directory}; "
                         f"run the same command to resume from it")


class _StopSignals:
    """Turns SIGTERM and SIGINT (what TPU maintenance, spot VMs, SLURM and Ctrl-C send) into a request to
    stop after the current step; a second SIGINT interrupts at once. In a multi-process job the
    signals are left to jax's preemption notifier and every process stops at the step they agree on
    (``multihost_utils.reached_preemption_sync_point``)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logging.warning("received %s: finishing the current step, saving it, then stopping",
                        signal.Signals(signum).name)

    def requested(self, step: int) -> int | None:
        """The signal to stop on after ``step`` (None: go on)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return signal.SIGTERM if multihost_utils.reached_preemption_sync_point(step) else None
        return self.signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def run(state, step: Callable, batches: Iterator, *, to_device: Callable[[Any], Any],
        checkpointer: checkpoint_lib.Checkpointer, logger: metrics_lib.MetricsLogger, total_steps: int,
        start_step: int = 0, eval_every: int = 0, evaluate: Callable[[Any], Mapping[str, float]] | None = None,
        save_every: int | None = None) -> Result:
    """Runs steps ``start_step + 1 .. total_steps``: evaluates every ``eval_every`` steps and at the last
    step (when ``evaluate`` is given), saves every ``save_every`` steps (default: the checkpointer's)
    and at the last step, then waits for the saves to finish. On SIGTERM or SIGINT it finishes the
    current step, saves it, waits for the save and raises ``Preempted``: a rerun redoes no step."""
    save_every = save_every or checkpointer.save_every
    last: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    last_eval_step = None

    def finish(n: int, device_metrics) -> None:
        """Host side of a step: read its metrics, stop on a non-finite loss, log."""
        nonlocal last
        last = train_state.host_metrics(device_metrics)
        if not np.isfinite(last["loss"]):
            good = checkpointer.latest_step()
            raise FloatingPointError(
                f"loss is {last['loss']} at step {n}; stopping. Last good checkpoint: "
                + (f"step {good} in {checkpointer.directory}" if good is not None else "none (no step was saved)")
                + ". Lower config.optim.lr, set config.optim.grad_clip_norm, or check the data.")
        logger.step(n, last)

    t0 = time.perf_counter()
    pending = None  # (step, device metrics) read one step late
    with _StopSignals() as stop:
        for n in range(start_step + 1, total_steps + 1):
            state, m = step(state, to_device(next(batches)))
            if pending is not None:
                finish(*pending)
            pending = (n, m)
            checkpointer.check()  # a background save that failed stops the run now, not a save later
            signum = stop.requested(n)
            evaluating = evaluate is not None and ((eval_every and n % eval_every == 0) or n == total_steps)
            if not (evaluating or n % save_every == 0 or n == total_steps or signum):
                continue
            finish(*pending)  # this step's state is evaluated or saved: its loss must be known good
            pending = None
            metrics = None
            if evaluating:
                last_eval, last_eval_step = dict(evaluate(state)), n
                metrics = last_eval
                logger.write(n, {f"val/{k}": v for k, v in last_eval.items()})
                logging.info("eval at step %d: %s", n, ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            # with a best metric, every evaluated step is saved so that the best can be kept
            force = n == total_steps or bool(signum) or (evaluating and bool(checkpointer.best_metric))
            checkpointer.save(n, state.as_dict(), batches, metrics=metrics, force=force)
            logger.restart_clock()
            if signum and n < total_steps:
                checkpointer.wait()
                logger.flush()
                raise Preempted(signum, n, checkpointer.directory)
        if pending is not None:
            finish(*pending)
        checkpointer.wait()
    return Result(state=state, start_step=start_step, end_step=max(total_steps, start_step), last_train=last,
                  last_eval=last_eval, last_eval_step=last_eval_step, train_seconds=time.perf_counter() - t0)
