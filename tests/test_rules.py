"""The rule controller: each rule fires where the module docstring says, with its numbers in the reason.

python -m pytest -q tests/test_rules.py
"""

from __future__ import annotations

import math
import random

import pytest
from toy_loop import toy_loop

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


def test_first_decision_holds():
    d = RuleController().decide(obs(step=WARMUP, prev=None))
    assert rule(d) == "hold" and d.lr == 3e-4 and "no previous interval" in d.reason


def test_fast_quiet_fall_climbs_with_numbers_in_the_reason():
    d = RuleController().decide(obs(prev=4.0, cur=3.8, noise=0.01))
    assert rule(d) == "climb" and math.isclose(d.lr, 4.5e-4)
    assert "climb x1.5" in d.reason and "(-4.9" in d.reason and "3.000e-04 -> 4.500e-04" in d.reason


def test_fast_but_noisy_fall_holds():
    d = RuleController().decide(obs(prev=4.0, cur=3.8, noise=0.5))
    assert rule(d) == "hold" and d.lr == 3e-4 and "noise" in d.reason


def test_climb_stops_at_the_ceiling():
    c = RuleController()
    assert math.isclose(c.decide(obs(lr=8e-4, prev=4.0, cur=3.8)).lr, 1e-3)
    d = c.decide(obs(lr=1e-3, prev=4.0, cur=3.8))
    assert rule(d) == "hold" and d.lr == 1e-3 and "ceiling" in d.reason
    # the guard's own ceiling and ratio band are respected too
    assert c.decide(obs(lr=8e-4, prev=4.0, cur=3.8, ceiling=9e-4)).lr == 9e-4
    assert math.isclose(c.decide(obs(lr=3e-4, prev=4.0, cur=3.8, max_ratio=1.2)).lr, 3.6e-4)


def test_normal_fall_holds():
    d = RuleController().decide(obs(prev=4.0, cur=3.98))  # 0.5 %: between plateau and fast
    assert rule(d) == "hold" and d.lr == 3e-4 and "falling" in d.reason


def test_plateau_and_rise_cut():
    c = RuleController()
    d = c.decide(obs(lr=1e-3, prev=3.5, cur=3.499, lr_history=((1600, 1e-3),)))
    assert rule(d) == "plateau" and math.isclose(d.lr, 6e-4) and "cut x0.6" in d.reason
    d = c.decide(obs(lr=1e-3, prev=3.5, cur=3.6))
    assert rule(d) == "rise" and math.isclose(d.lr, 6e-4) and "+2.86%" in d.reason
    # a plateau never cuts below final_ratio x the peak seen (1e-3 -> 1e-4)
    d = c.decide(obs(lr=1.2e-4, prev=3.5, cur=3.5, lr_history=((1300, 1e-3),)))
    assert rule(d) == "plateau" and math.isclose(d.lr, 1e-4) and "no lower than 1.000e-04" in d.reason


def test_noisy_flat_interval_holds_instead_of_cutting():
    # small batches: per-step noise 5% of the loss; a 0.2% wiggle between interval means is not a signal
    d = RuleController().decide(obs(lr=1e-3, prev=3.5, cur=3.507, noise=0.17, n=50))
    assert rule(d) == "hold" and d.lr == 1e-3 and d.meta["margin"] > 0.01


def test_non_finite_losses_cut_and_nothing_breaks():
    c = RuleController()
    d = c.decide(obs(recent=(3.0, float("nan"), float("inf"))))
    assert rule(d) == "non-finite" and math.isclose(d.lr, 1.8e-4) and "2 of 3" in d.reason
    d = c.decide(obs(recent=(), prev=None))
    assert rule(d) == "hold" and "no recent losses" in d.reason
    d = c.decide(obs(lr=float("nan")))
    assert d.fallback and d.lr == 3e-4 and rule(d) == "bad-lr"
    d = c.decide(obs(loss_history=((1600, float("nan")), (1900, 3.9))))
    assert rule(d) == "hold"  # no finite previous interval to compare with


def test_decay_lands_on_final_ratio_of_peak_at_the_end():
    c = RuleController()
    lr, steps = 1e-3, list(range(7000 + 100, TOTAL, EVERY))  # first decision point after 70% of the run
    rates = []
    for s in steps:
        d = c.decide(obs(step=s, lr=lr, prev=3.30, cur=3.29, lr_history=((2000, 1e-3),)))
        assert rule(d) == "decay" and d.lr < lr
        rates.append((d.lr / lr) ** (1 / min(EVERY, TOTAL - s)))  # per-step factor over the interval
        lr = d.lr
    assert math.isclose(lr, 1e-4, rel_tol=1e-9)  # the last interval runs at exactly final_ratio x peak
    assert max(rates) - min(rates) < 1e-9  # geometric: the same per-step factor throughout
    # a loss rise during the decay cuts harder than the decay alone
    d = c.decide(obs(step=7300, lr=1e-3, prev=3.3, cur=3.5))
    assert rule(d) == "decay" and math.isclose(d.lr, 6e-4) and "cut x0.6 instead" in d.reason


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


def test_closed_loop_climbs_then_decays_like_the_published_agent():
    """On a synthetic run whose loss falls fast early and slowly later, the defaults climb from 3e-4 to
    the ceiling within a few decisions, hold, then decay to ~1e-4 by the end."""
    _, lrs = toy_loop(RuleController(), total=TOTAL, warmup=WARMUP, every=EVERY, init_lr=3e-4, scale=0.2, seed=0)
    seq = [v for _, v in lrs]
    assert math.isclose(max(seq), 1e-3) and seq.index(max(seq)) <= 5
    assert all(b >= a for a, b in zip(seq[: seq.index(max(seq))], seq[1 : seq.index(max(seq)) + 1], strict=False))
    assert math.isclose(seq[-1], 1e-4, rel_tol=0.05)


def test_params_validation_and_round_trip():
    with pytest.raises(ConfigError, match="rules.climb_factor"):
        RuleParams(climb_factor=2.5)
    with pytest.raises(ConfigError, match="rules.final_ratio"):
        RuleParams(final_ratio=0.0)
    with pytest.raises(ConfigError, match="rules.fast_threshold"):
        RuleParams(fast_threshold=0.001, plateau_threshold=0.002)
    with pytest.raises(ConfigError, match="rules.ceiling"):
        RuleParams(ceiling=float("nan"))
    with pytest.raises(ConfigError, match="rules.bogus"):
        RuleParams.from_dict({"bogus": 1.0})
    p = RuleParams(ceiling=1.2e-3, cut_factor=0.5)
    assert RuleParams.from_dict(p.to_dict()) == p
    space = RuleParams.search_space()
    assert all(r.contains(getattr(RuleParams(), n)) for n, r in space.items())  # defaults inside the space
    assert space["plateau_threshold"].high < space["fast_threshold"].low
    assert RuleParams.search_space(3e-3)["ceiling"].high == pytest.approx(3e-1)
    assert RuleController(p).describe() == {"controller": "rules", "params": p.to_dict()}
