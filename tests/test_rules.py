"""The rule controller: each rule fires where the module docstring says, with its numbers in the reason.

python -m pytest -q tests/test_rules.py
"""

from __future__ import annotations

import math
import random

import pytest
from toy_loop import toy_loop

from lrpilot.channel import LRState
from lrpilot.config import ConfigError
from lrpilot.controllers.base import Observation, RollbackRecord
from lrpilot.controllers.rules import RuleController, RuleParams

TOTAL, WARMUP, EVERY = 10_000, 1000, 300


def obs(
    step=1900, lr=3e-4, prev=4.0, cur=3.9, noise=0.0, n=EVERY, recent=None, rollbacks=(), lr_history=(), **kw
) -> Observation:
    rng = random.Random(step)
    if recent is None:
        recent = tuple(
            cur + ((prev or cur) - cur) * (0.5 - (i + 0.5) / n) * 0.5 + rng.gauss(0, noise) for i in range(n)
        )
    history = () if prev is None else ((step - EVERY, prev), (step, cur))
    base = dict(
        step=step,
        total_steps=TOTAL,
        warmup_steps=WARMUP,
        decision_every=EVERY,
        lr=lr,
        init_lr=3e-4,
        recent_losses=recent,
        loss_history=history,
        lr_history=lr_history,
        rollbacks=rollbacks,
    )
    return Observation(**{**base, **kw})


def rule(d) -> str:
    return d.meta["rule"]


def test_first_decision_climbs_on_a_significant_slope_and_holds_on_noise():
    # no previous interval: the fitted slope's t-statistic decides
    d = RuleController().decide(obs(step=WARMUP, prev=None, recent=tuple(4.0 - 0.001 * i for i in range(EVERY))))
    assert rule(d) == "climb" and math.isclose(d.lr, 6e-4) and "slope within the interval" in d.reason
    flat = tuple(4.0 + random.Random(1).gauss(0, 0.05) for _ in range(EVERY))
    d = RuleController().decide(obs(step=WARMUP, prev=None, recent=flat))
    assert rule(d) == "hold" and d.lr == 3e-4


def test_fast_quiet_fall_climbs_with_numbers_in_the_reason():
    d = RuleController().decide(obs(prev=4.0, cur=3.8, noise=0.01))
    assert rule(d) == "climb" and math.isclose(d.lr, 6e-4)
    assert "climb x2" in d.reason and "SE" in d.reason and "3.000e-04 -> 6.000e-04" in d.reason
    assert d.meta["z"] > 2


def test_a_fall_within_the_noise_holds():
    d = RuleController().decide(obs(prev=4.0, cur=3.99, noise=0.5))
    assert rule(d) == "hold" and d.lr == 3e-4 and "within 2 SE" in d.reason


def test_thresholds_are_relative_to_the_noise_not_to_the_loss_scale():
    """The old rules climbed only when the loss fell by more than an absolute 1% per interval, so on a
    workload whose loss falls 0.5% per interval with little noise they stopped at 6.75e-4 (lrpilot issue 15).
    Now a fall many standard errors deep climbs whatever its size, and the decision does not change when
    the losses are scaled or shifted."""
    d = RuleController().decide(obs(prev=4.0, cur=3.98, noise=0.002))  # 0.5 %, 22 SE
    assert rule(d) == "climb" and math.isclose(d.lr, 6e-4)
    for scale, shift in ((0.1, 0.0), (10.0, 0.0), (1.0, 5.0)):
        base = obs(prev=4.0, cur=3.98, noise=0.002)
        moved = obs(
            prev=4.0 * scale + shift,
            cur=3.98 * scale + shift,
            recent=tuple(x * scale + shift for x in base.recent_losses),
        )
        e = RuleController().decide(moved)
        assert rule(e) == "climb" and math.isclose(e.meta["z"], d.meta["z"], rel_tol=1e-6)


def test_climb_stops_at_the_ceiling():
    c = RuleController()
    assert math.isclose(c.decide(obs(lr=8e-4, prev=4.0, cur=3.8)).lr, 1e-3)
    d = c.decide(obs(lr=1e-3, prev=4.0, cur=3.8))
    assert rule(d) == "hold" and d.lr == 1e-3 and "ceiling" in d.reason
    # the guard's own ceiling and ratio band are respected too
    assert c.decide(obs(lr=8e-4, prev=4.0, cur=3.8, ceiling=9e-4)).lr == 9e-4
    assert math.isclose(c.decide(obs(lr=3e-4, prev=4.0, cur=3.8, max_ratio=1.2)).lr, 3.6e-4)


