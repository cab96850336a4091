"""The SafetyGuard: plain-code rules that keep a run alive whatever the controller says.

    python -m pytest -q tests/test_guard.py

The round supervisor (`lrpilot/supervisor.py`) calls these functions around every controller decision and
every crash; they are the only thing between an LLM's reply and the trainer. They are pure functions of
their arguments and a `lrpilot.config.GuardConfig`: no torch, no files, no clock, no randomness, so each
rule is tested alone with property-based tests and a logged decision can be re-checked later.

Every rule returns the adjusted value together with the reasons, in words a person can read in
decisions.jsonl / rollbacks.jsonl ("requested 0.01 > 2.0x current 0.0003; clamped to 0.0006").

The rules:

1. `clamp_lr`: a decision's LR may move at most `max_ratio`x up / `min_ratio`x down from the current LR
   per decision, and never leaves the global [floor, ceiling]. A proposal that is not a positive finite
   number keeps the current LR (the fallback). `clamp_plan`: a schedule's (step, lr) knots are bounded
   by [0, min(ceiling, max_ratio x current)]: they never rise faster, but may fall faster than min_ratio
   and below the floor (decay schedules reach 0; see its docstring for why).
   With `lower_only` (train.optimizer=schedulefree_adamw) a decision may not raise the LR above the current
   one, and a plan's knots never rise (`lower_only`).
2. `choose_rollback`: after a crash, resume from the latest healthy checkpoint at least
   `rollback_back_steps` before the crash (else the earliest healthy one) with the LR x `crash_lr_factor`.
   A checkpoint at or after the branch's first bad loss (`first_bad_loss_step`) is never healthy: it holds
   the state that update produced.
3. `check_loss`: NaN/Inf or a loss above `crash_loss` is a crash. `check_emergency` / `emergency_lr`: the
   published emergency rule cuts the LR x `emergency_factor` on a big loss jump or a high loss, without
   asking the controller.
4. `is_fast_crash` / `CrashCounter`: after `max_fast_crash` consecutive quick crashes the round is given up;
   before that, `crash_backoff` makes each consecutive quick crash wait longer (doubling, capped) before the
   relaunch. After `max_repeat_crash` consecutive slow crashes that get no further than the furthest of them
   (the same bad batch or fault at one step, whatever the LR) the round is given up too; a crash past that
   step is progress and resets the count.
   `is_hung`: no telemetry for `hang_timeout_s` seconds means the trainer hangs; `start_timeout_s` applies
   instead until a launch's first step and during a slow phase the trainer announced (eval, checkpoint).
5. `check_agent_rollback` / `agent_rollback_steps`: the LLM agent may ask to go back to an earlier healthy
   checkpoint (at most `agent_rollbacks` per round, not twice to the same step, never in the last
   `agent_rollback_end_fraction` of the run).

Inputs that come from outside the supervisor (a controller's proposal or plan, losses from telemetry) are
untrusted: any value, including NaN, a string or None, gives a result and a reason, never an exception.
The supervisor's own state (the LR in force, the LR at a crash) must be a positive finite number; anything
else is a bug upstream and raises ValueError naming the argument.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from lrpilot.config import GuardConfig
from lrpilot.lr import check_lr, is_positive_finite

# crash reasons, as written to rollbacks.jsonl (`crash_reason`)
NAN_LOSS = "nan_loss"
INF_LOSS = "inf_loss"
CATASTROPHIC_LOSS = "catastrophic_loss"

# emergency triggers
LOSS_JUMP = "loss_jump"
HIGH_LOSS = "high_loss"


def _fmt(x: float) -> str:
    """A number for a reason string: short, but enough digits to tell bounds apart."""
    return f"{x:.6g}"


def _as_number(x: Any) -> float | None:
    """x as a float if it is a real number (bool is not), else None."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    return float(x)


