"""The campaign report: tables and figures from a campaign's logs (never imports torch).

    lrpilot report runs/published --baselines runs/sweep --out runs/report

`build_report(campaign_dir, baseline_dirs, out_dir, compare_dirs) -> ReportData` writes OUT/report.html
(self-contained) and OUT/report.md with its PNGs; `main_report` does the same and prints the key tables.
`compare_dirs` (`--compare DIR2 ...`) adds a "Side by side" section: campaigns and baseline sweeps in one table.
"""

from lrpilot.report.report import ReportData, build_report, main_report, render_text

__all__ = ["ReportData", "build_report", "main_report", "render_text"]
