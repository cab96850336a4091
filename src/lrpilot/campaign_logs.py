"""Torch-free reader of a campaign directory: rounds joined with their decisions and rollbacks, and baselines.

    python -c "from lrpilot.campaign_logs import load_campaign; print(load_campaign('runs/demo').rounds[-1])"

The layout is the one in docs/architecture.md (final_results.jsonl, decisions.jsonl, rollbacks.jsonl,
llm_calls.jsonl, briefs.jsonl, baselines/*.json). Rounds come from final_results.jsonl; each is joined to its
decisions and rollbacks by `run_start_iso` (the identity of one run attempt, as in the published logs) and by
`round` where both records carry it. Corrupt lines are skipped with a warning (`lrpilot.logs.iter_jsonl`).
The report and the Memory agent both read campaigns through this module, so it imports neither torch nor
matplotlib. The published study's three-file layout is turned into this one by `lrpilot.importer`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrpilot.errors import LrpilotError
from lrpilot.logs import as_float, iter_jsonl
from lrpilot.lr import (  # noqa: F401 - fmt_lr and the peak bands are re-exported: their home is lrpilot.lr
    BAND_EDGES,
    CATASTROPHIC_FACTOR,
    band_sort_key,
    bands_between,
    fmt_lr,
    is_positive_finite,
    peak_band,
    peak_band_range,
    warmup_lr,
)
from lrpilot.records import Kind


class CampaignLogsError(LrpilotError, ValueError):
    """A campaign or baseline path that cannot be read (the message names the path and the fix)."""


# ------------------------------------------------------------------------------------------- records


def _int(v: Any, default: int = 0) -> int:
    if isinstance(v, bool):
        return default
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return int(f) if math.isfinite(f) else default


def _opt_int(v: Any) -> int | None:
    return None if v is None else _int(v, default=0) if _finite(v) else None


def _finite(v: Any) -> bool:
    return math.isfinite(as_float(v))


def _parse_iso(s: Any) -> _dt.datetime | None:
    if not isinstance(s, str):
        return None
    try:
        return _dt.datetime.fromisoformat(s)
    except ValueError:
        return None


def decision_applied(rec: dict[str, Any]) -> bool:
    """False for a decision the trainer never applied: lrpilot logs those with `effective_step: null` (a crash
    or the end of the run came first). The published logs have no `effective_step`: all count as applied."""
    return not ("effective_step" in rec and rec["effective_step"] is None)


def decision_step(rec: dict[str, Any]) -> int:
    """Step a decision took effect at: `effective_step` when logged, else the decision `step`."""
    eff = rec.get("effective_step")
    if eff is not None and _finite(eff):
        return _int(eff)
    return _int(rec.get("step"))


def _realized_events(decisions: Sequence[dict[str, Any]], rollbacks: Sequence[dict[str, Any]]) -> list[tuple]:
    """Decisions and rollbacks merged in time order as ("d", rec) / ("r", rec). Rollbacks are placed by their
    timestamp; without timestamps they cannot be placed and are left out."""
    events: list[tuple[str, int, dict[str, Any]]] = [("d", i, r) for i, r in enumerate(decisions)]
    if rollbacks and all(_parse_iso(r.get("timestamp")) for r in rollbacks):
        dec_times = [_parse_iso(r.get("timestamp")) for r in decisions]
        if all(dec_times):
            events += [("r", i, r) for i, r in enumerate(rollbacks)]
            # stable: ties keep decisions before rollbacks, and each log keeps its own order
            events.sort(key=lambda e: (_parse_iso(e[2].get("timestamp")), e[0] == "r"))
    return [(kind, rec) for kind, _, rec in events]


class _FallbackCounts:
    """How many of a run's controller answers fell back (shared by a round and a baseline run)."""

    decisions: list[dict[str, Any]]
    raw: dict[str, Any]

    @property
    def fallback_counts(self) -> tuple[int, int]:
        """(answers that fell back, controller answers): decision-log kinds fallback and decision + fallback
        (published logs have no kind: (0, 0))."""
        kinds = [d.get("kind") for d in self.decisions]
        return kinds.count(Kind.FALLBACK), kinds.count(Kind.FALLBACK) + kinds.count(Kind.DECISION)

    @property
    def mostly_fallback(self) -> bool:
        """More than half of the controller's answers fell back (final_results `mostly_fallback`, or counted
        from the decisions for logs without it): the round shows the fallback path, not the agent."""
        fb, n = self.fallback_counts
        return bool(self.raw.get("mostly_fallback")) or (n > 0 and 2 * fb > n)