def test_rise_beyond_the_noise_cuts():
    c = RuleController()
    d = c.decide(obs(lr=1e-3, prev=3.5, cur=3.6, noise=0.01))
    assert rule(d) == "rise" and math.isclose(d.lr, 6e-4) and "rose beyond 3 SE" in d.reason


def test_noisy_flat_interval_holds_instead_of_cutting():
    # small batches: per-step noise 5% of the loss; a 0.2% wiggle between interval means is not a signal
    d = RuleController().decide(obs(lr=1e-3, prev=3.5, cur=3.507, noise=0.17, n=50))
    assert rule(d) == "hold" and d.lr == 1e-3 and abs(d.meta["z"]) < 3


def test_non_finite_losses_cut_and_nothing_breaks():
    c = RuleController()
    d = c.decide(obs(recent=(3.0, float("nan"), float("inf"))))
    assert rule(d) == "non-finite" and math.isclose(d.lr, 1.8e-4) and "2 of 3" in d.reason
    d = c.decide(obs(recent=(), prev=None))
    assert rule(d) == "hold" and "no recent losses" in d.reason
    d = c.decide(obs(lr=float("nan")))
    assert d.fallback and d.lr == 3e-4 and rule(d) == "bad-lr"
    d = c.decide(obs(recent=(3.9, 3.8), prev=None))
    assert rule(d) == "hold" and "too few losses" in d.reason


def _cooldown_curve(params: RuleParams, noise: float = 0.0) -> tuple[dict[int, float], list[tuple]]:
    """Follow the controller's plans through the cool-down as the trainer does (lrpilot.channel.LRState: knots
    interpolated linearly, the last one held): the LR of every update from the first cool-down decision to the
    end, and every plan."""
    c, state, per_step, plans = RuleController(params), LRState(1e-3), {}, []
    for s in range(WARMUP, TOTAL, EVERY):
        lr = state.lr_for(s)  # what the trainer reports at the decision point
        d = c.decide(obs(step=s, lr=lr, prev=3.30, cur=3.299, noise=noise, lr_history=((2000, 1e-3),)))
        if rule(d) != "cooldown":
            assert d.plan is None
            continue
        assert d.plan is not None and d.plan[0][0] == s and d.plan[-1][0] == min(s + EVERY, TOTAL) - 1
        plans.append(d.plan)
        state.apply({"lr": d.lr, "plan": [list(k) for k in d.plan]}, s)
        per_step.update({t: state.lr_for(t) for t in range(s, min(s + EVERY, TOTAL))})
    return per_step, plans


@pytest.mark.parametrize("shape", ["1-sqrt", "linear", "geometric"])
def test_cooldown_follows_its_shape_from_the_stable_peak_to_the_end(shape):
    p = RuleParams(decay_shape=shape, final_ratio=0.01 if shape == "geometric" else 0.0)
    curve, plans = _cooldown_curve(p)
    c0, span = 7900, 2100  # the last decision point at or before 80% of the run
    assert min(curve) == c0 and curve[c0] == 1e-3  # the stable LR until the cool-down starts

    def want(t: int) -> float:
        frac = (t - c0) / span
        return {"1-sqrt": 1 - math.sqrt(frac), "linear": 1 - frac, "geometric": 0.01**frac}[shape] * 1e-3

    # every plan is one straight segment whose two knots lie on the curve (so its log summary replays it)
    assert all(len(plan) == 2 for plan in plans)
    for plan in plans:
        for t, v in plan:
            assert math.isclose(v, want(t), rel_tol=1e-9, abs_tol=1e-15), (t, v, want(t))
    assert all(math.isclose(curve[t], want(t), rel_tol=0.3, abs_tol=2e-5) for t in curve)  # close in between
    assert all(b <= a for a, b in zip(list(curve.values()), list(curve.values())[1:], strict=False))
    assert curve[TOTAL - 1] < (0.02 if shape == "geometric" else 0.03) * 1e-3  # (near) zero at the end


def test_cooldown_settings_and_a_rise_during_it():
    # a longer cool-down starts earlier (decision points 1000 + 300k: 4900 is the last at or before 5000)
    curve, _ = _cooldown_curve(RuleParams(decay_start=0.5))
    assert min(curve) == 4900 and min(t for t, v in curve.items() if v < 1e-3) == 4901
    # a rise scales the rest of the curve by cut_factor
    lr = 1e-3 * (1 - 1099 / 2100)  # the default linear shape
    d = RuleController().decide(obs(step=9000, lr=lr, prev=3.3, cur=3.5, noise=0.01, lr_history=((2000, 1e-3),)))
    assert rule(d) == "cooldown" and "curve x0.6" in d.reason
    assert math.isclose(d.plan[0][1], 0.6 * 1e-3 * (1 - 1100 / 2100), rel_tol=1e-9)


