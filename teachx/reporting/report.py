"""One report per run or study: a self-contained HTML file and a Markdown file.

The HTML embeds every figure as a base64 PNG and its CSS inline, so it can be mailed or archived
alone (no external assets, no URLs). The Markdown file links PNGs written next to it
(``<name>_files/``). Both are written atomically. The report only reads what the run or study
wrote (``results.json``/``study.json``, stage records, ``examples.npz``): no model is re-run.

This module picks the report and writes its files; the pages are built in :mod:`~teachx.reporting.run_report`
and :mod:`~teachx.reporting.study_report` on a :class:`~teachx.reporting.page.Page`, with the figures of
:mod:`~teachx.reporting.plots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from teachx.errors import RunDirError
from teachx.reporting.run_report import run_report
from teachx.reporting.study_report import study_report
from teachx.utils.io import write_bytes_atomic, write_text_atomic


def write_report(run_or_study_dir: str | Path, out: Optional[str | Path] = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (or ``out`` and ``out`` with .md) for a run or study directory."""
    d = Path(run_or_study_dir)
    if (d / "study.json").exists():
        doc = study_report(d)
    elif (d / "results.json").exists() and (d / "config.yaml").exists():
        doc = run_report(d)
    elif d.is_dir() and (d / "study.yaml").exists():
        raise RunDirError(
            f"study '{d}' has no study.json yet; run `teachx study` to completion (it resumes) and try again "
            f"(`teachx study CONFIG --out {d} --status` shows how far it is)"
        )
    else:
        raise RunDirError(
            f"'{d}' is not a teachx run or study directory (no results.json or study.json); pass the --out folder of `teachx run`, `teachx demo` or `teachx study`"
        )
    html_path = Path(out) if out else d / "report.html"
    if html_path.suffix.lower() not in (".html", ".htm"):
        html_path = html_path.with_suffix(".html")
    md_path = html_path.with_suffix(".md")
    files_dir = html_path.with_name(html_path.stem + "_files")
    _refuse_foreign(html_path, md_path, [files_dir / name for name in doc.figures])
    html_text, md_text = doc.render(files_dir.name)
    for name, png in doc.figures.items():
        write_bytes_atomic(files_dir / name, png)
    write_text_atomic(md_path, md_text)
    write_text_atomic(html_path, html_text)
    return html_path, md_path


def _written_by_teachx(path: Path) -> bool:
    """Whether ``path`` is a report teachx wrote (its 'written ... by teachx' line)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192).decode("utf-8", "replace")
    except OSError:
        return False
    return "by teachx</p>" in head or "by teachx_" in head


def _refuse_foreign(html_path: Path, md_path: Path, figures: list[Path]) -> None:
    """A report replaces only an earlier report of teachx's, never a file it did not write (a
    notes.md next to --out notes.html, a picture in notes_files/)."""
    ours = any(_written_by_teachx(p) for p in (html_path, md_path))
    for p in [html_path, md_path] + ([] if ours else figures):
        if p.exists() and not (p.suffix in (".html", ".htm", ".md") and _written_by_teachx(p)):
            raise RunDirError(
                f"'{p}' exists and was not written by teachx; teachx never replaces files it did not make, "
                "so choose another --out file name for the report"
            )