@dataclass(frozen=True)
class RoundSummary(_FallbackCounts):
    """One finished round of a campaign: its final result joined with its decisions and rollbacks."""

    round: int
    run_start_iso: str
    final_eval_ppl: float
    final_eval_loss: float
    peak_lr: float
    min_lr: float
    crash_count: int
    total_decisions: int
    status: str  # "ok" | "failed" | "pruned" (stopped early by `campaign --prune`: not ok, not failed)
    controller: str  # "" if unknown
    wall_time_s: float | None
    init_lr: float
    warmup_steps: int
    decision_every: int
    decisions: tuple[dict[str, Any], ...] = field(default=(), hash=False, repr=False)
    rollbacks: tuple[dict[str, Any], ...] = field(default=(), hash=False, repr=False)
    raw: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)
    #: planned updates of the run (final_results `total_steps`, `settings.total_steps` or `update_step`), None
    #: when not logged
    total_steps: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and math.isfinite(self.final_eval_ppl)

    @property
    def band(self) -> str:
        return peak_band(self.peak_lr)

    def _path(self, include_rollbacks: bool) -> list[tuple[int, float, dict[str, Any] | None]]:
        """(step, lr, decision record or None) of the path the final model was trained on: a decision at
        step s supersedes every earlier point at a step >= s (the run came back there after a rollback); a
        rollback to step r drops the points after r and sets the guard's LR at r."""
        pts: list[tuple[int, float, dict[str, Any] | None]] = [(self.warmup_steps, self.init_lr, None)]
        events = (
            _realized_events(self.decisions, self.rollbacks)
            if include_rollbacks
            else [("d", r) for r in self.decisions]
        )
        for kind, rec in events:
            if kind == "d":
                step, lr = decision_step(rec), as_float(rec.get("new_lr"))
                if not math.isfinite(lr) or not decision_applied(rec):
                    continue
                pts = [p for p in pts if p[0] < step]
                pts.append((step, lr, rec))
            else:
                if not _finite(rec.get("rolled_back_to_step")):
                    continue  # where it resumed is unknown: the next decision still takes over
                step, lr = _int(rec.get("rolled_back_to_step")), as_float(rec.get("new_lr"))
                pts = [p for p in pts if p[0] <= step]
                if math.isfinite(lr):
                    pts = [p for p in pts if p[0] < step]
                    pts.append((step, lr, None))
        return pts

    def lr_trajectory(self, include_rollbacks: bool = True) -> list[tuple[int, float]]:
        """[(step, lr), ...] from the decisions (`effective_step` when logged, else `step`, and `new_lr`),
        starting with (warmup_steps, init_lr): the LR set at `step` holds until the next point. Decisions
        never applied, and those superseded by a rollback, are dropped, so this is the path the final model
        saw; with include_rollbacks the guard's halved LR at the rollback step is a point too. A decision's
        `plan` (per-step knots) is not expanded: its headline `new_lr` stands for it."""
        return [(s, lr) for s, lr, _ in self._path(include_rollbacks)]

    def lr_at(self, step: int) -> float:
        """LR used for update number `step` (0-based): the warmup ramp init_lr * (step + 1) / warmup_steps
        before the first trajectory point, then the last point at or before `step`."""
        traj = self.lr_trajectory()
        if step < traj[0][0]:
            if step < self.warmup_steps and self.warmup_steps > 0:
                return warmup_lr(max(step, 0), self.init_lr, self.warmup_steps)
            return traj[0][1]
        lr = traj[0][1]
        for s, v in traj:
            if s > step:
                break
            lr = v
        return lr

    def loss_trajectory(self) -> list[tuple[int, float]]:
        """[(step, loss), ...] from the decisions on the realized path (the training loss each decision saw)."""
        out = []
        for _, _, rec in self._path(include_rollbacks=True):
            if rec is not None and _finite(rec.get("loss")):
                out.append((_int(rec.get("step")), as_float(rec.get("loss"))))
        return out

    def steps_trained(self) -> int | None:
        """Updates the round actually ran: the steps it reached (`update_step` when logged, else total_steps)
        plus the steps redone after rollbacks. When neither is logged (the published logs) the steps reached
        are estimated as the last decision step + decision_every."""
        total = _opt_int(self.raw.get("update_step")) if "update_step" in self.raw else self.total_steps
        if total is None:
            steps = [_int(d.get("step")) for d in self.decisions]
            if not steps:
                return None
            total = max(steps) + self.decision_every
        return total + self.steps_redone()

    def steps_redone(self) -> int:
        """Updates run twice because of rollbacks: crash_step - rolled_back_to_step summed over rollbacks."""
        return sum(max(_int(r.get("crash_step")) - _int(r.get("rolled_back_to_step")), 0) for r in self.rollbacks)

    def range_tests(self) -> list[RangeTest]:
        """The LR range tests of this round (a decision record's `probe.sweep`, docs/architecture.md), oldest
        first; a curve whose numbers are unreadable or with fewer than 2 points is left out."""
        out = []
        for rec in self.decisions:
            probe, meta = rec.get("probe"), rec.get("meta")
            sweep = probe.get("sweep") if isinstance(probe, dict) else None
            if not isinstance(sweep, list) or not sweep or not isinstance(sweep[0], dict):
                continue
            xs, ys = sweep[0].get("lrs"), sweep[0].get("losses")
            if not isinstance(xs, list) or not isinstance(ys, list):
                continue
            pts = [(as_float(x), as_float(y)) for x, y in zip(xs, ys, strict=False)]
            pts = [(x, y) for x, y in pts if is_positive_finite(x)]  # a NaN loss stays: the curve blew up
            if len(pts) < 2:
                continue
            meta = meta if isinstance(meta, dict) else {}
            out.append(RangeTest(self.round, _int(rec.get("step")), tuple(x for x, _ in pts),
                                 tuple(y for _, y in pts), as_float(meta.get("range_ceiling")),
                                 as_float(meta.get("range_lr_at_min"))))  # fmt: skip
        return out


