"""Checks every training job runs on its config before anything is built: the optimizer, the sharding
rules, the mesh against the device count, the data section, and the global batch against the mesh."""

from __future__ import annotations

import jax

from jaxgist.core import config as config_lib
from jaxgist.data import datasets
from jaxgist.training import optim, parallel


def check_training(config, num_devices: int | None = None, *, check_data: bool = True) -> None:
    """``config.optim``, ``config.sharding.rules``, ``config.mesh`` (for ``num_devices``, default this
    process's view of every device) and, with ``check_data``, ``config.data``; raises ``ConfigError``
    naming the first bad value."""
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
