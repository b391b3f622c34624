"""Will this config fit a TPU pod? Ahead-of-time compilation of the training step for a topology.

    pip install -e ".[tpu]"        # libtpu: it compiles for TPUs on any machine, no TPU needed
    python -m jaxgist.aot --config configs/finetune.py --topology v5e:16x16 \\
        --config.train.global_batch=1024 --config.mesh='(("data", -1), ("fsdp", 1))'

Builds the mesh and shardings from the config over the topology's abstract chips, then lowers and
compiles the same jitted train step that ``finetune`` runs (``train.build``), with abstract arrays of
the config's shapes and shardings; no parameters are created and no data is read. Prints per-chip
memory (arguments, outputs, temporaries, generated code, and their total against the chip's usable
HBM), FLOPs per step and the compile time; ``--json FILE`` writes the same as JSON.

Exit status: 0 when the step fits, 1 when it does not (with the compiler's message), 2 for a bad
config or topology (for example a global batch that does not divide over the data axes: that is
caught before compiling).

Topologies are libtpu's names: ``v5e:2x2``, ``v5e:4x4``, ``v5e:16x16`` (v5litepod-256), ``v4:2x2x2``,
``v4:4x4x4`` (64 chips, one device per chip: megacore), ``v5p:4x4x4``, ``v6e:16x16``, ...
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
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
        g = _size
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


def _size(b: float | None) -> str:
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


def compile_train_step(config, devices: Sequence[Any], *, topology: str = "", hbm_bytes: float | None = None) -> Report:
    """Lowers and compiles ``finetune``'s train step for ``config`` on ``devices`` (a topology's).

    Raises ``config.ConfigError`` for a bad config (before compiling). A step that does not fit
    comes back as a Report with ``fits=False`` (and the compiler's message when it refused)."""
    import jax
    import numpy as np

    from jaxgist import finetune, metrics, parallel, train
    from jaxgist.models import clip

    finetune.validate(config, num_devices=len(devices), check_data=False)
    mesh = parallel.make_mesh(config.mesh, devices)
    finetune.check_batch(config, mesh)
    model_cfg = clip.config_from_model_config(config.model)
    # the schedule's length does not change any shape: a placeholder when the job counts epochs
    setup = train.build(config, mesh, config.train.steps or 1000, model_cfg=model_cfg)
    global_batch = config.train.global_batch
    args = (setup.abstract_state, setup.abstract_batch(global_batch))
    argument_bytes = bytes_per_device(args)
    kind = devices[0].device_kind
    hbm = hbm_bytes if hbm_bytes is not None else USABLE_HBM.get(kind)

    t0 = time.perf_counter()
    lowered = setup.step.lower(*args)
    t1 = time.perf_counter()
    compiled, message = None, ""
    try:
        compiled = lowered.compile()
    except Exception as e:  # jax.errors.JaxRuntimeError; the TPU compiler refuses programs over HBM
        if not _OOM.search(str(e)):
            raise
        message = str(e).strip().splitlines()[0]
    t2 = time.perf_counter()

    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(setup.abstract_state.params))
    common = dict(
        topology=topology, device_kind=kind, num_devices=len(devices),
        num_hosts=len({d.process_index for d in devices}), mesh={k: int(v) for k, v in mesh.shape.items()},
        model=_model_name(config.model), num_params=num_params, param_dtype=np.dtype(model_cfg.param_dtype).name,
        compute_dtype=np.dtype(model_cfg.dtype).name, remat=bool(model_cfg.remat), global_batch=global_batch,
        per_device_batch=global_batch // parallel.data_size(mesh), hbm_bytes=hbm, argument_bytes=argument_bytes,
        lower_seconds=round(t1 - t0, 2), compile_seconds=round(t2 - t1, 2))
    if compiled is None:
        required, available, is_total = _oom_sizes(message)
        total = None if required is None else int(required if is_total else required + argument_bytes)
        temps = None if required is None or is_total else int(required)
        return Report(**{**common, "hbm_bytes": available or hbm}, compiled_argument_bytes=None, output_bytes=None,
                      alias_bytes=None, temp_bytes=temps, code_bytes=None, total_bytes=total, fits=False,
                      flops_per_device=None, flops_total=_unpartitioned_flops(config, model_cfg),
                      compiler_message=message)
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    flops = metrics.compiled_flops(compiled)
    return Report(**common, compiled_argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
                  temp_bytes=mem.temp_size_in_bytes, code_bytes=mem.generated_code_size_in_bytes, total_bytes=total,
                  fits=hbm is None or total <= hbm, flops_per_device=flops,
                  flops_total=flops * len(devices) if flops else _unpartitioned_flops(config, model_cfg))


