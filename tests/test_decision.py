"""The decision core alone (lrpilot.decision): no trainer, no Pilot; observations in, commands and records out.

python -m pytest -q tests/test_decision.py
"""

from __future__ import annotations

import math
import threading

import pytest

from lrpilot import guard
from lrpilot.config import ConfigError, GuardConfig, load_config
from lrpilot.controllers.base import BaseController, Decision
from lrpilot.controllers.rules import RuleController
from lrpilot.controllers.schedules import make_schedule
from lrpilot.decision import (
    DEFAULT_GUARD_RULES,
    GUARD_RULES,
    Command,
    DecisionCore,
    Point,
    RunShape,
    build_guard_rules,
    decision_record,
)
from lrpilot.supervisor import DECISION_FIELDS

SHAPE = RunShape(total_steps=200, warmup_steps=20, decision_every=10, init_lr=1e-3, round_index=3)


class Fixed(BaseController):
    """Answers the same LR (a multiple of the current one) every time."""

    name = "fixed"

    def __init__(self, factor: float, plan=None, raise_=None) -> None:
        self.factor, self.plan, self.raise_ = factor, plan, raise_

    def decide(self, obs):
        if self.raise_ is not None:
            raise self.raise_
        return Decision(lr=obs.lr * self.factor, reason=f"x{self.factor}", plan=self.plan)


def _core(controller, cfg=None, **kw) -> DecisionCore:
    core = DecisionCore(controller, cfg or GuardConfig(), SHAPE, stamp={"round": 3, "controller": "t"}, **kw)
    core.run_start_iso = "2026-01-01T00:00:00"
    return core


def _point(core: DecisionCore, step: int = 30, lr: float = 1e-3, losses=(3.0, 3.0), launch: int = 1) -> Point:
    obs = core.observation(step, lr, losses, loss_history=[(step, sum(losses) / len(losses))], lr_history=[(step, lr)])
    return Point(obs=obs, trend="flat +0.000", launch=launch)


def test_a_too_big_jump_is_clamped_as_guard_clamp_lr_does_and_the_record_keeps_the_published_order():
    core = _core(Fixed(100.0))
    p = _point(core)
    decision, latency = core.ask_inline(p.obs)
    cmd = core.guard(p, decision, latency)
    want = guard.clamp_lr(0.1, 1e-3, core.g)
    assert cmd.kind == "decision" and cmd.new_lr == want.lr == 2e-3
    assert cmd.fields["clamp_reasons"] == list(want.reasons) and cmd.fields["clamped"] is True
    rec = core.command_record(p, cmd, seq=1)
    assert tuple(rec)[: len(DECISION_FIELDS)] == DECISION_FIELDS
    assert list(rec)[-2:] == ["round", "controller"]  # the supervisor's layout: the stamp last
    assert rec["raw_lr_request"] == pytest.approx(0.1) and rec["seq"] == 1 and rec["effective_step"] is None


@pytest.mark.parametrize("lower_only", [False, True])
@pytest.mark.parametrize("proposed", [1e-3, 5e-4, 1.5e-3, 9.0, 1e-9, 0.0, -1.0, math.nan, math.inf, "x", None])
def test_the_registered_rules_bound_an_lr_exactly_as_guard_clamp_lr(proposed, lower_only):
    cfg = GuardConfig()
    core = _core(Fixed(1.0), cfg, lower_only=lower_only)
    for current in (1e-3, 5e-7, 2e-2):  # inside, below the floor, above the ceiling
        assert core.bound_lr(proposed, current) == guard.clamp_lr(proposed, current, cfg, lower_only=lower_only)


def test_a_schedule_plan_goes_through_clamp_plan():
    cfg = load_config("cpu-smoke")
    cosine = make_schedule("cosine", 3e-3, cfg)
    core = DecisionCore(cosine, cfg.guard, SHAPE)
    p = _point(core, step=20, lr=3e-4)  # far below the curve: its knots come back at most max_ratio x
    cmd = core.guard(p, *core.ask_inline(p.obs))
    assert cmd.plan and max(lr for _, lr in cmd.plan) <= cfg.guard.max_ratio * 3e-4 + 1e-18
    want = guard.clamp_plan(cosine.decide(p.obs).plan, cfg.guard, current=3e-4)
    assert cmd.plan == want.plan and set(want.reasons) <= set(cmd.fields["clamp_reasons"])