def test_replay_of_the_cooldown_reproduces_its_plans(tmp_path):
    """The rule controller's cool-down plans are two-knot segments, so the decision log's plan summary (what
    the supervisor writes) replays them exactly."""
    from lrpilot.controllers.replay import ReplayController

    _, plans = _cooldown_curve(RuleParams())
    records = [
        {"step": p[0][0], "new_lr": p[0][1], "effective_step": p[0][0], "kind": "decision",
         "plan": {"knots": len(p), "first": list(p[0]), "last": list(p[-1])}}
        for p in plans
    ]  # fmt: skip
    replay = ReplayController(records)
    for p in plans:
        assert replay.decide(obs(step=p[0][0], lr=p[0][1])).plan == p


def test_rollback_caps_the_ceiling_below_the_crash_lr():
    crash = RollbackRecord(crash_step=2500, lr_at_crash=1e-3, rolled_back_to_step=1300, new_lr=5e-4, crash_reason="nan")
    c = RuleController(RuleParams(ceiling=2e-3))
    # right after the rollback: the interval straddles the crash, so no climb however good it looks
    d = c.decide(obs(step=1300, lr=5e-4, prev=9.0, cur=4.0, rollbacks=(crash,)))
    assert rule(d) == "hold" and d.lr == 5e-4 and "after a rollback" in d.reason
    # later: climbs, but only to crash_margin x the crash LR, not back to 1e-3
    d = c.decide(obs(step=1900, lr=5e-4, prev=4.0, cur=3.8, rollbacks=(crash,)))
    assert rule(d) == "climb" and math.isclose(d.lr, 7e-4) and "0.7 x crash LR 1.000e-03" in d.reason
    d = c.decide(obs(step=1900, lr=9e-4, prev=4.0, cur=3.8, rollbacks=(crash,)))
    assert rule(d) == "over-ceiling" and math.isclose(d.lr, 7e-4)


def test_closed_loop_climbs_holds_then_cools_down():
    """On a synthetic run whose loss falls fast early and slowly later, the defaults climb from 3e-4 to the
    ceiling within two decisions, hold it through the stable phase, then cool down towards zero."""
    _, lrs = toy_loop(RuleController(), total=TOTAL, warmup=WARMUP, every=EVERY, init_lr=3e-4, scale=0.2, seed=0)
    seq = [v for _, v in lrs]
    assert math.isclose(max(seq), 1e-3) and seq.index(max(seq)) <= 2
    stable = [v for s, v in lrs if seq.index(max(seq)) <= lrs.index((s, v)) and s <= 8000]
    assert all(math.isclose(v, 1e-3) for v in stable)
    assert seq[-1] < 0.2 * 1e-3 and all(b < a for a, b in zip(seq[-6:], seq[-5:], strict=False))


def test_params_validation_and_round_trip():
    with pytest.raises(ConfigError, match="rules.climb_factor"):
        RuleParams(climb_factor=2.5)
    with pytest.raises(ConfigError, match="rules.final_ratio"):
        RuleParams(final_ratio=-0.1)
    with pytest.raises(ConfigError, match="rules.final_ratio.*geometric"):
        RuleParams(decay_shape="geometric", final_ratio=0.0)
    with pytest.raises(ConfigError, match="rules.decay_shape"):
        RuleParams(decay_shape="cosine")
    with pytest.raises(ConfigError, match="rules.climb_z"):
        RuleParams(climb_z=0.0)
    with pytest.raises(ConfigError, match="rules.ceiling"):
        RuleParams(ceiling=float("nan"))
    with pytest.raises(ConfigError, match="rules.bogus"):
        RuleParams.from_dict({"bogus": 1.0})
    p = RuleParams(ceiling=1.2e-3, cut_factor=0.5, decay_shape="linear")
    assert RuleParams.from_dict(p.to_dict()) == p
    space = RuleParams.search_space()
    assert all(r.contains(getattr(RuleParams(), n)) for n, r in space.items())  # defaults inside the space
    for corner in ({n: r.low for n, r in space.items()}, {n: r.high for n, r in space.items()}):
        RuleParams(**corner)  # every sample of the box is valid
    assert RuleParams.search_space(3e-3)["ceiling"].high == pytest.approx(3e-1)
    assert RuleController(p).describe() == {"controller": "rules", "params": p.to_dict()}


