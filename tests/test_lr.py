"""lrpilot.lr: torch-free, its closed forms equal torch's schedulers over whole runs (a reference twin), plan
interpolation and check_lr answer as documented.

    python -m pytest -q tests/test_lr.py
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from lrpilot import lr as L

REL = 1e-12


def test_importing_lr_pulls_in_neither_torch_nor_numpy():
    code = "import sys, lrpilot.lr; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- reference twin: torch's schedulers


def torch_lrs(peak: float, total: int, warmup: int, after) -> list[float]:
    """The LR of each of `total` SGD updates under SequentialLR(warmup LinearLR, *after(optimizer)) with milestones
    at warmup (and each later phase's start): what torch users write for the same schedule."""
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))], lr=peak)
    # update t < warmup trains at peak * (t + 1) / warmup: start 1/warmup, reaching 1 at epoch warmup - 1
    ramp = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    phases, starts = after(opt)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [ramp, *phases], milestones=[warmup, *starts])
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def assert_twin(ours: list[float], ref: list[float], peak: float) -> None:
    assert len(ours) == len(ref)
    for t, (a, b) in enumerate(zip(ours, ref, strict=True)):
        # relative to the LR, and to the peak where the LR nears 0 (d2z ends at 0, where relative error is moot)
        assert math.isclose(a, b, rel_tol=REL, abs_tol=REL * peak), (t, a, b)


@pytest.mark.parametrize(("peak", "total", "warmup"), [(3e-3, 400, 40), (1.0, 1000, 2), (2.5e-4, 97, 13)])
@pytest.mark.parametrize("min_ratio", [0.0, L.COSINE_MIN_RATIO, 0.5])
def test_cosine_equals_torch_cosine_annealing(peak, total, warmup, min_ratio):
    torch = pytest.importorskip("torch")
    ref = torch_lrs(
        peak,
        total,
        warmup,
        lambda o: ([torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total - warmup, eta_min=min_ratio * peak)], []),
    )
    assert_twin([L.cosine_lr(t, peak, total, warmup, min_ratio) for t in range(total)], ref, peak)


@pytest.mark.parametrize(("peak", "total", "warmup"), [(3e-3, 400, 40), (1.0, 1000, 2), (2.5e-4, 97, 13)])
def test_d2z_equals_torch_linear_to_zero(peak, total, warmup):
    torch = pytest.importorskip("torch")
    ref = torch_lrs(
        peak,
        total,
        warmup,
        lambda o: ([torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.0, total_iters=total - warmup)], []),
    )
    assert_twin([L.d2z_lr(t, peak, total, warmup) for t in range(total)], ref, peak)


@pytest.mark.parametrize(("peak", "total", "warmup"), [(3e-3, 400, 40), (1.0, 1000, 2), (2.5e-4, 97, 13)])
@pytest.mark.parametrize(("fraction", "final"), [(L.WSD_DECAY_FRACTION, L.WSD_FINAL_RATIO), (0.5, 0.1), (0.05, 0.3)])
def test_wsd_equals_torch_constant_then_linear(peak, total, warmup, fraction, final):
    torch = pytest.importorskip("torch")
    start = L.wsd_decay_start(total, warmup, fraction)
    assert warmup < start < total
    ref = torch_lrs(
        peak,
        total,
        warmup,
        lambda o: (
            [
                torch.optim.lr_scheduler.ConstantLR(o, factor=1.0, total_iters=0),
                torch.optim.lr_scheduler.LinearLR(o, 1.0, final, total_iters=total - start),
            ],
            [start],
        ),
    )
    assert_twin([L.wsd_lr(t, peak, total, warmup, fraction, final) for t in range(total)], ref, peak)


def test_closed_forms_at_their_ends_and_outside_the_run():
    peak, total, warmup = 1e-3, 100, 10
    assert L.cosine_lr(warmup - 1, peak, total, warmup) == peak  # the warmup ends at the peak
    assert L.cosine_lr(warmup, peak, total, warmup) == peak
    assert L.cosine_lr(total, peak, total, warmup) == pytest.approx(L.COSINE_MIN_RATIO * peak, rel=1e-15)
    assert L.cosine_lr(10 * total, peak, total, warmup) == L.cosine_lr(total, peak, total, warmup)  # held after
    assert L.d2z_lr(total, peak, total, warmup) == 0.0 and L.d2z_lr(total + 5, peak, total, warmup) == 0.0
    # WSD with the whole post-warmup part as its decay is D2Z
    assert [L.wsd_lr(t, peak, total, warmup, 1.0, 0.0) for t in range(total + 1)] == pytest.approx(
        [L.d2z_lr(t, peak, total, warmup) for t in range(total + 1)], rel=1e-15, abs=1e-18
    )
    # a negative step is update 0, also without a warmup (no ZeroDivisionError)
    assert L.cosine_lr(-3, peak, total, 0) == peak and L.constant_lr(-1, peak, 0) == peak
    assert L.d2z_lr(-3, peak, total, warmup) == L.warmup_lr(0, peak, warmup) == peak / warmup


