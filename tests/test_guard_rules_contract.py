"""The guard-rule contract, over every rule in lrpilot.decision.GUARD_RULES (the toy one included): a rule is
pure (the same input gives the same answer), never raises on an untrusted LR or plan, answers with the guard's
result types, and leaves an in-bounds LR equal to the current one alone. A new rule registered in its own file
(CONTRIBUTING.md, Extending > Guard rule) is covered here with no edit.

    python -m pytest -q tests/test_guard_rules_contract.py
"""

from __future__ import annotations

import math

import pytest
from toy_components import toy_guard_rule  # noqa: F401 - registers toy_cap

from lrpilot import guard
from lrpilot.config import GuardConfig
from lrpilot.controllers.base import Observation
from lrpilot.decision import GUARD_RULES, Command, GuardContext, Point

HOSTILE_LRS = [math.nan, math.inf, -math.inf, -1e-3, 0.0, 1e-300, 1e9, 5e-4, 4e-4, 1e-2]
HOSTILE_PLANS = [
    ((20, 5e-4), (30, 2.5e-4)),
    ((20, math.nan), (30, math.inf)),
    ((20, -1.0), (25, 0.0), (30, 1e9)),
    (),
]


def _point(loss: float) -> Point:
    obs = Observation(step=20, total_steps=30, warmup_steps=10, decision_every=10, lr=5e-4, init_lr=1e-3,
                      recent_losses=(loss, loss), loss_history=((10, 5.1),), lr_history=((10, 5e-4),))  # fmt: skip
    return Point(obs=obs, trend="", launch=0)


@pytest.fixture(params=GUARD_RULES.names())
def rule(request):
    return GUARD_RULES.get(request.param)()


@pytest.mark.parametrize("lower_only", [False, True])
def test_bound_lr_is_pure_never_raises_and_answers_a_clamp_result(rule, lower_only):
    ctx = GuardContext(current_lr=5e-4, cfg=GuardConfig(), lower_only=lower_only)
    for lr in HOSTILE_LRS:
        a, b = rule.bound_lr(lr, ctx), rule.bound_lr(lr, ctx)
        assert isinstance(a, guard.ClampResult)
        assert (a.lr == b.lr or (math.isnan(a.lr) and math.isnan(b.lr))) and a.reasons == b.reasons
        assert all(isinstance(r, str) and r for r in a.reasons)


def test_an_in_bounds_lr_equal_to_the_current_one_is_left_alone(rule):
    ctx = GuardContext(current_lr=5e-4, cfg=GuardConfig(), lower_only=True)
    res = rule.bound_lr(5e-4, ctx)
    assert res.lr == 5e-4 and not res.clamped and not res.reasons


def test_bound_plan_is_pure_and_never_raises(rule):
    ctx = GuardContext(current_lr=5e-4, cfg=GuardConfig())
    for plan in HOSTILE_PLANS:
        a, b = rule.bound_plan(plan, ctx), rule.bound_plan(plan, ctx)
        assert isinstance(a, guard.PlanResult) and a == b


def test_pre_empt_is_pure_and_quiet_on_a_calm_interval(rule):
    ctx = GuardContext(current_lr=5e-4, cfg=GuardConfig())
    assert rule.pre_empt(_point(4.9), 5.0, ctx) is None  # the loss fell: nothing to pre-empt
    for loss, prev in [(math.nan, 5.0), (math.inf, 5.0), (1e6, math.nan), (40.0, 4.0)]:
        a, b = rule.pre_empt(_point(loss), prev, ctx), rule.pre_empt(_point(loss), prev, ctx)
        assert a is None or isinstance(a, Command)
        assert (a is None) == (b is None) and (a is None or (a.kind, a.new_lr) == (b.kind, b.new_lr))
