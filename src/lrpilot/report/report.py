"""Build the campaign report: report.html (self-contained), report.md with PNGs beside it, terminal tables.

    lrpilot report runs/published --baselines runs/sweep --out runs/report

Reads logs only (through `lrpilot.campaign_logs`) and never imports torch. Sections: (a) cross-round
learning per phase of 10 rounds, (b) head-to-head at the same peak LR, (c) LR schedule evolution, (d) the
exploration landscape, (e) loss curves with rollbacks, (f) summary and survival per peak band. With
`--compare DIR2 [DIR3 ...]` a "Side by side" section puts the campaigns and the baseline sweeps in one table
and one best-so-far figure, and says whether they ran on the same per-run budget:

    lrpilot report runs/llm-small --compare runs/rules-small --baselines runs/sweep-small --out runs/compare
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import html
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lrpilot.campaign_logs import BaselineResult, CampaignLogsError, load_baselines, load_campaign
from lrpilot.errors import writing_output
from lrpilot.logs import write_atomic
from lrpilot.report.figures import Figure, all_figures, fig_side_by_side, safe_figure
from lrpilot.report.tables import (
    Analysis,
    SideBySide,
    Table,
    analyse,
    fmt_ppl,
    head_to_head_table,
    phase_table,
    rounds_table,
    side_by_side,
    side_by_side_table,
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
    #: the campaigns and baseline sweeps side by side (None unless build_report got compare_dirs)
    side_by_side: SideBySide | None = None
    #: (link to bench.md relative to out_dir, one-line headline) per `lrpilot bench` directory given
    benches: list[tuple[str, str]] = field(default_factory=list)

    @property
    def phase_means(self) -> list[float]:
        return [p.mean for p in self.phases]


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
    compare: list[tuple[str, list[Table | Figure | str]]] = (
        [("Side by side", [t["side_by_side"], figs["side_by_side"]])] if d.side_by_side is not None else []
    )
    return [
        ("Summary", [t["summary"]]),
        *compare,
        ("(a) Cross-round learning", [t["phases"], figs["ppl_per_round"]]),
        ("(b) Head-to-head at the same peak LR", [t["head_to_head"]]),
        ("(c) LR schedule evolution", [figs["lr_schedules"]]),
        ("(d) Exploration landscape", [figs["landscape"]]),
        ("(e) Loss curves", [figs["loss_curves"]]),
        ("(f) Survival per peak band", [t["survival"]]),
        *([("(g) LR range tests", [figs["range_tests"]])] if "range_tests" in figs else []),
        ("All rounds", [t["rounds"]]),
    ]


def _intro(d: ReportData) -> str:
    n_b = len(d.baselines)
    others = d.side_by_side.campaigns[1:] if d.side_by_side is not None else []
    compared = f"Compared side by side with {', '.join(c.path for c in others)}. " if others else ""
    fb = [str(r.round) for r in d.rounds if r.mostly_fallback]
    fallback = (
        f"In round{'s' * (len(fb) > 1)} {', '.join(fb)} most decisions fell back (no valid controller answer, "
        "LR kept): they show the fallback path, not the agent; see llm_calls.jsonl. "
        if fb
        else ""
    )
    return (
        f"Campaign {d.campaign_dir}: {len(d.rounds)} rounds; {n_b} baseline run{'s' * (n_b != 1)}. {compared}"
        f"{fallback}"
        f"Generated {_dt.datetime.now().isoformat(timespec='seconds')} by lrpilot report from the logs only."
    )


def bench_link(bench_dir: Path, out_dir: Path) -> tuple[str, str]:
    """(bench.md relative to out_dir, a headline from bench.json) for `lrpilot report --bench DIR`.
    Raises CampaignLogsError (one line) when DIR holds no readable bench.json."""
    path = Path(bench_dir) / "bench.json"
    try:
        s = json.loads(path.read_text())
        methods = s["methods"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CampaignLogsError(
            f"report --bench {bench_dir}: no readable bench.json; run `lrpilot bench --out {bench_dir}` first"
        ) from None
    ranked = sorted((m["mean"], k) for k, m in methods.items() if isinstance(m.get("mean"), (int, float)))
    head = f"{len(methods)} methods over seeds {', '.join(map(str, s.get('seeds', [])))}"
    if ranked:
        head += f"; best mean ppl {ranked[0][0]:.3f} ({ranked[0][1]})"
    if s.get("reference") in methods and isinstance(methods[s["reference"]].get("mean"), (int, float)):
        head += f"; best fixed schedule {s['reference']} {methods[s['reference']]['mean']:.3f}"
    return os.path.relpath(Path(bench_dir) / "bench.md", out_dir), head


def render_html(d: ReportData) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>lrpilot report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>lrpilot campaign report</h1>",
        f"<p>{html.escape(_intro(d))}</p>",
    ]
    for link, head in d.benches:
        parts.append(f"<p>Bench: <a href='{html.escape(link)}'>{html.escape(link)}</a> ({html.escape(head)})</p>")
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
    parts += [f"Bench: [{link}]({link}) ({head})\n" for link, head in d.benches]
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
    keys = ("summary", "side_by_side", "phases", "head_to_head", "survival")
    blocks = [d.tables[k].text() for k in keys if k in d.tables]
    blocks.append(f"report: {d.html_path}  (markdown: {d.md_path}; figures beside it)")
    return "\n\n".join(blocks)


def _names(dirs: Sequence[Path]) -> list[str]:
    """Row names: each directory's name, with as many parent folders as it takes to tell them apart."""
    parts = [p.resolve().parts[1:] for p in dirs]  # without the root "/"
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{p.name} #{i}" for i, p in enumerate(dirs, 1)]  # the same folder given twice


