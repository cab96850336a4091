"""The decision core: observation -> controller (inline or in a worker thread) -> emergency rule -> guard rules ->
command -> record, usable in-process.

    python -m pytest -q tests/test_decision.py

Two hosts use it: the round supervisor (`lrpilot.supervisor`, which sends each command to a trainer subprocess
through RUN/control.jsonl) and `lrpilot.Pilot` (which sets the optimizer's LR in your own loop). A host passes the
interval's telemetry in (`observation`), asks (`ask_inline` / `ask`, whose replies `poll` returns), turns the answer
into a `Command` (`emergency` first, then `guard`) and builds the decision-log record (`record`); it sends the
command its own way. The core imports no torch and knows no subprocess.

Guard rules are named components (`GUARD_RULES`, a `lrpilot.registry.Registry`): each is a `GuardRule` with up to
three hooks, applied in the configured order (`DEFAULT_GUARD_RULES`):

- `pre_empt`: before the controller is asked; the first rule that returns a `Command` decides instead
  (`emergency`: the published emergency rule, lrpilot.guard.check_emergency / emergency_lr);
- `bound_lr`: bounds a proposed headline LR (`clamp`: the [min_ratio x, max_ratio x] jump limit and the
  [floor, ceiling] bounds, lrpilot.guard.clamp_lr; `lower_only`: with a schedule-free optimizer the LR may not
  rise above the current one);
- `bound_plan`: bounds a plan's (step, lr) knots (`clamp`: lrpilot.guard.clamp_plan, whose knot pass also keeps a
  lower-only run's knots from rising, reason per knot).

Every rule returns its reasons in words; they end up in the record's clamp_reasons in rule order. A new rule is
one file (a `GuardRule` subclass) and one `GUARD_RULES.add(...)` line; CONTRIBUTING.md "Extending > Guard rule".
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lrpilot import guard
from lrpilot.config import GuardConfig
from lrpilot.controllers.base import BaseController, Decision, DecisionRecord, Observation, RollbackRecord
from lrpilot.logs import finite_mean, is_positive_finite, now_iso
from lrpilot.records import COUNTED_KINDS  # noqa: F401 - the kinds an Observation's `decisions` keeps
from lrpilot.registry import Registry

#: decisions.jsonl's own fields (records.DecisionRecord.ORDER), which a host's `fields` may set
_DECISION_FIELDS = frozenset(DecisionRecord.ORDER) - {"reasoning"}

#: at most this many (step, value) points of a run's LR and loss in its result (lr_trajectory, loss_trajectory)
TRAJECTORY_POINTS = 500


def interval_trend(prev: float, cur: float) -> str:
    """The decision record's `trend`: 'down -0.123' / 'up +0.050' / 'flat +0.000' (|change| < 5e-4) between two
    interval mean losses (nats), or 'insufficient data' when either is not finite."""
    if not (math.isfinite(prev) and math.isfinite(cur)):
        return "insufficient data"
    d = cur - prev
    word = "flat" if abs(d) < 5e-4 else ("down" if d < 0 else "up")
    return f"{word} {d:+.3f}"


def sample_trajectory(points: dict[int, float], n: int = TRAJECTORY_POINTS) -> list[tuple[int, float]]:
    """At most n (step, value) points of `points`, evenly spaced by stride, the last step always included."""
    steps = sorted(points)
    if len(steps) > n:
        stride = math.ceil(len(steps) / n)
        keep = steps[::stride]
        if keep[-1] != steps[-1]:
            keep = keep[: n - 1] + [steps[-1]]
        steps = keep
    return [(s, points[s]) for s in steps]


def plan_summary(plan: Sequence[Sequence[float]] | None) -> dict[str, Any] | None:
    """A plan as the decision record logs it: its number of knots and its first and last (step, lr), not every
    knot."""
    if not plan:
        return None
    return {
        "knots": len(plan),
        "first": [int(plan[0][0]), float(plan[0][1])],
        "last": [int(plan[-1][0]), float(plan[-1][1])],
    }


# ------------------------------------------------------------------------------------------ guard rules


@dataclass(frozen=True)
class GuardContext:
    """What a guard rule sees: the LR in force, the guard's settings and whether the LR may only fall."""

    current_lr: float
    cfg: GuardConfig
    lower_only: bool = False


