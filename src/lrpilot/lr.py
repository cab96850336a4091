"""The LR arithmetic of lrpilot in one torch-free module: warmup, plan interpolation, the closed-form schedules,
the LR check, LR formatting, peak bands and the constants they share (docs/architecture.md).

    python -c "from lrpilot.lr import cosine_lr; print([cosine_lr(t, 3e-3, 100, 10) for t in (0, 9, 10, 55, 99)])"

Everything here imports only the standard library, so the trainer, the supervisor, the in-process Pilot, the
campaign logs, the report and its figures all compute an LR with the same float operations in the same order:
a plan replayed from the logs gives the LR the trainer used, bit for bit.

Steps are update numbers, 0-based: `lr(t)` is the LR of the t-th optimizer update. A run of `total_steps`
updates warms up linearly over updates 0 .. warmup_steps-1 (reaching the peak at update warmup_steps-1), and the
schedule proper starts at update warmup_steps with the peak and would reach its end value at update total_steps
(one past the last update), as in nanoGPT's `get_lr` and torch's SequentialLR(LinearLR, CosineAnnealingLR).
LRs are in the optimizer's units (the value written to `param_group["lr"]`).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

# ------------------------------------------------------------------------------------------- constants

#: a round is catastrophic when its final ppl exceeds this multiple of the campaign median (report tables,
#: campaign-log phase stats, figure captions); 3x keeps a round that merely under-trained and names a collapse
CATASTROPHIC_FACTOR = 3.0
#: the reference cosine decays to this fraction of its peak, as GaLore's LLaMA-on-C4 runs do (Zhao et al. 2024,
#: `get_cosine_schedule_with_min_lr_lambda`, min_lr_ratio 0.1); controllers/schedules.py and the report's figures
COSINE_MIN_RATIO = 0.1
#: WSD's default decay: the last 20% of the run, linearly to 0 (Hägele et al. 2024, "Scaling Laws and
#: Compute-Optimal Training Beyond Fixed Training Durations", find 20% cool-down matches cosine)
WSD_DECAY_FRACTION = 0.2
WSD_FINAL_RATIO = 0.0
#: band edges inside one decade: [1, 3) and [3, 10), i.e. half-decade bands on a log grid
BAND_EDGES = (1.0, 3.0)
_EPS = 1e-9  # relative slack so that 1e-3 and 3e-3 (not exactly representable) land on their own edge
#: LRs whose decade 10.0**exp is a normal float (outside, 10.0**exp underflows to 0 or overflows)
_SAFE_POW = (1e-300, 1e300)

# ------------------------------------------------------------------------------------------- checks


def is_positive_finite(x: Any) -> bool:
    """A real number (not a bool) that is finite and > 0: what an LR must be."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_lr(x: Any, name: str, fix: str = "") -> float:
    """`x` as a float if it is a positive finite LR (int or float, not bool), else ValueError with one line
    naming the field: "<name>: must be a positive finite LR, got <x!r>" (and ` (<fix>)` when given)."""
    if not is_positive_finite(x):
        raise ValueError(f"{name}: must be a positive finite LR, got {x!r}" + (f" ({fix})" if fix else ""))
    return float(x)


# ------------------------------------------------------------------------------------------- warmup


def warmup_lr(step: int, init_lr: float, warmup_steps: int) -> float:
    """The LR of update number `step` (0-based) during the linear warmup: init_lr * (step + 1) / warmup_steps,
    so update warmup_steps-1 trains at init_lr (torch: LinearLR(start_factor=1/warmup_steps,
    total_iters=warmup_steps-1)). Only meaningful for 0 <= step < warmup_steps; ZeroDivisionError when
    warmup_steps is 0 (there is no warmup to ask about)."""
    return init_lr * (step + 1) / warmup_steps


def warmup_target(lr: float, update: int, warmup_steps: int) -> float:
    """The inverse of `warmup_lr`: the LR in force (the warmup's target) given the LR `lr` that update number
    `update` used; after the warmup (or without one) that is `lr` itself. Raises nothing."""
    return lr * warmup_steps / (update + 1) if 0 <= update < warmup_steps else lr


# ------------------------------------------------------------------------------------------- plans


