"""report.html: report.md as one self-contained web page, its figures inlined.

MLflow's artifact viewer shows an HTML artifact in a sandboxed frame where links to other
artifacts do not load, and shows markdown without its images; a page that carries its images as
``data:`` URIs is the one form of the report that reads in full there. The markdown is the
report's own (gradalign.report.markdown), so only its subset is translated: headings, bullet
lists, tables, images on a line of their own, paragraphs, and inline code and bold.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterator
from pathlib import Path

_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)]+)\)$")
_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       line-height: 1.45; color: #1f2328; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.6em; text-align: left; }
th { background: #f6f8fa; }
code { background: #f6f8fa; padding: 0.1em 0.3em; border-radius: 4px; }
img { max-width: 100%; }
"""


def _inline(text: str) -> str:
    """Escaped ``text`` with `code` and **bold** spans."""
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", escaped)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _image(alt: str, src: str, folder: Path) -> str:
    """An <img>: a file of ``folder`` inlined as a data: URI, anything else linked as it is."""
    path = folder / src
    if "://" not in src and path.is_file():
        data = base64.b64encode(path.read_bytes()).decode()
        kind = "svg+xml" if path.suffix == ".svg" else path.suffix.lstrip(".").lower()
        src = f"data:image/{kind};base64,{data}"
    return f'<p><img alt="{html.escape(alt)}" src="{html.escape(src)}"></p>'


def _blocks(lines: list[str]) -> Iterator[list[str]]:
    """Runs of lines of one kind: a table, a list, an image, a heading, a paragraph."""
    block: list[str] = []
    for line in lines:
        kind = _kind(line)
        if block and (kind != _kind(block[0]) or kind in ("heading", "image", "blank")):
            yield block
            block = []
        block.append(line)
    if block:
        yield block


def _kind(line: str) -> str:
    if not line.strip():
        return "blank"
    if line.startswith("#"):
        return "heading"
    if line.startswith("|"):
        return "table"
    if line.startswith("- "):
        return "list"
    if _IMAGE.match(line.strip()):
        return "image"
    return "paragraph"


def to_html(markdown: str, folder: Path, title: str) -> str:
    """The page of ``markdown`` (the report's own), with the images it names in ``folder``
    inlined."""
    body = []
    for block in _blocks(markdown.splitlines()):
        kind = _kind(block[0])
        if kind == "heading":
            level = len(block[0]) - len(block[0].lstrip("#"))
            body.append(f"<h{level}>{_inline(block[0][level:].strip())}</h{level}>")
        elif kind == "table":
            rows = [_cells(line) for line in block if not re.fullmatch(r"\|(\s*-+\s*\|)+", line)]
            head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
            body.append(f"<table><tr>{head}</tr>")
            body += [
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
            ]
            body.append("</table>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(x[2:])}</li>" for x in block) + "</ul>")
        elif kind == "image":
            match = _IMAGE.match(block[0].strip())
            body.append(_image(match["alt"], match["src"], folder))
        elif kind == "paragraph":
            body.append(f"<p>{_inline(' '.join(line.strip() for line in block))}</p>")
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{_STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
