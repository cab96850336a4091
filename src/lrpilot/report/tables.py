"""The report's numbers and tables, computed from logs only (no torch, no matplotlib).

    python -c "from lrpilot.report.tables import analyse; from lrpilot.campaign_logs import load_campaign; \
print(analyse(load_campaign('runs/published'), []).summary)"

`analyse` turns a campaign and its baselines into `Analysis` (phases, head-to-head, survival, summary);
`side_by_side` puts several campaigns and the baseline sweeps in one table (`lrpilot report --compare`);
`Table` renders the same rows as terminal text, markdown and HTML, so the three outputs cannot disagree.
"""

from __future__ import annotations

import html
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lrpilot.campaign_logs import (
    BaselineResult,
    CampaignLogs,
    PhaseStats,
    RoundSummary,
    band_sort_key,
    best_round,
    campaign_median,
    fmt_lr,
    outlier_rounds,
    phase_stats,
)
from lrpilot.logs import as_float
from lrpilot.lr import CATASTROPHIC_FACTOR

#: a round is catastrophic when its ppl exceeds this multiple of the campaign median (home: lrpilot.lr)
OUTLIER_FACTOR = CATASTROPHIC_FACTOR
#: a run survives when it finished and its final eval loss (ln ppl) is below this multiple of the best run's
#: loss in the report, i.e. ppl < best_ppl ** SURVIVAL_LOSS_FACTOR. A loss ratio, not a ppl ratio, because it
#: means the same for a byte-level model (best ppl 4.7: collapse at 9.2 is 1.43x the loss) and for LLaMA-60M
#: on C4 (best 30.4: an under-trained 57 is 1.18x, the collapsed cosine at 215 is 1.57x)
SURVIVAL_LOSS_FACTOR = 1.3
#: two results within this relative difference of ppl are a tie
TIE_REL = 1e-3


def survival_threshold(best_ppl: float) -> float:
    """best_ppl ** SURVIVAL_LOSS_FACTOR, computed in the loss domain (exp(factor * ln ppl)) so that a huge finite
    best ppl (the trainer logs up to ~1e307) gives inf instead of an OverflowError; NaN unless best_ppl > 1."""
    if not best_ppl > 1:
        return math.nan
    loss = SURVIVAL_LOSS_FACTOR * math.log(best_ppl)
    return math.exp(loss) if loss < 709.0 else math.inf


def _ratio(a: float, b: float) -> float:
    """a / b, NaN where b is 0 (a log holding ppl 0 is garbage, not a crash)."""
    return a / b if b != 0 else math.nan


def fmt_ppl(x: float | None) -> str:
    """2 decimals; a huge finite ppl (the trainer logs up to ~1e307) in exponent form, not 300 digits."""
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.2f}" if abs(x) < 1e9 else f"{x:.3g}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "not logged"
    h = seconds / 3600
    return f"{h:.1f} h" if h >= 1 else f"{seconds / 60:.1f} min"


