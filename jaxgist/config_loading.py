"""Loading a job's config as ``python -m jaxgist --config FILE[:ARG] --config.key=value ...`` does, for
commands that load many (``python -m jaxgist.sweep``).

    config = config_loading.load("configs/gist.py:dataset=cub,shots=5", ["--config.train.epochs=2"])
"""

from __future__ import annotations

from typing import Sequence

from absl import flags
from ml_collections import config_flags

from jaxgist.core.config import ConfigError


def override_error_message(e: BaseException) -> str:
    """One line for an error ml_collections raises applying a ``--config.a.b=value`` override."""
    message = " ".join(str(e).replace("\\n", " ").replace("\\'", "").replace("'", "").split())
    return f"no such key: {message}" if isinstance(e, (AttributeError, KeyError)) else message


def load(spec: str, overrides: Sequence[str] = ()):
    """The config of ``--config SPEC OVERRIDES...`` (``SPEC``: ``configs/x.py[:arg]``; ``OVERRIDES``:
    ``--config.key=value`` strings), parsed by the same ml_collections flag as the launcher's. A bad
    file, argument or key raises ConfigError with one line naming it."""
    flag_values = flags.FlagValues()
    argv = ["jaxgist", f"--config={spec}", *overrides]
    config_flags.DEFINE_config_file("config", None, "Path to a config file.", flag_values=flag_values, sys_argv=argv)
    try:
        flag_values(argv)
    except flags.Error as e:  # the config file's get_config raised: its last line says why
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ConfigError(f"--config={spec}: {lines[-1] if lines else e}") from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"--config={spec} {' '.join(overrides)}: {override_error_message(e)}") from None
    return flag_values.config
