"""Baseline schedules: the LR the trainer follows (plans stitched over a whole run) equals the closed form.

python -m pytest -q tests/test_schedules.py
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrpilot.config import ConfigError, load_config
from lrpilot.controllers.base import Observation
from lrpilot.controllers.schedules import (
    ConstantController,
    CosineController,
    LinearDecayController,
    WSDController,
    baseline_config,
    make_schedule,
)


def obs_at(step: int, total: int, warmup: int, every: int, lr: float = 1e-3) -> Observation:
    return Observation(
        step=step,
        total_steps=total,
        warmup_steps=warmup,
        decision_every=every,
        lr=lr,
        init_lr=lr,
        recent_losses=(3.0,) * every,
        loss_history=(),
        lr_history=(),
    )


def plan_lr(plan: tuple[tuple[int, float], ...], step: int) -> float:
    """The trainer's rule (docs/architecture.md): linear between knots, the last knot's LR after it."""
    if step <= plan[0][0]:
        return plan[0][1]
    for (s0, v0), (s1, v1) in zip(plan, plan[1:], strict=False):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return plan[-1][1]


def stitched(ctrl, total: int, warmup: int, every: int) -> dict[int, float]:
    """LR of every update after warmup when the trainer follows each decision's plan until the next one."""
    lrs: dict[int, float] = {}
    points = list(range(warmup, total, every))
    for i, d in enumerate(points):
        dec = ctrl.decide(obs_at(d, total, warmup, every))
        assert dec.plan is not None and all(d <= s < d + every for s, _ in dec.plan)
        assert dec.lr == dec.plan[0][1]
        nxt = points[i + 1] if i + 1 < len(points) else total
        for s in range(d, nxt):
            lrs[s] = plan_lr(dec.plan, s)
    return lrs


