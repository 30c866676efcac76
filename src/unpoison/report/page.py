"""The page every report.html is built on: one self-contained HTML file (figures embedded
as base64 PNG, no external resource), a self-check that marks the page when a figure fails
to decode, and the escaping every string from a run or a user's data goes through (a
class folder may be named <script>)."""

from __future__ import annotations

import base64
import html
from typing import Any, Callable

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1000px;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.sub { color: #555; margin-top: 0; } .missing { color: #8a5a00; background: #fff7e0; padding: 0.5em 0.8em; }
#broken { color: #fff; background: #b00020; padding: 0.5em 0.8em; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ccc; padding: 0.25em 0.7em; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 0.8em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""

# Marks the page when an embedded figure fails to decode, visibly and in the DOM
# (body[data-images-loaded]), which is what the headless-Chromium check reads.
SELF_CHECK = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (img) { return !(img.complete && img.naturalWidth > 0); });
  document.body.setAttribute('data-images-loaded', (images.length - broken.length) + '/' + images.length);
  if (broken.length) {
    var banner = document.getElementById('broken');
    banner.textContent = broken.length + ' figure(s) on this page failed to load';
    banner.hidden = false;
  }
});
"""




def page(title: str, subtitle: str, sections: list[tuple[str, str, Callable[[], str]]]) -> str:
    """The whole page: `sections` are (anchor, heading, make_html); one that fails to draw
    says why instead of costing the page."""
    body = [f"<h1>{esc(title)}</h1>", f"<p class='sub'>{subtitle}</p>", "<p id='broken' hidden></p>"]
    for anchor, heading, make in sections:
        body.append(f"<section id='{anchor}'><h2>{esc(heading)}</h2>{guarded(make)}</section>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>unpoison: {esc(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body)
            + f"\n<script>{SELF_CHECK}</script>\n</body></html>\n")

def guarded(make: Callable[[], str]) -> str:
    """One broken section (an odd record, a drawing error) must not cost the whole page."""
    try:
        return make()
    except Exception as exc:
        return missing(f"this section could not be drawn: {type(exc).__name__}: {exc}")




def figure(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f"<figure><img alt='{esc(caption[:80])}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def table(header: list[str], rows: list[tuple]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_td(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(value: Any) -> str:
    text = esc(value)
    numeric = text.replace(".", "").replace(" %", "").replace(" ", "").isdigit()
    return f"<td class='num'>{text}</td>" if numeric else f"<td>{text}</td>"


def missing(text: str) -> str:
    return f"<p class='missing'>{esc(text)}</p>"






def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)