@dataclass(frozen=True)
class RangeTest:
    """One LR range test of a round, read from its decision record: the LR and training loss of each update of
    the sweep, and (rules only; NaN otherwise) the LR of the lowest smoothed loss and the ceiling it set."""

    round: int
    step: int
    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    ceiling: float = math.nan
    lr_at_min: float = math.nan


@dataclass(frozen=True)
class BaselineResult(_FallbackCounts):
    """One baseline run's result json (a fixed schedule at one peak LR)."""

    schedule: str
    peak_lr: float
    final_eval_ppl: float
    final_eval_loss: float
    final_eval_tokens: int | None
    update_step: int | None
    seed: int | None
    lr_trajectory: list[tuple[int, float]] = field(default_factory=list, hash=False, repr=False)
    loss_trajectory: list[tuple[int, float]] = field(default_factory=list, hash=False, repr=False)
    wall_time_s: float | None = None
    diverged: bool = False
    path: str = ""
    raw: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)

    @property
    def label(self) -> str:
        return f"{self.schedule} {fmt_lr(self.peak_lr)}"

    @property
    def ok(self) -> bool:
        return not self.diverged and math.isfinite(self.final_eval_ppl)

    @property
    def band(self) -> str:
        return peak_band(self.peak_lr)


@dataclass(frozen=True)
class CampaignLogs:
    """Everything a campaign directory holds, read once: rounds (ordered by round) and baselines."""

    rounds: list[RoundSummary]
    baselines: list[BaselineResult]
    path: str
    settings: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)
    briefs: list[dict[str, Any]] = field(default_factory=list, hash=False, repr=False)
    #: decisions and rollbacks that belong to no finished round (a round still running or abandoned)
    unjoined_decisions: int = 0
    unjoined_rollbacks: int = 0

    def round(self, n: int) -> RoundSummary | None:
        return next((r for r in self.rounds if r.round == n), None)

    def best_round(self) -> RoundSummary | None:
        return best_round(self.rounds)

    def best_baseline(self, schedule: str | None = None) -> BaselineResult | None:
        ok = [b for b in self.baselines if b.ok and (schedule is None or b.schedule == schedule)]
        return min(ok, key=lambda b: b.final_eval_ppl) if ok else None