class GuardRule:
    """A plain-code rule between the controller and the optimizer. Override any of the three hooks; the defaults
    change nothing. Rules must be pure (no clock, files or randomness) and never raise on untrusted input."""

    name = "rule"

    def pre_empt(self, point: Point, prev_mean: float, ctx: GuardContext) -> Command | None:
        """A command that replaces asking the controller at `point` (None: ask it). `prev_mean` is the previous
        decision interval's mean loss (NaN for the first)."""
        return None

    def bound_lr(self, lr: float, ctx: GuardContext) -> guard.ClampResult:
        """The headline LR `lr` bounded (with reasons when changed)."""
        return guard.ClampResult(lr=lr, clamped=False)

    def bound_plan(self, plan: tuple[tuple[int, float], ...], ctx: GuardContext) -> guard.PlanResult:
        """A plan's knots bounded (with reasons when changed)."""
        return guard.PlanResult(plan=plan, reasons=())


class EmergencyRule(GuardRule):
    """The published emergency rule: a loss jump > emergency_jump over one interval, or a loss above
    emergency_loss, cuts the LR x emergency_factor without asking the controller (lrpilot.guard)."""

    name = "emergency"

    def pre_empt(self, point: Point, prev_mean: float, ctx: GuardContext) -> Command | None:
        e = guard.check_emergency(prev_mean, point.obs.loss, ctx.cfg)
        if e is None:
            return None
        return Command(
            kind="emergency",
            new_lr=guard.emergency_lr(ctx.current_lr, ctx.cfg),
            reasoning=e.reason,
            fields={"emergency_triggers": list(e.triggers)},
        )


class ClampRule(GuardRule):
    """The jump limit and global bounds: lrpilot.guard.clamp_lr (headline) and clamp_plan (knots; in a lower-only
    run clamp_plan also keeps each knot at or below the lowest LR so far, its reasons interleaved per knot)."""

    name = "clamp"

    def bound_lr(self, lr: float, ctx: GuardContext) -> guard.ClampResult:
        return guard.clamp_lr(lr, ctx.current_lr, ctx.cfg)

    def bound_plan(self, plan: tuple[tuple[int, float], ...], ctx: GuardContext) -> guard.PlanResult:
        return guard.clamp_plan(
            plan, ctx.cfg, current=ctx.current_lr, lower_only=ctx.current_lr if ctx.lower_only else None
        )


class LowerOnlyRule(GuardRule):
    """Schedule-free optimizers (train.optimizer=schedulefree_adamw): a decision may not raise the LR above the
    current one (lrpilot.guard.clamp_lr's lower_only; the published study's rule). Inactive otherwise."""

    name = "lower_only"

    def bound_lr(self, lr: float, ctx: GuardContext) -> guard.ClampResult:
        cur = float(ctx.current_lr)
        if not ctx.lower_only or not (isinstance(lr, (int, float)) and math.isfinite(lr)) or lr <= cur:
            return guard.ClampResult(lr=lr, clamped=False)
        held = min(max(cur, ctx.cfg.floor), ctx.cfg.ceiling)
        why = f"lower-only (schedule-free optimizer): {lr:.6g} > current {cur:.6g}; kept {held:.6g}"
        return guard.ClampResult(lr=held, clamped=True, reasons=(why,))


#: guard rules by name (`DecisionCore(rules=...)`, `Pilot(guard_rules=...)`)
GUARD_RULES: Registry[type[GuardRule]] = Registry("guard rule", field="guard.rules")
GUARD_RULES.add("emergency", EmergencyRule, help="cut the LR on a loss jump or a high loss, before asking")
GUARD_RULES.add("clamp", ClampRule, help="[min_ratio x, max_ratio x] the current LR, then [floor, ceiling]")
GUARD_RULES.add("lower_only", LowerOnlyRule, help="schedule-free optimizers: the LR may only fall")

#: the rules every round applies, in order
DEFAULT_GUARD_RULES = ("emergency", "clamp", "lower_only")


