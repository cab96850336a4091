"""What the campaign's own rounds show, as numbers and compact text tables for the Memory agent (no torch).

    python -c "from lrpilot.campaign_logs import load_campaign; from lrpilot.memory.evidence import \
build_evidence; print(build_evidence(load_campaign('runs/published')).render())"

Three pieces, all computed from the campaign's logs (nothing from outside the campaign):
  (a) history: the last `max_cross_run_history` rounds plus the best round ever -- LR at 10%, 20%, ...,
      100% of the steps, peak and min LR, crashes, final ppl;
  (b) the plateau rule: when the last 10 rounds' peak LRs lie within 2x of each other and their ppl within
      +-10% of their median, more rounds there teach little: explore an order of magnitude away;
  (c) the evidence table: per peak-LR band (lrpilot.campaign_logs.peak_band), how many rounds, best and
      median ppl, failures, and which bands of a sensible range were never tried. The table exists so that
      one bad round cannot close a region: in the published study round 28 (peak 2.5e-3, ppl 32.85) was
      never repeated, and the band above it (3e-3..1e-2) was never tried.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from lrpilot.campaign_logs import (
    CampaignLogs,
    RoundSummary,
    bands_between,
    best_round,
    campaign_total_steps,
    fmt_lr,
    peak_band,
    peak_band_range,
)
from lrpilot.lr import CATASTROPHIC_FACTOR, is_positive_finite

MILESTONES = tuple(i / 10 for i in range(1, 11))
#: peak LRs worth considering at all: the evidence table names the bands in here that no round tried
SENSIBLE_RANGE = (1e-4, 3e-2)
#: a round whose ppl is above this factor x the campaign median counts as failed (diverged), like a crash
DIVERGED_FACTOR = CATASTROPHIC_FACTOR


def _ppl(x: float) -> str:
    """2 decimals; a huge finite ppl (the trainer logs up to ~1e307) in exponent form, not 300 digits."""
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.2f}" if abs(x) < 1e9 else f"{x:.3g}"


def failed(r: RoundSummary, median_ppl: float) -> bool:
    """No usable result, or a result so bad the run diverged (ppl > DIVERGED_FACTOR x the campaign median)."""
    if not r.ok:
        return True
    return math.isfinite(median_ppl) and r.final_eval_ppl > DIVERGED_FACTOR * median_ppl


# -------------------------------------------------------------------------------------- (a) history


@dataclass(frozen=True)
class RoundEvidence:
    """One round as the Memory agent sees it."""

    round: int
    peak_lr: float
    min_lr: float
    crashes: int
    final_ppl: float
    ok: bool
    band: str
    #: LR in force at 10%, 20%, ..., 100% of the round's steps
    lr_at_milestones: tuple[float, ...]
    best: bool = False


def round_evidence(r: RoundSummary, total_steps: int | None, best_round: int | None = None) -> RoundEvidence:
    total = r.total_steps or total_steps
    lrs = tuple(r.lr_at(min(int(round(f * total)), total - 1)) for f in MILESTONES) if total else ()
    return RoundEvidence(
        round=r.round,
        peak_lr=r.peak_lr,
        min_lr=r.min_lr,
        crashes=r.crash_count,
        final_ppl=r.final_eval_ppl,
        ok=r.ok,
        band=r.band,
        lr_at_milestones=lrs,
        best=r.round == best_round,
    )


def history(logs: CampaignLogs | Sequence[RoundSummary], last: int = 10) -> list[RoundEvidence]:
    """The last `last` rounds plus the best round ever (if older), oldest first."""
    rounds = list(logs.rounds if isinstance(logs, CampaignLogs) else logs)
    return _history(rounds, last, best_round(rounds))


def _history(rounds: list[RoundSummary], last: int, best: RoundSummary | None) -> list[RoundEvidence]:
    total = campaign_total_steps(rounds)
    chosen = rounds[-last:] if last > 0 else []
    if best is not None and best not in chosen:
        chosen = [best, *chosen]
    return [round_evidence(r, total, best.round if best else None) for r in chosen]


def render_history(rows: Sequence[RoundEvidence]) -> str:
    if not rows:
        return "no rounds yet"
    head = "round | peak LR | min LR | LR at 10%,20%,...,100% of steps | crashes | final ppl"
    lines = [head]
    for e in rows:
        traj = " ".join(fmt_lr(x) for x in e.lr_at_milestones) or "n/a"
        mark = " (best)" if e.best else ""
        ppl = _ppl(e.final_ppl) if e.ok else f"failed ({_ppl(e.final_ppl)})"
        lines.append(f"{e.round}{mark} | {fmt_lr(e.peak_lr)} | {fmt_lr(e.min_lr)} | {traj} | {e.crashes} | {ppl}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- (b) plateau rule


@dataclass(frozen=True)
class PlateauResult:
    """Outcome of the plateau rule over the last `window` rounds; `sentence` says it in one line."""

    fired: bool
    rounds: tuple[int, ...]
    peak_ratio: float  # max / min peak LR in the window
    ppl_median: float
    ppl_max_dev: float  # largest |ppl / median - 1| in the window
    #: peak LRs an order of magnitude away (above, below) from the window's geometric-mean peak, inside the
    #: sensible range; empty when the rule did not fire
    candidates: tuple[float, ...] = ()
    sentence: str = ""


def plateau_rule(
    rounds: Sequence[RoundSummary],
    window: int = 10,
    max_peak_ratio: float = 2.0,
    ppl_tol: float = 0.10,
    sensible: tuple[float, float] = SENSIBLE_RANGE,
) -> PlateauResult:
    """Fires when the last `window` rounds all finished, their peak LRs are within `max_peak_ratio` of each
    other (max/min <= ratio) and each ppl is within +-ppl_tol of the window's median ppl."""
    win = list(rounds)[-window:]
    ids = tuple(r.round for r in win)
    if len(win) < window:
        return PlateauResult(
            False, ids, math.nan, math.nan, math.nan, sentence=f"Plateau rule: needs {window} rounds, have {len(win)}."
        )
    bad = [r.round for r in win if not (r.ok and is_positive_finite(r.peak_lr))]
    if bad:
        return PlateauResult(
            False,
            ids,
            math.nan,
            math.nan,
            math.nan,
            sentence=f"Plateau rule: not a plateau, round(s) {bad} failed in the last {window}.",
        )
    peaks = [r.peak_lr for r in win]
    ppls = [r.final_eval_ppl for r in win]
    ratio = max(peaks) / min(peaks)
    med = statistics.median(ppls)
    dev = max(abs(p / med - 1) for p in ppls) if med > 0 else math.inf  # ppl <= 0 is garbage: no plateau
    span = f"rounds {ids[0]}-{ids[-1]}"
    fired = ratio <= max_peak_ratio * (1 + 1e-9) and dev <= ppl_tol + 1e-12
    if not fired:
        why = []
        if ratio > max_peak_ratio * (1 + 1e-9):
            why.append(f"peak LRs span {ratio:.2f}x (> {max_peak_ratio:g}x)")
        if dev > ppl_tol + 1e-12:
            why.append(f"ppl varies up to {100 * dev:.1f}% from the median {_ppl(med)} (> {100 * ppl_tol:g}%)")
        return PlateauResult(False, ids, ratio, med, dev, sentence=f"No plateau over {span}: {'; '.join(why)}.")
    center = math.exp(sum(math.log(p) for p in peaks) / len(peaks))
    lo, hi = sensible
    cands = tuple(c for c in (center * 10, center / 10) if lo * (1 - 1e-9) <= c <= hi * (1 + 1e-9))
    tried = [r.band for r in rounds]

    def _where(c: float) -> str:
        n = tried.count(peak_band(c))
        return f"~{fmt_lr(c)} (band {peak_band(c)}, " + (f"tried {n}x)" if n else "never tried)")

    where = " or ".join(_where(c) for c in cands) or "none inside the sensible range"
    sentence = (
        f"Plateau over {span}: peak LRs {fmt_lr(min(peaks))}..{fmt_lr(max(peaks))} (within {max_peak_ratio:g}x), "
        f"ppl {_ppl(min(ppls))}..{_ppl(max(ppls))} (within {100 * ppl_tol:g}% of {_ppl(med)}). More rounds there teach "
        f"little: explore a peak LR an order of magnitude away, {where}."
    )
    return PlateauResult(True, ids, ratio, med, dev, cands, sentence)