# ------------------------------------------------------------------------------------------- loading

_LR_IN_NAME = re.compile(r"(?:^|[_-])lr(\d+(?:\.\d+)?(?:e[-+]?\d+)?)(?=[_.-]|$)", re.IGNORECASE)


def peak_from_filename(name: str) -> float:
    """Peak LR spelled in a baseline file name: "cosine_lr1e-2_60m_final.json" -> 0.01,
    "cosine_lr3.5e-3.json" -> 0.0035; NaN when the name holds none."""
    m = _LR_IN_NAME.search(Path(name).stem)
    return float(m.group(1)) if m else math.nan


def _schedule_from_filename(name: str) -> str:
    head = Path(name).stem.split("_lr")[0].split("_")[0].lower()
    return head if head and re.fullmatch(r"[a-z0-9]+", head) and head != Path(name).stem.lower() else "unknown"


def _pairs(v: Any) -> list[tuple[int, float]]:
    out = []
    if isinstance(v, list):
        for p in v:
            if isinstance(p, (list, tuple)) and len(p) >= 2 and _finite(p[0]):
                out.append((_int(p[0]), as_float(p[1])))
    return out


def baseline_from_record(rec: dict[str, Any], path: str | Path = "") -> BaselineResult:
    """A BaselineResult from a parsed result json; `peak_lr` and `schedule` fall back to the file name."""
    name = Path(path).name
    peak = as_float(rec.get("peak_lr"))
    if not math.isfinite(peak):
        peak = peak_from_filename(name)
    schedule = str(rec.get("schedule") or _schedule_from_filename(name))
    ppl = as_float(rec.get("final_eval_ppl"))
    diverged = bool(rec["diverged"]) if "diverged" in rec else not math.isfinite(ppl)
    wall = as_float(rec.get("wall_time_s"))
    return BaselineResult(
        schedule=schedule,
        peak_lr=peak,
        final_eval_ppl=ppl,
        final_eval_loss=as_float(rec.get("final_eval_loss")),
        final_eval_tokens=_opt_int(rec.get("final_eval_tokens")),
        update_step=_opt_int(rec.get("update_step")),
        seed=_opt_int(rec.get("seed")),
        lr_trajectory=_pairs(rec.get("lr_trajectory")),
        loss_trajectory=_pairs(rec.get("loss_trajectory")),
        wall_time_s=wall if math.isfinite(wall) else None,
        diverged=diverged,
        path=str(path),
        raw=dict(rec),
    )


