"""Meshes, sharding rules and multi-host start-up.

One mesh from the config, e.g. ``mesh = (("data", -1), ("fsdp", 1))`` (-1: all remaining devices).
Parameters carry logical axis names (the model's ``logical_axes(path)``); ``rules`` map logical
names to mesh axes, e.g. ``(("embed", "fsdp"),)`` shards every weight's width over ``fsdp`` (FSDP:
parameters and optimizer state both, since optimizer state follows its parameter). Batches are
sharded on their leading axis over every data-like axis (``data`` and ``fsdp``).

The same code runs on 1 CPU, 8 fake CPU devices, one GPU and a pod: only the mesh changes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXES = ("data", "fsdp")  # mesh axes the batch is split over
KNOWN_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (("embed", "fsdp"),)


def add_config(c):
    """Adds the sections every training job reads, with their defaults, to config ``c`` and returns
    it: ``mesh`` (all devices on ``data``), ``sharding.rules`` and ``distributed`` (read by
    ``initialize_distributed``; -1 and "": detected)."""
    c.mesh = (("data", -1), ("fsdp", 1))
    c.sharding = ml_collections.ConfigDict(dict(rules=DEFAULT_RULES))
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=-1, process_id=-1, cpu_collectives=""))
    return c


def parse_mesh(spec: Sequence[Sequence[Any]], num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(("data", -1), ("fsdp", 2))`` -> (names, sizes) with the -1 resolved against ``num_devices``."""
    names, sizes = [], []
    for item in spec:
        if len(item) != 2:
            raise ValueError(f"mesh entry {tuple(item)!r} must be (axis name, size)")
        name, size = str(item[0]), int(item[1])
        if name not in KNOWN_AXES:
            raise ValueError(f"mesh axis {name!r} is not one of {KNOWN_AXES}")
        if name in names:
            raise ValueError(f"mesh axis {name!r} appears twice in {spec!r}")
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {name!r} has size {size}; sizes are positive or -1 (the rest)")
        names.append(name)
        sizes.append(size)
    if not names:
        raise ValueError("the mesh needs at least one axis, e.g. (('data', -1),)")
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may have size -1, got {spec!r}")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh {spec!r}: {num_devices} devices are not divisible by {fixed}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(names, sizes))} has {math.prod(sizes)} devices, "
                         f"but {num_devices} are available")
    return tuple(names), tuple(sizes)


def make_mesh(spec: Sequence[Sequence[Any]] = (("data", -1),), devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes) with Auto axis types.

    TPU devices (live or a topology's abstract chips) are laid out along the physical torus, as
    ``jax.make_mesh`` does; others in their given order."""
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = parse_mesh(spec, len(devices))
    types = (jax.sharding.AxisType.Auto,) * len(names)
    if devices == list(jax.devices()):
        return jax.make_mesh(sizes, names, axis_types=types)
    if devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        return Mesh(grid, names, axis_types=types)
    return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=types)


def data_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in DATA_AXES if a in mesh.axis_names)


def data_size(mesh: Mesh) -> int:
    """How many ways a batch is split."""
    return math.prod(mesh.shape[a] for a in data_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis over the data-like axes, the rest replicated."""
    axes = data_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_rules(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, str | None], ...]:
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"sharding rule {tuple(rule)!r} must be (logical axis, mesh axis or None)")
        logical, mesh_axis = rule
        if mesh_axis is not None and mesh_axis not in KNOWN_AXES:
            raise ValueError(f"sharding rule {tuple(rule)!r}: mesh axis {mesh_axis!r} is not one of {KNOWN_AXES}")
        out.append((str(logical), mesh_axis))
    return tuple(out)


