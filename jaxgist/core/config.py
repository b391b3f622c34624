"""Checking job configs against a method's defaults: unknown keys and wrong types fail at start.

A method publishes its complete default config (every key it reads); ``check_keys(config, defaults)``
raises ``ConfigError`` naming each key of ``config`` that the defaults do not have (a typo such as
``train.epoch`` for ``train.epochs``) and each value whose type does not fit. Keys listed in
``free`` hold user data of any shape (for example ``model.preset``) and are not checked inside.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A job config with an unknown key or a bad value."""


def _as_dict(c) -> Mapping[str, Any]:
    return c.to_dict() if hasattr(c, "to_dict") else c


def _fits(value, default) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    if isinstance(default, Mapping):
        return isinstance(value, Mapping)
    return True


def check_keys(config, defaults, *, free: Iterable[str] = ()) -> None:
    """Raises ConfigError listing every unknown key and mistyped value of ``config``."""
    free = set(free)
    problems: list[str] = []

    def walk(c: Mapping[str, Any], d: Mapping[str, Any], prefix: str) -> None:
        for key, value in c.items():
            name = f"{prefix}{key}"
            if key not in d:
                close = difflib.get_close_matches(str(key), [str(k) for k in d], n=1)
                hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
                problems.append(f"config.{name} is not a known key{hint}")
                continue
            if name in free:
                continue
            default = d[key]
            if isinstance(default, Mapping) and isinstance(value, Mapping):
                walk(value, default, name + ".")
            elif not _fits(value, default):
                problems.append(f"config.{name}={value!r} has type {type(value).__name__}, expected "
                                f"{type(default).__name__} like the default {default!r}")

    walk(_as_dict(config), _as_dict(defaults), "")
    if problems:
        raise ConfigError("; ".join(problems))


def require(condition: bool, message: str) -> None:
    """Raises ConfigError(message) unless ``condition``."""
    if not condition:
        raise ConfigError(message)