# ------------------------------------------------------------------------------ (c) evidence table


@dataclass(frozen=True)
class BandRow:
    """All rounds whose peak LR fell in one band."""

    band: str
    lo: float
    hi: float
    rounds: tuple[int, ...]
    best_ppl: float
    median_ppl: float
    failures: int  # failed or diverged rounds
    crashed: int  # rounds with at least one crash (rollback)
    best_round: int | None

    @property
    def n(self) -> int:
        return len(self.rounds)


@dataclass(frozen=True)
class EvidenceTable:
    """Peak-LR bands tried (lowest first) and the bands of `sensible` that no round tried."""

    rows: tuple[BandRow, ...]
    untried: tuple[str, ...]
    sensible: tuple[float, float] = SENSIBLE_RANGE
    unknown_peak: tuple[int, ...] = ()  # rounds without a usable peak LR

    def row(self, band: str) -> BandRow | None:
        return next((r for r in self.rows if r.band == band), None)


def evidence_table(rounds: Sequence[RoundSummary], sensible: tuple[float, float] = SENSIBLE_RANGE) -> EvidenceTable:
    rounds = list(rounds)
    fin = [r.final_eval_ppl for r in rounds if r.ok]
    median_all = statistics.median(fin) if fin else math.nan
    groups: dict[str, list[RoundSummary]] = {}
    unknown = []
    for r in rounds:
        b = r.band
        if b == "n/a":
            unknown.append(r.round)
            continue
        groups.setdefault(b, []).append(r)
    rows = []
    for b, rs in groups.items():
        lo, hi = peak_band_range(rs[0].peak_lr)
        good = [r for r in rs if not failed(r, median_all)]
        vals = [r.final_eval_ppl for r in good]
        best = best_round(good)  # every round in `good` is ok
        rows.append(
            BandRow(
                band=b,
                lo=lo,
                hi=hi,
                rounds=tuple(r.round for r in rs),
                best_ppl=best.final_eval_ppl if best else math.nan,
                median_ppl=statistics.median(vals) if vals else math.nan,
                failures=len(rs) - len(good),
                crashed=sum(1 for r in rs if r.crash_count > 0),
                best_round=best.round if best else None,
            )
        )
    rows.sort(key=lambda x: x.lo)
    lo, hi = sensible
    in_range = [name for name, _, _ in bands_between(lo, hi * (1 - 1e-6))]
    untried = tuple(b for b in in_range if b not in groups)
    return EvidenceTable(tuple(rows), untried, sensible, tuple(unknown))


