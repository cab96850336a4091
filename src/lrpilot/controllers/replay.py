"""Replay a logged LR trajectory with no LLM: the same decisions, in the same places, from decisions.jsonl.

    lrpilot campaign --preset cpu-small --rounds 3 --controller replay --replay-from runs/agent --dir runs/replay

At each decision step the controller answers with the `new_lr` recorded for that step. Where the record
says the LR took effect later (`effective_step` > `step`: the asynchronous LLM kept training while it
thought), the decision carries a plan that holds the current LR until `effective_step` and switches
then, so the replay reproduces the delay, also past the next decision point (which the logged run skipped
while the answer was pending): the LR is held until the decision point whose interval holds
`effective_step`, and that one switches it. If the logged run got that answer just as it reached a decision
point and asked there too, that point's replay switches at the pending answer's step first and then at its
own answer's. A step without a record holds the current LR.

Records of kind `emergency` or `rollback` are the guard's doing, not the controller's; they are not
replayed (the guard applies its own rules again in the replay run). A decision that never took effect
(kind `superseded`: a reply discarded after a rollback or an emergency cut; or `effective_step` written
as null: the trainer crashed or ended first) replays as "hold the current LR", so the replayed
trajectory is the one that ran. A record without an `effective_step` key (older logs) is replayed as
taking effect at its step. A record with `plan_knots` (every knot of the plan the trainer got: a baseline
schedule's per-step LRs) replays with that plan; one without them, whose `plan` summary holds the whole plan (one
or two knots from its step: the rule controller's cool-down segments), replays with that plan. Records of kind `unanswered` (no reply before the round ended or was
interrupted) are skipped: the step holds, or a resumed round's later record for it counts. If the logged
round had rollbacks, a step can have several records (one per visit); the visit number is told from the observation's rollbacks (how many rollbacks re-opened this
step), so decide() stays a pure function of its input. A record of kind `agent_rollback` (the agent asked to
go back to a checkpoint and the guard granted it) replays as the same request (`rollback_to_step`, at its
logged LR); the guard validates it again, and the granted rollback counts as a visit like a crash's.

`rerun_raw=True` re-feeds the recorded raw LLM replies (`raw_reply`, else `reasoning`) through the LLM
controller's parser (`lrpilot.controllers.llm.parse_recorded_reply`: our JSON replies, or the published
study's `[FINAL_LR] x [/FINAL_LR]` text) instead of using the logged LR: a regression test of the parser
against real replies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lrpilot.campaign_logs import decision_applied
from lrpilot.controllers.base import BaseController, ControllerContext, ControllerSpec, Decision, Observation
from lrpilot.errors import LrpilotError
from lrpilot.logs import as_float, is_positive_finite, read_jsonl
from lrpilot.records import Kind

#: record kinds written by the guard rather than by the controller
_NOT_REPLAYED = (Kind.EMERGENCY, Kind.ROLLBACK)
#: record kinds whose decision never reached the trainer
_NOT_APPLIED = (Kind.SUPERSEDED,)
#: record kinds that are no answer at all (a question still open when the round ended or was interrupted): a
#: resumed round may ask the same step again, so they are not a visit of the step either
_NO_ANSWER = (Kind.UNANSWERED,)


class ReplayError(LrpilotError, ValueError):
    """A decisions log cannot be replayed; the message names the record or the filter and the fix."""


def _int_field(rec: dict[str, Any], key: str, where: str) -> int | None:
    v = rec.get(key)
    if v is None:
        return None
    f = as_float(v)
    if not (math.isfinite(f) and f.is_integer() and f >= 0):
        raise ReplayError(f"{where}: field {key!r} must be a non-negative integer step, got {v!r}")
    return int(f)


def _full_plan(knots: Any, step: int) -> tuple[tuple[int, float], ...] | None:
    """A record's `plan_knots` (every knot of the plan the trainer got: a baseline schedule's per-step LRs,
    logged since the supervisor and the Pilot both write them) when it is a well-formed plan from the decision
    step on (knots [step, lr], steps rising, LRs finite and >= 0); None otherwise (the summary is used then,
    or the headline LR)."""
    if not isinstance(knots, list) or not knots:
        return None
    out = []
    for k in knots:
        if not (isinstance(k, (list, tuple)) and len(k) == 2):
            return None
        s, v = as_float(k[0]), as_float(k[1])
        if not (math.isfinite(s) and s.is_integer() and math.isfinite(v) and v >= 0):
            return None
        if out and int(s) <= out[-1][0]:
            return None
        out.append((int(s), v))
    return tuple(out) if out[0][0] == step else None


def _exact_plan(summary: Any, step: int) -> tuple[tuple[int, float], ...] | None:
    """The plan a decision record's summary ({"knots", "first", "last"}) describes exactly: one or two knots
    starting at the decision step (the rule controller's cool-down segments). Longer plans (the baseline
    schedules' per-step knots) are not in the log and replay as their headline LR, as before."""
    if not isinstance(summary, dict) or summary.get("knots") not in (1, 2):
        return None
    return _full_plan([summary.get("first")] + ([summary.get("last")] if summary["knots"] == 2 else []), step)


class ReplayController(BaseController):
    """Returns the logged LR at each logged decision step (delayed to its effective_step); holds elsewhere."""

    name = "replay"
    blocking = True

    def __init__(
        self,
        decisions: list[dict[str, Any]],
        rerun_raw: bool = False,
        source: str = "",
        settings: dict[str, int] | None = None,
    ) -> None:
        self.source = source
        #: the settings the log was found under, where known (warmup_steps, decision_every: an export-schedule
        #: file's); a host refuses to replay under others (Pilot)
        self.settings = dict(settings or {})
        self.rerun_raw = bool(rerun_raw)
        self._parse: Callable[[str], tuple[float | None, str, str | None]] | None = None
        if self.rerun_raw:
            try:
                from lrpilot.controllers.llm import parse_recorded_reply
            except ImportError as e:
                raise ReplayError(
                    f"rerun_raw: needs lrpilot.controllers.llm.parse_recorded_reply, which is not available ({e})"
                ) from e
            self._parse = parse_recorded_reply
        #: step -> records for that step, in log order (one per visit of the step)
        self._by_step: dict[int, list[dict[str, Any]]] = {}
        #: (step, old_lr) of the earliest record: the LR in force at the logged round's first decision point
        self._first: tuple[int, float] | None = None
        for n, rec in enumerate(decisions):
            where = f"{source or 'decisions'} record {n}"
            if not isinstance(rec, dict):
                raise ReplayError(f"{where}: must be a JSON object")
            kind = str(rec.get("kind", Kind.DECISION))
            first_step, old = as_float(rec.get("step")), as_float(rec.get("old_lr"))
            if (
                math.isfinite(first_step)
                and is_positive_finite(old)
                and (self._first is None or first_step < self._first[0])
            ):
                self._first = (int(first_step), old)
            if kind in _NOT_REPLAYED or kind in _NO_ANSWER:
                continue
            step = _int_field(rec, "step", where)
            if step is None:
                raise ReplayError(f"{where}: lacks 'step'; a decisions.jsonl record needs step and new_lr")
            new_lr = as_float(rec.get("new_lr"))
            if not is_positive_finite(new_lr):
                raise ReplayError(
                    f"{where} (step {step}): 'new_lr' must be a positive number, got {rec.get('new_lr')!r}"
                )
            eff = _int_field(rec, "effective_step", where)
            applied = kind not in _NOT_APPLIED and decision_applied(rec)
            raw = rec.get("raw_reply", rec.get("reasoning"))
            if self.rerun_raw and applied and not isinstance(raw, str):
                raise ReplayError(f"{where} (step {step}): rerun_raw needs a 'raw_reply' or 'reasoning' string")
            self._by_step.setdefault(step, []).append(
                {
                    "step": step,
                    "new_lr": new_lr,
                    "effective_step": eff,
                    "applied": applied,
                    "raw": raw,
                    "reason": str(rec.get("reasoning", rec.get("reason", "")) or ""),
                    "rollback_to_step": _int_field(rec, "rollback_to_step", where)
                    if kind == Kind.AGENT_ROLLBACK
                    else None,
                    "plan": _full_plan(rec.get("plan_knots"), step) or _exact_plan(rec.get("plan"), step),
                }
            )

    @classmethod
    def from_log(
        cls, path: str | Path, round: int | None = None, run_start_iso: str | None = None, rerun_raw: bool = False
    ) -> ReplayController:
        """The records of one round of a decisions.jsonl, chosen by `round` and/or `run_start_iso`. With
        neither, the log must hold a single round."""
        p = Path(path)
        if not p.is_file():
            raise ReplayError(f"replay: decisions log not found: {p} (give a campaign's decisions.jsonl)")
        recs = read_jsonl(p)
        if round is not None:
            recs = [r for r in recs if r.get("round") == round]
        if run_start_iso is not None:
            recs = [r for r in recs if r.get("run_start_iso") == run_start_iso]
        if round is None and run_start_iso is None:
            runs = sorted({str(r.get("run_start_iso", r.get("round", ""))) for r in recs})
            if len(runs) > 1:
                raise ReplayError(f"replay: {p} holds {len(runs)} rounds; pick one with round= or run_start_iso=")
        if not recs:
            rounds = sorted({r.get("round") for r in read_jsonl(p) if r.get("round") is not None})
            raise ReplayError(
                f"replay: no records in {p} for round={round} run_start_iso={run_start_iso}; "
                f"rounds in the log: {rounds}"
            )
        return cls(recs, rerun_raw=rerun_raw, source=str(p))

    def warmup_to(self, init_lr: float) -> float:
        """The logged round's warmup end: the LR in force (`old_lr`) at its earliest logged decision, so a replay
        warms up as the logged round did (a rule round warms up to its ceiling, not to the preset's init_lr);
        init_lr for a log without one."""
        return self._first[1] if self._first is not None else init_lr

    def logged_steps(self) -> list[int]:
        """The decision steps the log holds records for (guard-only and unanswered records left out), sorted: a
        host checks that some are its own decision points (preflight.check_replay_steps, the Pilot)."""
        return sorted(self._by_step)

    def describe(self) -> dict[str, Any]:
        return {
            "controller": self.name,
            "source": self.source,
            "records": sum(map(len, self._by_step.values())),
            "steps": len(self._by_step),
            "rerun_raw": self.rerun_raw,
        }

    def _record_for(self, obs: Observation) -> dict[str, Any] | None:
        recs = self._by_step.get(int(obs.step))
        if not recs:
            return None
        # each rollback that went back to (or before) this step and crashed after it re-opens the step
        visit = sum(1 for rb in obs.rollbacks if rb.rolled_back_to_step <= obs.step <= rb.crash_step)
        return recs[min(visit, len(recs) - 1)]

    def _pending(self, obs: Observation) -> dict[str, Any] | None:
        """The record of an earlier decision point (this visit of it) whose switch is at or after obs.step: the
        logged run skipped this decision point while that answer was pending (the LR switches at its effective
        step, not here), or got that answer just as it reached this point (which it then asked about too)."""
        best = None
        for step, recs in self._by_step.items():
            if step >= obs.step:
                continue
            visit = sum(1 for rb in obs.rollbacks if rb.rolled_back_to_step <= step <= rb.crash_step)
            rec = recs[min(visit, len(recs) - 1)]
            eff = rec["effective_step"]
            if rec["applied"] and eff is not None and eff >= obs.step and (best is None or step > best["step"]):
                best = rec
        return best

    def decide(self, obs: Observation) -> Decision:
        cur = (
            obs.lr
            if is_positive_finite(obs.lr)
            else next((x for x in (obs.init_lr, obs.floor) if is_positive_finite(x)), 1e-4)
        )
        held = cur != obs.lr
        own, pending = self._record_for(obs), self._pending(obs)
        if pending is not None and (own is None or not own["applied"]):
            own = pending  # this point was skipped (or its answer discarded) while that answer was pending
        elif own is not None and pending is not None and own["rollback_to_step"] is None:
            pe, oe = pending["effective_step"], own["effective_step"]
            if pe < obs.step + max(int(obs.decision_every), 1) and oe is not None and oe > pe:
                return self._after_pending(own, pending, obs, cur, held)
        return self._answer(own, obs, cur, held)

    def _after_pending(
        self, own: dict[str, Any], pending: dict[str, Any], obs: Observation, cur: float, held: bool
    ) -> Decision:
        """This decision point has its own record, and an earlier point's answer (which the logged run was
        still waiting for when it got here) switched the LR inside this interval, before this point's own
        answer did: hold the current LR until that switch, then go on as this point's own answer says."""
        pe, plr = pending["effective_step"], pending["new_lr"]
        d = self._answer(own, obs, plr, held)
        if pe <= obs.step:  # it landed right at this point: switched before this point's first update
            head: tuple[tuple[int, float], ...] = ((obs.step, plr),)
        elif pe - 1 > obs.step:
            head = ((obs.step, cur), (pe - 1, cur), (pe, plr))
        else:
            head = ((obs.step, cur), (pe, plr))
        tail = tuple((s, v) for s, v in (d.plan or ()) if s > pe)
        meta = {**d.meta, "pending_from_step": pending["step"], "pending_effective_step": pe}
        reason = f"replay of step {pending['step']}: {plr:.3e} from step {pe}; then {d.reason}"
        return Decision(lr=d.lr, reason=reason, raw=d.raw, plan=head + tail, fallback=d.fallback, meta=meta)

    def _answer(self, rec: dict[str, Any] | None, obs: Observation, cur: float, held: bool) -> Decision:
        """The decision one record gives at obs.step, with `cur` the LR in force there."""
        if rec is None:
            return Decision(
                lr=cur,
                reason=f"replay: no record at step {obs.step}, hold {cur:.3e}",
                fallback=held,
                meta={"replayed": False},
            )
        if not rec["applied"]:
            return Decision(
                lr=cur,
                reason=f"replay: the logged decision at step {obs.step} never took effect, hold {cur:.3e}",
                fallback=held,
                meta={"replayed": True, "applied": False},
            )
        new_lr, reason, meta = rec["new_lr"], f"replay of step {rec['step']}: {rec['reason']}", {"replayed": True}
        if rec["rollback_to_step"] is not None:  # the logged LR, where the agent's rollback relaunched the run
            return Decision(lr=new_lr, reason=reason, meta=meta, rollback_to_step=rec["rollback_to_step"])
        if self._parse is not None:
            try:
                parsed, why, err = self._parse(rec["raw"])
            except Exception as e:  # noqa: BLE001 - the parser must not break a replay; log it as a fallback
                parsed, why, err = None, "", f"{e.__class__.__name__}: {e}"
            meta.update(logged_lr=new_lr, parse_error=err)
            if parsed is None or not is_positive_finite(parsed):
                return Decision(
                    lr=cur,
                    reason=f"replay (rerun_raw) step {obs.step}: reply not parsed ({err}); hold {cur:.3e}",
                    raw=rec["raw"],
                    fallback=True,
                    meta=meta,
                )
            new_lr, reason = float(parsed), f"replay (rerun_raw) of step {rec['step']}: {why}"
        plan = None
        eff = rec["effective_step"]
        if eff is not None and eff > obs.step:
            # hold the old LR through update eff-1, switch at eff; an eff past this interval (the logged run
            # skipped the next decision point while this answer was pending) holds now and switches there
            if rec["step"] != obs.step:
                meta["pending_from_step"] = rec["step"]
            meta["effective_step"] = eff
            if eff >= obs.step + max(int(obs.decision_every), 1):
                reason = f"replay of step {rec['step']}: {new_lr:.3e} from step {eff}; hold {cur:.3e}"
                return Decision(lr=cur, reason=reason, meta=meta)
            plan = (
                ((obs.step, cur), (eff - 1, cur), (eff, new_lr))
                if eff - 1 > obs.step
                else ((obs.step, cur), (eff, new_lr))
            )
        if plan is None and rec["plan"] is not None and rec["step"] == obs.step and self._parse is None:
            plan = rec["plan"]  # the logged two-knot segment (a rule controller's cool-down)
        return Decision(
            lr=new_lr, reason=reason, raw=rec["raw"] if self._parse is not None else None, plan=plan, meta=meta
        )


def _build(ctx: ControllerContext) -> ReplayController:
    """Round `ctx.round_index` of the campaign in `ctx.replay_from` (its decisions.jsonl), re-played."""
    return ReplayController.from_log(Path(ctx.replay_from) / "decisions.jsonl", round=ctx.round_index)


#: `--controller replay --replay-from DIR` (registered in lrpilot.controllers.CONTROLLERS)
SPEC = ControllerSpec(build=_build)
