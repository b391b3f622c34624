"""Ahead-of-time compilation of a jitted train step for a TPU topology: memory per chip and FLOPs.

    devices = aot.topology_devices("v5e:16x16")          # libtpu's abstract chips, no TPU needed
    compiled, message, seconds = aot.compile_step(step, *abstract_args)   # message: the compiler's OOM
    mem = aot.memory_fields(compiled, argument_bytes)    # per-chip arguments/outputs/temps/code/total

``Report`` is what ``python -m jaxgist.aot`` prints for one method's step (``jaxgist.aot``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Sequence

GiB = 1024**3

# HBM per device that the TPU compiler lets a program use, by jax's device_kind (read from the
# compiler's out-of-memory messages with this libtpu: "exceeds available HBM (15.75G)"; G = GiB).
USABLE_HBM = {
    "TPU v4": 30.75 * GiB,
    "TPU v5 lite": 15.75 * GiB,
    "TPU v5": 95.74 * GiB,
    "TPU v6 lite": 31.25 * GiB,
}

# One jax device per chip: v4 runs its two TensorCores as one ("megacore"), as jax does on v4 VMs.
DEFAULT_CHIP_CONFIG = {"v4": "megacore"}

_TOPOLOGY = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+){1,2})$")
_OOM = re.compile(r"RESOURCE_EXHAUSTED")
_SIZE = re.compile(r"([\d.]+)([KMGTP]?)(?:i?B)?\b")


class TopologyError(ValueError):
    """An unknown or malformed TPU topology, or libtpu missing."""


@dataclasses.dataclass
class Report:
    """What compiling the train step for a topology tells."""

    topology: str
    device_kind: str
    num_devices: int
    num_hosts: int
    mesh: dict[str, int]
    model: str
    num_params: int
    param_dtype: str
    compute_dtype: str
    remat: bool
    global_batch: int
    per_device_batch: int
    hbm_bytes: float | None  # usable HBM per chip
    argument_bytes: int  # per chip: train state shards + batch shard, from the shardings
    compiled_argument_bytes: int | None  # the compiler's figure for the same (with padding)
    output_bytes: int | None
    alias_bytes: int | None  # outputs written into donated arguments
    temp_bytes: int | None
    code_bytes: int | None
    total_bytes: int | None  # arguments + outputs - aliased + temporaries + code
    fits: bool
    flops_per_device: float | None  # one step, as XLA counts the partitioned program
    flops_total: float | None  # one step, all chips
    lower_seconds: float
    compile_seconds: float
    compiler_message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        g = format_bytes
        mesh = ", ".join(f"{k} {v}" for k, v in self.mesh.items())
        lines = [
            f"topology {self.topology}: {self.num_devices} x {self.device_kind} ({self.num_hosts} host{'s' if self.num_hosts > 1 else ''}), mesh {mesh}",
            f"model {self.model}: {self.num_params / 1e6:.1f}M parameters, {self.param_dtype} parameters, "
            f"{self.compute_dtype} compute, remat {'on' if self.remat else 'off'}; global batch "
            f"{self.global_batch} ({self.per_device_batch} per chip)",
        ]
        if self.temp_bytes is not None and self.output_bytes is not None:
            lines.append(f"per-chip memory: arguments {g(self.compiled_argument_bytes)}, outputs {g(self.output_bytes)} "
                         f"({g(self.alias_bytes)} aliased to donated arguments), temporaries {g(self.temp_bytes)}, "
                         f"code {g(self.code_bytes)}")
        else:
            lines.append(f"per-chip memory: arguments {g(self.argument_bytes)}, temporaries "
                         f"{g(self.temp_bytes)} (the compiler's figures when it gave up)")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        if self.hbm_bytes and self.total_bytes is not None:
            lines.append(f"  total {g(self.total_bytes)} of {g(self.hbm_bytes)} usable HBM "
                         f"({100 * self.total_bytes / self.hbm_bytes:.0f}%): {verdict}")
        else:
            lines.append(f"  total {g(self.total_bytes)} (usable HBM of {self.device_kind} unknown): {verdict}")
        if self.flops_total is not None:
            if self.flops_per_device:
                lines.append(f"FLOPs per step: {self.flops_per_device:.3e} per chip, {self.flops_total:.3e} in all")
            else:
                lines.append(f"FLOPs per step: {self.flops_total:.3e} in all (counted on the unpartitioned step)")
        lines.append(f"lower {self.lower_seconds:.1f} s, compile {self.compile_seconds:.1f} s")
        if self.compiler_message:
            lines.append(f"compiler: {self.compiler_message}")
        return "\n".join(lines)


def format_bytes(b: float | None) -> str:
    if b is None:
        return "?"
    return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Topologies
# ---------------------------------------------------------------------------------------------


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """``"v5e:16x16"`` -> ("v5e", (16, 16))."""
    m = _TOPOLOGY.match(name or "")
    if not m:
        raise TopologyError(f"topology {name!r} is not of the form <generation>:<AxB[xC]>, e.g. v5e:16x16 or v4:4x4x4")
    return m.group(1), tuple(int(x) for x in m.group(2).split("x"))


def _quiet_libtpu(generation: str, dims: tuple[int, ...]) -> None:
    """libtpu looks for a TPU VM's metadata when it loads; tell it what it would find so that it does
    not warn (only where the variables are unset: on a real TPU VM they are right already)."""
    chips = math.prod(dims)
    kind = {"v5e": f"v5litepod-{chips}", "v6e": f"v6e-{chips}"}.get(generation, f"{generation}-{2 * chips}")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", kind)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # compile-only: several compiles (or one beside a job on a TPU VM) may load libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(name: str, *, chip_config: str | None = None, chips_per_host: Sequence[int] = (2, 2, 1),
                     num_slices: int = 1) -> list:
    """The abstract devices of a TPU topology (compile-only: nothing runs on them)."""
    generation, dims = parse_topology(name)
    chip_config = chip_config or DEFAULT_CHIP_CONFIG.get(generation, "default")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TopologyError('compiling for TPU topologies needs libtpu: pip install -e ".[tpu]" '
                            '(or pip install "jax[tpu]")') from None
    _quiet_libtpu(generation, dims)
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=name, chip_config_name=chip_config,
            chips_per_host_bounds=tuple(chips_per_host), num_slices=num_slices)
    except Exception as e:  # libtpu's errors are plain RuntimeErrors / XlaRuntimeErrors
        raise TopologyError(f"libtpu does not know topology {name!r} (chip config {chip_config!r}): {e}") from None
    return list(desc.devices)


# ---------------------------------------------------------------------------------------------
# Compiling the step
# ---------------------------------------------------------------------------------------------


def bytes_per_device(tree) -> int:
    """Bytes of the largest shard each device holds of a tree of sharded ShapeDtypeStructs."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def _parse_size(text: str) -> float | None:
    m = _SIZE.fullmatch(text.strip())
    if not m:
        return None
    return float(m.group(1)) * 1024 ** "BKMGTP".index(m.group(2) or "B")