def _require_lr(x: Any, name: str) -> float:
    """The supervisor's own LR state must be positive and finite; anything else is a bug upstream."""
    v = _as_number(x)
    return check_lr(x if v is None else v, name, "the supervisor's LR state is corrupt")


def _clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


# ------------------------------------------------------------------------------------------ 1. LR clamp


@dataclass(frozen=True)
class ClampResult:
    """The LR to send, and why it differs from the proposal (reasons is empty iff clamped is False)."""

    lr: float
    #: the guard changed the proposal (clamped, or fell back to the current LR)
    clamped: bool
    reasons: tuple[str, ...] = ()
    #: the proposal was unusable (not a positive finite number) and the current LR was kept
    fallback: bool = False


def clamp_lr(proposed: Any, current: float, cfg: GuardConfig, lower_only: bool = False) -> ClampResult:
    """Bound a decision's headline LR: first to [min_ratio x current, max_ratio x current] (the jump limit),
    then to the global [floor, ceiling]. The global bounds win where the two do not overlap, so the result
    is always in [floor, ceiling]. Clamping a clamped value changes nothing.

    A proposal that is not a positive finite number (NaN, Inf, 0, negative, not a number) keeps the
    current LR (itself put into [floor, ceiling]) with fallback=True and a reason saying why.
    `current` is the LR in force now; ValueError if it is not a positive finite number.

    lower_only: the LR may only go down (schedule-free AdamW, whose averaging follows the running maximum LR;
    the published study's rule): a result above the current LR becomes the current LR, with a reason.
    """
    res = _clamp_lr(proposed, current, cfg)
    cur = float(current)
    if lower_only and res.lr > cur:
        held = _clip(cur, cfg.floor, cfg.ceiling)
        why = f"lower-only (schedule-free optimizer): {_fmt(res.lr)} > current {_fmt(cur)}; kept {_fmt(held)}"
        return ClampResult(lr=held, clamped=True, reasons=(*res.reasons, why), fallback=res.fallback)
    return res


def _clamp_lr(proposed: Any, current: float, cfg: GuardConfig) -> ClampResult:
    cur = _require_lr(current, "clamp_lr current")
    p = _as_number(proposed)
    if not is_positive_finite(p):
        if p is None:
            why = f"requested {proposed!r} is not a number"
        elif not math.isfinite(p):
            why = f"requested {p} is not finite"
        else:
            why = f"requested {_fmt(p)} is not positive"
        reasons = [f"{why}; kept current {_fmt(cur)}"]
        lr = _clip(cur, cfg.floor, cfg.ceiling)
        if lr != cur:
            side = "below floor" if cur < cfg.floor else "above ceiling"
            reasons.append(f"current {_fmt(cur)} is {side}; clamped to {_fmt(lr)}")
        return ClampResult(lr=lr, clamped=True, reasons=tuple(reasons), fallback=True)

    lo, hi = cfg.min_ratio * cur, cfg.max_ratio * cur
    band = _clip(p, lo, hi)
    lr = _clip(band, cfg.floor, cfg.ceiling)
    if lr == p:
        # also covers a proposal the jump limit moved and the global bounds moved straight back
        return ClampResult(lr=lr, clamped=False)

    reasons = []
    if p > hi:
        reasons.append(f"requested {_fmt(p)} > {cfg.max_ratio!r}x current {_fmt(cur)}; clamped to {_fmt(band)}")
    elif p < lo:
        reasons.append(f"requested {_fmt(p)} < {cfg.min_ratio!r}x current {_fmt(cur)}; clamped to {_fmt(band)}")
    what = _fmt(band) if band != p else f"requested {_fmt(p)}"
    if band > cfg.ceiling:
        reasons.append(f"{what} > ceiling {_fmt(cfg.ceiling)}; clamped to {_fmt(lr)}")
    elif band < cfg.floor:
        reasons.append(f"{what} < floor {_fmt(cfg.floor)}; raised to {_fmt(lr)}")
    return ClampResult(lr=lr, clamped=True, reasons=tuple(reasons))


