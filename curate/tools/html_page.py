"""The HTML kit of the pages curate writes about a run (the run report, the threshold preview): the page shell
and its one stylesheet, escaping, number tables, sample cards with inline thumbnails, and the plots.

Every page is self-contained: thumbnails are ``data:`` URIs and plots are inline SVG, so a page opens
anywhere, from any folder or bucket, without a server and without fetching anything.

Plots are hand-drawn SVG, not matplotlib PNGs: a histogram is a few dozen rectangles and a bar chart a few
bars, which SVG draws exactly, in a few kilobytes, sharp at any zoom, with the counts of each bin in a tooltip
(``<title>``) and the labels as text a browser can search. Drawing them costs microseconds, where importing
matplotlib and rendering PNGs cost most of the report's time at the end of every run; and the markup is the
same on every machine, so a page is checked by reading it.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

from curate.core.output import OutputFolder
from curate.core.writer import image_extension, thumbnail

__all__ = [
    "CSS",
    "DROPPED_COLOUR",
    "KEPT_COLOUR",
    "bar_chart",
    "card",
    "card_images",
    "escape",
    "histogram",
    "image",
    "number",
    "page",
    "table",
]

KEPT_COLOUR = "#4a9"
DROPPED_COLOUR = "#d66"
IMAGE_EXTENSIONS = ("jpg", "png", "webp", "gif")  # what a card shows; a .bin image is not drawn
_MIME = {"jpg": "jpeg", "png": "png", "webp": "webp", "gif": "gif"}
_FONT = 11  # px, every text of a plot
_CHAR = 6.2  # px, the width of an average character at _FONT, to leave room for labels

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:21px}h2{font-size:17px;margin-top:34px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 6px}
table.n{border-collapse:collapse;font-size:13px}table.n td,table.n th{padding:2px 10px;text-align:left}
table.n td.r,table.n th.r{text-align:right}table.n tr:nth-child(even){background:#f6f6f6}
table.counts td{padding:2px 12px}table.counts td.n{text-align:right}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.row p{max-width:560px;font-size:13px}
svg.histogram,svg.bars{max-width:100%;height:auto;border:1px solid #eee;font-family:system-ui,sans-serif}
.grid{display:flex;flex-wrap:wrap;gap:8px}
.card{width:140px;font-size:11px;border:1px solid #ddd;padding:4px;border-radius:4px}
.card img{max-width:128px;max-height:128px;display:block;margin:auto}
.noimg{width:128px;height:64px;background:#eee;color:#888;text-align:center;line-height:64px;margin:auto}
.cap{color:#444;overflow-wrap:anywhere}.score{font-weight:bold}
.drop .score{color:#b00}.keep .score{color:#070}.note{color:#a60}
.pair{display:flex;gap:4px;border:1px solid #ddd;padding:4px;border-radius:4px;font-size:11px}
.pair .card{border:none}.absent{color:#888;font-style:italic}
table.caps td{vertical-align:top;font-size:12px;max-width:360px;overflow-wrap:anywhere}
table.caps img{max-width:72px;max-height:72px}.model{color:#888;font-size:10px}
"""


def escape(value: Any) -> str:
    """``value`` as HTML text (quotes too: it may stand in an attribute)."""
    return html.escape(str(value))


def page(title: str, body: Sequence[str], heading: str | None = None) -> str:
    """A whole page: the shell and the stylesheet, ``heading`` (the ``title`` unless given), then ``body``
    (HTML, one part per line)."""
    head = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{CSS}</style>"
    )
    h1 = f"<h1>{escape(title if heading is None else heading)}</h1>"
    return "\n".join([f"{head}</head><body>", h1, *body, "</body></html>"])


# --- tables --------------------------------------------------------------------------------------------


