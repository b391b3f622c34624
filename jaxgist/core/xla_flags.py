"""The XLA flags jaxgist runs with: added to ``$XLA_FLAGS`` before jax creates its backends.

    from jaxgist.core import xla_flags
    xla_flags.apply_defaults()   # first thing in a program, before any jax computation

Today one flag, for XLA:CPU: ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNNPACK fusions). With
them, jaxlib 0.10's CPU backend runs whole stretches of a network as one fused call that allocates its
own workspace on every run; at batch 64 the kernel then maps that memory afresh each time (about 1.3
million page faults and 3 s of system time per CLIP RN50 batch). Without them XLA plans that memory
itself: RN50 image embedding 6.6-7.2 s down to 5.0-5.2 s per batch of 64, a ResNet-50 train step
5.75 s down to 5.38 s, ViT-B/32 embedding unchanged (2 cores). Accelerators ignore the flag.

A flag already in ``$XLA_FLAGS`` keeps the user's value; ``JAXGIST_XLA_DEFAULTS=0`` adds nothing. The
flag is only added for the jaxlib versions it was measured with (an XLA that does not know a flag
refuses to start), and takes effect only when set before the backends exist.
"""

from __future__ import annotations

import os
import sys

# (flag, value): jaxgist's defaults
DEFAULTS = (("xla_cpu_experimental_ynn_fusion_type", ""),)
# jaxlib (major, minor) versions whose XLA knows these flags
KNOWN_VERSIONS = ((0, 10),)


def _jaxlib_version() -> tuple[int, int] | None:
    try:
        from jaxlib import version
    except ImportError:
        return None
    try:
        major, minor = version.__version__.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def backends_started() -> bool:
    """Whether jax has already created its backends (after which $XLA_FLAGS is not read again)."""
    xla_bridge = sys.modules.get("jax._src.xla_bridge")  # not imported yet: nothing has started
    return xla_bridge is not None and xla_bridge.backends_are_initialized()


def apply_defaults(environ=None, jaxlib_version=None) -> list[str]:
    """Adds the flags of ``DEFAULTS`` that ``$XLA_FLAGS`` does not already set; returns those added
    (``--name=value``). Adds nothing with ``JAXGIST_XLA_DEFAULTS=0``, on a jaxlib not in
    ``KNOWN_VERSIONS``, or once jax's backends exist (too late to take effect)."""
    environ = os.environ if environ is None else environ
    if environ.get("JAXGIST_XLA_DEFAULTS", "1") == "0" or backends_started():
        return []
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    if version not in KNOWN_VERSIONS:
        return []
    current = environ.get("XLA_FLAGS", "")
    present = {token.lstrip("-").split("=", 1)[0] for token in current.split()}
    added = [f"--{name}={value}" for name, value in DEFAULTS if name not in present]
    if added:
        environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
    return added


def describe(added: list[str], environ=None) -> str:
    """One line for a program's log: the flags ``apply_defaults`` added and the resulting ``$XLA_FLAGS``."""
    environ = os.environ if environ is None else environ
    return f"XLA flags added: {' '.join(added) or 'none'} ($XLA_FLAGS: {environ.get('XLA_FLAGS', '')})"