def build_guard_rules(names: Sequence[str]) -> list[GuardRule]:
    """The rules named, in order. Raises ConfigError (one line, the choices) for an unknown name."""
    return [GUARD_RULES.get(n)() for n in names]


# ------------------------------------------------------------------------------------------ points and commands


@dataclass
class Point:
    """A decision point as the host saw it; for a non-blocking controller also the question in flight."""

    obs: Observation
    trend: str
    #: the host's launch / branch number when observed: a reply for an older one is stale
    launch: int
    #: the trainer's clock (time.time()) at the observe event; NaN when unknown
    t_observed: float = math.nan
    #: later decision points skipped while this one's question was in flight
    skipped: list[int] = field(default_factory=list)
    #: step of an emergency cut made while it was in flight
    superseded_by: int | None = None
    #: time.monotonic() when the controller was asked (non-blocking)
    t_asked: float = 0.0


@dataclass(frozen=True)
class Command:
    """What to do at a point: set `new_lr` (and follow `plan`), or, for kind agent_rollback, go back to
    `rollback_to` (`rollback_handle` is the host's: a checkpoint path, a snapshot). `fields` are the decision
    record's fields other than kind and reasoning, in record order."""

    kind: str
    new_lr: float
    reasoning: str
    plan: tuple[tuple[int, float], ...] | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    rollback_to: int | None = None
    rollback_handle: Any = None


#: (point, the controller's answer or the exception it raised, seconds decide() took)
Reply = tuple[Point, "Decision | BaseException", float]


def decision_record(
    run_start_iso: str,
    point: Point,
    new_lr: float,
    *,
    kind: str,
    reasoning: str,
    stamp: dict[str, Any] | None = None,
    stamp_first: bool = False,
    **fields: Any,
) -> dict[str, Any]:
    """The one place a decision-log record is built: the published fields first (supervisor.DECISION_FIELDS),
    then ours, then `fields`; `stamp` (e.g. round, controller) goes right after `launch` (stamp_first, the
    Pilot's order) or at the end without overriding a field (the supervisor's order)."""
    known = {k: fields.pop(k) for k in list(fields) if k in _DECISION_FIELDS}
    if stamp_first:  # the Pilot's order: stamp, then the other fields
        extra = {**(stamp or {}), **fields}
    else:  # the supervisor's order: the other fields, then the stamp where no field has its name
        extra = {**fields, **{k: v for k, v in (stamp or {}).items() if k not in fields and k not in known}}
    rec = DecisionRecord(
        run_start_iso=run_start_iso,
        step=point.obs.step,
        loss=point.obs.loss,
        trend=point.trend,
        old_lr=point.obs.lr,
        new_lr=new_lr,
        raw_lr_request=known.pop("raw_lr_request", new_lr if kind == "emergency" else None),
        clamped=known.pop("clamped", False),
        reason=reasoning,
        timestamp=now_iso(),
        kind=kind,
        clamp_reasons=list(known.pop("clamp_reasons", ())),
        launch=point.launch,
        **{"effective_step": None, "latency_s": None, "wait_s": 0.0, "seq": None, "plan": None, **known},
        extra=extra,
    )
    return rec.to_dict()  # records.DecisionRecord: the schema's field names, order and types


# ------------------------------------------------------------------------------------------ the core


def warmup_end_lr(controller: BaseController, init_lr: float, cfg: GuardConfig) -> float:
    """The LR a run's warmup ends at: `controller.warmup_to(init_lr)`, kept inside the guard's [floor, ceiling]
    when it differs from init_lr (the configured target stays as the user set it). Both hosts (the round
    supervisor and the Pilot) start from it, so a run warms up the same way in either. Raises ValueError,
    naming the controller, when its answer is not a positive number."""
    lr = controller.warmup_to(init_lr)
    if not is_positive_finite(lr):
        name = getattr(controller, "name", type(controller).__name__)
        raise ValueError(f"controller {name}: warmup_to({init_lr!r}) gave {lr!r}; it must be a positive LR")
    if lr == init_lr:
        return init_lr
    return min(max(float(lr), cfg.floor), cfg.ceiling)


@dataclass(frozen=True)
class RunShape:
    """The run's fixed numbers an Observation carries (steps are optimizer updates)."""

    total_steps: int
    warmup_steps: int
    decision_every: int
    init_lr: float
    memory_brief: str = ""
    round_index: int = 1