def _read_baseline(p: Path) -> BaselineResult | None:
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        warnings.warn(f"{p}: unreadable baseline json skipped ({e.__class__.__name__}: {str(e)[:80]})", stacklevel=3)
        return None
    if not isinstance(rec, dict) or not ("final_eval_ppl" in rec or "final_eval_loss" in rec):
        return None  # another json (campaign.json, import.json, a config): not a baseline result
    b = baseline_from_record(rec, p)
    if not math.isfinite(b.peak_lr):
        warnings.warn(f"{p}: baseline without peak_lr (no 'peak_lr' field, no 'lr<peak>' in the name)", stacklevel=3)
    return b


def load_baselines(dir_or_dirs: str | Path | Iterable[str | Path]) -> list[BaselineResult]:
    """Baseline results from result jsons: each argument is a json file or a directory whose top-level
    *.json files are read (a directory with a `baselines/` folder, e.g. a campaign, is read there too).
    Jsons that are not baseline results are ignored; unreadable ones are skipped with a warning. Sorted by
    (schedule, peak_lr); a file given twice is read once."""
    items = [dir_or_dirs] if isinstance(dir_or_dirs, (str, Path)) else list(dir_or_dirs)
    seen: set[Path] = set()
    out: list[BaselineResult] = []
    for item in items:
        p = Path(item)
        if not p.exists():
            raise CampaignLogsError(f"baselines {p}: no such file or directory; pass a folder of result jsons")
        files = [p] if p.is_file() else sorted(p.glob("*.json"))
        if p.is_dir() and (p / "baselines").is_dir():
            files += sorted((p / "baselines").glob("*.json"))
        for f in files:
            key = f.resolve()
            if key in seen:
                continue
            seen.add(key)
            b = _read_baseline(f)
            if b is not None:
                out.append(b)
    out.sort(key=lambda b: (b.schedule, b.peak_lr if math.isfinite(b.peak_lr) else math.inf, b.path))
    return out


def _joins(rnd: dict[str, Any], rec: dict[str, Any]) -> bool:
    """Does a decision/rollback record belong to this final-results record? Keys present in both must
    agree, and at least one key must be present in both."""
    keys = [k for k in ("run_start_iso", "round") if rnd.get(k) is not None and rec.get(k) is not None]
    return bool(keys) and all(rnd[k] == rec[k] for k in keys)


def round_from_records(
    rec: dict[str, Any], number: int, decisions: Sequence[dict[str, Any]], rollbacks: Sequence[dict[str, Any]]
) -> RoundSummary:
    """A RoundSummary from a final_results record and its (already joined) decisions and rollbacks."""
    ppl = as_float(rec.get("final_eval_ppl"))
    raw_status = rec.get("status")
    status = "ok" if raw_status in (None, "ok") and math.isfinite(ppl) else "failed"
    if raw_status == "pruned":
        status = "pruned"
    warmup = _int(rec.get("warmup_steps"))
    init_lr = as_float(rec.get("init_lr"))
    lrs = [as_float(d.get("new_lr")) for d in decisions] + ([init_lr] if math.isfinite(init_lr) else [])
    lrs = [x for x in lrs if math.isfinite(x)]
    peak = as_float(rec.get("peak_lr_seen", rec.get("peak_lr")))
    if not math.isfinite(peak):
        peak = max(lrs) if lrs else math.nan
    low = as_float(rec.get("min_lr_seen", rec.get("min_lr")))
    if not math.isfinite(low):
        low = min(lrs) if lrs else math.nan
    wall = as_float(rec.get("wall_time_s"))
    if not math.isfinite(wall):
        t0, t1 = _parse_iso(rec.get("run_start_iso")), _parse_iso(rec.get("timestamp"))
        wall = (t1 - t0).total_seconds() if t0 and t1 and t1 >= t0 else math.nan
    settings = rec.get("settings") if isinstance(rec.get("settings"), dict) else {}
    total = rec.get("total_steps", settings.get("total_steps", rec.get("update_step")))
    return RoundSummary(
        round=number,
        run_start_iso=str(rec.get("run_start_iso", "")),
        final_eval_ppl=ppl,
        final_eval_loss=as_float(rec.get("final_eval_loss")),
        peak_lr=peak,
        min_lr=low,
        crash_count=_int(rec.get("crash_count"), len(rollbacks)),
        total_decisions=_int(rec.get("total_decisions"), len(decisions)),
        status=status,
        controller=str(rec.get("controller") or ""),
        wall_time_s=wall if math.isfinite(wall) else None,
        init_lr=init_lr,
        warmup_steps=warmup,
        decision_every=_int(rec.get("decision_every")),
        decisions=tuple(decisions),
        rollbacks=tuple(rollbacks),
        raw=dict(rec),
        total_steps=_opt_int(total),
    )