def build_report(
    campaign_dir: str | Path,
    baseline_dirs: Sequence[str | Path] = (),
    out_dir: str | Path | None = None,
    compare_dirs: Sequence[str | Path] = (),
    bench_dirs: Sequence[str | Path] = (),
) -> ReportData:
    """Read the campaign (and extra baseline folders), compute every number, and write OUT/report.html,
    OUT/report.md and the PNGs (OUT defaults to CAMPAIGN/report). With compare_dirs (other campaign
    directories) the report gets a "Side by side" section: one row per campaign (this one first) and per
    baseline schedule, and the best-so-far figure. bench_dirs (`lrpilot bench` outputs) are linked with a
    headline each. Raises CampaignLogsError for unreadable input, or when there
    is nothing to report."""
    campaign_dir = Path(campaign_dir)
    logs = load_campaign(campaign_dir)
    others = [load_campaign(Path(c)) for c in compare_dirs]
    extra: list[BaselineResult] = load_baselines(list(baseline_dirs)) if baseline_dirs else []
    if not logs.rounds and not logs.baselines and not extra and not any(o.rounds for o in others):
        sweep = load_baselines(campaign_dir)  # its top-level *.json: a baseline sweep's --out?
        if sweep:
            raise CampaignLogsError(
                f"report: {campaign_dir} is a baseline sweep ({len(sweep)} result jsons), not a campaign; "
                f"pass it with --baselines {campaign_dir} next to a campaign directory"
            )
        raise CampaignLogsError(
            f"report: {campaign_dir} has no finished rounds and no baselines; nothing to report yet"
        )
    a = analyse(logs, extra)
    out = Path(out_dir) if out_dir is not None else campaign_dir / "report"
    with writing_output("--out" if out_dir is not None else "report", out):  # /proc/rep: one line, no traceback
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
    if compare_dirs:
        names = _names([campaign_dir, *(Path(c) for c in compare_dirs)])
        # each compared campaign's own sweep gets its own rows (it may have another budget); a file read twice
        # (the same folder given to --baselines and held by a campaign) counts once
        # (analyse keeps one run per schedule, peak and seed; here every sweep stays whole, in its own row)
        baselines, seen = [], set()
        for b in [*logs.baselines, *extra, *(b for o in others for b in o.baselines)]:
            key = Path(b.path).resolve() if b.path else id(b)
            if key not in seen:
                seen.add(key)
                baselines.append(b)
        d.side_by_side = side_by_side(list(zip(names, [logs, *others], strict=True)), baselines)
        d.tables["side_by_side"] = side_by_side_table(d.side_by_side)
        d.figures.append(safe_figure("side_by_side", fig_side_by_side, d.side_by_side, out))
    d.benches = [bench_link(Path(b), out) for b in bench_dirs]
    d.html_path, d.md_path = out / "report.html", out / "report.md"
    # atomic: a full disk or a second report into OUT never leaves half a page
    write_atomic(d.md_path, render_markdown(d).encode("utf-8"))
    write_atomic(d.html_path, render_html(d).encode("utf-8"))
    return d


def main_report(
    campaign_dir: str | Path,
    baseline_dirs: Sequence[str | Path] = (),
    out_dir: str | Path | None = None,
    compare_dirs: Sequence[str | Path] = (),
    bench_dirs: Sequence[str | Path] = (),
) -> int:
    """`lrpilot report DIR [--baselines DIR ...] [--compare DIR2 ...] --out OUT`: build the report, print the
    key tables; 0 on success, 2 with a one-line error for unreadable input."""
    try:
        d = build_report(campaign_dir, baseline_dirs, out_dir, compare_dirs, bench_dirs)
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
    print(f"open: {Path(d.html_path).resolve().as_uri()}")  # a file:// URL terminals make clickable
    return 0