def test_the_emergency_rule_pre_empts_the_controller_and_supersedes_the_question_in_flight():
    cfg = GuardConfig()
    core = _core(RuleController())
    asked = _point(core, step=30)
    core.inflight = asked
    p = _point(core, step=40, losses=(cfg.emergency_loss + 1.0,))
    cmd = core.pre_empt(p, prev_mean=3.0)
    assert cmd is not None and cmd.kind == "emergency" and cmd.new_lr == guard.emergency_lr(1e-3, cfg)
    assert asked.superseded_by == 40
    rec = core.command_record(p, cmd)
    assert rec["raw_lr_request"] == cmd.new_lr and rec["emergency_triggers"] == list(cmd.fields["emergency_triggers"])
    assert core.pre_empt(_point(core, step=50), prev_mean=3.0) is None  # a quiet interval: ask the controller


def test_a_controller_error_keeps_the_lr_as_a_fallback():
    core = _core(Fixed(1.0, raise_=RuntimeError("boom")))
    p = _point(core)
    cmd = core.guard(p, *core.ask_inline(p.obs))
    assert cmd.kind == "fallback" and cmd.new_lr == 1e-3
    assert cmd.reasoning == "controller error: RuntimeError: boom; kept the current LR"
    assert core.guard(p, "not a decision", 0.0).reasoning.startswith("controller returned str")


def test_rules_controller_from_the_core_sees_its_own_history():
    core = _core(RuleController())
    p = _point(core)
    cmd = core.guard(p, *core.ask_inline(p.obs))
    core.decisions.append(core.command_record(p, cmd))
    obs = _point(core, step=40).obs
    assert [d.step for d in obs.decisions] == [30] and obs.round_index == 3 and obs.lr == 1e-3


def test_a_non_blocking_controller_is_asked_in_a_worker_thread_one_question_at_a_time():
    release = threading.Event()

    class Slow(BaseController):
        name, blocking = "slow", False

        def decide(self, obs):
            assert release.wait(30)
            return Decision(lr=obs.lr / 2, reason="halve")

    core = _core(Slow())
    first, second = _point(core, step=30), _point(core, step=40)
    assert core.ask(first) and not core.ask(second)  # the second point is skipped while the first is out
    assert first.skipped == [40] and core.asked == [first] and core.poll() == []
    release.set()
    replies = core.poll(timeout=30)
    assert [r[0] for r in replies] == [first]
    assert core.answered(replies[0], launch=1) is None and core.inflight is None and core.asked == []
    cmd = core.guard(first, replies[0][1], replies[0][2])
    assert cmd.new_lr == 5e-4 and cmd.fields["skipped_observes"] == [40]
    # the same reply after a rollback (another launch) is stale, and its record says so
    why = core.answered(replies[0], launch=2)
    assert why == "discarded: the trainer was rolled back before the reply arrived"
    rec = core.stale_record(first, replies[0][1], 0.5, why)
    assert rec["kind"] == "superseded" and rec["new_lr"] == 1e-3 and rec["raw_lr_request"] == 5e-4


def test_an_agent_rollback_is_granted_through_the_hosts_check():
    class Back(BaseController):
        name = "back"

        def decide(self, obs):
            return Decision(lr=obs.lr, reason="go back", rollback_to_step=20)

    core = _core(Back())
    p = _point(core)
    cmd = core.guard(p, *core.ask_inline(p.obs), grant=lambda point, to: (to, "ok", "ckpt-20"))
    assert (cmd.kind, cmd.rollback_to, cmd.rollback_handle) == ("agent_rollback", 20, "ckpt-20")
    assert list(cmd.fields)[:5] == ["raw_lr_request", "clamped", "clamp_reasons", "latency_s", "rollback_reason"]
    refused = core.guard(p, *core.ask_inline(p.obs), grant=lambda point, to: (None, "no checkpoint", None))
    assert refused.kind == "decision" and refused.fields["rollback_refused"] == "no checkpoint"
    assert refused.fields["clamp_reasons"] == ["no checkpoint"] and refused.fields["clamped"] is True


