"""Property-based tests of the SafetyGuard rules (lrpilot.guard), plus examples with the published numbers.

python -m pytest -q tests/test_guard.py
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import lrpilot.guard as guard_module
from lrpilot.config import GuardConfig
from lrpilot.guard import (
    CATASTROPHIC_LOSS,
    HIGH_LOSS,
    INF_LOSS,
    LOSS_JUMP,
    NAN_LOSS,
    CheckpointInfo,
    ClampResult,
    CrashCounter,
    check_emergency,
    check_loss,
    choose_rollback,
    clamp_lr,
    clamp_plan,
    crash_backoff,
    crash_lr,
    emergency_lr,
    is_fast_crash,
    is_hung,
)

DEFAULT = GuardConfig()

# ------------------------------------------------------------------------------------------ strategies


@st.composite
def guard_configs(draw) -> GuardConfig:
    """Valid GuardConfigs around the defaults (the default itself is drawn often)."""
    if draw(st.booleans()):
        return DEFAULT
    floor = 10 ** draw(st.floats(-8, -3))
    emergency_loss = draw(st.floats(1, 100))
    return GuardConfig(
        min_ratio=draw(st.floats(0.05, 1.0)),
        max_ratio=draw(st.floats(1.0, 10.0)),
        floor=floor,
        ceiling=floor * 10 ** draw(st.floats(0.1, 6)),
        rollback_back_steps=draw(st.integers(0, 2000)),
        crash_lr_factor=draw(st.floats(0.05, 0.95)),
        emergency_jump=draw(st.floats(0.1, 10)),
        emergency_loss=emergency_loss,
        emergency_factor=draw(st.floats(0.05, 0.95)),
        crash_loss=emergency_loss + draw(st.floats(0.01, 200)),  # config requires crash_loss > emergency_loss
        max_fast_crash=draw(st.integers(1, 30)),
        fast_crash_steps=draw(st.integers(0, 1000)),
        max_repeat_crash=draw(st.integers(2, 10)),
    )


# positive LRs over many orders of magnitude, including ones outside [floor, ceiling]
lrs = st.floats(-10, 1).map(lambda e: 10**e) | st.floats(min_value=1e-12, max_value=10.0)
bad_proposals = (
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0])
    | st.floats(max_value=0.0, allow_nan=False)
    | st.sampled_from([None, "0.01", True, False, [1e-3], {"lr": 1e-3}])
)


def band(current: float, cfg: GuardConfig) -> tuple[float, float]:
    """Where a proposal may land: the jump band intersected with [floor, ceiling] (empty -> the nearest bound)."""
    lo = max(cfg.min_ratio * current, cfg.floor)
    hi = min(cfg.max_ratio * current, cfg.ceiling)
    if lo > hi:  # the jump band lies wholly outside the global bounds: they win
        x = cfg.ceiling if cfg.min_ratio * current > cfg.ceiling else cfg.floor
        return x, x
    return lo, hi


# -------------------------------------------------------------------------------------- 1. clamp_lr


@given(p=lrs, cur=lrs, cfg=guard_configs())
@example(p=1e-2, cur=3e-4, cfg=DEFAULT)
@example(p=1.0, cur=1.0, cfg=DEFAULT)  # band wholly above the ceiling
@example(p=1e-9, cur=1e-9, cfg=DEFAULT)  # band wholly below the floor
def test_clamp_within_bounds(p, cur, cfg):
    r = clamp_lr(p, cur, cfg)
    lo, hi = band(cur, cfg)
    assert cfg.floor <= r.lr <= cfg.ceiling
    assert lo <= r.lr <= hi
    assert not r.fallback


@given(p=lrs, cur=lrs, cfg=guard_configs())
def test_clamp_idempotent(p, cur, cfg):
    first = clamp_lr(p, cur, cfg)
    second = clamp_lr(first.lr, cur, cfg)
    assert second.lr == first.lr
    assert not second.clamped and second.reasons == ()


@given(cur=lrs, u=st.floats(0, 1), cfg=guard_configs())
def test_clamp_leaves_allowed_proposal_alone(cur, u, cfg):
    lo, hi = band(cur, cfg)
    p = min(max(lo + u * (hi - lo), lo), hi)
    assert clamp_lr(p, cur, cfg) == ClampResult(lr=p, clamped=False, reasons=(), fallback=False)


@given(p=lrs, cur=lrs, cfg=guard_configs())
def test_clamp_reasons_iff_clamped_iff_changed(p, cur, cfg):
    r = clamp_lr(p, cur, cfg)
    assert r.clamped == (r.lr != p)
    assert bool(r.reasons) == r.clamped
    assert all(isinstance(s, str) and s for s in r.reasons)
    if r.clamped:
        assert r.reasons[-1].endswith(f"{r.lr:.6g}")  # the last reason names the LR actually sent


@given(p1=lrs, p2=lrs, cur=lrs, cfg=guard_configs())
def test_clamp_is_monotone(p1, p2, cur, cfg):
    lo, hi = sorted((p1, p2))
    assert clamp_lr(lo, cur, cfg).lr <= clamp_lr(hi, cur, cfg).lr


@given(p=bad_proposals, cur=lrs, cfg=guard_configs())
def test_clamp_bad_proposal_keeps_current(p, cur, cfg):
    r = clamp_lr(p, cur, cfg)
    assert r.fallback and r.clamped and r.reasons
    assert "kept current" in r.reasons[0]
    assert r.lr == min(max(cur, cfg.floor), cfg.ceiling)  # the current LR, within the global bounds
    assert len(r.reasons) == (1 if cfg.floor <= cur <= cfg.ceiling else 2)


@pytest.mark.parametrize("cur", [math.nan, math.inf, 0.0, -1e-3, None, "3e-4", True])
def test_clamp_rejects_corrupt_current(cur):
    with pytest.raises(ValueError, match="clamp_lr current"):
        clamp_lr(1e-3, cur, DEFAULT)


def test_clamp_published_numbers():
    up = clamp_lr(1e-2, 3e-4, DEFAULT)
    assert up.lr == pytest.approx(6e-4) and up.clamped and not up.fallback
    assert up.reasons == ("requested 0.01 > 2.0x current 0.0003; clamped to 0.0006",)
    down = clamp_lr(1e-5, 3e-4, DEFAULT)
    assert down.lr == pytest.approx(1.5e-4)
    assert down.reasons == ("requested 1e-05 < 0.5x current 0.0003; clamped to 0.00015",)
    assert clamp_lr(5e-4, 3e-4, DEFAULT) == ClampResult(lr=5e-4, clamped=False)
    # both limits: 2x 0.04 = 0.08, then the 5e-2 ceiling
    both = clamp_lr(0.1, 0.04, DEFAULT)
    assert both.lr == 0.05
    assert both.reasons == (
        "requested 0.1 > 2.0x current 0.04; clamped to 0.08",
        "0.08 > ceiling 0.05; clamped to 0.05",
    )
    assert clamp_lr(1.5e-6, 1e-6, DEFAULT).lr == 1.5e-6
    low = clamp_lr(6e-7, 1e-6, DEFAULT)
    assert low.lr == 1e-6 and low.reasons == ("requested 6e-07 < floor 1e-06; raised to 1e-06",)
    nan = clamp_lr(math.nan, 3e-4, DEFAULT)
    assert nan.lr == 3e-4 and nan.fallback
    assert nan.reasons == ("requested nan is not finite; kept current 0.0003",)
    assert clamp_lr(-0.01, 3e-4, DEFAULT).reasons == ("requested -0.01 is not positive; kept current 0.0003",)


# ------------------------------------------------------------------------------------ clamp_plan

knot_lrs = st.floats(0, 1) | st.floats(-1, 0) | st.floats(-10, 0).map(lambda e: 10**e)
plans = st.lists(st.tuples(st.integers(0, 10_000), knot_lrs), max_size=20)


@given(plan=plans, cfg=guard_configs())
def test_plan_bounded_sorted_idempotent(plan, cfg):
    out, reasons = clamp_plan(plan, cfg)
    assert all(0.0 <= lr <= cfg.ceiling for _, lr in out)
    steps = [s for s, _ in out]
    assert steps == sorted(set(steps)) == sorted({s for s, _ in plan})
    assert all(type(s) is int for s in steps)
    assert bool(reasons) == (list(out) != list(plan))
    assert clamp_plan(out, cfg) == (out, ())


@given(plan=plans, cfg=guard_configs())
def test_plan_in_bounds_untouched_even_below_floor(plan, cfg):
    # distinct increasing steps, every lr in [0, ceiling]: nothing to do, however far below the floor
    plan = sorted({s: min(abs(lr), cfg.ceiling) for s, lr in plan}.items())
    assert clamp_plan(plan, cfg) == (tuple(plan), ())


@given(plan=plans, cfg=guard_configs())
def test_plan_keeps_values_it_does_not_clamp(plan, cfg):
    out = dict(clamp_plan(plan, cfg).plan)
    first = {}
    for s, lr in plan:
        first.setdefault(s, lr)
    assert out == {s: min(max(lr, 0.0), cfg.ceiling) for s, lr in first.items()}


def test_plan_examples():
    decay = [(1000, 3e-4), (5000, 1e-7), (10000, 0.0)]  # linear decay to zero: legitimately below floor
    assert clamp_plan(decay, DEFAULT) == (tuple(decay), ())
    res = clamp_plan([[600, 0.2], [300, -1e-4], (300, 1e-3), (900, math.nan), "x", (-1, 1e-3), (1.5, 1e-3)], DEFAULT)
    assert res.plan == ((300, 0.0), (600, 0.05))
    assert res.clamped
    text = " | ".join(res.reasons)
    for needle in (
        "0.2 > ceiling 0.05",
        "-0.0001 < 0",
        "repeated step",
        "not a finite number",
        "not a (step, lr) pair",
        "not a non-negative integer",
        "sorted",
    ):
        assert needle in text, needle
    assert clamp_plan([(600.0, 1e-3)], DEFAULT).plan == ((600, 1e-3),)
    assert clamp_plan([], DEFAULT) == ((), ())


# ---------------------------------------------------------------------------------------- 2. rollback

checkpoint_lists = st.lists(st.builds(CheckpointInfo, step=st.integers(0, 6000), healthy=st.booleans()), max_size=12)


@given(ckpts=checkpoint_lists, crash_step=st.integers(0, 6000), lr=lrs, cfg=guard_configs())
@example(ckpts=[CheckpointInfo(500), CheckpointInfo(1000), CheckpointInfo(2000)], crash_step=2000, lr=3e-4, cfg=DEFAULT)
@example(ckpts=[CheckpointInfo(1000, healthy=False), CheckpointInfo(1500)], crash_step=2000, lr=3e-4, cfg=DEFAULT)
def test_rollback_rule(ckpts, crash_step, lr, cfg):
    plan = choose_rollback(ckpts, crash_step, lr, cfg)
    usable = [c.step for c in ckpts if c.healthy and c.step <= crash_step]
    if not usable:
        assert plan is None
        return
    assert plan is not None
    assert plan.checkpoint in ckpts and plan.checkpoint.healthy  # never unhealthy
    assert plan.to_step == plan.checkpoint.step <= crash_step  # never after the crash
    target = crash_step - cfg.rollback_back_steps
    early = [s for s in usable if s <= target]
    if early:
        assert plan.to_step == max(early)  # the latest one far enough back
    else:
        assert plan.to_step == min(usable)  # else the earliest healthy one
    assert plan.new_lr == crash_lr(lr, cfg) == min(max(lr * cfg.crash_lr_factor, cfg.floor), cfg.ceiling)
    assert f"step {crash_step}" in plan.reason and f"step {plan.to_step}" in plan.reason


@given(ckpts=checkpoint_lists, crash_step=st.integers(0, 6000), data=st.data())
def test_rollback_ignores_order(ckpts, crash_step, data):
    shuffled = data.draw(st.permutations(ckpts))
    a, b = choose_rollback(ckpts, crash_step, 3e-4, DEFAULT), choose_rollback(shuffled, crash_step, 3e-4, DEFAULT)
    assert (a is None) == (b is None)
    if a is not None:
        assert a.to_step == b.to_step and a.new_lr == b.new_lr


@given(lr=st.floats(DEFAULT.floor, DEFAULT.ceiling))
def test_crash_lr_halves_within_bounds(lr):
    assert crash_lr(lr, DEFAULT) == max(lr * 0.5, DEFAULT.floor)


def test_rollback_examples():
    ckpts = [CheckpointInfo(s, healthy=s != 2100, path=f"step_{s:06d}.pt") for s in range(300, 3301, 300)]
    plan = choose_rollback(ckpts, 3150, 1e-3, DEFAULT)
    assert plan.to_step == 2100 - 300  # 2100 is unhealthy; 2150 is the target
    assert plan.checkpoint.path == "step_001800.pt"
    assert plan.new_lr == 5e-4
    assert "crash at step 3150" in plan.reason and "latest healthy" in plan.reason
    assert choose_rollback(ckpts, 2800, 1e-3, DEFAULT).to_step == 1800  # exactly rollback_back_steps back
    early = choose_rollback(ckpts, 1000, 1e-3, DEFAULT)
    assert early.to_step == 300 and "earliest healthy" in early.reason
    assert choose_rollback(ckpts, 299, 1e-3, DEFAULT) is None  # only checkpoints after the crash
    assert choose_rollback([CheckpointInfo(300, healthy=False)], 5000, 1e-3, DEFAULT) is None
    assert choose_rollback([], 5000, 1e-3, DEFAULT) is None
    assert crash_lr(1.5e-6, DEFAULT) == 1e-6  # floored
    with pytest.raises(ValueError, match="lr_at_crash"):
        choose_rollback(ckpts, 3150, math.nan, DEFAULT)


# ---------------------------------------------------------------------------------------- 3. health


@given(loss=st.floats(allow_nan=False, allow_infinity=False), cfg=guard_configs())
@example(loss=50.0, cfg=DEFAULT)
@example(loss=50.000001, cfg=DEFAULT)
def test_check_loss_finite(loss, cfg):
    h = check_loss(loss, cfg)
    assert h.ok == (loss <= cfg.crash_loss)
    assert h.reason == ("" if h.ok else CATASTROPHIC_LOSS)
    assert bool(h.detail) == (not h.ok)


@given(cfg=guard_configs())
def test_check_loss_non_finite(cfg):
    assert check_loss(math.nan, cfg).reason == NAN_LOSS
    assert check_loss(math.inf, cfg).reason == INF_LOSS
    assert check_loss(-math.inf, cfg).reason == INF_LOSS
    for junk in (None, "nan", "2.5", True, [2.5]):
        h = check_loss(junk, cfg)
        assert not h.ok and h.reason == NAN_LOSS


finite_losses = st.floats(-5, 200)


@given(prev=finite_losses | st.just(math.nan), cur=finite_losses, cfg=guard_configs())
@example(prev=3.0, cur=5.0, cfg=DEFAULT)  # a jump of exactly 2.0 is not above 2.0
@example(prev=3.0, cur=5.01, cfg=DEFAULT)
@example(prev=math.nan, cur=20.0, cfg=DEFAULT)
@example(prev=math.nan, cur=20.01, cfg=DEFAULT)
def test_emergency_triggers_exactly(prev, cur, cfg):
    jump = cur - prev  # NaN without a previous interval: never above the threshold
    expect = [t for t, on in ((LOSS_JUMP, jump > cfg.emergency_jump), (HIGH_LOSS, cur > cfg.emergency_loss)) if on]
    e = check_emergency(prev, cur, cfg)
    if not expect:
        assert e is None
        return
    assert e is not None and list(e.triggers) == expect
    assert e.loss == cur and e.reason.startswith("emergency: ")
    assert e.jump == jump or (math.isnan(e.jump) and math.isnan(jump))


@given(prev=finite_losses | st.just(math.nan), cfg=guard_configs())
def test_emergency_leaves_non_finite_to_check_loss(prev, cfg):
    for cur in (math.nan, math.inf, -math.inf, None, "30"):
        assert check_emergency(prev, cur, cfg) is None


@given(cur=lrs, cfg=guard_configs())
def test_emergency_lr(cur, cfg):
    lr = emergency_lr(cur, cfg)
    assert lr == min(max(cur * cfg.emergency_factor, cfg.floor), cfg.ceiling)
    assert cfg.floor <= lr <= cfg.ceiling
    if cur >= cfg.floor:
        assert lr <= cur  # an emergency never raises an LR that was within bounds


def test_emergency_published_numbers():
    e = check_emergency(3.1, 5.6, DEFAULT)
    assert e.triggers == (LOSS_JUMP,) and "LR x 0.3" in e.reason
    e = check_emergency(20.5, 21.0, DEFAULT)
    assert e.triggers == (HIGH_LOSS,)
    assert check_emergency(4.0, 4.5, DEFAULT) is None
    assert check_emergency(4.0, 3.0, DEFAULT) is None  # a falling loss is no emergency
    assert emergency_lr(1e-3, DEFAULT) == pytest.approx(3e-4)
    assert emergency_lr(2e-6, DEFAULT) == 1e-6  # floored
    with pytest.raises(ValueError, match="emergency_lr current"):
        emergency_lr(0.0, DEFAULT)


# -------------------------------------------------------------------------------------- 4. crash budget


@given(steps=st.integers(-10, 5000), cfg=guard_configs())
def test_is_fast_crash(steps, cfg):
    assert is_fast_crash(steps, cfg) == (steps <= cfg.fast_crash_steps)


def test_is_hung():
    assert not is_hung(600.0, DEFAULT) and is_hung(600.5, DEFAULT)
    # before a launch's first telemetry line the (longer) start timeout applies
    assert not is_hung(1800.0, DEFAULT, started=False) and is_hung(1800.5, DEFAULT, started=False)


@given(silent=st.floats(0, 1e5), hang=st.floats(1e-3, 1e4), start=st.floats(1e-3, 1e4), started=st.booleans())
def test_is_hung_uses_the_timeout_of_the_phase(silent, hang, start, started):
    cfg = GuardConfig(hang_timeout_s=hang, start_timeout_s=start)
    assert is_hung(silent, cfg, started=started) == (silent > (hang if started else start))


@given(lengths=st.lists(st.integers(0, 2000), max_size=60), start=st.integers(0, 5000), cfg=guard_configs())
def test_crash_counter_matches_trailing_quick_run(lengths, start, cfg):
    counter = CrashCounter()
    quick_run = 0
    # max_repeat_crash: slow crashes since one got past every crash before it (the furthest so far)
    slow_stuck, furthest = 0, -1
    for n in lengths:
        before = counter
        counter = counter.record(start + n, start)
        assert before.total == counter.total - 1  # record returns a new counter, the old one is unchanged
        quick_run = quick_run + 1 if n <= cfg.fast_crash_steps else 0
        if start + n > furthest:
            slow_stuck, furthest = 0, start + n
        slow_stuck += n > cfg.fast_crash_steps
        assert counter.consecutive_fast(cfg) == quick_run
        assert counter.repeated(cfg) == (slow_stuck, furthest)
        assert counter.stuck(cfg) == (slow_stuck >= cfg.max_repeat_crash)
        assert counter.give_up(cfg) == (quick_run >= cfg.max_fast_crash or slow_stuck >= cfg.max_repeat_crash)
    assert counter.total == len(lengths)


@given(cfg=guard_configs(), slow_at=st.integers(0, 40))
def test_crash_counter_gives_up_after_exactly_max(cfg, slow_at):
    quick, slow = cfg.fast_crash_steps, cfg.fast_crash_steps + 1
    counter = CrashCounter()
    for i in range(cfg.max_fast_crash - 1):
        counter = counter.record(100 + quick, 100)
        assert not counter.give_up(cfg), i
    if slow_at < cfg.max_fast_crash:
        counter = counter.record(100 + slow, 100)  # a long healthy stretch resets the count
        assert counter.consecutive_fast(cfg) == 0 and not counter.give_up(cfg)
        for _ in range(cfg.max_fast_crash - 1):
            counter = counter.record(quick, 0)
            assert not counter.give_up(cfg)
    counter = counter.record(quick, 0)
    assert counter.give_up(cfg)


def test_crash_counter_example():
    cfg = GuardConfig(max_fast_crash=3, fast_crash_steps=300)
    c = CrashCounter().record(1200, 1000).record(1100, 900)
    assert c.consecutive_fast(cfg) == 2 and not c.give_up(cfg)
    assert not c.record(5000, 1000).give_up(cfg)  # 4000 healthy steps: reset
    assert c.record(1000, 800).give_up(cfg)
    assert c.crashes == ((1200, 1000), (1100, 900))


def test_crashes_repeating_at_one_step_give_up_after_max_repeat_crash():
    """The tester's loop (cpu-smoke, checkpoint.every=10, a NaN at step 25 on every launch): each crash rolls
    back to step 10, 15 updates before it, so none is quick and max_fast_crash never fires; the third crash
    at step 25 gives up."""
    cfg = GuardConfig(rollback_back_steps=10, fast_crash_steps=10, max_fast_crash=5)
    assert cfg.max_repeat_crash == 3  # the default
    c = CrashCounter()
    for n in (1, 2):
        c = c.record(25, 10)
        assert c.repeated(cfg) == (n, 25) and not c.stuck(cfg) and not c.give_up(cfg)
        assert c.stuck_reason(cfg) == "" and c.consecutive_fast(cfg) == 0
    c = c.record(25, 10)
    assert c.repeated(cfg) == (3, 25) and c.stuck(cfg) and c.give_up(cfg) and c.consecutive_fast(cfg) == 0
    why = c.stuck_reason(cfg)
    assert why.startswith("gave up after 3 consecutive crashes at step 25, none past it")
    assert "guard.max_repeat_crash=3" in why and "\n" not in why
    assert CrashCounter().repeated(cfg) == (0, None)


def test_progress_past_the_crash_step_resets_the_repeat_count():
    cfg = GuardConfig(fast_crash_steps=10, max_repeat_crash=3)
    c = CrashCounter().record(25, 10).record(25, 10).record(40, 10)  # got past 25: progress
    assert c.repeated(cfg) == (1, 40) and not c.give_up(cfg)
    c = c.record(40, 20)
    assert c.repeated(cfg) == (2, 40) and not c.give_up(cfg)
    assert c.record(41, 20).repeated(cfg) == (1, 41)  # one step further is progress too
    c = c.record(40, 20)
    assert c.give_up(cfg) and "3 consecutive crashes at step 40" in c.stuck_reason(cfg)
    # a crash before the furthest one is no progress: 25, 20, 25 never got past step 25
    c = CrashCounter().record(25, 10).record(20, 5).record(25, 10)
    assert c.repeated(cfg) == (3, 25) and c.give_up(cfg)
    assert "3 consecutive crashes at or before step 25" in c.stuck_reason(cfg)


def test_quick_crashes_are_max_fast_crash_s_not_max_repeat_crash_s():
    """Crashes right after every relaunch (a broken node) are the back-off's and max_fast_crash's: repeated at
    one step they add nothing to the repeat count, so max_fast_crash keeps its meaning."""
    cfg = GuardConfig(fast_crash_steps=10, max_fast_crash=20, max_repeat_crash=3)
    c = CrashCounter()
    for _ in range(19):
        c = c.record(3, 0)
        assert c.repeated(cfg) == (0, 3) and not c.give_up(cfg)
    assert c.record(3, 0).give_up(cfg) and not c.record(3, 0).stuck(cfg)
    # slow crashes at one step with quick ones between still add up (a quick one past the step is progress)
    c = CrashCounter().record(25, 10).record(25, 20).record(25, 10)
    assert c.repeated(cfg) == (2, 25) and not c.give_up(cfg)
    assert c.record(25, 10).give_up(cfg)
    assert CrashCounter().record(25, 10).record(30, 25).record(30, 10).repeated(cfg) == (1, 30)


@given(cfg=guard_configs(), step=st.integers(0, 10**6), back=st.integers(1, 2000))
def test_slow_crashes_at_one_step_give_up_after_exactly_max_repeat_crash(cfg, step, back):
    start = max(0, step - cfg.fast_crash_steps - back)  # more than fast_crash_steps before: slow
    if step - start <= cfg.fast_crash_steps:
        return
    c = CrashCounter()
    for _ in range(cfg.max_repeat_crash - 1):
        c = c.record(step, start)
        assert not c.give_up(cfg)
    assert c.record(step, start).give_up(cfg)
    assert f"{cfg.max_repeat_crash} consecutive crashes at step {step}" in c.record(step, start).stuck_reason(cfg)


@pytest.mark.parametrize("bad", [1, 0, -3])
def test_max_repeat_crash_below_two_is_refused_naming_the_field(bad):
    from lrpilot.config import ConfigError

    with pytest.raises(ConfigError) as e:
        GuardConfig(max_repeat_crash=bad)
    msg = str(e.value)
    assert msg.startswith("guard.max_repeat_crash: must be >= 2") and "\n" not in msg


# ------------------------------------------------------------------------------------------ purity


def test_guard_does_not_import_torch():
    code = "import sys, lrpilot.guard; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_guard_imports_only_pure_modules():
    """No torch, no file or process I/O: the guard's imports are a short list of pure stdlib modules."""
    tree = ast.parse(Path(guard_module.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    # lrpilot.lr is stdlib-only itself (tests/test_lr.py::test_importing_lr_pulls_in_neither_torch_nor_numpy)
    pure = {"__future__", "math", "numbers", "collections.abc", "dataclasses", "typing", "lrpilot.config", "lrpilot.lr"}
    assert names <= pure
    assert "open(" not in Path(guard_module.__file__).read_text()


def test_plan_knots_never_rise_above_max_ratio_of_the_current_lr():
    """Issue 9, item 7: a schedule's plan after a rollback or a cut is held to max_ratio x current (rising),
    while it may still fall faster than min_ratio and below the floor (decay to 0)."""
    cfg = GuardConfig()
    res = clamp_plan([(100, 3e-3), (110, 2.5e-3), (120, 1e-3), (130, 0.0)], cfg, current=1e-3)
    assert res.plan == ((100, 2e-3), (110, 2e-3), (120, 1e-3), (130, 0.0))
    assert any("2.0x current" in r for r in res.reasons) and len(res.reasons) == 2
    # without `current` only the ceiling applies, as before
    assert clamp_plan([(100, 3e-3)], cfg).plan == ((100, 3e-3),)
    # a plain decay from the LR in force is untouched
    assert clamp_plan([(100, 1e-3), (110, 1e-5)], cfg, current=1e-3).reasons == ()


@given(
    base=st.floats(0, 100),
    factor=st.floats(1, 1e12),
    extra=st.floats(0, 1e4),
    lengths=st.lists(st.integers(0, 2000), max_size=40),
    fast_steps=st.integers(0, 1000),
)
def test_crash_backoff_grows_with_consecutive_quick_crashes_and_is_capped(base, factor, extra, lengths, fast_steps):
    cfg = GuardConfig(crash_backoff_s=base, crash_backoff_factor=factor, crash_backoff_max_s=base + extra,
                      fast_crash_steps=fast_steps)  # fmt: skip
    counter, prev_wait = CrashCounter(), 0.0
    for n in lengths:
        counter = counter.record(100 + n, 100)
        wait, run = counter.backoff_s(cfg), counter.consecutive_fast(cfg)
        assert wait == crash_backoff(run, cfg)
        assert 0 <= wait <= cfg.crash_backoff_max_s and math.isfinite(wait)
        if run == 0 or base == 0:
            assert wait == 0  # a slow crash (after a healthy stretch) relaunches at once
        elif run == 1:
            assert wait == base
        else:
            assert wait >= prev_wait  # never shrinks within a run of quick crashes
            grown = base * factor ** (run - 1) if (run - 1) * math.log10(factor) < 300 else math.inf
            assert wait == pytest.approx(min(base + extra, grown), rel=1e-9)
        prev_wait = wait


def test_crash_backoff_doubles_then_caps():
    cfg = GuardConfig(crash_backoff_s=5, crash_backoff_factor=2, crash_backoff_max_s=30)
    assert [crash_backoff(n, cfg) for n in range(7)] == [0, 5, 10, 20, 30, 30, 30]
    assert crash_backoff(10**6, cfg) == 30  # no overflow however long the run of crashes
    assert crash_backoff(3, GuardConfig(crash_backoff_s=0)) == 0


# ------------------------------------------------------------------------ lower-only (schedule-free)


@given(
    st.floats(min_value=1e-7, max_value=1.0, allow_nan=False),
    st.floats(min_value=1e-6, max_value=5e-2, allow_nan=False),
)
@example(1e-2, 3e-3)
def test_lower_only_never_raises_the_lr(proposed, current):
    """Schedule-free's rule: with lower_only the result is never above the current LR, a lower proposal is
    bounded as without it, and a higher one keeps the current LR with a reason naming the rule."""
    got = clamp_lr(proposed, current, DEFAULT, lower_only=True)
    plain = clamp_lr(proposed, current, DEFAULT)
    assert got.lr <= current
    if plain.lr <= current:
        assert got == plain
    else:
        assert got.lr == current and got.clamped and "lower-only" in got.reasons[-1]


def test_lower_only_plan_knots_never_rise():
    plan = [(10, 2e-3), (11, 1e-3), (12, 1.5e-3), (13, 5e-4)]
    out = clamp_plan(plan, DEFAULT, lower_only=1.2e-3)
    assert out.plan == ((10, 1.2e-3), (11, 1e-3), (12, 1e-3), (13, 5e-4))
    assert sum("lower-only" in r for r in out.reasons) == 2
    assert clamp_plan(plan, DEFAULT).plan == tuple(plan)  # without the rule nothing changes


def test_schedule_free_config_turns_the_rule_on():
    from lrpilot.config import ConfigError, load_config

    assert load_config("cpu-smoke", ["train.optimizer=schedulefree_adamw"]).lr_may_only_fall
    assert not load_config("cpu-smoke", ["train.optimizer=prodigy"]).lr_may_only_fall
    assert not load_config("cpu-smoke").lr_may_only_fall
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config("cpu-smoke", ["train.optimizer=sgd"])


# --------------------------------------------------------------------- 2b. poisoned checkpoints (issue 9.1)


@given(ckpts=checkpoint_lists, crash_step=st.integers(0, 6000), bad_from=st.integers(0, 6000), lr=lrs)
def test_rollback_never_picks_a_checkpoint_at_or_after_the_first_bad_loss(ckpts, crash_step, bad_from, lr):
    plan = choose_rollback(ckpts, crash_step, lr, DEFAULT, bad_from=bad_from)
    usable = [c.step for c in ckpts if c.healthy and c.step <= crash_step and c.step < bad_from]
    assert (plan is None) == (not usable)
    if plan is not None:
        assert plan.to_step < bad_from and plan.to_step in usable


def test_first_bad_loss_step_and_the_issue_example():
    from lrpilot.guard import first_bad_loss_step

    assert first_bad_loss_step([], DEFAULT) is None
    assert first_bad_loss_step([(1, 5.0), (2, 4.9)], DEFAULT) is None
    assert first_bad_loss_step([(7, math.nan), (5, math.inf), (6, 4.0)], DEFAULT) == 5
    assert first_bad_loss_step([(3, 4.0), (4, DEFAULT.crash_loss + 1), (5, "nan")], DEFAULT) == 4
    # cpu-smoke with checkpoint.every=5, NaN at step 5, step_000005.pt written before the kill: restart from 0
    ckpts = [CheckpointInfo(5)]
    assert choose_rollback(ckpts, 5, 3e-3, DEFAULT).to_step == 5  # what the guard did without knowing
    assert choose_rollback(ckpts, 5, 3e-3, DEFAULT, bad_from=5) is None
