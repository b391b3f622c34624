"""The report's HTML: one self-contained page (inline CSS, figures and thumbnails as base64 data URIs,
no scripts), readable from disk without a server. Links point only at the PNG/SVG files written
beside it.

    html.page("title", [html.section("Table", html.table(t)), ...])   # the whole document
"""

from __future__ import annotations

import base64
import html as html_lib
import os
from typing import Iterable, Sequence

from jaxgist.reports import table as table_lib
from jaxgist.reports.gallery import Gallery
from jaxgist.reports.runs import Run

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em auto; max-width: 1280px;
       padding: 0 1em; color: #1d232a; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 1.05em; margin-top: 1.2em; }
.meta { color: #57606a; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #d0d7de; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f6f8fa; } td.label, th.label { text-align: left; }
td.best { font-weight: bold; background: #eaf5ea; }
.status-complete { color: #1a7f37; } .status-incomplete { color: #9a6700; } .status-failed { color: #cf222e; }
figure { margin: 0.8em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { font-size: 0.85em; color: #57606a; }
.scroll { overflow-x: auto; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 10px; }
.card { display: flex; gap: 8px; border: 1px solid #d0d7de; border-radius: 6px; padding: 6px; font-size: 0.8em; }
.card img { width: 112px; height: auto; flex: none; align-self: flex-start; }
.card .noimg { width: 112px; height: 84px; flex: none; background: #eaeef2; color: #57606a; display: flex;
               align-items: center; justify-content: center; text-align: center; }
.card ol, .card ul { margin: 0.2em 0 0 1.2em; padding: 0; }
.score { color: #57606a; font-variant-numeric: tabular-nums; }
.name { font-weight: 600; } .file { color: #57606a; word-break: break-all; }
details > summary { cursor: pointer; font-weight: 600; margin: 0.4em 0; }
"""


def escape(text) -> str:
    return html_lib.escape(str(text), quote=True)


def png_data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def figure(paths: dict[str, str], out_dir: str, caption: str) -> str:
    """The PNG embedded, linking to the vector (SVG) copy beside the page."""
    png = os.path.relpath(paths["png"], out_dir).replace(os.sep, "/")
    svg = os.path.relpath(paths["svg"], out_dir).replace(os.sep, "/")
    return (f'<figure><a href="{escape(svg)}"><img src="{png_data_uri(paths["png"])}" alt="{escape(caption)}"></a>'
            f'<figcaption>{escape(caption)} &middot; <a href="{escape(png)}">PNG</a> &middot; '
            f'<a href="{escape(svg)}">SVG</a></figcaption></figure>')


def section(title: str, body: str, level: int = 2, anchor: str = "") -> str:
    ident = f' id="{escape(anchor)}"' if anchor else ""
    return f"<h{level}{ident}>{escape(title)}</h{level}>\n{body}\n"


def paragraph(text: str, cls: str = "") -> str:
    attr = f' class="{escape(cls)}"' if cls else ""
    return f"<p{attr}>{escape(text)}</p>"


def details(summary: str, body: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{escape(summary)}</summary>\n{body}\n</details>"


def table(t: table_lib.Table) -> str:
    """The paper-style table; the best mean of each column highlighted."""
    if not t.rows:
        return paragraph(f"No complete run has {t.metric}.", "meta")
    best = {col: t.best(col) for col in t.columns}
    titles = table_lib.row_titles(t)
    head = "".join(f'<th class="label">{escape(x)}</th>' for x in titles)
    head += "".join(f"<th>{escape(table_lib.column_title(c))}</th>" for c in t.columns)
    body = []
    for row in t.rows:
        labels = list(row[:3]) + ([row[3]] if len(titles) == 4 else [])
        cells = "".join(f'<td class="label">{escape(x)}</td>' for x in labels)
        for col in t.columns:
            cell = t.cell(row, col)
            if cell is None:
                cells += "<td>-</td>"
            else:
                attr = f' title="{escape(", ".join(cell.runs))}"' + (' class="best"' if best[col] == row else "")
                cells += f"<td{attr}>{escape(cell.text())}</td>"
        body.append(f"<tr>{cells}</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(body)
            + "\n</tbody></table></div>")


def runs(found: Sequence[Run]) -> str:
    """Every run with its status, labels and, when not complete, the reason."""
    rows = []
    for r in found:
        where = escape(r.path) + (f'<br><span class="file">log: {escape(r.log)}</span>' if r.log else "")
        rows.append(f'<tr><td class="label"><a href="#{escape(anchor(r))}">{escape(r.name)}</a></td>'
                    f'<td class="label status-{escape(r.status)}">{escape(r.status)}</td>'
                    f'<td class="label">{escape(r.dataset)}</td><td class="label">{escape(r.shots)}</td>'
                    f'<td class="label">{escape(r.reason)}</td><td class="label file">{where}</td></tr>')
    return ('<div class="scroll"><table><thead><tr><th class="label">run</th><th class="label">status</th>'
            '<th class="label">dataset</th><th class="label">shots</th><th class="label">note</th>'
            '<th class="label">workdir</th></tr></thead><tbody>\n' + "\n".join(rows) + "\n</tbody></table></div>")


def anchor(run: Run) -> str:
    return "run-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in run.name)


def _caption(text: str, score: float | None) -> str:
    shown = f' <span class="score">({score:.3f})</span>' if score is not None else ""
    return f"<li>{escape(text)}{shown}</li>"


def gallery(g: Gallery) -> str:
    cards = []
    for item in g.items:
        image = (f'<img src="{item.thumbnail}" alt="{escape(item.filename)}">' if item.thumbnail
                 else '<div class="noimg">no image</div>')
        text = [f'<div class="name">{escape(item.label or "?")}</div><div class="file">{escape(item.filename)}</div>']
        if item.texts:
            text.append("<ol>" + "".join(_caption(t, s) for t, s in item.texts) + "</ol>")
        if item.generated:
            text.append("<div><b>generated</b></div><ul>" + "".join(f"<li>{escape(t)}</li>" for t in item.generated)
                        + "</ul>")
            refs = "".join(f"<li>{escape(t)}</li>" for t in item.references) or "<li><i>none</i></li>"
            text.append(f"<div><b>references</b></div><ul>{refs}</ul>")
        cards.append(f'<div class="card">{image}<div>{"".join(text)}</div></div>')
    note = paragraph(f"From {g.source}." + (f" Note: {g.note}." if g.note else ""), "meta")
    return f'{note}\n<div class="gallery">\n' + "\n".join(cards) + "\n</div>"


def page(title: str, subtitle: str, parts: Iterable[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{escape(title)}</h1>\n<p class=\"meta\">{escape(subtitle)}</p>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")