def test_one_record_function_with_each_hosts_field_order():
    core = _core(Fixed(1.0))
    p = _point(core)
    p.skipped.append(40)
    cmd = Command("decision", 1e-3, "r", fields={"raw_lr_request": 1e-3, "latency_s": 0.1, "raw_reply": "x"})
    sup = decision_record("iso", p, 1e-3, kind="decision", reasoning="r", stamp={"round": 1}, raw_reply="x")
    pil = decision_record("iso", p, 1e-3, kind="decision", reasoning="r", stamp={"round": 1}, stamp_first=True,
                          raw_reply="x")  # fmt: skip
    assert list(sup)[-2:] == ["raw_reply", "round"] and list(pil)[-2:] == ["round", "raw_reply"]
    assert core.command_record(p, cmd)["latency_s"] == 0.1


def test_guard_rules_registry_names_and_one_line_errors():
    assert list(DEFAULT_GUARD_RULES) == ["emergency", "clamp", "lower_only"]
    assert all(n in GUARD_RULES for n in DEFAULT_GUARD_RULES)
    with pytest.raises(ConfigError, match="guard.rules 'clmap': unknown guard rule; choose one of: emergency"):
        build_guard_rules(["clmap"])
    with pytest.raises(ValueError, match="layout"):
        DecisionCore(Fixed(1.0), GuardConfig(), SHAPE, layout="other")


def test_a_pilot_logs_the_same_trend_words_as_the_supervisor(tmp_path):
    """Both hosts of the core log `trend` through decision.interval_trend (the Pilot used to write
    'decreasing'/'flat' while the supervisor wrote 'down -0.123'), and sample trajectories the same way."""
    import torch

    from lrpilot.decision import interval_trend, sample_trajectory
    from lrpilot.logs import read_jsonl
    from lrpilot.pilot import Pilot

    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1e-3)
    pilot = Pilot(opt, controller="rules", total_steps=40, warmup_steps=4, decision_every=8, init_lr=1e-3,
                  run_dir=tmp_path / "run")  # fmt: skip
    for step in range(40):
        pilot.step(4.0 - 0.05 * step)  # a loss falling 0.4 per interval
        opt.step()
    pilot.finish(final_eval_loss=2.0)
    recs = [r for r in read_jsonl(tmp_path / "run" / "decisions.jsonl") if r.get("kind") == "decision"]
    assert recs, "the rules answered at least one decision point"
    trends = [r["trend"] for r in recs]
    assert trends[0] == "insufficient data" and trends[-1] == "down -0.400", trends
    assert all(t == "insufficient data" or t.startswith("down -0.") for t in trends), trends
    assert interval_trend(3.0, 2.6) == "down -0.400" and interval_trend(float("nan"), 1.0) == "insufficient data"
    pts = {s: float(s) for s in range(1203)}
    sampled = sample_trajectory(pts)
    assert len(sampled) <= 500 and sampled[0] == (0, 0.0) and sampled[-1] == (1202, 1202.0)


def test_the_warmup_ends_where_the_controller_says_inside_the_guards_bounds():
    from lrpilot.controllers.rules import RuleParams
    from lrpilot.decision import warmup_end_lr

    g = GuardConfig(floor=1e-5, ceiling=5e-3)
    # a controller without a view keeps the configured target, even outside the guard's band (the user's own)
    assert warmup_end_lr(make_schedule("cosine", 8e-3, load_config("cpu-smoke")), 8e-3, g) == 8e-3
    assert warmup_end_lr(RuleController(RuleParams(ceiling=1e-3)), 3e-4, g) == pytest.approx(1e-3)
    assert warmup_end_lr(RuleController(RuleParams(ceiling=3e-2)), 3e-3, g) == 5e-3  # the guard's ceiling

    class Bad(RuleController):
        name = "bad"

        def warmup_to(self, init_lr: float) -> float:
            return float("nan")

    with pytest.raises(ValueError, match=r"controller bad: warmup_to\(0.0003\) gave nan"):
        warmup_end_lr(Bad(), 3e-4, g)
