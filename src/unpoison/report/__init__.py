"""Reports: per-run report.html, figures, and the tables of benchmark grids."""

from .html import REPORT_FILE, render_report, write_report

__all__ = ["REPORT_FILE", "render_report", "write_report"]