def plan_lr(
    plan: Sequence[tuple[int, float]] | None, step: int, lr: float, knot_steps: Sequence[int] | None = None
) -> float:
    """LR of update number `step` under a plan of (step, lr) knots sorted by step (what a controller sends):
    linear interpolation between knots, the last knot's LR held after it, and `lr` (the LR in force) before
    the first knot or without a plan. With repeated steps the later knot wins. `knot_steps` is
    `[s for s, _ in plan]`, passed by callers that look up many steps of one plan (bisect needs it).
    Validation is the caller's (channel._parse_plan); raises nothing for a sorted plan."""
    if not plan or step < plan[0][0]:
        return lr
    if step >= plan[-1][0]:
        return plan[-1][1]
    # plan[i-1] is the last knot at or before step; with duplicate steps the later knot wins
    i = bisect_right(knot_steps if knot_steps is not None else [s for s, _ in plan], step)
    (s0, v0), (s1, v1) = plan[i - 1], plan[i]
    if s1 == s0:
        return v1
    return v0 + (v1 - v0) * (step - s0) / (s1 - s0)


# ------------------------------------------------------------------------------------------- closed forms


def schedule_progress(step: int, total_steps: int, warmup_steps: int) -> float:
    """Fraction of the post-warmup part done at update `step`: 0 at warmup_steps, 1 at total_steps (and after).
    A run with no post-warmup part (total_steps <= warmup_steps) counts steps from the warmup's end, clamped
    to 1. Raises nothing."""
    t = (min(step, total_steps) - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min(t, 1.0)


def cosine_lr(
    step: int, peak_lr: float, total_steps: int, warmup_steps: int, min_ratio: float = COSINE_MIN_RATIO
) -> float:
    """Linear warmup to peak_lr, then cosine annealing from peak_lr at warmup_steps to min_ratio * peak_lr at
    total_steps (held after), Loshchilov & Hutter 2017, "SGDR", eq. 5 without restarts:
    lr = peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * progress))).
    Raises nothing."""
    step = max(step, 0)  # a negative step is update 0
    if step < warmup_steps:
        return warmup_lr(step, peak_lr, warmup_steps)
    cos = 0.5 * (1.0 + math.cos(math.pi * schedule_progress(step, total_steps, warmup_steps)))
    return peak_lr * (min_ratio + (1.0 - min_ratio) * cos)


def d2z_lr(step: int, peak_lr: float, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup to peak_lr, then linear decay to zero at total_steps, Bergsma et al. 2025, "Straight to
    Zero: Why Linearly Decaying the Learning Rate to Zero Works Best for LLMs": lr = peak * (1 - progress).
    0 at and after total_steps. Raises nothing."""
    step = max(step, 0)  # a negative step is update 0
    if step < warmup_steps:
        return warmup_lr(step, peak_lr, warmup_steps)
    return peak_lr * (1.0 - schedule_progress(step, total_steps, warmup_steps))


def wsd_decay_start(total_steps: int, warmup_steps: int, decay_fraction: float = WSD_DECAY_FRACTION) -> int:
    """First update of WSD's decay: the last round(decay_fraction * total_steps) updates (at least 1), never
    into the warmup. Raises nothing."""
    decay_steps = max(1, round(decay_fraction * total_steps))
    return max(warmup_steps, total_steps - decay_steps)


def wsd_lr(
    step: int,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int,
    decay_fraction: float = WSD_DECAY_FRACTION,
    final_ratio: float = WSD_FINAL_RATIO,
) -> float:
    """Warmup-stable-decay (Hu et al. 2024, "MiniCPM"; Hägele et al. 2024): linear warmup to peak_lr,
    peak_lr up to `wsd_decay_start`, then linear to final_ratio * peak_lr at total_steps (held after):
    lr = peak * (final_ratio + (1 - final_ratio) * (total - step) / (total - decay_start)). With
    decay_fraction=1 and final_ratio=0 it equals `d2z_lr`. Raises nothing."""
    step = max(step, 0)  # a negative step is update 0
    if step < warmup_steps:
        return warmup_lr(step, peak_lr, warmup_steps)
    step, decay_start = min(step, total_steps), wsd_decay_start(total_steps, warmup_steps, decay_fraction)
    if step <= decay_start:
        return peak_lr
    frac = (total_steps - step) / (total_steps - decay_start)  # 1 -> 0 over the decay
    return peak_lr * (final_ratio + (1.0 - final_ratio) * frac)


def constant_lr(step: int, peak_lr: float, warmup_steps: int = 0) -> float:
    """Linear warmup to peak_lr, then peak_lr. Raises nothing."""
    step = max(step, 0)  # a negative step is update 0
    return warmup_lr(step, peak_lr, warmup_steps) if step < warmup_steps else peak_lr


# ------------------------------------------------------------------------------------------- formatting


def fmt_lr(lr: float, digits: int = 2) -> str:
    """Compact LR as the published file names spell it: 0.01 -> "1e-2", 0.0035 -> "3.5e-3" (the mantissa
    rounded to `digits` decimals: 3 significant digits at most by default); non-positive or non-finite ->
    "n/a"."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        return "n/a"
    if not _SAFE_POW[0] <= lr <= _SAFE_POW[1]:  # 10**exp would underflow to 0 or overflow: let format round it
        mant_s, exp_s = f"{lr:.{digits}e}".split("e")
        return f"{float(mant_s):g}e{int(exp_s)}"
    exp = math.floor(math.log10(lr))
    mant = round(lr / 10**exp, digits)
    if mant >= 10:  # rounding carried over (9.996 -> 10.0)
        mant, exp = mant / 10, exp + 1
    return f"{mant:g}e{exp}"


# ------------------------------------------------------------------------------------------- peak bands


def peak_band_range(lr: float) -> tuple[float, float]:
    """The half-decade band [lo, hi) that holds `lr`: edges at 1 and 3 per decade (1e-3, 3e-3, 1e-2, ...).
    An LR exactly on an edge belongs to the band that starts there. Raises ValueError for lr <= 0 or NaN."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"peak LR must be a positive number, got {lr!r}")
    exp = math.floor(math.log10(lr) + _EPS)
    if not _SAFE_POW[0] <= lr <= _SAFE_POW[1]:  # subnormal or near the float maximum: no 10.0**exp arithmetic
        mant_s, exp_s = f"{lr:.17e}".split("e")
        mant, exp = float(mant_s), int(exp_s)
        if mant >= 10 * (1 - _EPS):
            mant, exp = mant / 10, exp + 1
        edge = lambda m, e: float(f"{m:g}e{e}")  # noqa: E731 - 1e309 -> inf, 1e-330 -> 0.0, never an error
        if mant >= BAND_EDGES[1] * (1 - _EPS):
            return edge(BAND_EDGES[1], exp), edge(BAND_EDGES[0], exp + 1)
        return edge(BAND_EDGES[0], exp), edge(BAND_EDGES[1], exp)
    mant = lr / 10.0**exp
    if mant >= BAND_EDGES[1] * (1 - _EPS):
        return BAND_EDGES[1] * 10.0**exp, BAND_EDGES[0] * 10.0 ** (exp + 1)
    return BAND_EDGES[0] * 10.0**exp, BAND_EDGES[1] * 10.0**exp


def peak_band(lr: float) -> str:
    """Name of the half-decade LR band that holds `lr`, e.g. peak_band(1.2e-3) == "1e-3..3e-3",
    peak_band(3e-3) == "3e-3..1e-2", peak_band(1e-2) == "1e-2..3e-2". Bands have edges 1 and 3 per decade
    (a log grid with ratio ~3.16 per band) and are closed at the bottom, open at the top. An LR that is not a
    positive finite number gives "n/a"."""
    try:
        lo, hi = peak_band_range(lr)
    except ValueError:
        return "n/a"
    return f"{fmt_lr(lo)}..{fmt_lr(hi)}"


def bands_between(lo: float, hi: float) -> list[tuple[str, float, float]]:
    """All bands (name, lo, hi) that overlap [lo, hi], lowest first (for axes and band tables)."""
    out: list[tuple[str, float, float]] = []
    if not (lo > 0 and hi >= lo and math.isfinite(hi)):
        return out
    b_lo, b_hi = peak_band_range(lo)
    while b_lo <= hi * (1 + _EPS) and len(out) < 100:
        out.append((peak_band(b_lo), b_lo, b_hi))
        b_lo, b_hi = peak_band_range(b_hi)
    return out


def band_sort_key(name: str) -> float:
    """Sort key of a band name ("1e-3..3e-3" -> 1e-3); unknown names sort last."""
    try:
        return float(name.split("..")[0])
    except ValueError:
        return math.inf


# ------------------------------------------------------------------------------------------- range test
#: a range test stops once an update's loss exceeds this multiple of the lowest loss so far (or is NaN/Inf):
#: the LR-finder's usual stop (fastai's lr_find stops at 4x the best smoothed loss)
SWEEP_DIVERGED = 4.0


def sweep_lrs(lo: float, hi: float, n: int) -> list[float]:
    """The LRs of an n-update range test: geometric from lo (update 0) to hi (update n-1), as in Smith 2017,
    "Cyclical Learning Rates for Training Neural Networks" (sec. 3.3) with an exponential ramp."""
    if n == 1:
        return [lo]
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
