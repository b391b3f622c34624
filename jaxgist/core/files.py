"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_json_atomic(path: str | os.PathLike, data: Any, *, newline: bool = False, **dump_kwargs) -> str:
    """Writes ``data`` as JSON (``json.dump(data, f, **dump_kwargs)``, then a newline if ``newline``)
    to a temporary sibling of ``path`` and renames it into place, with the mode a plain ``open``
    would give (0666 minus the umask). Creates the directory. Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, **dump_kwargs)
            if newline:
                f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