# independent closed forms (written out again here, not taken from the module)
def cosine_ref(s: int, peak: float, total: int, warmup: int) -> float:
    progress = (s - warmup) / (total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def d2z_ref(s: int, peak: float, total: int, warmup: int) -> float:
    return peak * (total - s) / (total - warmup)


def wsd_ref(s: int, peak: float, total: int, warmup: int) -> float:
    start = max(warmup, total - max(1, round(0.2 * total)))
    return peak if s <= start else peak * (total - s) / (total - start)


CASES = [
    ("cosine", CosineController, cosine_ref),
    ("d2z", LinearDecayController, d2z_ref),
    ("wsd", WSDController, wsd_ref),
    ("constant", ConstantController, lambda s, peak, total, warmup: peak),
]

run_shapes = st.integers(2, 400).flatmap(
    lambda total: st.tuples(st.just(total), st.integers(0, total - 1), st.integers(1, 60))
)
peaks = st.floats(1e-5, 1e-1)


@pytest.mark.parametrize("name,cls,ref", CASES, ids=[c[0] for c in CASES])
@settings(max_examples=60, deadline=None)
@given(shape=run_shapes, peak=peaks)
def test_stitched_plans_equal_closed_form(name, cls, ref, shape, peak):
    total, warmup, every = shape
    ctrl = cls(peak, total, warmup)
    lrs = stitched(ctrl, total, warmup, every)
    assert sorted(lrs) == list(range(warmup, total))
    for s, v in lrs.items():
        assert math.isclose(v, ref(s, peak, total, warmup), rel_tol=1e-9, abs_tol=1e-15), (s, v)
        assert math.isclose(ctrl.lr_at(s), v, rel_tol=1e-12, abs_tol=1e-15)
    # monotone non-increasing after warmup, and positive for every update
    seq = [lrs[s] for s in range(warmup, total)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(seq, seq[1:], strict=False))
    assert all(v > 0 for v in seq)
    # the trainer's warmup ends exactly at the peak the schedule starts from
    if warmup:
        assert math.isclose(ctrl.lr_at(warmup - 1), peak) and math.isclose(ctrl.lr_at(0), peak / warmup)
    assert math.isclose(ctrl.lr_at(warmup), peak)


def test_endpoints():
    peak, total, warmup = 1e-3, 10_000, 1000
    cos = CosineController(peak, total, warmup)
    assert math.isclose(cos.lr_at(total), 0.1 * peak)
    assert math.isclose(cos.lr_at((total + warmup) // 2), 0.55 * peak)
    d2z = LinearDecayController(peak, total, warmup)
    assert d2z.lr_at(total) == 0.0 and math.isclose(d2z.lr_at(total - 1), peak / 9000)
    wsd = WSDController(peak, total, warmup)
    assert wsd.decay_start == 8000
    assert all(wsd.lr_at(s) == peak for s in range(warmup, 8001))
    assert wsd.lr_at(8001) < peak and math.isclose(wsd.lr_at(9000), 0.5 * peak) and wsd.lr_at(total) == 0.0
    wsd2 = WSDController(peak, total, warmup, decay_fraction=0.1, final_ratio=0.1)
    assert wsd2.decay_start == 9000 and math.isclose(wsd2.lr_at(total), 0.1 * peak)
    # WSD decaying over the whole run is D2Z
    wsd_all = WSDController(peak, total, warmup, decay_fraction=1.0)
    assert all(math.isclose(wsd_all.lr_at(s), d2z.lr_at(s)) for s in range(warmup, total + 1, 37))


def test_decision_at_last_point_and_past_the_end_is_positive():
    for ctrl in (LinearDecayController(1e-3, 100, 10), WSDController(1e-3, 100, 10), CosineController(1e-3, 100, 10)):
        last = ctrl.decide(obs_at(99, 100, 10, 30))
        assert last.plan == ((99, ctrl.lr_at(99)),) and last.lr > 0
        past = ctrl.decide(obs_at(150, 100, 10, 30))
        assert past.plan is None and past.lr == ctrl.lr_at(99)
        assert "schedule" in past.reason


def test_constant_without_run_length_holds():
    dec = ConstantController(2e-3).decide(obs_at(500, 1000, 100, 50))
    assert dec.lr == 2e-3 and dec.plan == ((500, 2e-3),)


def test_make_schedule_and_baseline_config():
    cfg = load_config("cpu-smoke")
    for name, cls in (
        ("cosine", CosineController),
        ("d2z", LinearDecayController),
        ("linear", LinearDecayController),
        ("wsd", WSDController),
        ("constant", ConstantController),
        ("Cosine", CosineController),
    ):
        ctrl = make_schedule(name, 5e-3, cfg)
        assert isinstance(ctrl, cls) and ctrl.blocking
        assert ctrl.total_steps == cfg.train.total_steps and ctrl.warmup_steps == cfg.schedule.warmup_steps
        assert ctrl.describe()["peak_lr"] == 5e-3
    with pytest.raises(ValueError) as e:
        make_schedule("step", 1e-3, cfg)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in ("cosine", "d2z", "linear", "wsd", "constant"))
    bcfg = baseline_config(cfg, "cosine", 7e-3)
    assert bcfg.schedule.init_lr == 7e-3 and bcfg.train == cfg.train and cfg.schedule.init_lr != 7e-3
    with pytest.raises(ConfigError, match="peak_lr"):
        baseline_config(cfg, "cosine", -1.0)
    with pytest.raises(ConfigError, match="unknown"):
        baseline_config(cfg, "nope", 1e-3)


def test_bad_construction_names_the_field():
    with pytest.raises(ConfigError, match="cosine.warmup_steps"):
        CosineController(1e-3, 100, 100)
    with pytest.raises(ConfigError, match="wsd.decay_fraction"):
        WSDController(1e-3, 100, 10, decay_fraction=0.0)
    with pytest.raises(ConfigError, match="constant.peak_lr"):
        ConstantController(float("nan"))
