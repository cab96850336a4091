"""Build the campaign report: report.html (self-contained), report.md with PNGs beside it, terminal tables.

    lrpilot report runs/published --baselines runs/sweep --out runs/report

Reads logs only (through `lrpilot.campaign_logs`) and never imports torch. Sections: (a) cross-round
learning per phase of 10 rounds, (b) head-to-head at the same peak LR, (c) LR schedule evolution, (d) the
exploration landscape, (e) loss curves with rollbacks, (f) summary and survival per peak band.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import html
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lrpilot.campaign_logs import BaselineResult, CampaignLogsError, load_baselines, load_campaign
from lrpilot.report.figures import Figure, all_figures
from lrpilot.report.tables import (
    Analysis,
    Table,
    analyse,
    fmt_ppl,
    head_to_head_table,
    phase_table,
    rounds_table,
    summary_table,
    survival_table,
)


@dataclass
class ReportData(Analysis):
    """What `build_report` computed and wrote: every number of the report plus the output paths."""

    campaign_dir: str = ""
    out_dir: str = ""
    figures: list[Figure] = field(default_factory=list)
    tables: dict[str, Table] = field(default_factory=dict)
    html_path: Path | None = None
    md_path: Path | None = None

    @property
    def phase_means(self) -> list[float]:
        return [p.mean for p in self.phases]

    @property
    def phase_means_without_outliers(self) -> list[float]:
        return [p.mean_without_outliers for p in self.phases]

    def figure_paths(self) -> list[Path]:
        return [f.path for f in self.figures if f.path is not None]


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1000px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: 0.9em; }
details { margin: 1em 0; }
"""


def _sections(d: ReportData) -> list[tuple[str, list[Table | Figure | str]]]:
    figs = {f.name: f for f in d.figures}
    t = d.tables
    return [
        ("Summary", [t["summary"]]),
        ("(a) Cross-round learning", [t["phases"], figs["ppl_per_round"]]),
        ("(b) Head-to-head at the same peak LR", [t["head_to_head"]]),
        ("(c) LR schedule evolution", [figs["lr_schedules"]]),
        ("(d) Exploration landscape", [figs["landscape"]]),
        ("(e) Loss curves", [figs["loss_curves"]]),
        ("(f) Survival per peak band", [t["survival"]]),
        ("All rounds", [t["rounds"]]),
    ]


def _intro(d: ReportData) -> str:
    n_b = len(d.baselines)
    return (
        f"Campaign {d.campaign_dir}: {len(d.rounds)} rounds; {n_b} baseline run{'s' * (n_b != 1)}. "
        f"Generated {_dt.datetime.now().isoformat(timespec='seconds')} by lrpilot report from the logs only."
    )


def render_html(d: ReportData) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>lrpilot report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>lrpilot campaign report</h1>",
        f"<p>{html.escape(_intro(d))}</p>",
    ]
    for title, items in _sections(d):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        for it in items:
            if isinstance(it, Table):
                if title == "All rounds":
                    parts.append(f"<details><summary>{len(d.rounds)} rounds</summary>{it.html()}</details>")
                else:
                    parts.append(it.html())
            elif isinstance(it, Figure):
                if it.path is None:
                    parts.append(f"<p class='note'>{html.escape(it.caption)}</p>")
                else:
                    data = base64.b64encode(it.path.read_bytes()).decode("ascii")
                    parts.append(
                        f"<figure><img alt='{html.escape(it.title)}' src='data:image/png;base64,{data}'>"
                        f"<figcaption><b>{html.escape(it.title)}.</b> {html.escape(it.caption)}</figcaption></figure>"
                    )
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(d: ReportData) -> str:
    parts = ["# lrpilot campaign report", "", _intro(d), ""]
    for title, items in _sections(d):
        parts += [f"## {title}", ""]
        for it in items:
            if isinstance(it, Table):
                parts += [it.markdown(), ""]
            elif isinstance(it, Figure):
                if it.path is None:
                    parts += [f"*{it.caption}*", ""]
                else:
                    parts += [f"![{it.title}]({it.path.name})", "", f"*{it.title}.* {it.caption}", ""]
    return "\n".join(parts)


def render_text(d: ReportData) -> str:
    """The key tables for the terminal."""
    blocks = [d.tables[k].text() for k in ("summary", "phases", "head_to_head", "survival")]
    blocks.append(f"report: {d.html_path}  (markdown: {d.md_path}; figures beside it)")
    return "\n\n".join(blocks)


def build_report(
    campaign_dir: str | Path, baseline_dirs: Sequence[str | Path] = (), out_dir: str | Path | None = None
) -> ReportData:
    """Read the campaign (and extra baseline folders), compute every number, and write OUT/report.html,
    OUT/report.md and the PNGs (OUT defaults to CAMPAIGN/report). Raises CampaignLogsError for unreadable
    input, or when there is nothing to report."""
    campaign_dir = Path(campaign_dir)
    logs = load_campaign(campaign_dir)
    extra: list[BaselineResult] = load_baselines(list(baseline_dirs)) if baseline_dirs else []
    if not logs.rounds and not logs.baselines and not extra:
        raise CampaignLogsError(
            f"report: {campaign_dir} has no finished rounds and no baselines; nothing to report yet"
        )
    a = analyse(logs, extra)
    out = Path(out_dir) if out_dir is not None else campaign_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    d = ReportData(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Analysis)})
    d.campaign_dir, d.out_dir = str(campaign_dir), str(out)
    d.figures = all_figures(a, out)
    d.tables = {
        "summary": summary_table(a),
        "phases": phase_table(a),
        "head_to_head": head_to_head_table(a),
        "survival": survival_table(a),
        "rounds": rounds_table(a),
    }
    d.html_path, d.md_path = out / "report.html", out / "report.md"
    d.md_path.write_text(render_markdown(d), encoding="utf-8")
    d.html_path.write_text(render_html(d), encoding="utf-8")
    return d


def main_report(
    campaign_dir: str | Path, baseline_dirs: Sequence[str | Path] = (), out_dir: str | Path | None = None
) -> int:
    """`lrpilot report DIR [--baselines DIR ...] --out OUT`: build the report, print the key tables; 0 on
    success, 2 with a one-line error for unreadable input."""
    try:
        d = build_report(campaign_dir, baseline_dirs, out_dir)
    except CampaignLogsError as e:
        print(f"lrpilot report: error: {e}", file=sys.stderr)
        return 2
    print(render_text(d))
    best = d.best_round
    if best is not None and d.best_baseline is not None and math.isfinite(d.ratio_best):
        print(
            f"best round {best.round} {fmt_ppl(best.final_eval_ppl)} vs best {d.best_baseline.label} "
            f"{fmt_ppl(d.best_baseline.final_eval_ppl)} (ratio {d.ratio_best:.3f})"
        )
    return 0
