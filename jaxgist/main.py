"""The jaxgist launcher: ``python -m jaxgist --config configs/<name>.py[:arg] --workdir DIR``.

``--config.a.b=value`` overrides any config field. The config's ``method`` picks the job; every job
writes ``DIR/results.json`` and ``DIR/results.md``. Compiled programs are cached on disk
(``--compilation_cache``), so a resumed or repeated job skips most of its compilation.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxgist import config_loading, methods
from jaxgist.core import files, xla_flags
from jaxgist.training import loop, parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/demo.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, embeddings and results.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None,
    "Directory (local or gs://) of jax's persistent compilation cache; 'off' disables it. Default: "
    "$JAX_COMPILATION_CACHE_DIR when set, else ~/.cache/jaxgist/jax.")

DEFAULT_COMPILATION_CACHE = "~/.cache/jaxgist/jax"


def enable_compilation_cache(directory: str | None) -> str | None:
    """Points jax's persistent compilation cache at ``directory`` (None: $JAX_COMPILATION_CACHE_DIR or
    the default; 'off': disabled) and returns the directory used. Every program is cached, however
    quickly it compiled, unless $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise."""
    if directory is None:
        directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_COMPILATION_CACHE
    if directory.lower() in ("off", "none", ""):
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if "://" not in directory:
        directory = os.path.expanduser(directory)
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory


def run_job(config, workdir: str) -> dict:
    """Runs the job ``config.method`` names in ``workdir``. A job that writes the workdir holds its lock
    (``workdir/.lock``: a second job there refuses to start); evaluating checkpoints beside a running
    job (``config.mode`` evaluate or watch) only reads and takes no lock."""
    job = methods.get(config.get("method"))
    parallel.initialize_distributed(config)  # before anything touches the devices
    if jax.process_count() > 1 and jax.default_backend() == "cpu" and jax.config.jax_enable_compilation_cache:
        # programs loaded from the persistent cache compute wrong results in multi-process CPU jobs
        # (gloo collectives; measured: the loss of step 1 4.52 instead of 2.93), so those compile afresh
        logging.info("multi-process CPU job: jax's persistent compilation cache is off")
        jax.config.update("jax_enable_compilation_cache", False)
    files.check_workdir(workdir)
    files.makedirs(workdir)
    reading = config.get("mode", "train") in ("evaluate", "watch")
    lock = files.WorkdirLock(workdir) if jax.process_index() == 0 and not reading else contextlib.nullcontext()
    with lock:
        if jax.process_index() == 0 and not reading:
            files.write_text_atomic(files.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
        out = job.run(config, workdir)
    if config.get("report", False) and jax.process_index() == 0:
        write_report(workdir)
    return out


def write_report(workdir: str) -> str | None:
    """``workdir/report/`` (``jaxgist.reports``) after a job whose config asks for it (``config.report``).
    A report that cannot be written is a warning: the job's results stand, and ``python -m
    jaxgist.report`` writes it later. Returns the page's path."""
    from jaxgist.reports import build

    try:
        return build.write_report([workdir], os.path.join(workdir, "report")).index
    except Exception as e:  # noqa: BLE001 - any failure of the report must leave the finished job's exit alone
        logging.warning("the report was not written (%s: %s); write it with: python -m jaxgist.report %s --out %s",
                        type(e).__name__, e, workdir, os.path.join(workdir, "report"))
        return None


def user_errors() -> tuple[type[BaseException], ...]:
    """What a bad config, bad data, a damaged or unwritable checkpoint, an unreachable chat endpoint, a
    busy workdir or a diverging run raises: printed as one line (the message names the key, file, row or step) instead of a
    traceback."""
    from jaxgist.core.config import ConfigError
    from jaxgist.core.results import ResultsError
    from jaxgist.data.images import ImageReadError
    from jaxgist.data.sources import DataError
    from jaxgist.describe.client import EndpointError
    from jaxgist.heads.coder import KnowledgeError
    from jaxgist.models.clip import CheckpointMismatchError
    from jaxgist.training.checkpoint import CorruptCheckpoint, SaveFailed

    return (ConfigError, DataError, ImageReadError, CheckpointMismatchError, KnowledgeError, ResultsError,
            CorruptCheckpoint, SaveFailed, EndpointError, files.WorkdirBusy, FileNotFoundError, FloatingPointError)


class _QuietLibraries(std_logging.Filter):
    """Keeps INFO lines of our own code; libraries (Orbax logs every file it renames) only from WARNING."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/jaxgist/" in record.pathname.replace("\\", "/")


def main(argv):
    global _STARTED
    _STARTED = True
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    enable_compilation_cache(_COMPILATION_CACHE.value)
    try:
        out = run_job(_CONFIG.value, _WORKDIR.value)
    except loop.Preempted as e:
        print(f"jaxgist: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except user_errors() as e:
        if os.environ.get("JAXGIST_TRACEBACK") == "1":
            raise
        logging.flush()
        print(f"jaxgist: error: {type(e).__name__}: {e}  (JAXGIST_TRACEBACK=1 shows where)", file=sys.stderr,
              flush=True)
        sys.exit(1)
    if jax.process_index() == 0:
        md = files.join(_WORKDIR.value, "results.md")
        print(files.read_text(md) if files.exists(md) else out)
        print(f"results: {files.join(_WORKDIR.value, 'results.json')}")
        report = files.join(_WORKDIR.value, "report", "index.html")
        if _CONFIG.value.get("report", False) and files.exists(report):
            print(f"report: {report}")


_STARTED = False  # main() has begun: errors after this point are the job's, not the command line's


def cli():
    xla_flags.apply_defaults()  # before jax creates its backends
    flags.mark_flags_as_required(["config", "workdir"])
    try:
        app.run(main)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections applies --config.a.b=value overrides while absl parses the flags, before
        # main(): a typo in a key there is the user's, and one line says it
        if _STARTED or os.environ.get("JAXGIST_TRACEBACK") == "1":
            raise
        message = config_loading.override_error_message(e)
        print(f"jaxgist: error: a --config override or the config file: {message}  "
              f"(JAXGIST_TRACEBACK=1 shows where)", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    cli()