def test_probes_are_asked_for_at_their_decision_points_and_only_ever_raise_the_lr():
    from lrpilot.controllers.base import ProbeResult

    c = RuleController(RuleParams(probe_steps=10, probe_every=2))
    # at the end of warmup and every 2nd decision point: the current LR and one step up
    d = c.decide(obs(step=WARMUP, lr=3e-4, prev=4.0, cur=3.99, noise=0.5))
    assert d.probe_lrs == (3e-4, 6e-4) and d.probe_steps == 10 and "probe first" in d.reason
    assert c.decide(obs(step=WARMUP + EVERY, lr=3e-4, prev=4.0, cur=3.99, noise=0.5)).probe_lrs is None
    assert c.decide(obs(step=WARMUP + 2 * EVERY, lr=1e-3, prev=3.5, cur=3.6, noise=0.01)).probe_lrs is None  # rise
    assert RuleController().decide(obs(step=WARMUP, lr=3e-4)).probe_lrs is None  # off by default
    # at the ceiling a probe may look above it (up to probe_ceiling_factor x ceiling)
    d = c.decide(obs(step=WARMUP + 2 * EVERY, lr=1e-3, prev=4.0, cur=3.99, noise=0.5))
    assert d.probe_lrs == (1e-3, 2e-3) and rule(d) == "hold"

    def answer(lr: float, here: float, up: float):
        probes = (ProbeResult(lr, (3.9, 3.8), after=here), ProbeResult(2 * lr, (3.9, 3.7), after=up))
        return c.decide(obs(step=WARMUP + 2 * EVERY, lr=lr, prev=4.0, cur=3.99, noise=0.5, probes=probes))

    d = answer(1e-3, here=3.80, up=3.75)  # the higher LR wins even on a short horizon: go up, above the ceiling
    assert rule(d) == "probe" and d.lr == 2e-3 and "the higher LR wins" in d.reason
    d = answer(1e-3, here=3.75, up=3.80)  # it loses: the rules' own decision (hold), never a cut
    assert rule(d) == "hold" and d.lr == 1e-3 and "did not win" in d.reason
    # with probes the rules hold an LR a probe took above their ceiling (without, they cut it back)
    assert rule(c.decide(obs(lr=2e-3, prev=4.0, cur=3.99, noise=0.5))) == "hold"
    assert rule(RuleController().decide(obs(lr=2e-3, prev=4.0, cur=3.99, noise=0.5))) == "over-ceiling"


# ------------------------------------------------------------------------------------------- LR range test (5a)


def test_range_suggestion_is_the_lowest_smoothed_loss_over_the_divisor():
    from lrpilot.controllers.rules import range_suggestion
    from lrpilot.lr import sweep_lrs

    lrs = tuple(sweep_lrs(1e-4, 1e-1, 31))
    # a valley at index 20 (with one low outlier at index 5 that a 5-update centred mean smooths away)
    losses = tuple(3.0 + 0.01 * (i - 20) ** 2 - (1.0 if i == 5 else 0.0) for i in range(31))
    found, at, why = range_suggestion(lrs, losses, 3.0)
    assert at == lrs[20] and found == pytest.approx(lrs[20] / 3) and "never turned up" not in why
    # a curve that only falls: the minimum is the sweep's end, and the reason says so
    found, at, why = range_suggestion(lrs, tuple(5.0 - 0.1 * i for i in range(31)), 3.0)
    assert at == lrs[-1] and "never turned up" in why
    # NaN/Inf and bad LRs are dropped; fewer than 5 finite points give no suggestion
    bad = (math.nan, math.inf, 2.0, 1.9, 1.8, 1.7)
    assert math.isnan(range_suggestion((1e-3, 2e-3, 3e-3, 4e-3, 5e-3, -1.0), bad, 3.0)[0])
    assert range_suggestion(lrs[:6], (math.nan, 2.0, 1.9, 1.8, 1.7, 1.6), 3.0)[1] == lrs[5]


