"""Will this config fit a TPU pod? Ahead-of-time compilation of the training step for a topology.

    pip install -e ".[tpu]"        # libtpu: it compiles for TPUs on any machine, no TPU needed
    python -m jaxgist.aot --config configs/finetune.py --topology v5e:16x16 \\
        --config.train.global_batch=1024 --config.mesh='(("data", -1), ("fsdp", 1))'

Builds the mesh and shardings from the config over the topology's abstract chips, then lowers and
compiles the same jitted train step that the config's method runs (its ``compile_inputs``), with abstract arrays of
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

import os
import sys
from typing import Any, Sequence

from jaxgist.training import aot, metrics
from jaxgist.training.aot import (  # noqa: F401  (the command's public names)
    USABLE_HBM,
    GiB,
    Report,
    TopologyError,
    bytes_per_device,
    parse_topology,
    topology_devices,
)


def compile_train_step(config, devices: Sequence[Any], *, topology: str = "", hbm_bytes: float | None = None) -> Report:
    """Lowers and compiles the train step of ``config.method`` for ``config`` on ``devices`` (a
    topology's). The method's ``compile_inputs(config, mesh)`` gives the jitted step and its abstract
    arguments (train state, batch).

    Raises ``ConfigError`` for a bad config or a method without a train step (before compiling). A
    step that does not fit comes back as a Report with ``fits=False`` (and the compiler's message
    when it refused)."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxgist import methods
    from jaxgist.core.config import ConfigError
    from jaxgist.training import parallel

    try:
        job = methods.get(config.get("method"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not hasattr(job, "compile_inputs"):
        raise ConfigError(f"config.method={config.method!r} has no train step to compile")
    try:
        mesh = parallel.make_mesh(config.mesh, devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    step, args, model_cfg = job.compile_inputs(config, mesh)
    state = args[0]
    global_batch = config.train.global_batch
    argument_bytes = aot.bytes_per_device(args)
    kind = devices[0].device_kind
    hbm = hbm_bytes if hbm_bytes is not None else aot.USABLE_HBM.get(kind)
    compiled, message, lower_s, compile_s = aot.compile_step(step, *args)

    params = [nnx.filter_state(m, nnx.Param) for m in state.models.values()]
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    common = dict(
        topology=topology, device_kind=kind, num_devices=len(devices),
        num_hosts=len({d.process_index for d in devices}), mesh={k: int(v) for k, v in mesh.shape.items()},
        model=getattr(model_cfg, "name", None) or _model_name(config.model), num_params=num_params, param_dtype=np.dtype(model_cfg.param_dtype).name,
        compute_dtype=np.dtype(model_cfg.dtype).name, remat=bool(model_cfg.remat), global_batch=global_batch,
        per_device_batch=global_batch // parallel.data_size(mesh), hbm_bytes=hbm, argument_bytes=argument_bytes,
        lower_seconds=lower_s, compile_seconds=compile_s)
    if compiled is None:
        return Report(**{**common, **aot.refused_fields(message, argument_bytes, hbm)}, flops_per_device=None,
                      flops_total=_unpartitioned_flops(job, config))
    flops = metrics.compiled_flops(compiled)
    return Report(**common, **aot.memory_fields(compiled, hbm), flops_per_device=flops,
                  flops_total=flops * len(devices) if flops else _unpartitioned_flops(job, config))


def _unpartitioned_flops(job, config) -> float | None:
    """FLOPs of the whole step as one program, from its lowering for one host CPU device (no compile):
    the figure for a step the TPU compiler refused (within ~1% of the partitioned count for CLIP)."""
    import jax

    from jaxgist.training import parallel

    one = config.copy_and_resolve_references()
    one.mesh = (("data", 1),)
    step, args, _ = job.compile_inputs(one, parallel.make_mesh(one.mesh, jax.devices("cpu")[:1]))
    return metrics.compiled_flops(step.lower(*args))


def _model_name(model_config) -> str:
    if model_config.get("arch"):
        return str(model_config.arch)
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

    from jaxgist.core.config import ConfigError

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
        from jaxgist.core.files import write_json_atomic

        write_json_atomic(out, report.to_dict())
    if not report.fits:
        need, have = aot.format_bytes(report.total_bytes), aot.format_bytes(report.hbm_bytes)
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
