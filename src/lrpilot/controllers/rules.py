"""A no-LLM rule controller: the control that tells whether the LLM agent adds anything.

    python -m pytest -q tests/test_controllers_contract.py tests/test_rules.py

Shape: warmup (the trainer's, linear) to start_ratio x the ceiling (`Start` below; by default the ceiling
itself), then **climb** to the ceiling while the loss falls by more than the measured noise (when the warmup
ended below it), **hold** there (the stable phase), and **cool down** to (near) zero over the last part of
the run. Every threshold is in units of the run's own per-step loss noise, never an absolute loss
change, so the same defaults work on workloads whose losses have different scales and noise.

The heuristic, evaluated at each decision point in this order (the first rule that fires decides):

1. `bad-lr`      the current LR is not a positive number: fall back to init_lr (fallback=True).
2. `non-finite`  a loss in the last interval is NaN/Inf: cut (x cut_factor).
3. `over-ceiling` the LR is above the effective ceiling: cut down to it. The effective ceiling is
                 min(params.ceiling, guard ceiling, crash_margin x the lowest LR that crashed this round),
                 so after a rollback the rule never climbs back to the LR that blew up.
4. `cooldown`    from c0 on, the last decision point at or before total_steps - round((1 - decay_start) x
                 total_steps): a plan that follows lr(t) = peak x f((t - c0) / (total_steps - c0)) as one
                 straight segment per decision interval, on the curve at both ends (so the decision log's plan
                 summary holds the whole plan and a replay reproduces it), f from `decay_shape`:
                 `linear`  f(p) = r + (1 - r)(1 - p)        (default: WSD's usual decay; Bergsma et al. 2025,
                           "Straight to Zero: Why Linearly Decaying the Learning Rate to Zero Works Best";
                           on cpu-small, seed 7, it ended at ppl 4.674 where 1-sqrt ended at 4.691 on the
                           same trajectory up to the cool-down, lrpilot issue 15);
                 `1-sqrt`  f(p) = r + (1 - r)(1 - sqrt(p))  (Hägele et al. 2024, "Scaling Laws and
                           Compute-Optimal Training Beyond Fixed Training Durations", find it beats linear
                           on their longer LLM runs);
                 `geometric` f(p) = r ** p                  (the rules' old decay; needs r > 0),
                 with r = final_ratio (default 0: decay to zero, as both papers recommend). The peak is
                 the stable-phase LR: at the first cool-down decision the LR in force, later recovered
                 from the LR in force as lr / f(p(step - 1)) (so the controller stays stateless and an
                 emergency cut lowers the rest of the curve), capped by the effective ceiling and the
                 highest LR of the decision history. A loss rise
                 beyond rise_z noise units during the cool-down scales the curve by cut_factor.
5. `hold`        the first interval after a rollback (its loss comparison straddles the crash), or no
                 loss data at all.
5a. `range`     only with range_steps > 0 (off by default): an LR range test at the end of warmup (Smith 2017,
                 "Cyclical Learning Rates for Training Neural Networks", sec. 3.3; the LR-finder of fastai):
                 the decision there comes with a request (Decision.probe_sweep) for one probe branch of
                 range_steps updates whose LR rises geometrically from the LR in force to range_factor x it
                 (the guard's ceiling caps the top; the branch stops once the loss passes 4 x its best). The
                 state is restored and the controller asked again with the curve: its losses smoothed by a
                 centred 5-update mean (no lag, unlike an EMA), the LR of the lowest smoothed loss / range_divisor
                 becomes the round's ceiling (in [floor, probe_ceiling_factor x ceiling]; kept in the decision's
                 meta["range_ceiling"], which later decisions read back from Observation.decisions, so the
                 controller stays stateless). Then rules 6-8 apply from here (a `range` cut if the LR in force is
                 already above it). Measured with the old slow start (start_ratio 0.3), seed 42, 50 updates
                 from 3e-4 to 3e-2: on cpu-small the lowest smoothed loss was at 6.1e-3 (the loss jumped at
                 1.4e-2), giving 2.0e-3, where that workload's WSD sweeps found 1e-3 and 3e-3 within 0.1% on
                 two of three seeds (3e-3 2.6% worse on the third); on cpu-bpe at 3.8e-3, giving 1.3e-3,
                 where WSD's best peak was 1e-3
                 and 3e-3 was 7% worse (lrpilot issue 15). The divisor 3
                 (not fastai's 10) comes from those two curves: a 50-update test starts from a model still
                 learning fast, so its minimum sits closer to the best peak than a test from initialisation.
                 Off by default: over 3 seeds with it the rules ended at a mean ppl of 4.692 against 4.668
                 without it on cpu-small (worse on 2 of 3 seeds), and at 90.40 against 90.86 on cpu-bpe (better
                 on 2 of 3): half a percent each way, inside the intervals, for 50 extra updates
                 (docs/bench/README.md, section 3).
5b. `probe`     only with probe_steps > 0 (off by default): at the end of warmup and every probe_every-th
                 decision point of the stable phase (unless the loss rose), the decision rules 6-8 would give
                 comes with a request for a lookahead probe (Decision.probe_lrs) at the current LR and one
                 step up (x climb_factor, up to probe_ceiling_factor x ceiling, the guard's limits applied):
                 the trainer trains probe_steps updates per branch from the current state on the run's next
                 batches, measures each branch on the batches after them, restores its state, and the
                 controller is asked again with Observation.probes; it goes up if the higher branch ends with
                 the lower loss, else keeps its own decision. A short horizon favours the lower LR (short-
                 horizon bias, Wu et al. 2018), so probes only ever raise the LR: on cpu-small a probe that
                 could also cut chose 6e-4 over 1e-3 after 10 updates, where the sweeps of lrpilot issue 15
                 found peaks of 1e-3 and above best. So probes let the rules find a peak above their
                 ceiling (the idea of AutoLRS, Jin et al. 2021, "AutoLRS: Automatic Learning-Rate Schedule by
                 Bayesian Optimization on the Fly", without its Bayesian optimisation: the branches are
                 compared directly, paired on the same batches). The extra updates are counted as compute
                 (RoundResult.probe_steps). If the probe cannot run, the rules' own decision is used. Off by
                 default: on cpu-small, 3 seeds, every stable-phase probe found 2e-3 worse than 1e-3 after 20
                 updates, and the runs ended at the default's ppl to the third decimal for 13% more updates
                 (docs/bench/README.md, section 4).
6. `rise`        the interval's mean loss rose by more than rise_z standard errors: cut (x cut_factor).
7. `climb`       the loss fell by more than climb_z standard errors: raise x climb_factor, up to the
                 effective ceiling (`hold` at the ceiling).
8. `hold`        otherwise: keep the LR (the stable phase of warmup-stable-decay).

Start (`start_ratio`, `warmup_to`): the warmup ends at start_ratio x ceiling, but never above the default
ceiling 10/3 x init_lr (`default_peak`); the hosts run the trainer's warmup to it
(lrpilot.decision.warmup_end_lr). Default 1: the warmup goes straight to the ceiling, as WSD's goes to its peak.
A ceiling set higher than the default (`--rule ceiling=1e-2`, or Optuna's samples up to 100 x init_lr) is
reached by climbing, only while the loss falls by more than its noise: the test that stopped the rules at
1.4e-2, where cosine at 3e-2 collapsed (README, cpu-small), is not skipped by a blind warmup. The old default
was to warm up to init_lr (start_ratio 0.3 with the default ceiling) and climb x2 per decision. Over 5 seeds
(docs/bench/README.md, section 5) that slow start ended 0.99% better than the WSD sweep
on cpu-small (4 of 5 seeds) and 1.75% worse on cpu-bpe (4 of 5). The fast start ended at WSD's ppl at the same
peak on both, which was the sweep's best on 9 of 10 seed-workload pairs. The slow start's gain on cpu-small
showed only after ~900 of 1500 steps (seed 42): until then its training loss was above the fast start's (by
0.97 nats at step 100). So a test over a few dozen updates at the end of warmup (the lookahead probes, the
range test, the z-test, the noise) sees the fast start ahead on both workloads and cannot tell them apart: the
short-horizon bias of Wu et al. 2018 ("Understanding Short-Horizon Bias in Stochastic Meta-Optimization"). The
default takes the start that loses on neither.
start_ratio is in Optuna's search space, so a campaign can find the slow start where it pays.

Noise: sigma = the std of the per-step losses of the interval around their least-squares line (absolute,
in loss units). The change between two interval means of n steps each has standard error
SE = sigma * sqrt(2 / n); z = (previous mean - current mean) / SE. At the first decision point (no previous
interval) z is the t-statistic of the fitted slope, -slope / SE(slope), SE(slope) = sigma / sqrt(sum (t-tbar)^2).
(The z-test on interval means is the classic two-sample test; using the loss change relative to its own
noise rather than an absolute 1% threshold is what made the old rules stop early on a workload with a
different loss scale, lrpilot issue 15.)

Defaults (lrpilot issue 15 measurements, cpu-small and a byte-level workload, 1500 steps): the best fixed
schedules there were WSD at peak ~10/3 x init_lr (1e-3 for init 3e-4), so the ceiling is 1e-3
(`for_init_lr` scales it as init_lr x 10/3); start_ratio 1 (`Start` above); climb_factor 2 (the guard's
max_ratio: after a warmup that ended below the ceiling, a cut or a rollback, one climb doubles the LR); climb_z
= 2 (two standard errors: a fall that noise alone gives in ~2% of intervals); rise_z = 3 so a noisy interval is
not taken for a divergence; decay_start 0.8 (WSD's 20% cool-down, Hägele et al. 2024: 20% matches cosine,
longer does slightly better); cut_factor 0.6 and crash_margin 0.7
as before. Every result is also kept inside the guard's limits ([min_ratio, max_ratio] x LR and
[floor, ceiling]; the cool-down plan, like the baseline schedules' plans, may fall below the floor) so the
guard has nothing to change. The controller keeps no state between decisions (all inputs come from the
observation), so it is deterministic and start_round() has nothing to reset.
`RuleParams.search_space()` gives the ranges that `--memory optuna` searches.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from lrpilot import config
from lrpilot.controllers.base import BaseController, ControllerContext, ControllerSpec, Decision, Observation
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


#: cool-down shapes (module docstring, rule 4)
DECAY_SHAPES = ("1-sqrt", "linear", "geometric")


@dataclass(frozen=True)
class RuleParams:
    """Settings of the rule heuristic (see the module docstring); validated on construction."""

    #: the highest LR the rules may climb to (the stable-phase peak)
    ceiling: float = 1e-3
    #: LR multiplier of one `climb` (<= 2, the guard's max ratio)
    climb_factor: float = 2.0
    #: climb while the interval's loss fell by more than climb_z standard errors of the noise
    climb_z: float = 2.0
    #: cut when the interval's loss rose by more than rise_z standard errors
    rise_z: float = 3.0
    #: LR multiplier of a cut (rise, non-finite loss)
    cut_factor: float = 0.6
    #: fraction of the run after which the cool-down starts (1 - the cool-down fraction)
    decay_start: float = 0.8
    #: the cool-down ends at final_ratio x the stable-phase peak (0: to zero)
    final_ratio: float = 0.0
    #: after a crash at LR x, never go above crash_margin * x again in this round
    crash_margin: float = 0.7
    #: lookahead probes (module docstring, rule 5b): updates per branch; 0 = no probes (the default)
    probe_steps: float = 0
    #: probe at every probe_every-th decision point of the stable phase (the first one at the end of warmup)
    probe_every: float = 5
    #: a probe may take the LR up to probe_ceiling_factor x ceiling (the rules alone stop at the ceiling)
    probe_ceiling_factor: float = 10.0
    #: the cool-down's shape: 1-sqrt, linear or geometric (module docstring)
    decay_shape: str = "linear"
    #: the warmup ends at start_ratio x ceiling (1: straight to the ceiling, as WSD warms up to its peak;
    #: 0.3 = init_lr with the default ceiling: the rules' old slow start, warm up to init_lr and climb)
    start_ratio: float = 1.0
    #: LR range test at the end of warmup (module docstring, rule 5a): updates in the sweep; 0 = none (default)
    range_steps: float = 0
    #: the range test sweeps from the LR in force to range_factor x it
    range_factor: float = 100.0
    #: the ceiling becomes the LR of the range test's lowest smoothed loss / range_divisor
    range_divisor: float = 3.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "decay_shape":
                _check(v in DECAY_SHAPES, f.name, f"must be one of {', '.join(DECAY_SHAPES)}, got {v!r}")
                continue
            _check(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                f.name,
                f"must be a finite number, got {v!r}",
            )
        _check(self.ceiling > 0, "ceiling", "must be > 0")
        _check(0.0 < self.start_ratio <= 1.0, "start_ratio", "must be in (0, 1] (a fraction of the ceiling)")
        _check(1.0 < self.climb_factor <= 2.0, "climb_factor", "must be in (1, 2] (the guard allows at most x2)")
        _check(self.climb_z > 0, "climb_z", "must be > 0 (standard errors of the loss noise)")
        _check(self.rise_z > 0, "rise_z", "must be > 0 (standard errors of the loss noise)")
        _check(0.0 < self.cut_factor < 1.0, "cut_factor", "must be in (0, 1)")
        _check(0.0 <= self.decay_start <= 1.0, "decay_start", "must be a fraction of the run in [0, 1]")
        _check(0.0 <= self.final_ratio <= 1.0, "final_ratio", "must be in [0, 1]")
        _check(
            self.decay_shape != "geometric" or self.final_ratio > 0,
            "final_ratio",
            "must be > 0 with decay_shape=geometric (a geometric decay cannot reach 0); or use 1-sqrt or linear",
        )
        _check(0.0 < self.crash_margin < 1.0, "crash_margin", "must be in (0, 1)")
        _check(
            float(self.probe_steps).is_integer() and 0 <= self.probe_steps <= 1000,
            "probe_steps",
            "must be a whole number of updates in [0, 1000] (0: no probes)",
        )
        _check(
            float(self.probe_every).is_integer() and self.probe_every >= 1, "probe_every", "must be a whole number >= 1"
        )
        _check(self.probe_ceiling_factor >= 1, "probe_ceiling_factor", "must be >= 1 (a multiple of ceiling)")
        _check(
            float(self.range_steps).is_integer() and (self.range_steps == 0 or 5 <= self.range_steps <= 1000),
            "range_steps",
            "must be 0 (no range test) or a whole number of updates in [5, 1000]",
        )
        _check(self.range_factor > 1, "range_factor", "must be > 1 (the sweep's end is range_factor x its start)")
        _check(self.range_divisor >= 1, "range_divisor", "must be >= 1 (the ceiling is the best LR / range_divisor)")

    @staticmethod
    def search_space(init_lr: float = 3e-4) -> dict[str, ParamRange]:
        """What Optuna searches: the ceiling from init_lr to 100 x init_lr (3e-4..3e-2 on the reference
        workload: it holds the published agent's ~1e-3..1.2e-3 plateau, cosine's best band 3e-3..5e-3 and
        the 1e-2 region where cosine collapses but a climbing agent survived), and ranges around the
        defaults for the rest (every default inside). crash_margin (a safety setting) and decay_shape (not a
        number) are not searched; every sample is a valid RuleParams with the default shape."""
        return {
            "ceiling": ParamRange(init_lr, 100.0 * init_lr, log=True),
            "climb_factor": ParamRange(1.1, 2.0),
            "climb_z": ParamRange(0.5, 6.0, log=True),
            "rise_z": ParamRange(1.5, 8.0, log=True),
            "cut_factor": ParamRange(0.5, 0.7),
            "decay_start": ParamRange(0.5, 0.9),
            "final_ratio": ParamRange(0.0, 0.2),
            "start_ratio": ParamRange(0.25, 1.0),
        }

    @classmethod
    def for_init_lr(cls, init_lr: float, **changes: Any) -> RuleParams:
        """The defaults scaled to a workload whose warmup ends at init_lr (ceiling = init_lr * 10/3)."""
        return cls(**{"ceiling": default_peak(init_lr), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The parameter names, in declaration order (what --rule, rules:KEY=V and a search space may name)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RuleParams:
        known = set(cls.names())
        unknown = set(d) - known
        _check(
            not unknown, sorted(unknown)[0] if unknown else "", f"unknown parameter; known: {', '.join(sorted(known))}"
        )
        return cls(**{k: (str(v) if k == "decay_shape" else float(v)) for k, v in d.items()})


def default_peak(init_lr: float) -> float:
    """10/3 x init_lr: the default ceiling, and the highest LR the warmup goes to without the climb's test
    (module docstring, Defaults and Start)."""
    return init_lr * 10.0 / 3.0


def decay_factor(shape: str, p: float, final_ratio: float) -> float:
    """The cool-down multiplier f(p) at fraction p in [0, 1] of the cool-down (module docstring, rule 4)."""
    p = min(max(p, 0.0), 1.0)
    if shape == "geometric":
        return final_ratio**p
    drop = math.sqrt(p) if shape == "1-sqrt" else p
    return final_ratio + (1.0 - final_ratio) * (1.0 - drop)


def _line_fit(xs: list[float]) -> tuple[float, float, float]:
    """(slope per step, residual std around the least-squares line in loss units, sum (t - tbar)^2);
    slope and std are NaN with fewer than 3 points."""
    n = len(xs)
    if n < 3:
        return math.nan, math.nan, 0.0
    mean_t, mean_x = (n - 1) / 2.0, sum(xs) / n
    sxx = sum((t - mean_t) ** 2 for t in range(n))
    slope = sum((t - mean_t) * (x - mean_x) for t, x in enumerate(xs)) / sxx
    res = [x - (mean_x + slope * (t - mean_t)) for t, x in enumerate(xs)]
    return slope, math.sqrt(sum(r * r for r in res) / (n - 2)), sxx


def _z(delta: float, se: float) -> float:
    """delta / se, with se = 0 (noise-free losses) giving +-inf for any change and 0 for none."""
    if not math.isfinite(delta) or not math.isfinite(se):
        return math.nan
    if se > 0:
        return delta / se
    return math.copysign(math.inf, delta) if delta else 0.0


#: half-width of the centred moving mean that smooths a range test's losses (a centred window has no lag, so
#: unlike an EMA it does not push the minimum to a higher LR)
RANGE_SMOOTH = 2


def range_suggestion(lrs: tuple[float, ...], losses: tuple[float, ...], divisor: float) -> tuple[float, float, str]:
    """(suggested ceiling, LR of the lowest smoothed loss, why) from one LR range test (ProbeResult.lrs, .losses):
    the losses smoothed by a centred moving mean of 2 x RANGE_SMOOTH + 1 updates, the LR at their minimum, that
    LR / `divisor` (the LR-finder's pick below the minimum: Smith 2017, "Cyclical Learning Rates for Training
    Neural Networks", sec. 3.3; fastai's lr_find "minimum / 10"). NaN for both LRs when fewer than 5 finite
    points came back."""
    pts = [(x, y) for x, y in zip(lrs, losses, strict=False) if is_positive_finite(x) and math.isfinite(y)]
    if len(pts) < 5:
        return math.nan, math.nan, f"range test gave {len(pts)} finite points (< 5)"
    ys = [y for _, y in pts]
    smooth = []
    for i in range(len(ys)):
        w = ys[max(0, i - RANGE_SMOOTH) : i + RANGE_SMOOTH + 1]
        smooth.append(sum(w) / len(w))
    i = min(range(len(smooth)), key=smooth.__getitem__)
    at = pts[i][0]
    edge = " (at the sweep's end: the loss never turned up)" if i == len(pts) - 1 else ""
    why = (
        f"range test {pts[0][0]:.3e}..{pts[-1][0]:.3e} over {len(pts)} updates: lowest smoothed loss "
        f"{smooth[i]:.4f} at lr {at:.3e}{edge}, / {divisor:g}"
    )
    return at / divisor, at, why


def range_ceiling(obs: Observation) -> float | None:
    """The ceiling an earlier range test of this round set (the latest decision's meta["range_ceiling"]): None
    if no decision took a test's result yet, NaN if one did but the test gave no ceiling. The controller stays
    stateless: its memory is the decision log (so one test per round, also after a rollback)."""
    for rec in reversed(obs.decisions):
        meta = rec.extra.get("meta")
        if isinstance(meta, dict) and "range_ceiling" in meta:
            x = meta["range_ceiling"]
            return float(x) if is_positive_finite(x) else math.nan
    return None


def rule_of(d: Decision) -> str:
    """The rule that made a RuleController decision (meta["rule"]), "" for another controller's."""
    return str(d.meta.get("rule", ""))


def loss_change_z(losses: list[float], prev: float) -> tuple[float, float, str]:
    """(z, sigma, basis): how many standard errors the loss fell over the interval (module docstring, "Noise");
    sigma is the per-step noise in loss units. `losses` are the interval's finite per-step losses, `prev` the
    previous interval's mean (NaN if none: z is then the slope's t-statistic). z is NaN with < 3 losses."""
    cur = finite_mean(losses)
    slope, sigma, sxx = _line_fit(losses)
    if math.isfinite(prev) and math.isfinite(cur):
        se = sigma * math.sqrt(2.0 / len(losses)) if math.isfinite(sigma) else math.nan
        return _z(prev - cur, se), sigma, "interval means"
    se = sigma / math.sqrt(sxx) if math.isfinite(sigma) and sxx > 0 else math.nan
    return _z(-slope, se), sigma, "slope within the interval"


class RuleController(BaseController):
    """Rule heuristic (module docstring): hold / climb / cut / decay from the observed loss; stateless."""

    name = "rules"
    blocking = True

    def __init__(self, params: RuleParams | None = None) -> None:
        self.params = params if params is not None else RuleParams()

    def describe(self) -> dict[str, Any]:
        return {"controller": self.name, "params": self.params.to_dict()}

    # ------------------------------------------------------------------------------------------ helpers

    def _ceiling(self, obs: Observation, base: float | None = None) -> tuple[float, str]:
        """Effective ceiling and why: params (or `base`), the guard's ceiling, and below any LR that crashed."""
        ceil, why = (self.params.ceiling, "rules ceiling") if base is None else (base, "probe ceiling")
        if base is None and is_positive_finite(found := range_ceiling(obs) or math.nan):
            ceil, why = found, "range test ceiling"
        if is_positive_finite(obs.ceiling) and obs.ceiling < ceil:
            ceil, why = obs.ceiling, "guard ceiling"
        crash_lrs = [r.lr_at_crash for r in obs.rollbacks if is_positive_finite(r.lr_at_crash)]
        if crash_lrs and self.params.crash_margin * min(crash_lrs) < ceil:
            ceil = self.params.crash_margin * min(crash_lrs)
            why = f"{self.params.crash_margin:g} x crash LR {min(crash_lrs):.3e}"
        return ceil, why

    @staticmethod
    def _previous_loss(obs: Observation) -> float:
        """Mean loss of the interval before this one: the latest history entry before obs.step."""
        prev = [loss for s, loss in obs.loss_history if s < obs.step and isinstance(loss, (int, float))]
        prev = [x for x in prev if math.isfinite(x)]
        return prev[-1] if prev else math.nan

    def _cooldown_start(self, obs: Observation) -> int:
        """c0: the last decision point at or before total - round((1 - decay_start) x total) (so the cool-down
        is at least that long and every cool-down interval is one straight segment; module docstring, rule 4)."""
        total, warmup, every = obs.total_steps, max(obs.warmup_steps, 0), max(obs.decision_every, 1)
        raw = max(warmup, total - round((1.0 - self.params.decay_start) * total))
        return warmup + (raw - warmup) // every * every

    def _limit(self, obs: Observation, lr: float, new: float, ceiling: float) -> float:
        """Keep `new` inside the guard's ratio band around `lr` and inside [floor, ceiling]."""
        lo = lr * obs.min_ratio if is_positive_finite(obs.min_ratio) and obs.min_ratio <= 1 else lr * 0.5
        hi = lr * obs.max_ratio if is_positive_finite(obs.max_ratio) and obs.max_ratio >= 1 else lr * 2.0
        new = min(max(new, lo), hi, ceiling)
        if is_positive_finite(obs.floor):
            new = max(new, obs.floor)
        return new

    # ------------------------------------------------------------------------------------------- decide

    def warmup_to(self, init_lr: float) -> float:
        """The warmup's end: start_ratio x ceiling, at most default_peak(init_lr) (module docstring, "Start").
        init_lr itself where that product is init_lr up to rounding (0.3 x 10/3 x init_lr), so that
        start_ratio=0.3 repeats the old default's runs exactly."""
        lr = min(self.params.start_ratio * self.params.ceiling, default_peak(init_lr))
        return init_lr if math.isclose(lr, init_lr, rel_tol=1e-9) else lr

    def decide(self, obs: Observation) -> Decision:
        p = self.params
        meta: dict[str, Any] = {"params": p.to_dict()}

        def out(rule: str, new: float, reason: str, fallback: bool = False, plan: Any = None) -> Decision:
            return Decision(
                lr=new, reason=f"{rule}: {reason}", fallback=fallback, meta={**meta, "rule": rule}, plan=plan
            )

        lr = obs.lr
        if not is_positive_finite(lr):
            safe = next(x for x in (obs.init_lr, obs.floor, p.ceiling) if is_positive_finite(x))
            return out("bad-lr", safe, f"current lr {lr!r} is not a positive number; fall back to {safe:.3e}", True)

        ceiling, ceiling_why = self._ceiling(obs)  # where the rules climb to on their own
        hard, hard_why = ceiling, ceiling_why  # above this they cut; with probes, a probe may go up to it
        ranged = p.range_steps > 0 and bool(obs.probes) and bool(obs.probes[0].lrs)  # the range test came back
        if p.probe_steps > 0 or ranged:  # a probe or the range test may take it above the ceiling
            hard, hard_why = self._ceiling(obs, p.ceiling * p.probe_ceiling_factor)
        meta.update(ceiling=ceiling, hard_ceiling=hard)
        losses = [x for x in obs.recent_losses if isinstance(x, (int, float))]
        bad = [x for x in losses if not math.isfinite(x)]
        finite = [x for x in losses if math.isfinite(x)]

        def decided(rule: str, new: float, reason: str) -> Decision:
            new = self._limit(obs, lr, new, hard)
            if not is_positive_finite(new):  # only with absurd guard limits in the observation
                return out(rule, lr, f"{reason}; limits give no valid LR, hold {lr:.3e}", True)
            return out(rule, new, f"{reason}: lr {lr:.3e} -> {new:.3e}" if new != lr else f"{reason}: lr {lr:.3e}")

        if bad:
            return decided(
                "non-finite", lr * p.cut_factor, f"{len(bad)} of {len(losses)} losses non-finite, cut x{p.cut_factor:g}"
            )
        if lr > hard:
            return decided("over-ceiling", hard, f"lr above ceiling {hard:.3e} ({hard_why})")

        cur = finite_mean(finite)
        prev = self._previous_loss(obs)
        z, sigma, basis = loss_change_z(finite, prev)
        meta.update(loss=cur, prev_loss=prev, noise=sigma, z=z, z_basis=basis)
        change = f"loss {prev:.4g} -> {cur:.4g}" if math.isfinite(prev) else f"loss {cur:.4g}"
        change += f" (z = {z:+.2f} SE, {basis})" if math.isfinite(z) or math.isinf(z) else ""

        total, every = obs.total_steps, max(obs.decision_every, 1)
        c0 = self._cooldown_start(obs)
        if total > 0 and obs.step >= c0:
            return self._cooldown(obs, lr, hard, c0, z, change, out)

        last_rb = obs.rollbacks[-1].rolled_back_to_step if obs.rollbacks else None  # the latest rollback
        if last_rb is not None and 0 <= obs.step - last_rb <= every:
            return decided("hold", lr, f"first interval after a rollback to step {last_rb}, {change}, hold")
        k, off = divmod(obs.step - obs.warmup_steps, every)
        if ranged:
            return self._after_range(obs, lr, hard, z, change, decided, meta)
        d = self._stable(obs, lr, ceiling, ceiling_why, z, change, decided)
        if p.probe_steps > 0 and obs.probes:
            return self._choose_probe(obs, lr, d, decided)
        if p.range_steps > 0 and k == 0 and off == 0 and not obs.probes and range_ceiling(obs) is None:
            return replace(
                d,
                probe_lrs=(lr, lr * p.range_factor),
                probe_steps=int(p.range_steps),
                probe_sweep=True,
                reason=f"{d.reason}; range test first: {int(p.range_steps)} updates from {lr:.3e} to "
                f"{lr * p.range_factor:.3e}",
            )
        up = self._limit(obs, lr, max(lr * p.climb_factor, d.lr), hard)
        if p.probe_steps > 0 and off == 0 and k % int(p.probe_every) == 0 and up > lr and rule_of(d) != "rise":
            return replace(
                d,
                probe_lrs=(lr, up),
                probe_steps=int(p.probe_steps),
                reason=f"{d.reason}; probe first: {int(p.probe_steps)} updates at {lr:.3e} and at {up:.3e}",
            )
        return d

    def _after_range(
        self, obs: Observation, lr: float, hard: float, z: float, change: str, decided: Any, meta: dict[str, Any]
    ) -> Decision:
        """Rule 5a: the range test came back; its suggestion (range_suggestion) becomes the round's ceiling (in
        [floor, hard ceiling]; kept in meta["range_ceiling"] for the later decisions), then rules 6-8 from here.
        A test with too few points leaves the rules' own ceiling (meta["range_ceiling"] = None)."""
        p, r = self.params, obs.probes[0]
        found, at, why = range_suggestion(r.lrs, r.losses, p.range_divisor)
        if is_positive_finite(found):
            found = min(found, hard)
            if is_positive_finite(obs.floor):
                found = max(found, obs.floor)
        meta.update(range_ceiling=found if is_positive_finite(found) else None, range_lr_at_min=at)
        if not is_positive_finite(found):
            own = self._stable(obs, lr, *self._ceiling(obs), z, change, decided)
            return replace(own, reason=f"{own.reason}; {why}: ceiling kept")
        d = self._stable(obs, lr, found, "range test ceiling", z, change, decided)
        if lr > found:  # the test says the LR in force is already too high
            d = decided("range", found, f"{why}: ceiling {found:.3e} below the LR in force")
        return replace(d, reason=f"{d.reason}; {why}: ceiling {found:.3e}")

    def _choose_probe(self, obs: Observation, lr: float, own: Decision, decided: Any) -> Decision:
        """Rule 5b: go to the higher probe branch if its loss after the branch (ProbeResult.end_loss) is lower than
        the current LR's, else the rules' own decision `own`. The branches started from the same state and saw the
        same batches, so the comparison is paired; a short horizon favours the lower LR (short-horizon bias, Wu et
        al. 2018, "Understanding Short-Horizon Bias in Stochastic Meta-Optimization"), so a higher LR that wins
        anyway is trusted, and a probe never lowers the LR by itself."""
        at = {r.lr: r.end_loss for r in obs.probes if is_positive_finite(r.lr)}
        higher = [(x, v) for x, v in at.items() if x > lr and math.isfinite(v)]
        here = at.get(lr, math.nan)
        table = ", ".join(f"{x:.3e}: {v:.4f}" for x, v in sorted(at.items()))
        if higher and math.isfinite(here):
            x, v = min(higher, key=lambda t: t[1])
            if v < here:
                return decided("probe", max(x, own.lr), f"probe branches (lr: loss) {table}; the higher LR wins")
        return replace(own, reason=f"{own.reason}; probe branches (lr: loss) {table}: the higher LR did not win")

    def _stable(
        self, obs: Observation, lr: float, ceiling: float, ceiling_why: str, z: float, change: str, decided: Any
    ) -> Decision:
        """Rules 5-8: hold / rise / climb / hold from the noise-relative change z."""
        p = self.params
        finite = [x for x in obs.recent_losses if isinstance(x, (int, float)) and math.isfinite(x)]
        if math.isnan(z):
            why = "no recent losses" if not finite else "too few losses to measure the noise"
            return decided("hold", lr, f"{why}, {change}, hold")
        if z < -p.rise_z:
            return decided("rise", lr * p.cut_factor, f"{change}: rose beyond {p.rise_z:g} SE, cut x{p.cut_factor:g}")
        if z > p.climb_z:
            if lr >= ceiling:
                return decided(
                    "hold", lr, f"{change} falls fast but lr is at the ceiling {ceiling:.3e} ({ceiling_why}), hold"
                )
            return decided(
                "climb",
                min(lr * p.climb_factor, ceiling),
                f"{change} fell by more than {p.climb_z:g} SE, climb x{p.climb_factor:g} (ceiling {ceiling:.3e}, {ceiling_why})",
            )
        return decided("hold", lr, f"{change}, within {p.climb_z:g} SE of the noise, hold (stable phase)")

    def _cooldown(
        self, obs: Observation, lr: float, ceiling: float, c0: int, z: float, change: str, out: Any
    ) -> Decision:
        """Rule 4: a two-knot plan along the cool-down curve from obs.step to the next decision point."""
        p, total, every = self.params, obs.total_steps, max(obs.decision_every, 1)
        span = max(total - c0, 1)

        def f(t: int) -> float:
            return decay_factor(p.decay_shape, (t - c0) / span, p.final_ratio) if t > c0 else 1.0

        if obs.step <= c0:  # the stable LR in force now is the peak
            peak, how = min(lr, ceiling), f"peak {min(lr, ceiling):.3e} = the stable-phase LR"
        else:  # the LR in force is the curve's value at step - 1: recover its peak (stateless)
            back = f(obs.step - 1)
            seen = [x for _, x in obs.lr_history if is_positive_finite(x)] + [lr]
            peak = min(lr / back if back > 0 else lr, ceiling, max(seen))  # never above an LR the run used
            how = f"peak {peak:.3e} (lr {lr:.3e} / f {back:.4g})"
        cut = z < -p.rise_z  # False for NaN
        if cut:
            peak *= p.cut_factor
            how += f"; {change}: rose beyond {p.rise_z:g} SE, curve x{p.cut_factor:g}"
        end = min(obs.step + every, total)
        # one straight segment per interval, on the curve at both ends: a decision record's plan summary (first,
        # last) then holds the whole plan, so a replay of the round (ReplayController) reproduces it exactly
        plan = tuple((t, peak * f(t)) for t in sorted({obs.step, end - 1}) if obs.step <= t < end)
        first = plan[0][1] if plan else peak * f(obs.step)
        new = first if is_positive_finite(first) else lr
        shape = f"{p.decay_shape} cool-down from step {c0} to {p.final_ratio:g} x peak at step {total}"
        reason = f"{shape}, {how}: lr {lr:.3e} -> {new:.3e}"
        if plan:
            reason += f" (plan to {plan[-1][1]:.3e} at step {plan[-1][0]})"
        return out("cooldown", new, reason, plan=plan or None)


def _build(ctx: ControllerContext) -> RuleController:
    """The round's rule controller: the campaign's parameters (Optuna's proposal or `--rule`), else the
    defaults scaled to the preset's init_lr (RuleParams.for_init_lr)."""
    return RuleController(ctx.params if ctx.params is not None else RuleParams.for_init_lr(ctx.cfg.schedule.init_lr))


#: `--controller rules` (registered in lrpilot.controllers.CONTROLLERS); its memory is Optuna over RuleParams
SPEC = ControllerSpec(build=_build, default_memory="optuna")
