"""The baseline schedule contract, checked on every schedule in SCHEDULES (toys registered in their own file too).

    python -m pytest -q tests/test_schedules_contract.py

Every registered schedule, built by `make_schedule(NAME, peak, cfg)` as `lrpilot baseline --schedule NAME` builds
it, must: be a blocking ScheduleController whose describe() names it; follow the trainer's own warmup
(lrpilot.lr.warmup_lr) before warmup_steps and start at the peak at warmup_steps; stay finite and in
[0, peak] over the whole run; answer each decision point with a positive LR and a plan whose knots are its own
lr_at for every step up to the next decision point (so the trainer follows the curve, not a staircase); and be
deterministic (a fresh instance answers the same).
"""

from __future__ import annotations

import json
import math

import pytest
from toy_components import toy_schedule  # noqa: F401 - registers toy-step

from lrpilot.config import RunConfig, ScheduleConfig, TrainConfig
from lrpilot.controllers.base import Observation
from lrpilot.controllers.schedules import SCHEDULES, ScheduleController, make_schedule
from lrpilot.lr import warmup_lr

#: (total_steps, warmup_steps, decision_every, peak): a tiny run, no warmup, a long warmup, an odd interval
SHAPES = [(30, 10, 10, 3e-3), (100, 0, 7, 1e-3), (1000, 900, 50, 1e-2), (601, 61, 37, 6e-4)]


def _cfg(total: int, warmup: int, every: int, peak: float) -> RunConfig:
    return RunConfig(
        train=TrainConfig(total_steps=total),
        schedule=ScheduleConfig(init_lr=peak, warmup_steps=warmup, decision_every=every),
    )


def _obs(step: int, total: int, warmup: int, every: int, lr: float) -> Observation:
    return Observation(step=step, total_steps=total, warmup_steps=warmup, decision_every=every, lr=lr, init_lr=lr,
                       recent_losses=(4.0,), loss_history=(), lr_history=())  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{s[0]}-W{s[1]}-E{s[2]}" for s in SHAPES])
@pytest.mark.parametrize("name", SCHEDULES.names())
def test_schedule_contract(name, shape):
    total, warmup, every, peak = shape
    ctrl = make_schedule(name, peak, _cfg(*shape))
    assert isinstance(ctrl, ScheduleController) and ctrl.blocking
    desc = ctrl.describe()
    assert desc["controller"] == name and desc["peak_lr"] == peak
    json.dumps(desc, allow_nan=False)
    for t in range(warmup):
        assert ctrl.lr_at(t) == pytest.approx(warmup_lr(t, peak, warmup), rel=1e-12)
    assert ctrl.lr_at(warmup) == pytest.approx(peak, rel=1e-12)
    for t in range(total + 1):
        lr = ctrl.lr_at(t)
        assert math.isfinite(lr) and 0 <= lr <= peak * (1 + 1e-12), (t, lr)
    fresh = make_schedule(name, peak, _cfg(*shape))
    for step in range(warmup, total, every):
        d = ctrl.decide(_obs(step, total, warmup, every, ctrl.lr_at(step)))
        assert math.isfinite(d.lr) and d.lr > 0
        expected = tuple((s, ctrl.lr_at(s)) for s in range(step, min(step + every, total)))
        assert d.plan == expected
        assert fresh.decide(_obs(step, total, warmup, every, ctrl.lr_at(step))) == d


def test_unknown_schedule_names_the_choices_and_the_alias():
    with pytest.raises(ValueError) as e:
        make_schedule("cosin", 1e-3, _cfg(*SHAPES[0]))
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in SCHEDULES.names()) and "alias linear" in msg
