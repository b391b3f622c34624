"""Training metrics: TensorBoard event files, a JSON-lines log, a progress line, and model FLOPs
utilization (MFU) where the device's peak is known.

Only process 0 writes files. ``metrics.jsonl`` has one ``{"step": ..., "name": value, ...}`` object
per logged step (training and evaluation), for scripts; TensorBoard reads ``workdir/tensorboard``.
"""

from __future__ import annotations

import json
import time
from typing import Mapping

import jax
from absl import logging

from jaxgist.core import files

# Dense bf16 peak FLOP/s per device, by jax's device_kind. MFU is reported against these.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops(device=None) -> float | None:
    device = device or jax.devices()[0]
    return PEAK_BF16_FLOPS.get(device.device_kind)


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled (AOT) function, per device, as XLA counts them; also takes a
    lowered function (then: the whole unpartitioned program)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = cost.get("flops") if cost else None
    return float(flops) if flops and flops > 0 else None


def format_seconds(s: float) -> str:
    s = int(round(s))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class JsonLines:
    """An append-only JSON-lines file in a workdir. Local files are appended to and flushed line by
    line; in a bucket (no appends there) the lines are kept and the whole object is rewritten at most
    every ``flush_seconds`` and on ``close``."""

    def __init__(self, path, *, flush_seconds: float = 30.0, after_step: int | None = None):
        """``after_step``: a run resumed from that step drops the rows of later steps (an earlier run
        logged them, then stopped before saving them: they are about to be redone)."""
        self.path, self.flush_seconds = files.path(path), flush_seconds
        self.local = files.is_local(path)
        reading = after_step is not None or not self.local  # a local file is appended to, not read
        lines = files.read_text(self.path).splitlines(keepends=True) if reading and self.path.exists() else []
        if after_step is not None:
            kept = [line for line in lines if not line.strip() or json.loads(line).get("step", 0) <= after_step]
            if len(kept) < len(lines):
                logging.info("%s: dropping %d rows of steps after %d, which this run redoes", self.path,
                             len(lines) - len(kept), after_step)
                files.write_text_atomic(self.path, "".join(kept))
            lines = kept
        if self.local:
            files.makedirs(self.path.parent)
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            self._lines = lines
            self._dirty, self._flushed = False, time.monotonic()

    def write(self, record: Mapping) -> None:
        line = json.dumps(record) + "\n"
        if self.local:
            self._file.write(line)
            self._file.flush()
            return
        self._lines.append(line)
        self._dirty = True
        if time.monotonic() - self._flushed >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.local and self._dirty:
            files.write_text_atomic(self.path, "".join(self._lines))
            self._dirty, self._flushed = False, time.monotonic()

    def close(self) -> None:
        if self.local:
            self._file.close()
        else:
            self.flush()


class MetricsLogger:
    """Writes metrics (``metrics.jsonl`` and TensorBoard event files in ``workdir``, local or a
    bucket) and prints a progress line every ``log_every`` steps.

    ``flops_per_step`` (per device) and the device peak give MFU; both are optional.
    """

    def __init__(self, workdir, *, total_steps: int, global_batch: int, log_every: int = 10,
                 flops_per_step: float | None = None, resume_step: int | None = None):
        """``resume_step``: the step a resumed run starts after; rows and TensorBoard events an earlier
        run logged for later steps are dropped, not repeated."""
        self.workdir = files.path(workdir)
        self.total_steps, self.global_batch, self.log_every = total_steps, global_batch, max(1, log_every)
        self.flops_per_step, self.peak = flops_per_step, peak_flops()
        self.is_writer = jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        if self.is_writer:
            self._jsonl = JsonLines(self.workdir / "metrics.jsonl", after_step=resume_step)
            self._tb = _tensorboard_writer(self.workdir / "tensorboard",
                                           purge_step=None if resume_step is None else resume_step + 1)
        self._last_time = time.perf_counter()
        self._window_time = 0.0
        self._window_steps = 0
        self.last: dict[str, float] = {}

    def step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records train ``metrics`` of ``step`` (1-based: steps done); logs every ``log_every``."""
        now = time.perf_counter()
        self._window_time += now - self._last_time
        self._last_time = now
        self._window_steps += 1
        if step % self.log_every and step != self.total_steps:
            return
        step_time = self._window_time / self._window_steps
        self._window_time, self._window_steps = 0.0, 0
        out = dict(metrics)
        out["step_time_s"] = step_time
        out["images_per_s"] = self.global_batch / step_time
        if self.flops_per_step and self.peak:
            out["mfu"] = self.flops_per_step / step_time / self.peak
        self.last = out
        self.write(step, {f"train/{k}": v for k, v in out.items()})
        eta = step_time * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}", f"loss {out['loss']:.4f}"]
        if "lr" in out:
            parts.append(f"lr {out['lr']:.3g}")
        parts += [f"{out['images_per_s']:.1f} img/s", f"{step_time:.3f} s/step"]
        if "mfu" in out:
            parts.append(f"MFU {100 * out['mfu']:.1f}%")
        parts.append(f"ETA {format_seconds(eta)}")
        logging.info("%s", " | ".join(parts))

    def restart_clock(self) -> None:
        """Leaves time spent since the last step (evaluation, checkpointing) out of the step time."""
        self._last_time = time.perf_counter()

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.is_writer:
            return
        for name, value in scalars.items():
            if self._tb is not None:
                self._tb.add_scalar(name, float(value), step)
        self._jsonl.write({"step": step, **{k: float(v) for k, v in scalars.items()}})

    def flush(self) -> None:
        """Writes out what is buffered (a bucket's metrics.jsonl, TensorBoard events)."""
        if self._tb is not None:
            self._tb.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in files.read_text(path).splitlines() if line.strip()]


def _tensorboard_writer(logdir, purge_step: int | None = None):
    """A tensorboardX SummaryWriter for ``logdir`` (local or ``gs://``), or None when it cannot write
    there (the reason is logged; metrics.jsonl is written either way)."""
    try:
        import tensorboardX
    except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard event files")
        return None
    try:
        # purge_step: TensorBoard drops the events of that step and later an earlier run wrote
        return tensorboardX.SummaryWriter(str(logdir), purge_step=purge_step)
    except Exception as e:  # e.g. a bucket URL tensorboardX has no client for
        logging.warning("no TensorBoard event files in %s: %s", logdir, e)
        return None
