"""jaxgist's default XLA flags: added to $XLA_FLAGS unless the user set them, opted out, or the jaxlib
is one they were not measured with; and in effect in this test process (conftest applies them)."""

import os
import subprocess
import sys

import pytest

from jaxgist.core import xla_flags

NAME, VALUE = xla_flags.DEFAULTS[0]
KNOWN = xla_flags.KNOWN_VERSIONS[0]


def test_adds_the_defaults_after_the_users_flags(monkeypatch):
    monkeypatch.setattr(xla_flags, "backends_started", lambda: False)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert xla_flags.apply_defaults(env, KNOWN) == [f"--{NAME}={VALUE}"]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 --{NAME}={VALUE}"
    assert xla_flags.apply_defaults(env, KNOWN) == []  # twice adds nothing more
    assert env["XLA_FLAGS"].count(NAME) == 1
    empty = {}
    assert xla_flags.apply_defaults(empty, KNOWN) and empty["XLA_FLAGS"] == f"--{NAME}={VALUE}"
    assert xla_flags.describe([f"--{NAME}={VALUE}"], empty) == f"XLA flags added: --{NAME}={VALUE} ($XLA_FLAGS: --{NAME}={VALUE})"
    assert xla_flags.describe([], {}) == "XLA flags added: none ($XLA_FLAGS: )"


def test_keeps_the_users_value_the_opt_out_and_unknown_versions(monkeypatch):
    monkeypatch.setattr(xla_flags, "backends_started", lambda: False)
    env = {"XLA_FLAGS": f"--{NAME}=dot"}
    assert xla_flags.apply_defaults(env, KNOWN) == [] and env["XLA_FLAGS"] == f"--{NAME}=dot"
    env = {"JAXGIST_XLA_DEFAULTS": "0"}
    assert xla_flags.apply_defaults(env, KNOWN) == [] and "XLA_FLAGS" not in env
    env = {}
    assert xla_flags.apply_defaults(env, (KNOWN[0], KNOWN[1] + 50)) == [] and "XLA_FLAGS" not in env


def test_adds_nothing_once_the_backends_exist():
    import jax

    jax.devices()
    env = {}
    assert xla_flags.backends_started()
    assert xla_flags.apply_defaults(env, KNOWN) == [] and "XLA_FLAGS" not in env


def test_this_jaxlib_accepts_the_flags():
    """The installed XLA starts and computes with the defaults (an unknown flag aborts it)."""
    if xla_flags._jaxlib_version() not in xla_flags.KNOWN_VERSIONS:
        pytest.skip("this jaxlib is not one the defaults are added for")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = ("from jaxgist.core import xla_flags; added = xla_flags.apply_defaults(); import jax, jax.numpy as jnp; "
            "print(added, float(jax.jit(lambda x: jnp.sum(jax.nn.relu(x @ x)))(jnp.eye(4))))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == f"['--{NAME}={VALUE}'] 4.0"
