"""Files of a workdir, local or in a bucket (``gs://...``), written so that a reader never sees half
of one.

    p = files.join(workdir, "eval", "results.json")     # an etils.epath.Path: local or gs://
    files.write_json_atomic(p, {"a": 1}, indent=2)      # local: temp file + rename; bucket: one object
    files.write_text_atomic(p, "...")
    text = files.read_text(p) if files.exists(p) else ""

Paths go through ``etils.epath`` (the layer Orbax uses), so a ``gs://`` workdir works wherever
Orbax's does; etils reads buckets with gcsfs (``pip install -e ".[gcs]"``), whose directory listings
are not cached here (a job watching a bucket must see the checkpoints another job writes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import tempfile
import time
from typing import Any

from absl import logging
from etils import epath

from jaxgist.core.config import ConfigError


def _no_listing_cache() -> None:
    """gcsfs caches directory listings for the life of the process; jobs here list checkpoint
    directories that other processes (TensorStore, other hosts, a training job) write."""
    try:
        import fsspec
    except ImportError:
        return
    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


_no_listing_cache()


def check_workdir(workdir: str | os.PathLike) -> None:
    """Raises ConfigError for a workdir that is a file, or a URL no installed client reads (with the
    install command)."""
    url = os.fspath(workdir)
    if url.startswith("gs://"):
        if importlib.util.find_spec("gcsfs") is None:
            raise ConfigError(f"--workdir={url}: Cloud Storage workdirs need gcsfs: pip install -e \".[gcs]\"")
    elif "://" in url:
        raise ConfigError(f"--workdir={url}: workdirs are local paths or gs:// URLs")
    elif os.path.exists(url) and not os.path.isdir(url):
        raise ConfigError(f"--workdir={url} is a file, not a directory")


def path(p: str | os.PathLike) -> epath.Path:
    """``p`` as an epath.Path (``gs://`` URLs stay URLs)."""
    return epath.Path(p)


def join(base: str | os.PathLike, *parts: str) -> epath.Path:
    return epath.Path(base).joinpath(*parts)


def is_local(p: str | os.PathLike) -> bool:
    """Whether ``p`` is a path on this machine (not a ``scheme://`` URL)."""
    return "://" not in os.fspath(p)


def exists(p: str | os.PathLike) -> bool:
    return epath.Path(p).exists()


def read_text(p: str | os.PathLike) -> str:
    return epath.Path(p).read_text(encoding="utf-8")


def makedirs(p: str | os.PathLike) -> epath.Path:
    out = epath.Path(p)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json_atomic(path: str | os.PathLike, data: Any, *, newline: bool = False, makedirs: bool = True,
                      **dump_kwargs) -> str:
    """Writes ``data`` as JSON (``json.dumps(data, **dump_kwargs)``, then a newline if ``newline``)
    atomically (``write_text_atomic``). Returns the path written."""
    return write_text_atomic(path, json.dumps(data, **dump_kwargs) + ("\n" if newline else ""), makedirs=makedirs)


def write_text_atomic(path: str | os.PathLike, text: str, *, makedirs: bool = True) -> str:
    """Writes ``text`` (UTF-8) so that a reader sees the old file or the new one, never a part: on
    this machine to a temporary sibling renamed into place with the mode a plain ``open`` would give
    (0666 minus the umask); in a bucket as one object upload. Creates the directory unless
    ``makedirs=False`` (then a missing directory raises FileNotFoundError). Returns the path written
    (absolute, for local paths)."""
    if not is_local(path):
        target = epath.Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        return os.fspath(path)
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    if makedirs:
        os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


class WorkdirBusy(RuntimeError):
    """Another live job holds the workdir's lock."""


class WorkdirLock:
    """``workdir/.lock``: one job at a time in a workdir. The lock names the process holding it (pid,
    host, start time); a lock left by a process that is gone (killed, or its machine restarted) is
    taken over with a warning; a live holder makes ``acquire`` raise ``WorkdirBusy`` naming it. A lock
    of another host cannot be checked from here and counts as live (remove the file once that job is
    gone). In a bucket (``gs://``) there is no atomic create here: no lock is taken there.

        with files.WorkdirLock(workdir):
            ...  # the job
    """

    NAME = ".lock"

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = workdir
        self.path = os.path.join(os.fspath(workdir), self.NAME) if is_local(workdir) else None
        self.held = False

    def _holder(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, OverflowError):
            return True
        return True

    def acquire(self) -> "WorkdirLock":
        if self.path is None:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("pid") == os.getpid() and holder.get("host") == me["host"]:
                    return self  # this process holds it already (a job run inside another)
                if self._alive(holder):
                    raise WorkdirBusy(
                        f"workdir {self.workdir} is in use by process {holder.get('pid', '?')} on "
                        f"{holder.get('host', '?')} (since {holder.get('started', '?')}): wait for that job, stop it, "
                        f"or use another --workdir (if it is gone, remove {self.path})") from None
                logging.warning("taking over the lock of workdir %s from process %s, which is gone", self.workdir,
                                holder.get("pid", "?"))
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise WorkdirBusy(f"could not take the lock {self.path}: other jobs keep taking it")

    def release(self) -> None:
        if self.held and self._holder().get("pid") == os.getpid():
            os.remove(self.path)
        self.held = False

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