def load_campaign(path: str | Path) -> CampaignLogs:
    """Read a campaign directory (see the module docstring). Rounds are ordered by their `round` field, or
    by line order where it is missing. A missing directory, or the published study's layout (which needs
    `lrpilot import-logs` first), raises CampaignLogsError; an empty campaign gives no rounds."""
    d = Path(path)
    if d.is_file():
        raise CampaignLogsError(
            f"campaign {d}: is a file, not a directory; pass the --dir of a campaign "
            "(a baseline result json goes to --baselines)"
        )
    if not d.is_dir():
        raise CampaignLogsError(f"campaign {d}: no such directory; pass the --dir of a campaign")
    if not (d / "final_results.jsonl").exists() and any(d.glob("final_results_log_*.jsonl")):
        raise CampaignLogsError(
            f"campaign {d}: this is the published logs' layout; run `lrpilot import-logs {d} --dir CAMPAIGN` first"
        )
    finals = list(iter_jsonl(d / "final_results.jsonl"))
    decisions = list(iter_jsonl(d / "decisions.jsonl"))
    rollbacks = list(iter_jsonl(d / "rollbacks.jsonl"))
    numbered = []
    for line_no, rec in enumerate(finals, 1):
        n = rec.get("round")
        numbered.append((_int(n, line_no) if n is not None and _finite(n) else line_no, line_no, rec))
    numbered.sort(key=lambda t: (t[0], t[1]))
    used_d: set[int] = set()
    used_r: set[int] = set()
    rounds = []
    for number, _, rec in numbered:
        my_d = [(i, x) for i, x in enumerate(decisions) if i not in used_d and _joins(rec, x)]
        my_r = [(i, x) for i, x in enumerate(rollbacks) if i not in used_r and _joins(rec, x)]
        used_d.update(i for i, _ in my_d)
        used_r.update(i for i, _ in my_r)
        rounds.append(round_from_records(rec, number, [x for _, x in my_d], [x for _, x in my_r]))
    settings: dict[str, Any] = {}
    if (d / "campaign.json").exists():
        try:
            loaded = json.loads((d / "campaign.json").read_text(encoding="utf-8"))
            settings = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError) as e:
            warnings.warn(
                f"{d / 'campaign.json'}: unreadable, settings left empty ({e.__class__.__name__})", stacklevel=2
            )
    baselines = load_baselines(d / "baselines") if (d / "baselines").is_dir() else []
    return CampaignLogs(
        rounds=rounds,
        baselines=baselines,
        path=str(d),
        settings=settings,
        briefs=list(iter_jsonl(d / "briefs.jsonl")),
        unjoined_decisions=len(decisions) - len(used_d),
        unjoined_rollbacks=len(rollbacks) - len(used_r),
    )


# ------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class PhaseStats:
    """Mean and median final ppl of one phase (a block of `size` consecutive rounds)."""

    index: int  # 1-based
    first_round: int
    last_round: int
    rounds: tuple[int, ...]
    ppls: tuple[float, ...]
    mean: float  # over rounds with a finite ppl (failed rounds are named in `failed`)
    median: float
    outliers: tuple[int, ...]  # rounds whose ppl > outlier_factor x the campaign median
    mean_without_outliers: float
    median_without_outliers: float
    failed: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return f"rounds {self.first_round}-{self.last_round}"