def spec_for(logical: Sequence[str | None], shape: Sequence[int], rules, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of one array: each dimension takes the mesh axis its logical name maps to, unless
    that mesh axis is absent, has size 1, is already used by an earlier dimension, or does not divide
    the dimension (then the dimension is replicated)."""
    mapping = dict(check_rules(rules))
    used, spec = set(), []
    for name, dim in zip(logical, shape):
        axis = mapping.get(name) if name is not None else None
        if (axis is None or axis not in mesh.axis_names or mesh.shape[axis] == 1 or axis in used
                or dim % mesh.shape[axis]):
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def tree_shardings(tree, axes_of: Callable[[tuple], Sequence[str | None]], rules, mesh: Mesh):
    """NamedShardings for every array leaf of ``tree`` (arrays or ShapeDtypeStructs) from the
    logical axes ``axes_of(path)`` of each leaf's path."""

    def one(path, leaf):
        keys = tuple(_key(k) for k in path)
        logical = tuple(axes_of(keys))
        if len(logical) != len(leaf.shape):
            raise ValueError(f"parameter {'.'.join(map(str, keys))} has shape {tuple(leaf.shape)} but logical "
                             f"axes {logical}")
        return NamedSharding(mesh, spec_for(logical, leaf.shape, rules, mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def _key(k) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def sharded_count(shardings) -> tuple[int, int]:
    """(arrays split over some mesh axis, all arrays) of a tree of NamedShardings."""
    leaves = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return sum(1 for s in leaves if any(p is not None for p in s.spec)), len(leaves)


def describe(shardings) -> str:
    """How many parameter arrays are sharded, for the start-up log."""
    sharded, total = sharded_count(shardings)
    return f"{sharded}/{total} parameter arrays sharded"


# ---------------------------------------------------------------------------------------------
# Multi-host
# ---------------------------------------------------------------------------------------------

_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def initialize_distributed(config=None) -> None:
    """Calls ``jax.distributed.initialize()`` when this job runs in several processes.

    Idempotent; the launcher calls it before any job touches jax. Triggers:
    ``config.distributed.coordinator_address`` (with ``num_processes`` and ``process_id``),
    a coordinator address in the environment (``JAX_COORDINATOR_ADDRESS``; ``launch/tpu_pod.sh``
    sets it to worker 0), a SLURM job step of several tasks (``SLURM_NTASKS`` > 1), a GKE TPU
    slice of several workers (``TPU_WORKER_HOSTNAMES`` with more than one host), or
    ``JAXGIST_MULTIHOST=1`` (let jax detect the cluster, e.g. on Cloud TPU VMs, where the worker
    list comes from the metadata server). Otherwise nothing happens (one process). Must run before
    anything touches the devices.
    """
    dist = config.get("distributed") if config is not None else None

    def get(key):  # unset values are None, "" or -1 in configs
        value = dist.get(key) if dist is not None else None
        return None if value in ("", -1) else value

    if get("cpu_collectives"):
        jax.config.update("jax_cpu_collectives_implementation", get("cpu_collectives"))
    address = get("coordinator_address") or next((os.environ[v] for v in _MULTIHOST_ENV if os.environ.get(v)), None)
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ
    tpu_pod = len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    opted_in = os.environ.get("JAXGIST_MULTIHOST", "") == "1"
    if not (address or slurm or tpu_pod or opted_in):
        return
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if address:
        kwargs["coordinator_address"] = address
        if get("num_processes") is not None:
            kwargs["num_processes"] = int(get("num_processes"))
        if get("process_id") is not None:
            kwargs["process_id"] = int(get("process_id"))
    logging.info("jax.distributed.initialize(%s)", kwargs or "auto-detected cluster")
    jax.distributed.initialize(**kwargs)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def combine_rows(values: np.ndarray, filled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows computed by different processes, put together: every process holds the same-shaped
    ``values`` [n, ...] in which it filled only its own rows (``filled`` [n] bool). Returns every
    process's rows and which rows any process filled (one process: the inputs as they are)."""
    values, filled = np.asarray(values), np.asarray(filled, bool)
    if jax.process_count() == 1:
        return values, filled
    from jax.experimental import multihost_utils

    all_values = np.asarray(multihost_utils.process_allgather(values))  # [P, n, ...]
    all_filled = np.asarray(multihost_utils.process_allgather(filled))  # [P, n]
    owner = np.argmax(all_filled, axis=0)
    return all_values[owner, np.arange(len(filled))], all_filled.any(axis=0)


def sync(name: str) -> None:
    """Waits until every process has reached this point (a no-op in a one-process job)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