def test_warmup_target_inverts_warmup_lr():
    for t in range(7):
        assert L.warmup_target(L.warmup_lr(t, 3e-3, 7), t, 7) == pytest.approx(3e-3, rel=1e-15)
    assert L.warmup_target(2e-3, 7, 7) == 2e-3 and L.warmup_target(2e-3, -1, 7) == 2e-3  # outside the warmup


# --------------------------------------------------------------------------- plan interpolation


@pytest.mark.parametrize(
    ("step", "want"),
    [
        (-5, 9e-3),  # before the first knot: the LR in force
        (9, 9e-3),
        (10, 4e-3),  # on a knot: its LR
        (15, 3e-3),  # halfway between (10, 4e-3) and (20, 2e-3)
        (19, 2.2e-3),
        (20, 1e-3),  # (20, 2e-3) then (20, 1e-3): the later knot of a repeated step wins
        (25, 1e-3),
        (30, 1e-3),
        (35, 7.5e-4),
        (1000, 5e-4),  # after the last knot: held
    ],
)
def test_plan_lr_known_answers(step, want):
    plan = ((10, 4e-3), (20, 2e-3), (20, 1e-3), (30, 1e-3), (40, 5e-4))
    got = L.plan_lr(plan, step, 9e-3)
    assert got == pytest.approx(want, rel=1e-15)
    assert L.plan_lr(plan, step, 9e-3, [s for s, _ in plan]) == got  # a cached knot list gives the same


def test_plan_lr_without_a_plan_is_the_lr_in_force_and_lrstate_uses_it():
    from lrpilot.channel import LRState

    assert L.plan_lr(None, 5, 2e-3) == 2e-3 and L.plan_lr((), 5, 2e-3) == 2e-3
    plan = [[0, 1e-3], [7, 8e-3], [13, 2e-3]]
    st = LRState(5e-3, plan)
    knots = tuple((s, v) for s, v in plan)
    assert [st.lr_for(t) for t in range(-2, 20)] == [L.plan_lr(knots, t, 5e-3) for t in range(-2, 20)]
    assert L.plan_lr(knots, 3, 5e-3) == 1e-3 + (8e-3 - 1e-3) * 3 / 7  # the exact float expression


# --------------------------------------------------------------------------- check_lr, formatting, bands


@pytest.mark.parametrize("bad", [0, 0.0, -1e-3, math.nan, math.inf, -math.inf, True, None, "3e-3", [1e-3]])
def test_check_lr_names_the_field_in_one_line(bad):
    with pytest.raises(ValueError) as e:
        L.check_lr(bad, "schedule.init_lr")
    msg = str(e.value)
    assert msg == f"schedule.init_lr: must be a positive finite LR, got {bad!r}" and "\n" not in msg
    assert not L.is_positive_finite(bad)


def test_check_lr_passes_a_positive_lr_as_float_and_appends_the_fix():
    assert L.check_lr(3, "x") == 3.0 and type(L.check_lr(3, "x")) is float
    assert L.check_lr(2.5e-3, "x") == 2.5e-3
    with pytest.raises(ValueError, match=r"^clamp_lr current: must be a positive finite LR, got -1 \(it is corrupt\)$"):
        L.check_lr(-1, "clamp_lr current", "it is corrupt")


def test_callers_raise_the_check_lr_message():
    from lrpilot.channel import LRState
    from lrpilot.controllers.base import Decision

    with pytest.raises(ValueError, match=r"^Decision\.lr: must be a positive finite LR, got nan$"):
        Decision(lr=math.nan)
    with pytest.raises(ValueError, match=r"^LRState lr: must be a positive finite LR, got 0$"):
        LRState(0)


def test_fmt_lr_and_peak_bands_have_one_home():
    import lrpilot.campaign_logs as cl

    assert L.fmt_lr(0.0035) == "3.5e-3" and L.fmt_lr(0.01) == "1e-2" and L.fmt_lr(-1) == "n/a"
    assert L.peak_band(1.2e-3) == "1e-3..3e-3" and L.peak_band(3e-3) == "3e-3..1e-2"
    # the campaign logs re-export the same objects (no second copy)
    assert cl.fmt_lr is L.fmt_lr and cl.peak_band is L.peak_band and cl.band_sort_key is L.band_sort_key


def test_the_catastrophic_factor_has_one_home():
    import inspect

    from lrpilot import campaign_logs
    from lrpilot.memory import evidence
    from lrpilot.report import tables

    assert tables.OUTLIER_FACTOR is evidence.DIVERGED_FACTOR is L.CATASTROPHIC_FACTOR
    assert L.CATASTROPHIC_FACTOR == 3.0
    for fn, arg in ((campaign_logs.outlier_rounds, "factor"), (campaign_logs.phase_stats, "outlier_factor")):
        assert inspect.signature(fn).parameters[arg].default is L.CATASTROPHIC_FACTOR


def test_lr_imports_only_the_standard_library():
    import ast
    from pathlib import Path

    names: set[str] = set()
    for node in ast.walk(ast.parse(Path(L.__file__).read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    assert names <= {"__future__", "math", "bisect", "collections.abc", "typing"}