def campaign_median(rounds: Sequence[RoundSummary]) -> float:
    """Median final ppl over the rounds with a finite ppl, pruned rounds left out (their ppl is an intermediate
    eval's); NaN when there are none."""
    vals = [r.final_eval_ppl for r in rounds if math.isfinite(r.final_eval_ppl) and r.status != "pruned"]
    return statistics.median(vals) if vals else math.nan


def outlier_rounds(rounds: Sequence[RoundSummary], factor: float = CATASTROPHIC_FACTOR) -> list[int]:
    """Rounds whose ppl is catastrophic: > factor x the campaign median."""
    med = campaign_median(rounds)
    return [
        r.round
        for r in rounds
        if r.status != "pruned" and math.isfinite(r.final_eval_ppl) and r.final_eval_ppl > factor * med
    ]


def best_round(rounds: Iterable[RoundSummary]) -> RoundSummary | None:
    """The finished round (`ok`) with the lowest final ppl; on a tie the first in the given order. None when
    no round finished."""
    ok = [r for r in rounds if r.ok]
    return min(ok, key=lambda r: r.final_eval_ppl) if ok else None


def campaign_total_steps(rounds: Sequence[RoundSummary]) -> int | None:
    """Planned steps per round: each round's logged total_steps, else the median over rounds of (last
    decision step + decision_every) -- a round that decided late (a non-blocking decision applied after its
    nominal step) does not get a longer run."""
    logged = [r.total_steps for r in rounds if r.total_steps]
    if logged:
        return int(statistics.median(logged))
    est = []
    for r in rounds:
        steps = [int(d.get("step", 0)) for d in r.decisions if isinstance(d.get("step"), (int, float))]
        if steps and r.decision_every:
            est.append(max(steps) + r.decision_every)
    return int(statistics.median(est)) if est else None


def _mean(xs: Sequence[float]) -> float:
    if not xs:
        return math.nan
    try:
        return statistics.fmean(xs)
    except OverflowError:  # the sum of finite values near the float maximum (ppl 1.7e308 twice) overflows
        return math.fsum(x / len(xs) for x in xs)


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def phase_stats(
    rounds: Sequence[RoundSummary], size: int = 10, outlier_factor: float = CATASTROPHIC_FACTOR
) -> list[PhaseStats]:
    """Mean and median ppl per phase of `size` consecutive rounds (in the given order; the last phase may be
    shorter). Outliers (ppl > outlier_factor x the median of all given rounds) stay in `mean` and are named,
    with `mean_without_outliers` beside it; failed rounds (no finite ppl) are named in `failed`."""
    if size < 1:
        raise ValueError(f"phase size must be >= 1, got {size}")
    rounds = list(rounds)
    outl = set(outlier_rounds(rounds, outlier_factor))
    out = []
    for i in range(0, len(rounds), size):
        chunk = rounds[i : i + size]
        fin = [r for r in chunk if math.isfinite(r.final_eval_ppl)]
        vals = [r.final_eval_ppl for r in fin]
        kept = [r.final_eval_ppl for r in fin if r.round not in outl]
        out.append(
            PhaseStats(
                index=i // size + 1,
                first_round=chunk[0].round,
                last_round=chunk[-1].round,
                rounds=tuple(r.round for r in chunk),
                ppls=tuple(r.final_eval_ppl for r in chunk),
                mean=_mean(vals),
                median=_median(vals),
                outliers=tuple(r.round for r in fin if r.round in outl),
                mean_without_outliers=_mean(kept),
                median_without_outliers=_median(kept),
                failed=tuple(r.round for r in chunk if not math.isfinite(r.final_eval_ppl)),
            )
        )
    return out
