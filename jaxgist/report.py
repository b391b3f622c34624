"""The report of finished (and unfinished) runs: ``python -m jaxgist.report WORKDIR [WORKDIR ...]``.

    python -m jaxgist.report runs/gist                      # a sweep's folder: every point
    python -m jaxgist.report runs/gist runs/flip-cub --out reports/cub --metric test_top3

Writes ``OUT/index.html`` (self-contained: open it from disk), ``OUT/table.md``, ``OUT/table.csv`` and
``OUT/figures/*.{png,svg}`` (default OUT: ``report``). A workdir without results, or with a partial
``results.json``, is listed as incomplete with the reason; a failed sweep point as failed.
Exit status 0 when the report is written (whatever the runs' state), 1 when it cannot be written (the
reason in one line), 2 for bad arguments.
"""

from __future__ import annotations

import os
import sys
import types

from absl import app, flags, logging

_FLAGS = None


def _define_flags():
    """The command's flags, defined when it runs rather than on import (another module of the process,
    such as ``jaxgist.data.synthetic``, may define a flag of the same name)."""
    global _FLAGS
    if _FLAGS is None:
        _FLAGS = types.SimpleNamespace(
            out=flags.DEFINE_string("out", "report",
                                    "Directory to write index.html, table.md, table.csv and figures/ into."),
            metric=flags.DEFINE_string("metric", "test_top1", "The results.json metric of the table and figures."),
            gallery=flags.DEFINE_integer("gallery_images", 24,
                                         "Training images shown per run in the gallery (0: none)."),
            thumbnail=flags.DEFINE_integer("thumbnail_size", 112, "Longest side of the gallery thumbnails, in pixels."),
            title=flags.DEFINE_string("title", "", "The page's title (default: jaxgist report)."),
        )
    return _FLAGS


def main(argv) -> None:
    if len(argv) < 2:
        raise app.UsageError("give one or more workdirs or sweep folders: python -m jaxgist.report runs/gist ...")
    f = _define_flags()
    if f.gallery.value < 0 or f.thumbnail.value < 16:
        raise app.UsageError("--gallery_images must be >= 0 and --thumbnail_size >= 16")
    logging.set_verbosity(logging.INFO)
    from jaxgist.reports import build

    try:
        report = build.write_report(argv[1:], f.out.value, metric=f.metric.value, gallery_images=f.gallery.value,
                                    thumbnail_size=f.thumbnail.value, title=f.title.value)
    except (OSError, ValueError) as e:
        if os.environ.get("JAXGIST_TRACEBACK") == "1":
            raise
        print(f"jaxgist.report: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    for r in report.runs:
        if not r.complete:
            print(f"{r.status}: {r.name}: {r.reason}")
    complete = sum(r.complete for r in report.runs)
    print(f"report: {os.path.abspath(report.index)} ({len(report.runs)} run(s), {complete} complete; "
          f"{len(report.table.rows)} table rows x {len(report.table.columns)} columns; {len(report.figures)} figures; "
          f"{report.seconds:.1f} s)")
    sys.stdout.flush()


def cli() -> None:
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    cli()