def test_rules_ask_for_one_range_test_at_the_end_of_warmup_and_read_its_ceiling_back():
    from lrpilot.controllers.base import ProbeResult
    from lrpilot.lr import sweep_lrs
    from lrpilot.records import DecisionRecord

    p = RuleParams(range_steps=20, range_factor=100.0, range_divisor=3.0)
    ctrl = RuleController(p)
    first = ctrl.decide(obs(step=WARMUP, prev=None, noise=0.01))
    assert first.probe_sweep and first.probe_lrs == (3e-4, pytest.approx(3e-2)) and first.probe_steps == 20
    # not at another decision point, and not without range_steps
    assert ctrl.decide(obs(step=WARMUP + EVERY, noise=0.01)).probe_lrs is None
    assert RuleController(RuleParams()).decide(obs(step=WARMUP, prev=None, noise=0.01)).probe_lrs is None

    lrs = tuple(sweep_lrs(3e-4, 3e-2, 20))
    curve = tuple(3.0 + 0.01 * (i - 12) ** 2 for i in range(20))
    probed = obs(step=WARMUP, prev=None, noise=0.01, probes=(ProbeResult(lr=3e-4, losses=curve, lrs=lrs),))
    d = ctrl.decide(probed)
    assert d.probe_lrs is None and d.meta["range_ceiling"] == pytest.approx(lrs[12] / 3)
    assert "range test" in d.reason and d.lr <= d.meta["range_ceiling"]
    # a later decision reads the ceiling back from the decision log (the controller keeps no state)
    rec = DecisionRecord(step=WARMUP, old_lr=3e-4, new_lr=d.lr, loss=3.0, extra={"meta": d.meta})
    later = ctrl.decide(obs(step=WARMUP + EVERY, lr=d.meta["range_ceiling"] / 1.5, prev=4.0, cur=3.0, decisions=(rec,)))
    assert later.lr == pytest.approx(d.meta["range_ceiling"]) and "range test ceiling" in later.reason
    # the LR in force above the found ceiling is cut to it
    high = obs(step=WARMUP, lr=2e-3, prev=None, noise=0.01, probes=(ProbeResult(lr=2e-3, losses=curve, lrs=lrs),))
    cut = ctrl.decide(high)
    assert cut.lr == pytest.approx(max(lrs[12] / 3, 2e-3 * 0.5)) and cut.meta["rule"] == "range"


@pytest.mark.parametrize(
    "field, value", [("range_steps", 3), ("range_steps", 2.5), ("range_factor", 1.0), ("range_divisor", 0.5)]
)
def test_bad_range_test_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"rules.{field}"):
        RuleParams(**{field: value})


def test_the_warmup_ends_at_start_ratio_times_the_ceiling():
    """Default: straight to the ceiling (as WSD warms up to its peak); start_ratio 0.3 is the old slow start,
    warm up to init_lr and climb (module docstring, Start)."""
    assert RuleController(RuleParams.for_init_lr(3e-4)).warmup_to(3e-4) == pytest.approx(1e-3)
    slow = RuleController(RuleParams.for_init_lr(3e-4, start_ratio=0.3))
    assert slow.warmup_to(3e-4) == 3e-4  # exactly (0.3 x 10/3 x 3e-4 is 1 ulp off): the old default's runs repeat
    assert 0.3 * RuleParams.for_init_lr(3e-4).ceiling != 3e-4
    assert RuleController(RuleParams(ceiling=2e-3, start_ratio=0.5)).warmup_to(1.0) == pytest.approx(1e-3)
    # a ceiling above the default one is climbed to, under the climb's test: the warmup stops at 10/3 x init_lr
    assert RuleController(RuleParams(ceiling=3e-2)).warmup_to(3e-4) == pytest.approx(1e-3)
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="rules.start_ratio"):
            RuleParams(start_ratio=bad)
    assert "start_ratio" in RuleParams.search_space() and "start_ratio" in RuleParams.names()


def test_from_a_slow_start_the_rules_climb_to_the_ceiling_and_from_the_default_they_hold_it():
    """The slow start (warmup to init_lr) climbs x2 per decision to the ceiling; the default start is already
    there, so the first decisions hold it."""
    _, slow = toy_loop(RuleController(RuleParams.for_init_lr(3e-4, start_ratio=0.3)), total=TOTAL, warmup=WARMUP,
                       every=EVERY, init_lr=3e-4, scale=0.2, seed=0)  # fmt: skip
    assert [round(v, 6) for _, v in slow[:3]] == [6e-4, 1e-3, 1e-3]
    fast = RuleController(RuleParams.for_init_lr(3e-4))
    _, lrs = toy_loop(fast, total=TOTAL, warmup=WARMUP, every=EVERY, init_lr=fast.warmup_to(3e-4), scale=0.2, seed=0)
    assert all(math.isclose(v, 1e-3) for s, v in lrs if s < 0.8 * TOTAL)
