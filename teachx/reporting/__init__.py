"""Figures and reports: ``write_report(run_or_study_dir)`` writes a self-contained HTML and a Markdown file."""

from teachx.reporting.report import write_report

__all__ = ["write_report"]