class PlanResult(NamedTuple):
    """A bounded plan and what was changed; unpacks as `plan, reasons = clamp_plan(...)`."""

    #: (step, lr) knots, steps strictly increasing, every lr in [0, ceiling]
    plan: tuple[tuple[int, float], ...]
    reasons: tuple[str, ...]

    @property
    def clamped(self) -> bool:
        return bool(self.reasons)


def clamp_plan(
    plan: Iterable[Any], cfg: GuardConfig, current: float | None = None, lower_only: float | None = None
) -> PlanResult:
    """Bound a schedule's (step, lr) knots to [0, min(ceiling, max_ratio x current)]; with `lower_only` = the
    current LR, also to the lowest LR so far (the current one, then every earlier knot), so the plan never
    raises the LR.

    The upper half of the jump limit applies to knots as it does to the headline LR (`clamp_lr`): no decision
    raises the LR above max_ratio x the LR in force (`current`; None = no jump limit). It matters after a
    rollback or an emergency cut, when a schedule's curve is far above the guard's LR: the curve then comes
    back by at most max_ratio per decision. The lower half and the floor do not apply to knots: a schedule's
    knots move along a curve the controller committed to, and schedules such as linear-decay-to-zero or WSD's
    decay phase legitimately fall faster than min_ratio, below the floor, and reach 0 at the end of training.

    Knots are untrusted (they may come from an LLM reply): a knot that is not a (step, lr) pair, whose step
    is not a non-negative integer or whose lr is not finite is dropped; knots are sorted by step and a
    repeated step keeps its first knot. Every change comes with a reason.
    """
    reasons: list[str] = []
    kept: list[tuple[int, float]] = []
    for i, knot in enumerate(plan):
        if not isinstance(knot, Sequence) or isinstance(knot, (str, bytes)) or len(knot) != 2:
            reasons.append(f"plan knot #{i} {knot!r} is not a (step, lr) pair; dropped")
            continue
        step, lr = _as_number(knot[0]), _as_number(knot[1])
        if step is None or not math.isfinite(step) or not step.is_integer() or step < 0:
            reasons.append(f"plan knot #{i}: step {knot[0]!r} is not a non-negative integer; dropped")
            continue
        if lr is None or not math.isfinite(lr):
            reasons.append(f"plan knot at step {int(step)}: lr {knot[1]!r} is not a finite number; dropped")
            continue
        kept.append((int(step), lr))

    if any(a[0] > b[0] for a, b in zip(kept, kept[1:], strict=False)):
        reasons.append("plan knots sorted by step")
        kept.sort(key=lambda k: k[0])  # stable: the first of equal steps stays first

    cap = cfg.ceiling
    if current is not None:
        cap = min(cap, cfg.max_ratio * _require_lr(current, "clamp_plan current"))
    out: list[tuple[int, float]] = []
    low = _require_lr(lower_only, "clamp_plan lower_only") if lower_only is not None else math.inf
    for step, lr in kept:
        if out and out[-1][0] == step:
            reasons.append(f"plan knot at step {step}: repeated step; dropped (lr {_fmt(lr)})")
            continue
        v = _clip(lr, 0.0, cap)
        if v != lr:
            if lr < 0:
                bound = "< 0"
            elif cap < cfg.ceiling:
                bound = f"> {cfg.max_ratio!r}x current {_fmt(current)}"
            else:
                bound = f"> ceiling {_fmt(cfg.ceiling)}"
            reasons.append(f"plan knot at step {step}: {_fmt(lr)} {bound}; clamped to {_fmt(v)}")
        if lower_only is not None:
            if v > low:
                reasons.append(f"plan knot at step {step}: lower-only, {_fmt(v)} > {_fmt(low)}; lowered to {_fmt(low)}")
                v = low
            low = v
        out.append((step, v))
    return PlanResult(plan=tuple(out), reasons=tuple(reasons))