def _unpartitioned_flops(config, model_cfg) -> float | None:
    """FLOPs of the whole step as one program, from its lowering for one host CPU device (no compile):
    the figure for a step the TPU compiler refused (within ~1% of the partitioned count for CLIP)."""
    import jax

    from jaxgist import metrics, parallel, train

    mesh = parallel.make_mesh((("data", 1),), jax.devices("cpu")[:1])
    setup = train.build(config, mesh, config.train.steps or 1000, model_cfg=model_cfg)
    return metrics.compiled_flops(setup.step.lower(setup.abstract_state, setup.abstract_batch(config.train.global_batch)))


def _model_name(model_config) -> str:
    if model_config.get("init"):
        return str(model_config.init)
    preset = model_config.get("preset")
    return preset if isinstance(preset, str) else "custom preset"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _flags():
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "Training config, e.g. configs/finetune.py[:arg].")
    topology = flags.DEFINE_string("topology", None, "libtpu topology name, e.g. v5e:2x2, v5e:16x16, v4:4x4x4.")
    chip_config = flags.DEFINE_string("chip_config", None, "libtpu chip config (default: megacore on v4, else default).")
    chips_per_host = flags.DEFINE_list("chips_per_host", ["2", "2", "1"], "Chips per host, as x,y,z.")
    num_slices = flags.DEFINE_integer("num_slices", 1, "Number of slices (multislice).")
    hbm_gib = flags.DEFINE_float("hbm_gib", None, "Usable HBM per chip in GiB (default: the compiler's figure "
                                 "for the chip, see USABLE_HBM).")
    out = flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
    return config, topology, chip_config, chips_per_host, num_slices, hbm_gib, out


def main(argv, flag_values) -> int:
    from absl import app

    from jaxgist.config import ConfigError

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, topology, chip_config, chips_per_host, num_slices, hbm_gib, out = (f.value for f in flag_values)
    try:
        devices = topology_devices(topology, chip_config=chip_config, num_slices=num_slices,
                                   chips_per_host=tuple(int(x) for x in chips_per_host))
        report = compile_train_step(config, devices, topology=topology,
                                    hbm_bytes=hbm_gib * GiB if hbm_gib is not None else None)
    except (ConfigError, TopologyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary(), flush=True)
    if out:
        from jaxgist.files import write_json_atomic

        write_json_atomic(out, report.to_dict())
    if not report.fits:
        need, have = _size(report.total_bytes), _size(report.hbm_bytes)
        print(f"error: the train step does not fit on {topology}: it needs {need} per chip, {have} usable. "
              f"Lower config.train.global_batch, shard parameters and optimizer state over more chips "
              f"(--config.mesh='((\"data\", -1), (\"fsdp\", N))'), set --config.model.remat=True or "
              f"--config.model.compute_dtype=bfloat16.", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    from absl import app

    flag_values = _flags()
    from absl import flags

    flags.mark_flags_as_required(["config", "topology"])
    if "JAX_PLATFORMS" not in os.environ:
        os.environ["JAX_PLATFORMS"] = "cpu"  # the host only compiles; libtpu is loaded for the topology alone
    app.run(lambda argv: sys.exit(main(argv, flag_values)))


if __name__ == "__main__":
    cli()
