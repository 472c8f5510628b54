"""The report's HTML: one self-contained page (inline CSS, PNGs as data URIs, no script, no network).

Written by hand with ``html.escape`` rather than a template engine: the page is a handful of
headings, tables and figures, and the standard library keeps the report free of a dependency.
"""
from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from html import escape
from typing import Iterable, Optional, Sequence

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1d232a}
header{background:#1d3557;color:#fff;padding:14px 24px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85}nav{padding:6px 24px;background:#eef2f6;border-bottom:1px solid #d5dde5}
nav a{margin-right:18px;color:#1d3557;text-decoration:none;font-weight:600}
main{padding:4px 24px 40px;max-width:1200px}section{margin-top:20px}
h2{border-bottom:2px solid #1d3557;padding-bottom:3px}h3{margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #d5dde5;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef2f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.missing{color:#9aa5b1;text-align:center}td.bad{background:#fde2e1}
figure{margin:10px 0 18px}figure img{max-width:100%;border:1px solid #e3e8ee}
figcaption{font-size:13px;color:#3e4c59;max-width:900px}figcaption b{color:#1d232a}
.note{background:#fff8e1;border-left:4px solid #f0b429;padding:6px 10px;max-width:900px}
.muted{color:#7b8794}code{font-size:12px;background:#f5f7fa;padding:0 3px}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
"""


@dataclass
class Section:
    """One ``<section>`` of the page: an anchor id, a title, and its HTML blocks in order."""

    id: str
    title: str
    blocks: list[str] = field(default_factory=list)

    def add(self, *blocks: str) -> "Section":
        self.blocks.extend(blocks)
        return self


def png_bytes(fig, dpi: int = 90) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed (the report draws dozens)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def figure(png: bytes, caption: str, alt: str, healthy: str) -> str:
    """An embedded PNG with its caption: what it shows, then what a healthy one looks like."""
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(alt)}">'
            f"<figcaption>{escape(caption)} <b>Healthy:</b> {escape(healthy)}</figcaption></figure>")


def table(header: Optional[Sequence[str]], rows: Iterable[Sequence],
          classes: Optional[Iterable[Sequence[str]]] = None) -> str:
    """An HTML table (``header`` None: none); cells are escaped, numbers right-aligned, ``None`` a dash."""
    classes = list(classes) if classes is not None else None
    out = ["<table>" + ("<tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in header) + "</tr>" if header else "")]
    for i, row in enumerate(rows):
        cells = []
        for j, v in enumerate(row):
            cls = [classes[i][j]] if classes and classes[i][j] else []
            if v is None:
                cls.append("missing")
                v = "—"
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                cls.append("num")
                v = fmt(v)
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{escape(str(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def fmt(v) -> str:
    """A number for a table: integers with thousands separators, floats to 4 significant digits."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if float(v).is_integer() and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:.4g}"


def compact(obj) -> str:
    """Parameters as short JSON (one line, sorted keys) for a table cell."""
    return json.dumps(obj, sort_keys=True, separators=(", ", ": "), default=str)


def para(text: str, cls: str = "") -> str:
    return f'<p class="{cls}">{escape(text)}</p>' if cls else f"<p>{escape(text)}</p>"


def heading(text: str) -> str:
    return f"<h3>{escape(text)}</h3>"


def details(summary: str, body: str) -> str:
    """A collapsed block (long tables: per-unit parameters, input files)."""
    return f"<details><summary>{escape(summary)}</summary>{body}</details>"


def render(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole page: header, a link bar to each section, the sections."""
    nav = "".join(f'<a href="#{s.id}">{escape(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.id}"><h2>{escape(s.title)}</h2>{"".join(s.blocks)}</section>'
                   for s in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,">'  # no favicon request (it would be a missing file)
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{escape(title)}</h1><p>{escape(subtitle)}</p></header>"
            f"<nav>{nav}</nav><main>{body}</main></body></html>\n")