def fmt_pct(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"


@dataclass
class Table:
    """A titled table of strings, rendered the same way to text, markdown and HTML."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    #: "l" or "r" per column; default: first column left, the rest right (numbers)
    align: str = ""

    def _align(self) -> str:
        return (self.align or "l" + "r" * (len(self.headers) - 1)).ljust(len(self.headers), "r")

    def text(self) -> str:
        widths = [max(len(str(c)) for c in col) for col in zip(self.headers, *self.rows, strict=True)]

        al = self._align()

        def line(cells: Sequence[str]) -> str:
            return "  ".join(
                str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, al, strict=True)
            ).rstrip()

        out = [self.title, line(self.headers), line(["-" * w for w in widths])]
        out += [line(r) for r in self.rows]
        if self.note:
            out.append(self.note)
        return "\n".join(out)

    def markdown(self) -> str:
        def esc(c: str) -> str:
            return str(c).replace("|", "\\|")

        out = [
            f"| {' | '.join(esc(h) for h in self.headers)} |",
            "|" + "|".join(":---" if a == "l" else "---:" for a in self._align()) + "|",
        ]
        out += [f"| {' | '.join(esc(c) for c in r)} |" for r in self.rows]
        if self.note:
            out += ["", f"*{self.note}*"]
        return "\n".join(out)

    def html(self) -> str:
        al = ["left" if a == "l" else "right" for a in self._align()]
        head = "".join(
            f"<th style='text-align:{a}'>{html.escape(h)}</th>" for h, a in zip(self.headers, al, strict=True)
        )
        body = "".join(
            "<tr>"
            + "".join(f"<td style='text-align:{a}'>{html.escape(str(c))}</td>" for c, a in zip(r, al, strict=True))
            + "</tr>"
            for r in self.rows
        )
        note = f'<p class="note">{html.escape(self.note)}</p>' if self.note else ""
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


@dataclass(frozen=True)
class HeadToHead:
    """One peak LR: a baseline run against the agent's best round in the same peak band."""

    band: str
    baseline: BaselineResult | None
    agent: RoundSummary | None
    agent_rounds_in_band: int
    winner: str  # "agent" | "<schedule>" | "tie" | "neither finished" | "no agent round" | "no baseline"


@dataclass(frozen=True)
class BandSurvival:
    """Survival in one peak band: finished without failure and ln(ppl) < SURVIVAL_LOSS_FACTOR x ln(best ppl)."""

    band: str
    agent_rounds: tuple[int, ...]
    agent_survived: int
    baseline_runs: int
    baseline_survived: int

    @property
    def agent_rate(self) -> float:
        return self.agent_survived / len(self.agent_rounds) if self.agent_rounds else math.nan

    @property
    def baseline_rate(self) -> float:
        return self.baseline_survived / self.baseline_runs if self.baseline_runs else math.nan


@dataclass
class Analysis:
    """Every number of the report (figures and tables are drawn from these)."""

    rounds: list[RoundSummary]
    baselines: list[BaselineResult]
    phases: list[PhaseStats]
    campaign_median: float
    outlier_threshold: float
    outliers: list[int]
    failed: list[int]
    best_round: RoundSummary | None
    best_baseline: BaselineResult | None
    #: baselines whose ppl is within TIE_REL of the best one (the best itself first)
    near_best_baselines: list[BaselineResult]
    head_to_head: list[HeadToHead]
    survival: list[BandSurvival]
    survival_threshold: float
    ratio_best: float  # best agent ppl / best baseline ppl
    campaign_steps: int | None
    campaign_steps_estimated: bool
    campaign_wall_s: float | None
    sweep_steps: int | None
    sweep_wall_s: float | None
    selected_rounds: dict[str, RoundSummary] = field(default_factory=dict)
    #: rounds stopped early by `campaign --prune` (not in `failed`; never the best round)
    pruned: list[int] = field(default_factory=list)

    def baseline_at(self, peak_lr: float, schedule: str = "cosine") -> BaselineResult | None:
        """The baseline run of `schedule` at this peak (relative match 1e-6)."""
        for b in self.baselines:
            if b.schedule == schedule and math.isclose(b.peak_lr, peak_lr, rel_tol=1e-6):
                return b
        return None


def _winner(agent: float, base: float, schedule: str) -> str:
    if not math.isfinite(agent) and not math.isfinite(base):
        return "neither finished"
    if not math.isfinite(base) or (math.isfinite(agent) and agent < base * (1 - TIE_REL)):
        return "agent"
    if not math.isfinite(agent) or base < agent * (1 - TIE_REL):
        return schedule
    return "tie"


def _select_rounds(rounds: list[RoundSummary], best: RoundSummary | None) -> dict[str, RoundSummary]:
    """first, a middle one, best and last; a round that fills several roles is named once with all of them."""
    if not rounds:
        return {}
    picks = [("first", rounds[0]), ("middle", rounds[(len(rounds) - 1) // 2])]
    if best is not None:
        picks.append(("best", best))
    picks.append(("last", rounds[-1]))
    by_round: dict[int, list[str]] = {}
    first_of: dict[int, RoundSummary] = {}
    for role, r in picks:
        by_round.setdefault(r.round, []).append(role)
        first_of.setdefault(r.round, r)
    return {"/".join(roles): first_of[n] for n, roles in by_round.items()}


def analyse(logs: CampaignLogs, extra_baselines: Sequence[BaselineResult] = ()) -> Analysis:
    """All numbers of the report for a campaign and the baselines (its own plus `extra_baselines`)."""
    rounds = list(logs.rounds)
    seen, baselines = set(), []
    for b in [*logs.baselines, *extra_baselines]:
        key = (b.schedule, round(b.peak_lr, 12) if math.isfinite(b.peak_lr) else b.path, b.seed)
        if key not in seen:
            seen.add(key)
            baselines.append(b)
    baselines.sort(key=lambda b: (b.schedule, b.peak_lr))
    med = campaign_median(rounds)
    best = best_round(rounds)
    ok_base = [b for b in baselines if b.ok]
    best_b = min(ok_base, key=lambda b: b.final_eval_ppl) if ok_base else None
    near = (
        sorted(
            [b for b in ok_base if b.final_eval_ppl <= best_b.final_eval_ppl * (1 + TIE_REL)],
            key=lambda b: b.final_eval_ppl,
        )
        if best_b
        else []
    )

    # head-to-head: each baseline against the agent's best round in its band, then agent bands with no baseline
    def best_in(band: str) -> tuple[RoundSummary | None, int]:
        inside = [r for r in rounds if r.band == band]
        return best_round(inside), len(inside)

    h2h = []
    for b in baselines:
        agent, n = best_in(b.band)
        if agent is not None:
            winner = _winner(agent.final_eval_ppl, b.final_eval_ppl, b.schedule)
        elif n:  # rounds in the band, none finished
            winner = b.schedule if b.ok else "neither finished"
        else:
            winner = "no agent round"
        h2h.append(HeadToHead(b.band, b, agent, n, winner))
    for band in sorted({r.band for r in rounds} - {b.band for b in baselines}, key=band_sort_key):
        agent, n = best_in(band)
        h2h.append(HeadToHead(band, None, agent, n, "no baseline"))
    h2h.sort(key=lambda h: (band_sort_key(h.band), h.baseline.peak_lr if h.baseline else 0.0))

    best_ppl = min([x.final_eval_ppl for x in rounds if x.ok] + [b.final_eval_ppl for b in ok_base], default=math.nan)
    thr = survival_threshold(best_ppl)
    bands = sorted({r.band for r in rounds} | {b.band for b in baselines}, key=band_sort_key)
    survival = []
    for band in bands:
        rs = [r for r in rounds if r.band == band]
        bs = [b for b in baselines if b.band == band]
        survival.append(
            BandSurvival(
                band=band,
                agent_rounds=tuple(r.round for r in rs),
                agent_survived=sum(r.ok and r.final_eval_ppl < thr for r in rs),
                baseline_runs=len(bs),
                baseline_survived=sum(b.ok and b.final_eval_ppl < thr for b in bs),
            )
        )

    steps = [r.steps_trained() for r in rounds]
    wall = [r.wall_time_s for r in rounds]
    b_steps = [b.update_step if b.update_step is not None else b.raw.get("total_steps") for b in baselines]
    b_wall = [b.wall_time_s for b in baselines]
    return Analysis(
        rounds=rounds,
        baselines=baselines,
        phases=phase_stats(rounds, size=10, outlier_factor=OUTLIER_FACTOR),
        campaign_median=med,
        outlier_threshold=OUTLIER_FACTOR * med,
        outliers=outlier_rounds(rounds, OUTLIER_FACTOR),
        failed=[r.round for r in rounds if not r.ok and r.status != "pruned"],
        pruned=[r.round for r in rounds if r.status == "pruned"],
        best_round=best,
        best_baseline=best_b,
        near_best_baselines=near,
        head_to_head=h2h,
        survival=survival,
        survival_threshold=thr,
        ratio_best=_ratio(best.final_eval_ppl, best_b.final_eval_ppl) if best and best_b else math.nan,
        campaign_steps=sum(s for s in steps if s is not None) if rounds and None not in steps else None,
        campaign_steps_estimated=any(r.total_steps is None for r in rounds),
        campaign_wall_s=sum(w for w in wall if w is not None) if rounds and None not in wall else None,
        sweep_steps=sum(int(s) for s in b_steps) if baselines and None not in b_steps else None,
        sweep_wall_s=sum(w for w in b_wall if w is not None) if baselines and None not in b_wall else None,
        selected_rounds=_select_rounds(rounds, best),
    )


# ------------------------------------------------------------------------------------------- side by side


@dataclass(frozen=True)
class SideBySideRow:
    """One row of the side-by-side comparison: a whole campaign, or every baseline run of one schedule."""

    name: str
    kind: str  # "campaign" | "baselines"
    method: str  # "controller / memory" of a campaign, "fixed <schedule>" of baselines
    runs: int  # rounds of a campaign, runs of a baseline group
    best_ppl: float
    best_at: str  # "round 3" | "cosine 3e-3"; "—" when nothing finished
    best_peak_lr: float
    median_ppl: float  # over runs with a finite ppl
    failed: tuple[str, ...]  # rounds that failed ("round 2") or runs that diverged ("cosine 1e-2")
    steps: int | None  # sum of update_step over the runs (steps reached; rollback repeats not counted)
    steps_estimated: bool  # some run logged no update_step: its planned or estimated steps were counted
    wall_s: float | None  # sum of wall_time_s over the runs that logged it
    wall_logged: int  # runs that logged wall_time_s
    budgets: tuple[int, ...]  # distinct planned steps per run (sorted); empty when not logged
    path: str = ""
    rounds: tuple[RoundSummary, ...] = field(default=(), repr=False)
    baselines: tuple[BaselineResult, ...] = field(default=(), repr=False)

    @property
    def best_so_far(self) -> list[tuple[int, float]]:
        """[(round, lowest finite ppl of this round and every earlier one)], NaN before the first finished
        round (campaign rows; empty for baselines)."""
        out, best = [], math.nan
        for r in self.rounds:
            if r.ok and (math.isnan(best) or r.final_eval_ppl < best):
                best = r.final_eval_ppl
            out.append((r.round, best))
        return out


@dataclass(frozen=True)
class SideBySide:
    """Campaigns and baseline schedules side by side, with whether they ran on the same per-run budget."""

    rows: list[SideBySideRow]
    same_budget: bool
    budget: int | None  # the common planned steps per run when same_budget
    budget_note: str

    def row(self, name: str) -> SideBySideRow | None:
        return next((r for r in self.rows if r.name == name), None)

    @property
    def campaigns(self) -> list[SideBySideRow]:
        return [r for r in self.rows if r.kind == "campaign"]

    @property
    def baseline_groups(self) -> list[SideBySideRow]:
        return [r for r in self.rows if r.kind == "baselines"]


def _method(logs: CampaignLogs) -> str:
    """The "controller / memory" of a campaign: campaign.json `settings`, else the final_results records."""
    settings = logs.settings.get("settings", logs.settings) if isinstance(logs.settings, dict) else {}
    settings = settings if isinstance(settings, dict) else {}

    def pick(key: str) -> str:
        v = settings.get(key)
        if isinstance(v, str) and v:
            return v
        seen = sorted({str(r.raw.get(key)) for r in logs.rounds if r.raw.get(key)})
        return ", ".join(seen) if seen else "—"

    return f"{pick('controller')} / {pick('memory')}"


def _round_budget(r: RoundSummary) -> int | None:
    """Planned updates of a round: `total_steps` (top level or in `settings`), else `update_step` of a round that
    finished (a failed round stopped early, so its update_step says nothing about the budget)."""
    settings = r.raw.get("settings") if isinstance(r.raw.get("settings"), dict) else {}
    for v in (r.raw.get("total_steps"), settings.get("total_steps")):
        if v is not None and math.isfinite(as_float(v)):
            return int(as_float(v))
    return int(as_float(r.raw["update_step"])) if r.ok and math.isfinite(as_float(r.raw.get("update_step"))) else None


def _baseline_budget(b: BaselineResult) -> int | None:
    v = as_float(b.raw.get("total_steps"))
    if math.isfinite(v):
        return int(v)
    return b.update_step if b.ok else None


def _wall(values: Sequence[float | None]) -> tuple[float | None, int]:
    logged = [v for v in values if v is not None and math.isfinite(v)]
    return (sum(logged) if logged else None), len(logged)


def campaign_row(logs: CampaignLogs, name: str) -> SideBySideRow:
    """The side-by-side row of one campaign."""
    rounds = list(logs.rounds)
    best = best_round(rounds)
    steps, estimated = 0, False
    for r in rounds:
        reached = as_float(r.raw.get("update_step"))
        if math.isfinite(reached):
            steps += int(reached)
        else:  # published logs: no update_step; count the planned or estimated steps and say so
            estimated = True
            steps += (r.steps_trained() or 0) - r.steps_redone()
    wall, n_wall = _wall([r.wall_time_s for r in rounds])
    return SideBySideRow(
        name=name,
        kind="campaign",
        method=_method(logs),
        runs=len(rounds),
        best_ppl=best.final_eval_ppl if best else math.nan,
        best_at=f"round {best.round}" if best else "—",
        best_peak_lr=best.peak_lr if best else math.nan,
        median_ppl=campaign_median(rounds),
        failed=tuple(f"round {r.round}" for r in rounds if not r.ok),
        steps=steps if rounds else None,
        steps_estimated=estimated,
        wall_s=wall,
        wall_logged=n_wall,
        budgets=tuple(sorted({b for b in map(_round_budget, rounds) if b is not None})),
        path=logs.path,
        rounds=tuple(rounds),
    )


def _origin(b: BaselineResult) -> str:
    """The sweep a baseline run came from: its folder's name (the campaign's name for CAMPAIGN/baselines/)."""
    if not b.path:
        return ""
    folder = Path(b.path).resolve().parent
    return folder.parent.name if folder.name == "baselines" else folder.name


def baseline_rows(baselines: Sequence[BaselineResult]) -> list[SideBySideRow]:
    """One side-by-side row per schedule and sweep folder ("cosine sweep", or "cosine sweep (FOLDER)" when runs
    of one schedule come from several sweeps, which may differ in budget): cosine first, then by name."""
    groups: dict[tuple[str, str], list[BaselineResult]] = {}
    for b in baselines:
        groups.setdefault((b.schedule, _origin(b)), []).append(b)
    rows = []
    for sched, origin in sorted(groups, key=lambda k: (k[0] != "cosine", k[0])):  # stable: sweeps in given order
        bs = sorted(groups[sched, origin], key=lambda b: b.peak_lr if math.isfinite(b.peak_lr) else math.inf)
        several = sum(k[0] == sched for k in groups) > 1
        name = f"{sched} sweep" + (f" ({origin or 'no folder'})" if several else "")
        ok = [b for b in bs if b.ok]
        best = min(ok, key=lambda b: b.final_eval_ppl) if ok else None
        fin = [b.final_eval_ppl for b in bs if math.isfinite(b.final_eval_ppl)]
        steps, estimated = 0, False
        for b in bs:
            if b.update_step is not None:
                steps += b.update_step
            else:
                estimated = True
                steps += _baseline_budget(b) or 0
        wall, n_wall = _wall([b.wall_time_s for b in bs])
        rows.append(
            SideBySideRow(
                name=name,
                kind="baselines",
                method=f"fixed {sched}",
                runs=len(bs),
                best_ppl=best.final_eval_ppl if best else math.nan,
                best_at=best.label if best else "—",
                best_peak_lr=best.peak_lr if best else math.nan,
                median_ppl=statistics.median(fin) if fin else math.nan,
                failed=tuple(b.label for b in bs if not b.ok),
                steps=steps,
                steps_estimated=estimated,
                wall_s=wall,
                wall_logged=n_wall,
                budgets=tuple(sorted({x for x in map(_baseline_budget, bs) if x is not None})),
                path=str(Path(bs[0].path).parent) if bs[0].path else "",
                baselines=tuple(bs),
            )
        )
    return rows


def _budget_verdict(rows: Sequence[SideBySideRow]) -> tuple[bool, int | None, str]:
    """Same per-run budget across rows? Rows without a single finished run have nothing to compare and are only
    named."""
    empty = [r.name for r in rows if not r.runs]
    rows = [r for r in rows if r.runs]
    tail = f" ({', '.join(empty)}: no finished runs yet.)" if empty else ""
    if not rows:
        return False, None, "Nothing to compare: no finished rounds or runs." + tail
    unknown = [r.name for r in rows if not r.budgets]
    all_budgets = sorted({b for r in rows for b in r.budgets})
    if not unknown and len(all_budgets) == 1:
        n = all_budgets[0]
        return True, n, f"Same budget: every round and run in this table was planned for {n:,} training steps." + tail
    per_row = "; ".join(f"{r.name} {', '.join(f'{b:,}' for b in r.budgets) or 'not logged'}" for r in rows)
    if len(all_budgets) > 1:
        head = "Budget mismatch: the rows were not planned for the same number of steps per run"
    else:
        head = f"Same budget not established: planned steps per run not logged for {', '.join(unknown)}"
    return False, None, f"{head} ({per_row}); compare with care." + tail


def side_by_side(campaigns: Sequence[tuple[str, CampaignLogs]], baselines: Sequence[BaselineResult]) -> SideBySide:
    """Each campaign (in the given order: the main one first) and each baseline schedule group, with the verdict
    on the per-run budget (planned steps: `total_steps`, else the `update_step` of finished runs)."""
    rows = [campaign_row(logs, name) for name, logs in campaigns] + baseline_rows(baselines)
    same, budget, note = _budget_verdict(rows)
    return SideBySide(rows, same, budget, note)


def side_by_side_table(s: SideBySide) -> Table:
    rows = []
    for r in s.rows:
        failed = str(len(r.failed))
        if 0 < len(r.failed) <= 3:
            failed += f" ({', '.join(r.failed)})"
        wall = fmt_duration(r.wall_s) if r.wall_s is not None else "not logged"
        if r.wall_s is not None and r.wall_logged < r.runs:
            wall += f" ({r.wall_logged} of {r.runs} logged)"
        rows.append(
            [
                r.name,
                r.method,
                f"{r.runs} {'round' if r.kind == 'campaign' else 'run'}{'s' * (r.runs != 1)}",
                fmt_ppl(r.best_ppl),
                r.best_at,
                fmt_ppl(r.median_ppl),
                failed,
                fmt_lr(r.best_peak_lr),
                ", ".join(f"{b:,}" for b in r.budgets) or "not logged",
                "—" if r.steps is None else f"{'≈' if r.steps_estimated else ''}{r.steps:,}",
                wall,
            ]
        )
    note = (
        s.budget_note + " Training steps = sum of update_step over the rounds/runs (steps reached; steps redone "
        "after rollbacks not counted; ≈ where some run did not log it). Median over runs that finished with a "
        "perplexity; failed = rounds that failed / baseline runs that diverged."
    )
    return Table(
        "Side by side: campaigns and baseline sweeps",
        [
            "name",
            "controller / memory",
            "rounds / runs",
            "best ppl",
            "best at",
            "median ppl",
            "failed / diverged",
            "peak LR of best",
            "steps per run",
            "training steps",
            "wall time",
        ],
        rows,
        note,
        align="llrrlrlrrrr",
    )


# ------------------------------------------------------------------------------------------------ tables


def rounds_table(a: Analysis) -> Table:
    rows = []
    for r in a.rounds:
        flags = []
        if r.round in a.outliers:
            flags.append(f"catastrophic (> {a.outlier_threshold:.1f})")
        if not r.ok:
            flags.append("failed")
        if a.best_round is not None and r.round == a.best_round.round:
            flags.append("best")
        if r.crash_count:
            flags.append(f"{r.crash_count} rollback{'s' * (r.crash_count > 1)}")
        if r.mostly_fallback:
            fb, n = r.fallback_counts
            flags.append(f"mostly fallback ({fb}/{n} answers invalid: LR kept)")
        rows.append(
            [str(r.round), fmt_ppl(r.final_eval_ppl), fmt_lr(r.peak_lr), r.band, fmt_lr(r.min_lr), ", ".join(flags)]
        )
    return Table(
        "Final perplexity per round", ["round", "ppl", "peak LR", "peak band", "min LR", "note"], rows, align="rrrlrl"
    )


def phase_table(a: Analysis) -> Table:
    rows = []
    for p in a.phases:
        rows.append(
            [
                p.label,
                fmt_ppl(p.mean),
                fmt_ppl(p.median),
                fmt_ppl(p.mean_without_outliers) if p.outliers else "",
                "; ".join(
                    (
                        [
                            ", ".join(
                                f"round {n} ({fmt_ppl(dict(zip(p.rounds, p.ppls, strict=True))[n])})"
                                for n in p.outliers
                            )
                        ]
                        if p.outliers
                        else []
                    )
                    + (["failed: round " + ", ".join(map(str, p.failed))] if p.failed else [])
                ),
            ]
        )
    note = (
        f"Catastrophic = ppl > {OUTLIER_FACTOR:g} x the campaign median ({fmt_ppl(a.campaign_median)}), "
        f"i.e. > {fmt_ppl(a.outlier_threshold)}. Such rounds stay in the mean and are named; the mean without "
        "them is shown beside it."
    )
    return Table(
        "Cross-round learning: ppl per phase of 10 rounds",
        ["phase", "mean ppl", "median ppl", "mean w/o catastrophic", "catastrophic / failed rounds"],
        rows,
        note,
        align="lrrrl",
    )


def head_to_head_table(a: Analysis) -> Table:
    rows = []
    for h in a.head_to_head:
        b, r = h.baseline, h.agent
        ratio = _ratio(r.final_eval_ppl, b.final_eval_ppl) if b and r and b.ok and r.ok else math.nan
        rows.append(
            [
                h.band,
                b.label if b else "—",
                fmt_ppl(b.final_eval_ppl) if b else "—",
                f"round {r.round} (peak {fmt_lr(r.peak_lr)})"
                if r
                else f"{h.agent_rounds_in_band} rounds, none finished"
                if h.agent_rounds_in_band
                else "not explored",
                fmt_ppl(r.final_eval_ppl) if r else "—",
                f"{ratio:.3f}" if math.isfinite(ratio) else "—",
                h.winner,
            ]
        )
    return Table(
        "Head-to-head at the same peak LR: baseline vs the agent's best round in that peak band",
        ["peak band", "baseline", "baseline ppl", "agent's best round", "agent ppl", "agent/baseline", "winner"],
        rows,
        f"Peak bands are half-decades with edges 1 and 3 per decade; a tie is within {TIE_REL:.1%} ppl.",
        align="llrlrrl",
    )


def survival_table(a: Analysis) -> Table:
    rows = []
    for s in a.survival:
        rows.append(
            [
                s.band,
                f"{s.agent_survived}/{len(s.agent_rounds)}" if s.agent_rounds else "—",
                fmt_pct(s.agent_rate),
                f"{s.baseline_survived}/{s.baseline_runs}" if s.baseline_runs else "—",
                fmt_pct(s.baseline_rate),
            ]
        )
    return Table(
        "Survival per peak band",
        ["peak band", "agent rounds survived", "agent rate", "baseline runs survived", "baseline rate"],
        rows,
        f"Survived = finished without failure and a final eval loss below {SURVIVAL_LOSS_FACTOR:g} x the best "
        f"run's loss in the report (ppl < best ppl ^ {SURVIVAL_LOSS_FACTOR:g} = {fmt_ppl(a.survival_threshold)}).",
    )


def summary_table(a: Analysis) -> Table:
    br, bb = a.best_round, a.best_baseline
    near = [b for b in a.near_best_baselines if b is not bb]
    rows = [
        [
            "rounds",
            f"{len(a.rounds)} ({len(a.failed)} failed, "
            + (f"{len(a.pruned)} pruned, " if a.pruned else "")
            + f"{len(a.outliers)} catastrophic)",
        ],
        [
            "best agent round",
            f"round {br.round}: ppl {fmt_ppl(br.final_eval_ppl)} at peak {fmt_lr(br.peak_lr)}" if br else "—",
        ],
        [
            "best baseline",
            (
                f"{bb.label}: ppl {fmt_ppl(bb.final_eval_ppl)}"
                + (
                    f" (tied within {TIE_REL:.1%}: "
                    + ", ".join(f"{b.label} {b.final_eval_ppl:.3f}" for b in near)
                    + ")"
                    if near
                    else ""
                )
            )
            if bb
            else "—",
        ],
        ["best agent / best baseline", f"{a.ratio_best:.4f}" if math.isfinite(a.ratio_best) else "—"],
        ["campaign steps", _steps_text(a)],
        ["campaign wall time", fmt_duration(a.campaign_wall_s)],
        ["sweep runs / steps", f"{len(a.baselines)} / " + ("—" if a.sweep_steps is None else f"{a.sweep_steps:,}")],
        ["sweep wall time", fmt_duration(a.sweep_wall_s)],
    ]
    return Table("Summary", ["", "value"], rows, align="ll")


def _steps_text(a: Analysis) -> str:
    if a.campaign_steps is None:
        return "not logged"
    text = f"{'≈' if a.campaign_steps_estimated else ''}{a.campaign_steps:,}"
    redone = sum(r.steps_redone() for r in a.rounds)
    notes = []
    if a.campaign_steps_estimated:
        notes.append("total steps not logged: each round counted to its last decision + decision_every")
    if redone:
        notes.append(f"includes {redone:,} steps redone after {sum(len(r.rollbacks) for r in a.rounds)} rollbacks")
    return text + (f" ({'; '.join(notes)})" if notes else "")


__all__ = [
    "Analysis",
    "BandSurvival",
    "HeadToHead",
    "SideBySide",
    "SideBySideRow",
    "Table",
    "analyse",
    "baseline_rows",
    "campaign_row",
    "fmt_ppl",
    "head_to_head_table",
    "phase_table",
    "rounds_table",
    "side_by_side",
    "side_by_side_table",
    "summary_table",
    "survival_table",
]
