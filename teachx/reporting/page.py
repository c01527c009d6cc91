"""The page a report is assembled on: its HTML and Markdown bodies built side by side, figures embedded.

:class:`Page` holds both bodies while a run or study report adds headings, tables, verdicts, figures and the
plain-words sentences of the measures shown; :meth:`Page.render` turns them into the self-contained HTML (CSS
inline, each figure a base64 PNG) and the Markdown that links the PNGs written next to it.
:func:`read_record` reads the records a report is built from, verified against their digests.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import teachx.evaluation.shortcut  # noqa: F401  (the modules that declare the measures reports show)
import teachx.runs.evaluation  # noqa: F401
from teachx.errors import RunDirError
from teachx.evaluation.base import measure
from teachx.runs.recovery import run_dir_fix
from teachx.utils.io import read_trusted_json

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.86em;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child,td.l{text-align:left}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.82em}
.verdict{padding:.4em .8em;margin:.3em 0;border-left:4px solid #888;background:#fafafa}
.yes{border-color:#2a7}.no{border-color:#c84}.note{color:#666;font-size:.85em}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
"""


@dataclass
class Page:
    """Builds the HTML and Markdown bodies side by side."""

    title: str
    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)

    def h(self, text: str) -> None:
        self.html.append(f"<h2>{html.escape(text)}</h2>")
        self.md.append(f"\n## {text}\n")

    def p(self, text: str, cls: str = "") -> None:
        c = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{c}>{html.escape(text)}</p>")
        self.md.append(f"{text}\n")

    def verdict(self, text: str, good: Optional[bool]) -> None:
        cls = "verdict " + ("yes" if good else "no" if good is not None else "")
        self.html.append(f'<div class="{cls}">{html.escape(text)}</div>')
        self.md.append(f"- **{text}**")

    def measures(self, names: Sequence[str]) -> None:
        """One plain sentence per measure shown above: what it measures and which direction is better
        (the sentences live with each measure's definition, ``teachx.evaluation.base.measure``)."""
        items = [(n, measure(n).sentence()) for n in names]
        self.html.append(
            "<ul class=note>"
            + "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(s)}</li>" for n, s in items)
            + "</ul>"
        )
        self.md.append("".join(f"- **{n}**: {s}\n" for n, s in items))

    def pre(self, text: str) -> None:
        self.html.append(f"<pre>{html.escape(text)}</pre>")
        self.md.append(f"\n```yaml\n{text.rstrip()}\n```\n")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        self.html.append(f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>")
        self.md.append("| " + " | ".join(map(str, header)) + " |")
        self.md.append("|" + "---|" * len(header))
        for r in rows:
            self.md.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
        self.md.append("")

    def figure(self, name: str, png: bytes, caption: str = "") -> None:
        b64 = base64.b64encode(png).decode("ascii")
        self.html.append(
            f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}">'
            + (f"<figcaption class=note>{html.escape(caption)}</figcaption>" if caption else "")
            + "</figure>"
        )
        self.figures[name] = png
        self.md.append(f"![{caption or name}]({{files}}/{name})\n")

    def render(self, md_files_dir: str) -> tuple[str, str]:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        head = (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(self.title)}</h1><p class=note>written {stamp} by teachx</p>"
        )
        md = (
            f"# {self.title}\n\n_written {stamp} by teachx_\n\n"
            + "\n".join(self.md).replace("{files}", md_files_dir)
            + "\n"
        )
        return head + "\n".join(self.html) + "</body></html>\n", md


# -- formatting --------------------------------------------------------------------------------------


# -- figures -----------------------------------------------------------------------------------------


def read_record(p: Path) -> Any:
    """A record the report is built from, verified against its digest (records without one are legacy)."""
    fix = run_dir_fix(p) or (
        "re-run the same `teachx study` command (complete units are skipped; it writes study.json again)"
        if p.name == "study.json"
        else "re-run the command that made this directory (finished stages are skipped; it writes the file again)"
    )
    try:
        return read_trusted_json(p, fix)
    except OSError as exc:
        raise RunDirError(f"cannot read '{p}' ({type(exc).__name__}); re-run the command that writes it") from None
