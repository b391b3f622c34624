"""Reports people look at: many runs gathered into a table, figures and a gallery.

    from jaxgist.reports import build
    report = build.write_report(["runs/gist", "runs/flip-cub"], "report")   # report/index.html

``runs`` reads workdirs (complete, incomplete or failed, never a crash), ``table`` builds the
paper-style table (rows method / head / model, columns dataset x shots), ``figures`` draws with
matplotlib (PNG and SVG), ``gallery`` shows training images with the text the method leaned on, and
``html`` writes one self-contained page. ``python -m jaxgist.report`` is the command; the demo config
writes a report into its workdir.
"""