# --------------------------------------------------------------------------------------- 2. rollback


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint on disk as the guard sees it: its step and whether the supervisor trusts it."""

    step: int
    healthy: bool = True
    #: where it is (the guard never opens it; handy for the caller)
    path: str = ""


@dataclass(frozen=True)
class RollbackPlan:
    """Resume from `checkpoint` (at `to_step`) with LR `new_lr`, because `reason`."""

    to_step: int
    new_lr: float
    reason: str
    checkpoint: CheckpointInfo


def crash_lr(lr_at_crash: float, cfg: GuardConfig) -> float:
    """The LR to resume with after a crash: lr_at_crash x crash_lr_factor, kept within [floor, ceiling].
    Also the LR for a restart from scratch when `choose_rollback` finds no checkpoint."""
    lr = _require_lr(lr_at_crash, "crash_lr lr_at_crash")
    return _clip(lr * cfg.crash_lr_factor, cfg.floor, cfg.ceiling)


def first_bad_loss_step(losses: Iterable[tuple[int, Any]], cfg: GuardConfig) -> int | None:
    """The first step whose loss `check_loss` rejects (NaN, Inf, above crash_loss), or None. `losses` are
    (step, loss) pairs of the branch the trainer is on; a checkpoint at or after that step holds the state
    the bad update produced (NaN weights or optimizer moments) and is no rollback target."""
    bad = [int(s) for s, loss in losses if not check_loss(loss, cfg).ok]
    return min(bad) if bad else None


def choose_rollback(
    checkpoints: Iterable[CheckpointInfo],
    crash_step: int,
    lr_at_crash: float,
    cfg: GuardConfig,
    bad_from: int | None = None,
) -> RollbackPlan | None:
    """Pick the checkpoint to resume from after a crash at `crash_step` (updates done when it was seen).

    The latest healthy checkpoint with step <= crash_step - rollback_back_steps, so the run restarts well
    before whatever led to the crash; if there is none, the earliest healthy one. Unhealthy checkpoints,
    checkpoints after the crash step and, with `bad_from` (the first bad loss of the branch, see
    `first_bad_loss_step`), checkpoints at or after it are never chosen (the order of `checkpoints` does
    not matter).
    new_lr = crash_lr(lr_at_crash). Returns None when no checkpoint is usable: the round then restarts from
    scratch (step 0), with `crash_lr(lr_at_crash, cfg)` if it wants the halved LR.
    """
    new_lr = crash_lr(lr_at_crash, cfg)
    last_ok = crash_step if bad_from is None else min(crash_step, int(bad_from) - 1)
    usable = sorted((c for c in checkpoints if c.healthy and c.step <= last_ok), key=lambda c: c.step)
    if not usable:
        return None
    target = crash_step - cfg.rollback_back_steps
    before = [c for c in usable if c.step <= target]
    lr_text = f"lr {_fmt(lr_at_crash)} x {cfg.crash_lr_factor!r} -> {_fmt(new_lr)}"
    if before:
        chosen = before[-1]
        where = f"latest healthy checkpoint at or before step {target} ({cfg.rollback_back_steps} before the crash)"
    else:
        chosen = usable[0]
        where = f"earliest healthy checkpoint (none at or before step {target})"
    reason = f"crash at step {crash_step}: rolled back to step {chosen.step}, the {where}; {lr_text}"
    return RollbackPlan(to_step=chosen.step, new_lr=new_lr, reason=reason, checkpoint=chosen)


# ------------------------------------------------------------------------------------ 3. loss health


@dataclass(frozen=True)
class Health:
    """Whether a loss is survivable. reason is a crash code (nan_loss, inf_loss, catastrophic_loss) or ""."""

    ok: bool
    reason: str = ""
    #: the same in words, for logs
    detail: str = ""


def check_loss(loss: Any, cfg: GuardConfig) -> Health:
    """NaN (or anything that is not a number, as `lrpilot.logs.as_float` reads it) -> nan_loss; +-Inf ->
    inf_loss; a loss above crash_loss -> catastrophic_loss. Each of these is a crash: roll back."""
    x = _as_number(loss)
    if x is None or math.isnan(x):
        return Health(False, NAN_LOSS, f"loss {loss!r} is not a number")
    if math.isinf(x):
        return Health(False, INF_LOSS, f"loss {x} is infinite")
    if x > cfg.crash_loss:
        return Health(False, CATASTROPHIC_LOSS, f"loss {_fmt(x)} > crash_loss {_fmt(cfg.crash_loss)}")
    return Health(True)


@dataclass(frozen=True)
class Emergency:
    """The emergency rule fired: cut the LR with `emergency_lr` now, without asking the controller."""

    #: which conditions held: loss_jump and/or high_loss
    triggers: tuple[str, ...]
    loss: float
    prev_loss: float
    #: loss - prev_loss (NaN when there is no finite previous interval)
    jump: float
    reason: str


def check_emergency(interval_losses_prev_mean: float, current_mean: float, cfg: GuardConfig) -> Emergency | None:
    """The published emergency rule on two consecutive decision intervals' mean losses: fires when the loss
    rose by more than emergency_jump over one interval, or is above emergency_loss (both strict).

    With no finite previous mean (the first interval) only the emergency_loss test applies. A current mean
    that is not finite is a crash, not an emergency: run `check_loss` first; this returns None for it.
    """
    cur = _as_number(current_mean)
    if cur is None or not math.isfinite(cur):
        return None
    prev = _as_number(interval_losses_prev_mean)
    prev = prev if prev is not None else math.nan
    jump = cur - prev if math.isfinite(prev) else math.nan
    triggers, words = [], []
    if jump > cfg.emergency_jump:  # False for NaN
        triggers.append(LOSS_JUMP)
        words.append(f"loss rose {_fmt(prev)} -> {_fmt(cur)} (+{_fmt(jump)} > {_fmt(cfg.emergency_jump)})")
    if cur > cfg.emergency_loss:
        triggers.append(HIGH_LOSS)
        words.append(f"loss {_fmt(cur)} > {_fmt(cfg.emergency_loss)}")
    if not triggers:
        return None
    reason = f"emergency: {' and '.join(words)}; LR x {cfg.emergency_factor!r}"
    return Emergency(triggers=tuple(triggers), loss=cur, prev_loss=prev, jump=jump, reason=reason)


def emergency_lr(current: float, cfg: GuardConfig) -> float:
    """The emergency LR: current x emergency_factor, kept within [floor, ceiling]."""
    cur = _require_lr(current, "emergency_lr current")
    return _clip(cur * cfg.emergency_factor, cfg.floor, cfg.ceiling)


# --------------------------------------------------------------------------------- 4. crash budget


def is_fast_crash(steps_since_start: int, cfg: GuardConfig) -> bool:
    """A crash within fast_crash_steps updates of the trainer's (re)start is quick: the rollback did not help."""
    return steps_since_start <= cfg.fast_crash_steps


