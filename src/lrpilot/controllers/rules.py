"""A no-LLM rule controller: the control that tells whether the LLM agent adds anything.

    python -m pytest -q tests/test_controllers_contract.py -k rules

The heuristic, evaluated at each decision point in this order (the first rule that fires decides):

1. `bad-lr`      the current LR is not a positive number: fall back to init_lr (fallback=True).
2. `non-finite`  a loss in the last interval is NaN/Inf: cut (x cut_factor).
3. `over-ceiling` the LR is above the effective ceiling: cut down to it. The effective ceiling is
                 min(params.ceiling, guard ceiling, crash_margin x the lowest LR that crashed this round),
                 so after a rollback the rule never climbs back to the LR that blew up.
4. `decay`       from decay_start (fraction of the run) on: move geometrically towards
                 final_ratio x peak LR seen, at the pace that lands there at total_steps
                 (lr * (target / lr) ** (interval / steps_left)); a loss rise cuts harder (min of both).
5. `hold`        no data to compare: first decision of the round, no recent losses, or the first
                 interval after a rollback (its loss comparison straddles the crash).
6. `rise`        the interval's mean loss rose by more than plateau_threshold + margin (relative): cut.
7. `plateau`     it improved by less than plateau_threshold - margin: cut, but not below
                 final_ratio x peak seen.
8. `climb`       it improved by more than fast_threshold and the per-step losses are quiet (residual
                 std around a linear fit < noise_threshold x loss): raise x climb_factor, up to the
                 effective ceiling.
9. `hold`        otherwise (the loss falls at a normal pace): keep the LR.

Relative improvement = (previous interval's mean loss - this interval's mean loss) / previous. The
margin is two standard errors of that difference, 2 * sqrt(2 / n) * noise (n losses in the interval), so
a noisy run (small batches) holds instead of cutting on a wiggle; on a quiet run it is ~0. Every
result is also kept inside the guard's limits ([min_ratio, max_ratio] x LR and [floor, ceiling]) so the
guard has nothing to change. The controller keeps no state between decisions (all inputs come from the
observation), so it is deterministic and start_round() has nothing to reset.

Defaults follow what the published agent found on LLaMA-60M (init LR 3e-4): climb quickly while the
loss falls fast, to about 1e-3, hold there, and decay over the last ~30% of the run to ~1e-4.
`RuleParams.search_space()` gives the ranges that `--memory optuna` searches.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from lrpilot import config
from lrpilot.controllers.base import BaseController, Decision, Observation
from lrpilot.logs import finite_mean, is_positive_finite


def _check(cond: bool, name: str, msg: str) -> None:
    config._check(cond, f"rules.{name}", msg)


@dataclass(frozen=True)
class ParamRange:
    """One searched parameter: a float in [low, high], sampled log-uniformly if `log`."""

    low: float
    high: float
    log: bool = False

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


@dataclass(frozen=True)
class RuleParams:
    """Settings of the rule heuristic (see the module docstring); validated on construction."""

    #: the highest LR the rules may climb to
    ceiling: float = 1e-3
    #: LR multiplier of one `climb` (<= 2, the guard's max ratio)
    climb_factor: float = 1.5
    #: relative loss improvement per interval above which the rules climb
    fast_threshold: float = 0.01
    #: relative improvement below which the loss is on a plateau (and a negative one below -this, a rise)
    plateau_threshold: float = 0.001
    #: LR multiplier of a cut (plateau, rise, non-finite loss)
    cut_factor: float = 0.6
    #: fraction of the run after which the LR decays
    decay_start: float = 0.7
    #: the decay lands on final_ratio x the highest LR seen this round
    final_ratio: float = 0.1
    #: per-step loss noise (residual std / loss) below which the loss counts as stable enough to climb
    noise_threshold: float = 0.05
    #: after a crash at LR x, never go above crash_margin * x again in this round
    crash_margin: float = 0.7

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            _check(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                f.name,
                f"must be a finite number, got {v!r}",
            )
        _check(self.ceiling > 0, "ceiling", "must be > 0")
        _check(1.0 < self.climb_factor <= 2.0, "climb_factor", "must be in (1, 2] (the guard allows at most x2)")
        _check(self.plateau_threshold >= 0, "plateau_threshold", "must be >= 0")
        _check(
            self.fast_threshold > self.plateau_threshold,
            "fast_threshold",
            f"must be > plateau_threshold ({self.plateau_threshold})",
        )
        _check(0.0 < self.cut_factor < 1.0, "cut_factor", "must be in (0, 1)")
        _check(0.0 <= self.decay_start <= 1.0, "decay_start", "must be a fraction of the run in [0, 1]")
        _check(0.0 < self.final_ratio <= 1.0, "final_ratio", "must be in (0, 1] (geometric decay cannot reach 0)")
        _check(self.noise_threshold > 0, "noise_threshold", "must be > 0")
        _check(0.0 < self.crash_margin < 1.0, "crash_margin", "must be in (0, 1)")

    @staticmethod
    def search_space(init_lr: float = 3e-4) -> dict[str, ParamRange]:
        """What Optuna searches: the ceiling from init_lr to 100 x init_lr (3e-4..3e-2 on the reference
        workload: it holds the published agent's ~1e-3..1.2e-3 plateau, cosine's best band 3e-3..5e-3 and
        the 1e-2 region where cosine collapses but a climbing agent survived), and ranges around the
        defaults for the rest. plateau_threshold's range ends below fast_threshold's, so every sample is valid.
        crash_margin is a safety setting and is not searched."""
        return {
            "ceiling": ParamRange(init_lr, 100.0 * init_lr, log=True),
            "climb_factor": ParamRange(1.1, 2.0),
            "fast_threshold": ParamRange(0.003, 0.05, log=True),
            "plateau_threshold": ParamRange(0.0, 0.002),
            "cut_factor": ParamRange(0.5, 0.7),
            "decay_start": ParamRange(0.5, 0.9),
            "final_ratio": ParamRange(0.02, 0.3, log=True),
            "noise_threshold": ParamRange(0.01, 0.2, log=True),
        }

    @classmethod
    def for_init_lr(cls, init_lr: float, **changes: float) -> RuleParams:
        """The defaults scaled to a workload whose warmup ends at init_lr (ceiling = init_lr * 10/3)."""
        return cls(**{"ceiling": init_lr * 10.0 / 3.0, **changes})

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RuleParams:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        _check(
            not unknown, sorted(unknown)[0] if unknown else "", f"unknown parameter; known: {', '.join(sorted(known))}"
        )
        return cls(**{k: float(v) for k, v in d.items()})


def _residual_noise(xs: list[float]) -> float:
    """Std of the residuals around a least-squares line, relative to the mean (inf if < 3 points)."""
    n = len(xs)
    if n < 3:
        return math.inf
    mean_t, mean_x = (n - 1) / 2.0, sum(xs) / n
    var_t = sum((t - mean_t) ** 2 for t in range(n))
    slope = sum((t - mean_t) * (x - mean_x) for t, x in enumerate(xs)) / var_t
    res = [x - (mean_x + slope * (t - mean_t)) for t, x in enumerate(xs)]
    std = math.sqrt(sum(r * r for r in res) / (n - 2))
    return std / abs(mean_x) if mean_x else math.inf


class RuleController(BaseController):
    """Rule heuristic (module docstring): hold / climb / cut / decay from the observed loss; stateless."""

    name = "rules"
    blocking = True

    def __init__(self, params: RuleParams | None = None) -> None:
        self.params = params if params is not None else RuleParams()

    def describe(self) -> dict[str, Any]:
        return {"controller": self.name, "params": self.params.to_dict()}

    # ------------------------------------------------------------------------------------------ helpers

    def _ceiling(self, obs: Observation) -> tuple[float, str]:
        """Effective ceiling and why: params, the guard's ceiling, and below any LR that crashed."""
        ceil, why = self.params.ceiling, "rules ceiling"
        if is_positive_finite(obs.ceiling) and obs.ceiling < ceil:
            ceil, why = obs.ceiling, "guard ceiling"
        crash_lrs = [r.lr_at_crash for r in obs.rollbacks if is_positive_finite(r.lr_at_crash)]
        if crash_lrs and self.params.crash_margin * min(crash_lrs) < ceil:
            ceil = self.params.crash_margin * min(crash_lrs)
            why = f"{self.params.crash_margin:g} x crash LR {min(crash_lrs):.3e}"
        return ceil, why

    @staticmethod
    def _peak_seen(obs: Observation) -> float:
        lrs = [obs.init_lr, obs.lr] + [lr for _, lr in obs.lr_history] + [d.new_lr for d in obs.decisions]
        return max((x for x in lrs if is_positive_finite(x)), default=math.nan)

    @staticmethod
    def _previous_loss(obs: Observation) -> float:
        """Mean loss of the interval before this one: the latest history entry before obs.step."""
        prev = [loss for s, loss in obs.loss_history if s < obs.step and isinstance(loss, (int, float))]
        prev = [x for x in prev if math.isfinite(x)]
        return prev[-1] if prev else math.nan

    def _limit(self, obs: Observation, lr: float, new: float, ceiling: float) -> float:
        """Keep `new` inside the guard's ratio band around `lr` and inside [floor, ceiling]."""
        lo = lr * obs.min_ratio if is_positive_finite(obs.min_ratio) and obs.min_ratio <= 1 else lr * 0.5
        hi = lr * obs.max_ratio if is_positive_finite(obs.max_ratio) and obs.max_ratio >= 1 else lr * 2.0
        new = min(max(new, lo), hi, ceiling)
        if is_positive_finite(obs.floor):
            new = max(new, obs.floor)
        return new

    # ------------------------------------------------------------------------------------------- decide

    def decide(self, obs: Observation) -> Decision:
        p = self.params
        meta: dict[str, Any] = {"params": p.to_dict()}

        def out(rule: str, new: float, reason: str, fallback: bool = False) -> Decision:
            return Decision(lr=new, reason=f"{rule}: {reason}", fallback=fallback, meta={**meta, "rule": rule})

        lr = obs.lr
        if not is_positive_finite(lr):
            safe = next(x for x in (obs.init_lr, obs.floor, p.ceiling) if is_positive_finite(x))
            return out("bad-lr", safe, f"current lr {lr!r} is not a positive number; fall back to {safe:.3e}", True)

        ceiling, ceiling_why = self._ceiling(obs)
        meta["ceiling"] = ceiling
        losses = [x for x in obs.recent_losses if isinstance(x, (int, float))]
        bad = [x for x in losses if not math.isfinite(x)]
        finite = [x for x in losses if math.isfinite(x)]

        def decided(rule: str, new: float, reason: str) -> Decision:
            new = self._limit(obs, lr, new, ceiling)
            if not is_positive_finite(new):  # only with absurd guard limits in the observation
                return out(rule, lr, f"{reason}; limits give no valid LR, hold {lr:.3e}", True)
            return out(rule, new, f"{reason}: lr {lr:.3e} -> {new:.3e}" if new != lr else f"{reason}: lr {lr:.3e}")

        if bad:
            return decided(
                "non-finite", lr * p.cut_factor, f"{len(bad)} of {len(losses)} losses non-finite, cut x{p.cut_factor:g}"
            )
        if lr > ceiling:
            return decided("over-ceiling", ceiling, f"lr above ceiling {ceiling:.3e} ({ceiling_why})")

        cur = finite_mean(finite)
        prev = self._previous_loss(obs)
        rel = (prev - cur) / abs(prev) if math.isfinite(cur) and math.isfinite(prev) and prev != 0 else math.nan
        noise = _residual_noise(finite)
        margin = 2.0 * math.sqrt(2.0 / len(finite)) * noise if math.isfinite(noise) else 0.0
        meta.update(loss=cur, prev_loss=prev, rel_improvement=rel, noise=noise, margin=margin)
        change = f"loss {prev:.4g} -> {cur:.4g} ({-rel:+.2%})" if math.isfinite(rel) else f"loss {cur:.4g}"

        if obs.total_steps > 0 and obs.step >= p.decay_start * obs.total_steps:
            peak = min(self._peak_seen(obs), ceiling)
            target = p.final_ratio * peak if math.isfinite(peak) else lr
            left = max(obs.total_steps - obs.step, 0)
            if target >= lr:
                new, how = lr, f"at or below the target {target:.3e}, hold"
            elif left == 0:
                new, how = target, f"run over, go to the target {target:.3e}"
            else:
                d = min(max(obs.decision_every, 1), left)
                new = lr * (target / lr) ** (d / left)
                how = (
                    f"geometric towards {target:.3e} (= {p.final_ratio:g} x peak {peak:.3e}) at step {obs.total_steps}"
                )
            if math.isfinite(rel) and rel < -(p.plateau_threshold + margin) and lr * p.cut_factor < new:
                new, how = lr * p.cut_factor, f"{how}; loss rose ({change}), cut x{p.cut_factor:g} instead"
            return decided("decay", new, f"step {obs.step} >= {p.decay_start:g} of the run, {how}")

        last_rb = obs.rollbacks[-1].rolled_back_to_step if obs.rollbacks else None  # the latest rollback
        if last_rb is not None and 0 <= obs.step - last_rb <= max(obs.decision_every, 1):
            return decided("hold", lr, f"first interval after a rollback to step {last_rb}, {change}, hold")
        if not math.isfinite(rel):
            why = "no recent losses" if not finite else "no previous interval to compare with"
            return decided("hold", lr, f"{why}, {change}, hold")
        if rel < -(p.plateau_threshold + margin):
            return decided(
                "rise",
                lr * p.cut_factor,
                f"{change}, rise beyond {p.plateau_threshold:.2%} + noise margin {margin:.2%}, cut x{p.cut_factor:g}",
            )
        if rel < p.plateau_threshold - margin:
            floor = p.final_ratio * self._peak_seen(obs)
            if lr * p.cut_factor <= floor:  # cutting would undershoot where the decay will end: stop there
                return decided(
                    "plateau",
                    min(floor, lr),
                    f"{change}, improvement below {p.plateau_threshold:.2%}, "
                    f"cut no lower than {floor:.3e} (= {p.final_ratio:g} x peak)",
                )
            return decided(
                "plateau",
                lr * p.cut_factor,
                f"{change}, improvement below {p.plateau_threshold:.2%}, cut x{p.cut_factor:g}",
            )
        if rel > p.fast_threshold and noise < p.noise_threshold:
            if lr >= ceiling:
                return decided(
                    "hold", lr, f"{change} falls fast but lr is at the ceiling {ceiling:.3e} ({ceiling_why}), hold"
                )
            return decided(
                "climb",
                min(lr * p.climb_factor, ceiling),
                f"{change} > {p.fast_threshold:.2%} with noise {noise:.2%} < {p.noise_threshold:.2%}, "
                f"climb x{p.climb_factor:g} (ceiling {ceiling:.3e}, {ceiling_why})",
            )
        quiet = f"noise {noise:.2%}" if math.isfinite(noise) else "noise unknown"
        return decided("hold", lr, f"{change}, falling ({quiet}), hold")