def number(v: Any) -> str:
    """A table cell: ints with thousands separators, floats to 4 significant digits, None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return escape(v)


def table(header: list[str], rows: list[list[Any]], right: set[int] | None = None) -> str:
    """A table of numbers; columns in ``right`` are right-aligned."""
    right = right or set()
    head = "".join(f"<th class='{'r' if i in right else ''}'>{escape(h)}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>"
        + "".join(f"<td class='{'r' if i in right else ''}'>{number(v)}</td>" for i, v in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table class='n'><tr>{head}</tr>{body}</table>"


# --- samples -------------------------------------------------------------------------------------------


def image(data: bytes | None) -> str:
    """An inline ``<img>`` of encoded image bytes, or a grey 'no image' box."""
    if data is None:
        return "<div class='noimg'>no image</div>"
    mime = _MIME.get(image_extension(data), "jpeg")
    return f"<img alt='' src='data:image/{mime};base64,{base64.b64encode(data).decode()}'>"


def card(data: bytes | None, lines: Sequence[tuple[str, str]], title: str | None = None) -> str:
    """A sample: its thumbnail, then one line per ``(css class, text)`` (``score``, ``cap`` ...); ``title``
    (the uid) shows on hover."""
    text = "".join(f"<div class='{cls}'>{escape(t)}</div>" for cls, t in lines)
    hover = f" title='{escape(title)}'" if title else ""
    return f"<div class='card'{hover}>{image(data)}{text}</div>"


def card_images(out: OutputFolder, rows: Sequence[tuple[str, str, bool]]) -> dict[int, bytes]:
    """Thumbnails of the samples ``(uid, shard, kept)``, by position in ``rows``: a kept row's image from its
    shard tar, shrunk; a dropped row's from the shard's ``dropped/`` audit tar, as it is. A row whose image is
    not there (no image, no audit tar, an image that does not decode) is left out."""
    want: dict[tuple[str, str], dict[str, int]] = {}
    for i, (uid, shard, kept) in enumerate(rows):
        want.setdefault((shard, "tar" if kept else "dropped"), {})[uid] = i
    found: dict[int, bytes] = {}
    for (shard, which), by_uid in sorted(want.items()):
        for uid, (data, ext) in out.images(shard, which, by_uid).items():
            if ext not in IMAGE_EXTENSIONS:
                continue
            small = data if which == "dropped" else thumbnail(data)
            if small is not None:
                found[by_uid[uid]] = small
    return found


# --- plots ---------------------------------------------------------------------------------------------


def _svg(css: str, width: float, height: float, parts: list[str]) -> str:
    return (
        f"<svg class='{css}' xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}' "
        f"viewBox='0 0 {width:.0f} {height:.0f}' font-size='{_FONT}'>" + "".join(parts) + "</svg>"
    )


def histogram(
    edges: Sequence[float],
    kept: Sequence[int],
    dropped: Sequence[int],
    label: str,
    thresholds: Sequence[tuple[float, str]] = (),
    width: int = 640,
    height: int = 180,
) -> str:
    """A histogram as inline SVG: per bin, the kept rows (green) with the dropped rows (red) stacked on top,
    each bin's range and counts in its tooltip; a dashed line per threshold ``(value, rule text)``; the
    lowest and highest edge under the axis, and ``label`` with the row count and the tallest bar."""
    n = len(kept)
    lo, hi = float(edges[0]), float(edges[-1])
    totals = [k + d for k, d in zip(kept, dropped, strict=True)]
    top = max(totals, default=0) or 1
    pad, legend_h = 30, 18
    base = height - 30
    plot_h = base - legend_h - 6
    span = (hi - lo) or 1.0

    def x(v: float) -> float:
        return pad + (v - lo) / span * (width - 2 * pad)

    parts = [
        f"<rect x='{pad}' y='4' width='10' height='10' fill='{KEPT_COLOUR}'/>",
        f"<text x='{pad + 14}' y='13'>kept</text>",
        f"<rect x='{pad + 54}' y='4' width='10' height='10' fill='{DROPPED_COLOUR}'/>",
        f"<text x='{pad + 68}' y='13'>dropped</text>",
    ]
    for b in range(n):
        x0, x1 = x(float(edges[b])), x(float(edges[b + 1]))
        tip = f"{float(edges[b]):.4g} to {float(edges[b + 1]):.4g}: {kept[b]:,} kept, {dropped[b]:,} dropped"
        y = base
        for count, colour in ((kept[b], KEPT_COLOUR), (dropped[b], DROPPED_COLOUR)):
            if not count:
                continue
            h = count / top * plot_h
            y -= h
            parts.append(
                f"<rect x='{x0:.1f}' y='{y:.1f}' width='{max(x1 - x0 - 1, 1):.1f}' height='{h:.1f}' "
                f"fill='{colour}'><title>{escape(tip)}</title></rect>"
            )
    parts.append(f"<line x1='{pad}' y1='{base}' x2='{width - pad}' y2='{base}' stroke='#888'/>")
    for k, (value, rule) in enumerate(thresholds):
        tx = x(float(value))
        # Right of the line, or left of it in the right half, so the rule never runs off the plot.
        right = tx > width / 2
        anchor = " text-anchor='end'" if right else ""
        parts += [
            f"<line class='threshold' x1='{tx:.1f}' y1='{legend_h + 4}' x2='{tx:.1f}' y2='{base}' stroke='#000' "
            "stroke-dasharray='4 2'/>",
            f"<text x='{tx - 3 if right else tx + 3:.1f}' y='{legend_h + 16 + 13 * k}'{anchor}>{escape(rule)}</text>",
        ]
    parts += [
        f"<text x='{pad}' y='{height - 8}'>{lo:.4g}</text>",
        f"<text x='{width - pad}' y='{height - 8}' text-anchor='end'>{hi:.4g}</text>",
        f"<text x='{width / 2:.0f}' y='{height - 8}' text-anchor='middle'>{escape(label)} "
        f"({sum(totals):,} rows, tallest bar {max(totals, default=0):,})</text>",
    ]
    return _svg("histogram", width, height, parts)


def bar_chart(
    labels: Sequence[str], values: Sequence[float], colour: str, notes: Sequence[str] | None = None
) -> str:
    """Horizontal bars as inline SVG, the first label on top, each bar followed by its note (the value, by
    default) and with the label, value and note in its tooltip."""
    notes = list(notes) if notes is not None else [f"{v:,.0f}" for v in values]
    row, pad = 20, 6
    label_w = min(_CHAR * max((len(s) for s in labels), default=0) + 10, 300)
    note_w = min(_CHAR * max((len(s) for s in notes), default=0) + 10, 200)
    width = 640
    bar_w = width - label_w - note_w - 2 * pad
    height = row * len(labels) + 2 * pad
    top = max(values, default=0) or 1
    parts = []
    for i, (label, v, note) in enumerate(zip(labels, values, notes, strict=True)):
        y = pad + i * row
        w = max(v, 0) / top * bar_w
        parts += [
            f"<text x='{pad + label_w - 6:.1f}' y='{y + 14}' text-anchor='end'>{escape(label)}</text>",
            f"<rect x='{pad + label_w:.1f}' y='{y + 3}' width='{w:.1f}' height='{row - 6}' fill='{colour}'>"
            f"<title>{escape(label)}: {escape(note)}</title></rect>",
            f"<text x='{pad + label_w + w + 4:.1f}' y='{y + 14}'>{escape(note)}</text>",
        ]
    parts.append(
        f"<line x1='{pad + label_w:.1f}' y1='{pad}' x2='{pad + label_w:.1f}' y2='{height - pad}' stroke='#888'/>"
    )
    return _svg("bars", width, height, parts)
