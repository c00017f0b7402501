"""Small HTML building blocks shared by the one-night report and the trend page."""

from __future__ import annotations

import base64
import html
from datetime import UTC, datetime

# ----------------------------------------------------------------------------------------- html


def html_img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def html_table(header: list[str] | None, rows: list) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header or [])
    body = "".join("<tr>" + "".join(f"<td>{html_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if header else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def html_fmt(value: object) -> str:
    if value is None:
        return "<span class=null>null</span>"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top;font-size:14px}th{background:#f0f3f8}td{max-width:700px;overflow-wrap:anywhere}
img{max-width:100%;display:block;margin:.5em 0}.null{color:#999}h2{border-bottom:2px solid #999}"""


def html_page(title: str, sections: list[str]) -> str:
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}"
            f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>generated {made}</p>{''.join(sections)}</body></html>\n")