def _oom_sizes(message: str) -> tuple[float | None, float | None, bool]:
    """(required, available, required is the total) bytes from the TPU compiler's out-of-memory
    message. Two forms: "... required for HLO temporaries (18.49G) exceeds available HBM (15.75G)"
    (temporaries alone) and "... Used 16.25G of 15.75G hbm. Exceeded hbm capacity by 515.03M." (all
    of the program's memory)."""
    used = re.search(r"Used ([\d.]+[KMGTP]?) of ([\d.]+[KMGTP]?) hbm", message)
    if used:
        return _parse_size(used.group(1)), _parse_size(used.group(2)), True
    sizes = [_parse_size(s) for s in re.findall(r"\(([\d.]+[KMGTP]?i?B?)\)", message)]
    sizes = [s for s in sizes if s is not None]
    return (sizes[0], sizes[1], False) if len(sizes) >= 2 else (None, None, False)


def compile_step(step, *args) -> tuple[Any, str, float, float]:
    """Lowers and compiles the jitted ``step`` on abstract ``args``: (compiled or None, the compiler's
    out-of-memory message when it refused, lower seconds, compile seconds). Other errors propagate."""
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    t1 = time.perf_counter()
    compiled, message = None, ""
    try:
        compiled = lowered.compile()
    except Exception as e:  # jax.errors.JaxRuntimeError; the TPU compiler refuses programs over HBM
        if not _OOM.search(str(e)):
            raise
        message = str(e).strip().splitlines()[0]
    return compiled, message, round(t1 - t0, 2), round(time.perf_counter() - t1, 2)


def memory_fields(compiled, hbm: float | None) -> dict[str, Any]:
    """The Report fields a compiled step's memory analysis gives (per chip)."""
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    return dict(compiled_argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
                alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
                code_bytes=mem.generated_code_size_in_bytes, total_bytes=total, fits=hbm is None or total <= hbm)


def refused_fields(message: str, argument_bytes: int, hbm: float | None) -> dict[str, Any]:
    """The Report fields of a step the compiler refused for memory (from its message)."""
    required, available, is_total = _oom_sizes(message)
    total = None if required is None else int(required if is_total else required + argument_bytes)
    temps = None if required is None or is_total else int(required)
    return dict(hbm_bytes=available or hbm, compiled_argument_bytes=None, output_bytes=None, alias_bytes=None,
                temp_bytes=temps, code_bytes=None, total_bytes=total, fits=False, compiler_message=message)