#: grant(point, requested step) -> (granted step or None, reason, host handle): the host's check of an agent's
#: rollback request (lrpilot.guard.check_agent_rollback plus what only the host knows: checkpoints, snapshots)
Grant = Callable[[Point, Any], tuple[int | None, str, Any]]


class DecisionCore:
    """The decision desk of one run: asks the controller, applies the guard rules and builds the records.

    State it owns: `decisions` (every record the host kept, in decision order: the controller's history),
    `asked` (questions to a non-blocking controller not answered yet), `inflight` (the one question in flight)
    and the reply queue. `layout` keeps each host's historical record field order byte-identical ("supervisor":
    skipped_observes last, stamp at the end; "pilot": skipped_observes first, stamp after launch).
    """

    def __init__(
        self,
        controller: BaseController,
        cfg: GuardConfig,
        shape: RunShape,
        *,
        lower_only: bool = False,
        rules: Sequence[str] = DEFAULT_GUARD_RULES,
        stamp: dict[str, Any] | None = None,
        layout: str = "supervisor",
        thread_prefix: str = "lrpilot-decide",
    ) -> None:
        if layout not in ("supervisor", "pilot"):
            raise ValueError(f"layout: must be 'supervisor' or 'pilot', got {layout!r}")
        self.controller = controller
        self.g = cfg
        self.shape = shape
        self.lower_only = bool(lower_only)
        self.rules = build_guard_rules(rules)
        self.stamp = dict(stamp or {})
        self.layout = layout
        self.thread_prefix = thread_prefix
        self.blocking = bool(getattr(controller, "blocking", True))
        self.run_start_iso = ""
        self.decisions: list[dict[str, Any]] = []
        self.asked: list[Point] = []
        self.inflight: Point | None = None
        self.replies: queue.Queue = queue.Queue()

    # ---------------------------------------------------------------------------------- observation

    def observation(
        self,
        step: int,
        lr: float,
        recent: Sequence[float],
        *,
        loss_history: Sequence[tuple[int, float]],
        lr_history: Sequence[tuple[int, float]],
        grad_norm: float = math.nan,
        tokens_per_s: float = math.nan,
        rollbacks: Sequence[RollbackRecord] = (),
        rollback_steps: Sequence[int] = (),
        agent_rollbacks_used: int = 0,
    ) -> Observation:
        """The Observation at decision step `step` (updates done) with the LR in force `lr` and the interval's
        losses `recent`; the decision history comes from `decisions`."""
        s, g = self.shape, self.g
        return Observation(
            step=step,
            total_steps=s.total_steps,
            warmup_steps=s.warmup_steps,
            decision_every=s.decision_every,
            lr=lr,
            init_lr=s.init_lr,
            recent_losses=tuple(recent),
            loss_history=tuple(loss_history),
            lr_history=tuple(lr_history),
            grad_norm=grad_norm,
            tokens_per_s=tokens_per_s,
            decisions=tuple(DecisionRecord.from_log(d) for d in self.decisions if d.get("kind") in COUNTED_KINDS),
            rollbacks=tuple(rollbacks),
            rollback_steps=tuple(rollback_steps),
            agent_rollbacks_left=max(0, g.agent_rollbacks - agent_rollbacks_used),
            memory_brief=s.memory_brief,
            floor=g.floor,
            ceiling=g.ceiling,
            min_ratio=g.min_ratio,
            max_ratio=g.max_ratio,
            round_index=s.round_index,
            lower_only=self.lower_only,
        )

    # ---------------------------------------------------------------------------------- asking

    def decide(self, obs: Observation) -> Decision | BaseException:
        """The controller's answer, or the exception it raised: a controller bug must not end the run (the LR
        is kept and the error logged as a fallback by `guard`)."""
        try:
            return self.controller.decide(obs)
        except Exception as e:  # noqa: BLE001
            return e

    def ask_inline(self, obs: Observation) -> tuple[Decision | BaseException, float]:
        """Ask a blocking controller now: (its answer, seconds it took)."""
        t = time.monotonic()
        decision = self.decide(obs)
        return decision, time.monotonic() - t

    def ask(self, point: Point) -> bool:
        """Ask a non-blocking controller about `point` in a worker thread; `poll` returns the reply. One question
        at a time: while one is in flight the point is skipped (added to its `skipped`) and False returned."""
        if self.inflight is not None:
            self.inflight.skipped.append(point.obs.step)
            return False
        self.inflight = point
        point.t_asked = time.monotonic()
        self.asked.append(point)
        name = f"{self.thread_prefix}-{point.obs.step}"
        threading.Thread(target=self._ask_async, args=(point,), daemon=True, name=name).start()
        return True

    def _ask_async(self, point: Point) -> None:
        decision, latency = self.ask_inline(point.obs)
        self.replies.put((point, decision, latency))

    def poll(self, timeout: float | None = None) -> list[Reply]:
        """Replies that came in (waiting up to `timeout` seconds for the first one; None: not at all)."""
        out: list[Reply] = []
        if timeout is not None:
            try:
                out.append(self.replies.get(timeout=timeout))
            except queue.Empty:
                return out
        while True:
            try:
                out.append(self.replies.get_nowait())
            except queue.Empty:
                return out

    def answered(self, reply: Reply, launch: int, stale: str | None = None, rolled_back: str = "trainer") -> str | None:
        """Mark `reply`'s question answered; returns why its answer is stale (None: use it): the host moved to
        another launch (`launch`) since, an emergency cut came first, or the caller's own `stale`."""
        point = reply[0]
        if point is self.inflight:
            self.inflight = None
        self.asked = [p for p in self.asked if p is not point]
        if stale is None and point.launch != launch:
            stale = f"discarded: the {rolled_back} was rolled back before the reply arrived"
        elif stale is None and point.superseded_by is not None:
            stale = f"superseded by the emergency cut at step {point.superseded_by}"
        return stale

    def forget_questions(self) -> None:
        """The host abandoned the branch (a rollback): no question is in flight any more."""
        self.inflight = None

    # ---------------------------------------------------------------------------------- guard

    def context(self, current_lr: float) -> GuardContext:
        return GuardContext(current_lr=current_lr, cfg=self.g, lower_only=self.lower_only)

    def pre_empt(self, point: Point, prev_mean: float) -> Command | None:
        """The first rule's command that replaces asking the controller (the emergency rule), else None. A
        question in flight is then superseded: its reply will only be logged."""
        ctx = self.context(point.obs.lr)
        for rule in self.rules:
            cmd = rule.pre_empt(point, prev_mean, ctx)
            if cmd is not None:
                if self.inflight is not None:
                    self.inflight.superseded_by = point.obs.step
                return cmd
        return None

    def bound_lr(self, proposed: Any, current: float) -> guard.ClampResult:
        """`proposed` through every rule's bound_lr, in order (reasons concatenated; fallback if any rule fell
        back)."""
        ctx = self.context(current)
        lr, reasons, fallback = proposed, [], False
        for rule in self.rules:
            r = rule.bound_lr(lr, ctx)
            lr, fallback = r.lr, fallback or r.fallback
            reasons += r.reasons
        return guard.ClampResult(lr=lr, clamped=bool(reasons), reasons=tuple(reasons), fallback=fallback)

    def bound_plan(self, plan: Any, current: float) -> guard.PlanResult:
        """A plan's knots through every rule's bound_plan, in order."""
        ctx = self.context(current)
        reasons: list[str] = []
        for rule in self.rules:
            r = rule.bound_plan(plan, ctx)
            plan = r.plan
            reasons += r.reasons
        return guard.PlanResult(plan=tuple(plan), reasons=tuple(reasons))

    def guard(
        self,
        point: Point,
        decision: Decision | BaseException | Any,
        latency: float,
        *,
        extra: dict[str, Any] | None = None,
        grant: Grant | None = None,
    ) -> Command:
        """A controller's answer at `point` made safe: an exception (or anything not a Decision) keeps the
        current LR (kind fallback); else the LR and plan go through the guard rules and an agent's rollback
        request through `grant` (granted: kind agent_rollback; refused: the reason joins clamp_reasons).
        `extra` (e.g. a probe's record) joins the record's fields."""
        lr_now = point.obs.lr
        skipped = {"skipped_observes": list(point.skipped)} if point.skipped else {}
        pilot = self.layout == "pilot"
        if not isinstance(decision, Decision):
            why = (
                f"controller error: {decision.__class__.__name__}: {str(decision)[:300]}"
                if isinstance(decision, BaseException)
                else f"controller returned {type(decision).__name__}, not a Decision"
            )
            fields = {"latency_s": latency, **(skipped if pilot else {}), **(extra or {})}
            if not pilot:
                fields.update(skipped)
            new_lr = guard.clamp_lr(lr_now, lr_now, self.g).lr
            return Command("fallback", new_lr, f"{why}; kept the current LR", fields=fields)
        clamp = self.bound_lr(decision.lr, lr_now)
        reasons = list(clamp.reasons)
        plan = None
        if decision.plan is not None:
            bounded = self.bound_plan(decision.plan, lr_now)
            reasons += bounded.reasons
            plan = bounded.plan or None
        fields: dict[str, Any] = {
            "raw_lr_request": decision.lr,
            "clamped": False,  # set below, once every reason is in
            "clamp_reasons": reasons,
            "latency_s": latency,
        }
        if pilot:
            fields.update(skipped)
        if decision.raw is not None:
            fields["raw_reply"] = decision.raw
        fields.update(extra or {})
        if decision.meta:
            fields["meta"] = decision.meta
        if decision.rollback_to_step is not None:
            fields["rollback_to_step"] = decision.rollback_to_step
            to, why, handle = grant(point, decision.rollback_to_step) if grant is not None else (None, "", None)
            if to is not None:
                fields["clamped"] = bool(reasons)
                head = {k: fields.pop(k) for k in ("raw_lr_request", "clamped", "clamp_reasons", "latency_s")}
                fields = {**head, "rollback_reason": why, **fields}
                return Command("agent_rollback", clamp.lr, decision.reason, plan=None, fields=fields,
                               rollback_to=to, rollback_handle=handle)  # fmt: skip
            fields["rollback_refused"] = why
            reasons.append(why)
        fields["clamped"] = bool(reasons)
        if not pilot:
            fields.update(skipped)
        kind = "fallback" if (decision.fallback or clamp.fallback) else "decision"
        return Command(kind, clamp.lr, decision.reason, plan=plan, fields=fields)

    # ---------------------------------------------------------------------------------- records

    def record(self, point: Point, new_lr: float, *, kind: str, reasoning: str, **fields: Any) -> dict[str, Any]:
        """The decision-log record of `point` (see `decision_record`), stamped with this run's fields."""
        return decision_record(
            self.run_start_iso,
            point,
            new_lr,
            kind=kind,
            reasoning=reasoning,
            stamp=self.stamp,
            stamp_first=self.layout == "pilot",
            **fields,
        )

    def command_record(self, point: Point, cmd: Command, **host_fields: Any) -> dict[str, Any]:
        """The record of `cmd` at `point`; `host_fields` (seq, wait_s, plan summary, ...) come first among the
        non-published fields."""
        return self.record(point, cmd.new_lr, kind=cmd.kind, reasoning=cmd.reasoning, **host_fields, **cmd.fields)

    def stale_record(self, point: Point, decision: Decision | BaseException, latency: float, why: str) -> dict:
        """The record of an answer that came too late to be used (kind superseded; the LR is kept)."""
        fields: dict[str, Any] = {"latency_s": latency}
        if self.layout == "pilot":
            rec = self.record(point, point.obs.lr, kind="superseded", reasoning=why, **fields)
            if isinstance(decision, Decision):
                rec["raw_lr_request"] = decision.lr
            return rec
        if point.skipped:
            fields["skipped_observes"] = list(point.skipped)
        if isinstance(decision, Decision):
            fields.update(raw_lr_request=decision.lr, raw_reply=decision.raw)
        return self.record(point, point.obs.lr, kind="superseded", reasoning=why, **fields)


def interval_mean(losses: Sequence[float]) -> float:
    """The mean of an interval's finite losses (NaN if none): the loss of a decision point."""
    return finite_mean(losses)