def is_hung(seconds_since_telemetry: float, cfg: GuardConfig, started: bool = True) -> bool:
    """No telemetry line for more than hang_timeout_s seconds: the trainer hangs (kill it, a crash). With
    started=False the limit is start_timeout_s: the caller passes it before a launch's first step (imports,
    data, process groups, loading a checkpoint, compiling the first step) and during a slow phase the
    trainer announced (an evaluation, a checkpoint save)."""
    return seconds_since_telemetry > (cfg.hang_timeout_s if started else cfg.start_timeout_s)


def crash_backoff(consecutive_fast: int, cfg: GuardConfig) -> float:
    """Seconds to wait before the relaunch after the n-th consecutive quick crash:
    min(crash_backoff_max_s, crash_backoff_s * crash_backoff_factor ** (n - 1)); 0 for n <= 0 (the last crash
    came after a healthy stretch) or crash_backoff_s = 0. Capped exponential back-off, as the published
    supervisor did, so a broken node or a full disk is not hammered with relaunches."""
    if consecutive_fast <= 0 or cfg.crash_backoff_s <= 0:
        return 0.0
    wait = cfg.crash_backoff_s
    for _ in range(consecutive_fast - 1):  # grown step by step, so a huge factor cannot overflow a float
        if wait >= cfg.crash_backoff_max_s:
            break
        wait *= cfg.crash_backoff_factor
    return float(min(cfg.crash_backoff_max_s, wait))