def _rounds_list(ids: Sequence[int]) -> str:
    """1,2,3,5,7,8,9 -> "1-3,5,7-9"."""
    out, ids = [], sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def render_table(t: EvidenceTable) -> str:
    lines = ["peak band | rounds (n) | best ppl (round) | median ppl | failed | crashed"]
    for r in t.rows:
        best = f"{_ppl(r.best_ppl)} (r{r.best_round})" if r.best_round is not None else "n/a"
        note = "  <- 1 round only: not conclusive" if r.n == 1 else ""
        lines.append(
            f"{r.band} | {_rounds_list(r.rounds)} ({r.n}) | {best} | {_ppl(r.median_ppl)} | "
            f"{r.failures} | {r.crashed}{note}"
        )
    lo, hi = t.sensible
    lines.append(f"never tried in {fmt_lr(lo)}..{fmt_lr(hi)}: " + (", ".join(t.untried) if t.untried else "none"))
    if t.unknown_peak:
        lines.append(f"rounds without a peak LR: {_rounds_list(t.unknown_peak)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- together


@dataclass(frozen=True)
class Evidence:
    """(a) + (b) + (c) for one Memory prompt."""

    n_rounds: int
    history: tuple[RoundEvidence, ...]
    plateau: PlateauResult
    table: EvidenceTable
    best_round: int | None
    best_ppl: float
    extra: dict = field(default_factory=dict)

    def render(self) -> str:
        best = f"round {self.best_round}, ppl {_ppl(self.best_ppl)}" if self.best_round is not None else "none yet"
        return "\n".join(
            [
                f"Rounds finished: {self.n_rounds}. Best: {best}.",
                "",
                "(a) Recent rounds and the best round",
                render_history(self.history),
                "",
                "(b) " + self.plateau.sentence,
                "",
                f"(c) Evidence by peak-LR band (failed = no result or ppl > {DIVERGED_FACTOR:g}x the campaign median)",
                render_table(self.table),
            ]
        )


def build_evidence(
    logs: CampaignLogs | Sequence[RoundSummary],
    max_cross_run_history: int = 10,
    window: int = 10,
    sensible: tuple[float, float] = SENSIBLE_RANGE,
) -> Evidence:
    rounds = list(logs.rounds if isinstance(logs, CampaignLogs) else logs)
    best = best_round(rounds)
    return Evidence(
        n_rounds=len(rounds),
        history=tuple(_history(rounds, max_cross_run_history, best)),
        plateau=plateau_rule(rounds, window=window, sensible=sensible),
        table=evidence_table(rounds, sensible),
        best_round=best.round if best else None,
        best_ppl=best.final_eval_ppl if best else math.nan,
    )