@dataclass(frozen=True)
class CrashCounter:
    """Immutable record of a round's crashes; gives up after max_fast_crash consecutive quick ones, or after
    max_repeat_crash consecutive slow ones that make no progress (`repeated`)."""

    #: (crash_step, start_step) of every crash so far, oldest first
    crashes: tuple[tuple[int, int], ...] = ()

    def record(self, crash_step: int, start_step: int) -> CrashCounter:
        """A new counter with one more crash at crash_step in a launch that started at start_step."""
        return CrashCounter(crashes=(*self.crashes, (int(crash_step), int(start_step))))

    @property
    def total(self) -> int:
        return len(self.crashes)

    def consecutive_fast(self, cfg: GuardConfig) -> int:
        """Quick crashes since the last slow one (a crash after a long healthy stretch resets the count)."""
        n = 0
        for crash_step, start_step in reversed(self.crashes):
            if not is_fast_crash(crash_step - start_step, cfg):
                break
            n += 1
        return n

    def repeated(self, cfg: GuardConfig) -> tuple[int, int | None]:
        """(n, step): the slow crashes since the run last got further than every crash before it, and the
        furthest crash step since then (None before the first crash). A crash past that step is progress
        and starts a new count (crashes at 25, 25, 40: n=1 at 40). Quick crashes (`is_fast_crash`) are
        max_fast_crash's: they add nothing to n, though one past the step is progress too.

        A crash that repeats at one step after rollbacks to before it does not depend on the LR, which each
        rollback cut x crash_lr_factor: a bad batch, a deterministic fault. Relaunching would loop for ever,
        and the crashes are slow (the rollback went back more than fast_crash_steps), so max_fast_crash never
        fires."""
        steps, furthest = self._since_progress(cfg)
        return len(steps), furthest

    def _since_progress(self, cfg: GuardConfig) -> tuple[list[int], int | None]:
        """The steps of the slow crashes since the last progress, and the furthest crash step since then."""
        steps: list[int] = []
        furthest = None
        for crash_step, start_step in self.crashes:
            if furthest is None or crash_step > furthest:
                steps, furthest = [], crash_step
            if not is_fast_crash(crash_step - start_step, cfg):
                steps.append(crash_step)
        return steps, furthest

    def stuck(self, cfg: GuardConfig) -> bool:
        """True once max_repeat_crash consecutive slow crashes got no further than the furthest of them."""
        return self.repeated(cfg)[0] >= cfg.max_repeat_crash

    def give_up_reason(self, cfg: GuardConfig) -> str:
        """Why the round is given up, in words, for its failure reason (both hosts); "" while `give_up` is False.
        The quick-crash rule is named first when both hold."""
        fast = self.consecutive_fast(cfg)
        if fast >= cfg.max_fast_crash:
            return (
                f"gave up after {fast} consecutive quick crashes (guard.max_fast_crash={cfg.max_fast_crash}, "
                f"each within {cfg.fast_crash_steps} steps of its start)"
            )
        return self.stuck_reason(cfg)

    def stuck_reason(self, cfg: GuardConfig) -> str:
        """The `stuck` verdict in words ("" when not stuck)."""
        steps, furthest = self._since_progress(cfg)
        if len(steps) < cfg.max_repeat_crash:
            return ""
        where = f"at step {furthest}" if set(steps) == {furthest} else f"at or before step {furthest}"
        return (
            f"gave up after {len(steps)} consecutive crashes {where}, none past it (guard.max_repeat_crash="
            f"{cfg.max_repeat_crash}): rolling back and cutting the LR x {cfg.crash_lr_factor!r} does not help"
        )

    def backoff_s(self, cfg: GuardConfig) -> float:
        """Seconds to wait before relaunching after the latest crash: `crash_backoff` of the consecutive
        quick crashes so far (0 after a slow crash)."""
        return crash_backoff(self.consecutive_fast(cfg), cfg)

    def give_up(self, cfg: GuardConfig) -> bool:
        """True once max_fast_crash consecutive quick crashes happened, or the round is `stuck`: stop the round,
        mark it diverged."""
        return bool(self.give_up_reason(cfg))


# ------------------------------------------------------------------------------ 5. agent rollback


@dataclass(frozen=True)
class AgentRollback:
    """The guard's verdict on an agent's rollback request: ok, the step to go back to, and why (in words)."""

    ok: bool
    to_step: int | None
    reason: str


def agent_rollback_steps(
    step: int, total_steps: int, checkpoints: Iterable[CheckpointInfo], used: Sequence[int], cfg: GuardConfig
) -> tuple[int, ...]:
    """The checkpoint steps an agent deciding at `step` may ask to roll back to (ascending; empty when it
    may not ask at all): healthy checkpoints at or before `step`, not already used this round, while fewer
    than agent_rollbacks were used and `step` is before the last agent_rollback_end_fraction of the run."""
    if len(used) >= cfg.agent_rollbacks or step >= total_steps * (1 - cfg.agent_rollback_end_fraction):
        return ()
    return tuple(sorted({c.step for c in checkpoints if c.healthy and c.step <= step and c.step not in used}))


def check_agent_rollback(
    requested: Any,
    step: int,
    total_steps: int,
    checkpoints: Iterable[CheckpointInfo],
    used: Sequence[int],
    cfg: GuardConfig,
) -> AgentRollback:
    """Validate an agent's request, made at decision step `step`, to roll back to the checkpoint at step
    `requested`; `used` are the steps this round's earlier agent rollbacks went back to. Refused (ok=False,
    with the reason) unless: requested is a non-negative integer step; fewer than agent_rollbacks were used;
    step is before the last agent_rollback_end_fraction of the run; requested <= step; it was not used
    before; and a healthy checkpoint exists at exactly that step. The request is untrusted: never raises."""
    x = _as_number(requested)
    if x is None or not math.isfinite(x) or not x.is_integer() or x < 0:
        return AgentRollback(False, None, f"rollback_to_step {requested!r} refused: not a non-negative integer step")
    to = int(x)
    no = f"rollback to step {to} refused: "
    if cfg.agent_rollbacks == 0:
        return AgentRollback(False, None, no + "agent rollbacks are disabled (guard.agent_rollbacks=0)")
    if len(used) >= cfg.agent_rollbacks:
        return AgentRollback(False, None, no + f"already {len(used)} this round (guard.agent_rollbacks)")
    last = total_steps * (1 - cfg.agent_rollback_end_fraction)
    if step >= last:
        return AgentRollback(
            False, None, no + f"step {step} is in the last {cfg.agent_rollback_end_fraction:g} of the run (>= {last:g})"
        )
    if to > step:
        return AgentRollback(False, None, no + f"it is after the decision step {step}")
    if to in used:
        return AgentRollback(False, None, no + "this round already rolled back to it once")
    if not any(c.healthy and c.step == to for c in checkpoints):
        return AgentRollback(False, None, no + "no healthy checkpoint at that step")
    return AgentRollback(True, to, f"agent-requested rollback from step {step} to the checkpoint at step {to}")
