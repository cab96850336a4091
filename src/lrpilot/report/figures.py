"""The report's figures (matplotlib, Agg backend), drawn from `tables.Analysis` only.

    python -c "from lrpilot.report import build_report; build_report('runs/published', [], 'runs/report')"

Each function writes one PNG sized for ~800-1000 px wide pages and returns a `Figure` with its caption; a
figure without data is skipped with a note instead. Each perplexity axis is scaled to what its figure draws
(`ppl_limits`: the values that are not outliers by a median/MAD rule), so one collapsed round or baseline does
not flatten the rest; anything above the top is drawn there as a triangle and labelled with its value.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from lrpilot.campaign_logs import (
    BaselineResult,
    RangeTest,
    RoundSummary,
    band_sort_key,
    bands_between,
    campaign_total_steps,
    fmt_lr,
)
from lrpilot.errors import DiskWriteError, writing
from lrpilot.logs import as_float, write_atomic
from lrpilot.lr import CATASTROPHIC_FACTOR, COSINE_MIN_RATIO, cosine_lr, warmup_lr
from lrpilot.report.tables import Analysis, SideBySide, SideBySideRow, fmt_ppl

WIDTH_IN, HEIGHT_IN, DPI = 8.4, 4.8, 110  # ~920 x 530 px
_BOX = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}


@dataclass(frozen=True)
class Figure:
    """One figure of the report: the PNG (None when skipped), its title and caption."""

    name: str
    title: str
    caption: str
    path: Path | None = None


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.titlesize": 12,
            "axes.labelsize": 10.5,
            "legend.fontsize": 8.5,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return plt


def _save(fig, path: Path) -> Path:
    """fig as PNG at path, atomically (a second report into OUT, or a full disk, never leaves half a PNG);
    a disk that refuses it raises DiskWriteError."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())
    return path


#: a value more than this many robust spreads above the median of a figure's values is off its scale
OUTLIER_SPREADS = 10.0
#: the robust spread is at least this fraction of the median (rounds that all agree to 0.1% are not a scale)
MIN_REL_SPREAD = 0.02


def ppl_limits(values: list[float], also: list[float] = ()) -> tuple[float, float]:
    """(bottom, top) of a perplexity axis for the values a figure is about: the values within OUTLIER_SPREADS
    robust spreads of their median (spread = max(1.4826 x MAD, MIN_REL_SPREAD x median); 1.4826 x MAD estimates
    a normal sigma, Rousseeuw & Croux 1993) set the range; 10% margin below, 35% above for labels. `also`
    (e.g. phase means) widen the range when they are within that limit but do not move the median. Values
    above `top` are off the scale: the caller draws them at the top and labels them. (nan, nan) if no value is
    finite."""
    vals = sorted(v for v in values if math.isfinite(v))
    if not vals:
        return math.nan, math.nan
    med = vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2
    dev = sorted(abs(v - med) for v in vals)
    mad = dev[len(dev) // 2] if len(dev) % 2 else (dev[len(dev) // 2 - 1] + dev[len(dev) // 2]) / 2
    spread = max(1.4826 * mad, MIN_REL_SPREAD * abs(med))
    limit = med + OUTLIER_SPREADS * spread
    kept = [v for v in vals if v <= limit] + [v for v in also if math.isfinite(v) and v <= limit]
    lo, hi = min(kept), max(kept)
    span = max(hi - lo, MIN_REL_SPREAD * abs(hi))
    return lo - 0.10 * span, hi + 0.35 * span


def _plottable_lr(lr: float) -> bool:
    """An LR a log-scale axis can hold with room around it (a log may hold 0, negatives, 5e-324 or 1.7e308)."""
    return math.isfinite(lr) and 1e-30 < lr < 1e30


def _band_colors(bands: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {b: cmap(i % 10) for i, b in enumerate(bands)}


def _cap_note(a: Analysis, cap: float, extra: list[tuple[str, float]] = ()) -> str:
    over = [
        (f"round {r.round}", r.final_eval_ppl)
        for r in a.rounds
        if math.isfinite(r.final_eval_ppl) and r.final_eval_ppl > cap
    ]
    over += list(extra)
    if not over:
        return ""
    items = ", ".join(f"{name} (ppl {fmt_ppl(v)})" for name, v in over)
    return f" The y-axis is capped at {cap:.3g} so that the rest stays readable; {items} drawn as ▲ at the cap."


# ----------------------------------------------------------------------------------------------- (a)


def fig_ppl_per_round(a: Analysis, out: Path) -> Figure:
    title = "Final perplexity per round, with phase means"
    rounds = list(a.rounds)
    if not rounds:
        return Figure("ppl_per_round", title, "No finished rounds yet: nothing to plot.")
    if not any(math.isfinite(r.final_eval_ppl) for r in rounds):
        return Figure(
            "ppl_per_round",
            title,
            f"No round finished with a perplexity (failed: rounds {', '.join(map(str, a.failed))}).",
        )
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    # the axis is about the rounds and the best baseline's line; a phase mean that a collapsed round pulled far
    # above them is drawn at the top with its value, like the round itself
    drawn = [r.final_eval_ppl for r in rounds]
    drawn += [a.best_baseline.final_eval_ppl] if a.best_baseline is not None else []
    means = [p.mean for p in a.phases] + [p.mean_without_outliers for p in a.phases if p.outliers]
    bottom, cap = ppl_limits(drawn, also=means)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN))
    bands = sorted({r.band for r in rounds}, key=band_sort_key)
    colors = _band_colors(bands)
    xs = [r.round for r in rounds]
    ys = [min(r.final_eval_ppl, cap) if math.isfinite(r.final_eval_ppl) else math.nan for r in rounds]
    ax.plot(xs, ys, color="0.75", lw=1, zorder=1)
    for band in bands:
        pts = [(r.round, r.final_eval_ppl) for r in rounds if r.band == band and math.isfinite(r.final_eval_ppl)]
        inside = [(x, y) for x, y in pts if y <= cap]
        if inside:
            ax.scatter(*zip(*inside, strict=True), color=colors[band], s=30, zorder=3, label=f"peak LR in {band}")
        for x, y in pts:
            if y > cap:
                ax.scatter([x], [cap], marker="^", s=70, color=colors[band], edgecolor="k", zorder=4)
                ax.annotate(
                    f"round {x}: ppl {y:.1f} (off scale)",
                    (x, cap),
                    xytext=(-10, -4),
                    textcoords="offset points",
                    ha="right",
                    va="top",
                    fontsize=8.5,
                    color="darkred",
                    bbox=_BOX,
                )
    failed = [r for r in rounds if not math.isfinite(r.final_eval_ppl)]
    if failed:
        ax.scatter(
            [r.round for r in failed],
            [cap] * len(failed),
            marker="x",
            color="red",
            s=60,
            zorder=4,
            label="failed (no ppl)",
        )
    for i, p in enumerate(a.phases):
        x0, x1 = p.first_round - 0.45, p.last_round + 0.45
        if math.isfinite(p.mean):
            ax.hlines(min(p.mean, cap), x0, x1, color="k", lw=2, zorder=2, label="phase mean" if i == 0 else None)
            text = f"mean {fmt_ppl(p.mean)}"
            if p.outliers and math.isfinite(p.mean_without_outliers):
                text += f"\n{fmt_ppl(p.mean_without_outliers)} without round {', '.join(map(str, p.outliers))}"
            off = p.mean > cap  # drawn at the top: its label goes under the bar, at the phase's left end
            under = off or p.mean > cap - 0.12 * (cap - bottom)  # no room above it for the label
            if off:
                text = text.replace("mean", "phase mean (off scale):", 1)
            ax.annotate(
                text,
                (x0 if off else (x0 + x1) / 2, min(p.mean, cap)),
                xytext=(4 if off else 0, -5 if under else 5),
                textcoords="offset points",
                ha="left" if off else "center",
                va="top" if under else "bottom",
                fontsize=8.5,
                bbox=_BOX,
                zorder=2.5,
            )
        if p.outliers and math.isfinite(p.mean_without_outliers):
            ax.hlines(
                p.mean_without_outliers,
                x0,
                x1,
                color="k",
                lw=1.5,
                ls="--",
                zorder=2,
                label="phase mean without catastrophic rounds",
            )
        if i:
            ax.axvline(p.first_round - 0.5, color="0.6", lw=0.8, ls=":")
    if a.best_baseline is not None:
        bb = a.best_baseline
        ax.axhline(
            bb.final_eval_ppl, color="tab:gray", ls="-.", lw=1.2, label=f"best {bb.label}: {fmt_ppl(bb.final_eval_ppl)}"
        )
    ax.set_ylim(bottom, cap)
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("final eval perplexity (lower is better)")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)
    phases = "; ".join(f"{p.label}: mean {fmt_ppl(p.mean)}, median {fmt_ppl(p.median)}" for p in a.phases)
    caption = (
        f"Each dot is one round's final eval perplexity, coloured by the band of its peak LR; black bars are phase "
        f"means ({phases}). Catastrophic rounds (ppl > {a.outlier_threshold:.1f}, {CATASTROPHIC_FACTOR:g}x the campaign median) are "
        "kept in the mean and also shown without it (dashed)." + _cap_note(a, cap)
    )
    return Figure("ppl_per_round", title, caption, _save(fig, out / "ppl_per_round.png"))


# ----------------------------------------------------------------------------------------------- (c)


def cosine_curve(
    peak: float, total_steps: int, warmup_steps: int, min_ratio: float = COSINE_MIN_RATIO
) -> tuple[list[int], list[float]]:
    """The reference cosine: linear warmup to `peak` over warmup_steps, then cosine to min_ratio x peak."""
    xs = list(range(0, total_steps + 1, max(total_steps // 400, 1)))
    ys = [cosine_lr(s, peak, total_steps, warmup_steps, min_ratio) for s in xs]
    return xs, ys


def _baseline_schedule(b: BaselineResult, warmup: int, total: int) -> tuple[list[int], list[float], str]:
    if b.lr_trajectory:
        xs, ys = zip(*b.lr_trajectory, strict=True)
        return list(xs), list(ys), "logged"
    total = int(b.raw.get("total_steps") or b.update_step or total)
    warmup = int(b.raw.get("warmup_steps", warmup))
    xs, ys = cosine_curve(b.peak_lr, total, warmup)
    return xs, ys, f"drawn from its peak: warmup {warmup} steps, cosine to {COSINE_MIN_RATIO:g}x peak at step {total}"


def _round_end(r: RoundSummary, default: int | None) -> int:
    if r.total_steps:
        return r.total_steps
    last = max(s for s, _ in r.lr_trajectory())
    return max(last + 1, default) if default else last + max(r.decision_every, 1)


def _round_schedule(r: RoundSummary, end: int | None) -> tuple[list[int], list[float]]:
    """Step-wise LR of a round: the warmup ramp, then each trajectory point held until the next."""
    traj = r.lr_trajectory()
    xs: list[int] = []
    ys: list[float] = []
    if r.warmup_steps > 0 and math.isfinite(r.init_lr):
        ramp_end = min(r.warmup_steps, traj[0][0])
        for s in range(0, ramp_end, max(ramp_end // 50, 1)):
            xs.append(s)
            ys.append(warmup_lr(s, r.init_lr, r.warmup_steps))
    for i, (s, lr) in enumerate(traj):
        nxt = traj[i + 1][0] if i + 1 < len(traj) else _round_end(r, end)
        xs += [s, nxt]
        ys += [lr, lr]
    return xs, ys


def fig_lr_schedules(a: Analysis, out: Path) -> Figure:
    title = "LR schedule evolution: selected rounds vs the best cosine"
    if not a.selected_rounds:
        return Figure("lr_schedules", title, "No finished rounds yet: nothing to plot.")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN))
    # one distinct colour per role (the best and last rounds are often neighbours, so no round colour map)
    role_color = {"first": "tab:purple", "middle": "tab:blue", "best": "crimson", "last": "tab:orange"}
    est_total = campaign_total_steps(a.rounds)
    for role, r in a.selected_rounds.items():
        xs, ys = _round_schedule(r, est_total)
        lw = 2.4 if "best" in role else 1.5
        ax.plot(
            xs,
            ys,
            color=role_color["best" if "best" in role else role.split("/")[0]],
            lw=lw,
            label=f"{role}: round {r.round} (ppl {fmt_ppl(r.final_eval_ppl)})",
        )
    notes = []
    ref = a.best_round or next(iter(a.selected_rounds.values()))
    warmup, total = ref.warmup_steps, _round_end(ref, est_total)
    drawn = []
    if a.best_baseline is not None:
        drawn.append((a.best_baseline, "k", "--", "best "))
    at_best_peak = a.baseline_at(a.best_round.peak_lr) if a.best_round else None
    if at_best_peak is not None and at_best_peak is not a.best_baseline:
        drawn.append((at_best_peak, "0.45", ":", "same peak as best round: "))
    for b, color, ls, prefix in drawn:
        xs, ys, how = _baseline_schedule(b, warmup, total)
        ax.plot(xs, ys, color=color, ls=ls, lw=1.8, label=f"{prefix}{b.label} (ppl {fmt_ppl(b.final_eval_ppl)})")
        notes.append(f"{b.label}: {how}")
    ax.set_yscale("log")
    lrs = [lr for r in a.selected_rounds.values() for _, lr in r.lr_trajectory() if lr > 0]
    lrs += [b.peak_lr for b, *_ in drawn]
    if lrs:
        ax.set_ylim(min(lrs) / 3, max(lrs) * 2)
    ax.set_xlim(left=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("learning rate (log scale)")
    ax.set_title(title)
    ax.legend(loc="lower left", framealpha=0.9)
    caption = (
        "LR per step of the first, a middle, the best and the last round (warmup ramp, then each decision held "
        "until the next; after a rollback, the path the final model actually trained on), against the best "
        "cosine run"
        + (" and the cosine run at the best round's peak" if len(drawn) > 1 else "")
        + ". "
        + ("Cosine curves: " + "; ".join(notes) + "." if notes else "No baseline to compare with.")
    )
    return Figure("lr_schedules", title, caption, _save(fig, out / "lr_schedules.png"))


# ----------------------------------------------------------------------------------------------- (d)


def fig_landscape(a: Analysis, out: Path) -> Figure:
    title = "Exploration landscape: final ppl vs peak LR"
    pts = [r for r in a.rounds if _plottable_lr(r.peak_lr)]
    if not pts and not a.baselines:
        return Figure("landscape", title, "No rounds or baselines: nothing to plot.")
    bottom, cap = ppl_limits([r.final_eval_ppl for r in pts] + [b.final_eval_ppl for b in a.baselines])
    if not math.isfinite(cap):
        return Figure("landscape", title, "No round or baseline finished with a perplexity: nothing to plot.")
    plt = _plt()
    import matplotlib.colors as mcolors
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN))
    peaks = [r.peak_lr for r in pts] + [b.peak_lr for b in a.baselines if _plottable_lr(b.peak_lr)]
    explored = {r.band for r in pts}
    unexplored = []
    for name, lo, hi in bands_between(min(peaks), max(peaks)):
        if name not in explored:
            ax.axvspan(
                lo, hi, color="0.88", zorder=0, label="band never explored by the agent" if not unexplored else None
            )
            unexplored.append(name)
    extra_over: list[tuple[str, float]] = []
    n_off = 0

    def off_scale(text: str, x: float, color: str) -> None:
        nonlocal n_off
        ax.annotate(
            text,
            (x, cap),
            xytext=(-12, -6 - 15 * n_off),
            textcoords="offset points",
            ha="right",
            va="top",
            fontsize=8.5,
            color=color,
            bbox=_BOX,
            zorder=6,
        )
        n_off += 1

    by_sched: dict[str, list[BaselineResult]] = {}
    for b in a.baselines:
        if _plottable_lr(b.peak_lr):
            by_sched.setdefault(b.schedule, []).append(b)
    for i, (sched, bs) in enumerate(sorted(by_sched.items())):
        bs = sorted(bs, key=lambda b: b.peak_lr)
        ys = [min(b.final_eval_ppl, cap) if math.isfinite(b.final_eval_ppl) else cap for b in bs]
        style = {"color": "k", "marker": "s"} if i == 0 else {"marker": "D"}
        ax.plot([b.peak_lr for b in bs], ys, lw=1.6, ms=6, zorder=2, label=f"{sched} sweep", **style)
        for b in bs:
            if not math.isfinite(b.final_eval_ppl) or b.final_eval_ppl > cap:
                ax.scatter([b.peak_lr], [cap], marker="^", s=80, color="k", zorder=4)
                off_scale(
                    f"{b.label}: "
                    + (f"ppl {fmt_ppl(b.final_eval_ppl)} (off scale)" if b.ok else "diverged (drawn at the top)"),
                    b.peak_lr,
                    "k",
                )
                extra_over.append((b.label, b.final_eval_ppl))
    if pts:
        norm = mcolors.Normalize(
            vmin=min(r.round for r in pts), vmax=max(max(r.round for r in pts), min(r.round for r in pts) + 1)
        )
        xs, ys, cs = [], [], []
        for r in pts:
            # a small deterministic spread in x so that the many rounds at one peak do not hide each other
            jitter = 10 ** (((r.round * 0.618034) % 1 - 0.5) * 0.06)
            xs.append(r.peak_lr * jitter)
            ys.append(min(r.final_eval_ppl, cap) if math.isfinite(r.final_eval_ppl) else cap)
            cs.append(r.round)
        markers = ["^" if (not math.isfinite(r.final_eval_ppl) or r.final_eval_ppl > cap) else "o" for r in pts]
        for m in ("o", "^"):
            sel = [i for i, mk in enumerate(markers) if mk == m]
            if sel:
                ax.scatter(
                    [xs[i] for i in sel],
                    [ys[i] for i in sel],
                    c=[cs[i] for i in sel],
                    cmap="viridis",
                    norm=norm,
                    s=36 if m == "o" else 80,
                    marker=m,
                    edgecolor="k",
                    linewidth=0.4,
                    zorder=3,
                    label="agent round (colour = round)" if m == "o" else None,
                )
        for r, x, m in zip(pts, xs, markers, strict=True):
            if m == "^":
                off_scale(
                    f"round {r.round}: "
                    + (f"ppl {fmt_ppl(r.final_eval_ppl)} (off scale)" if r.ok else "failed (drawn at the top)"),
                    x,
                    "darkred",
                )
        cb = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, pad=0.01)
        cb.set_label("round")
        cb.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if a.best_round is not None:
            br = a.best_round
            ax.scatter(
                [br.peak_lr],
                [br.final_eval_ppl],
                marker="*",
                s=260,
                facecolor="none",
                edgecolor="crimson",
                lw=1.6,
                zorder=5,
                label=f"best round {br.round}: {fmt_ppl(br.final_eval_ppl)}",
            )
    ax.set_xscale("log")
    ax.set_ylim(bottom, cap)
    ax.set_xlim(min(peaks) / 1.6, max(peaks) * 1.6)
    edges = [e for _, lo, hi in bands_between(min(peaks) / 1.6, max(peaks) * 1.6) for e in (lo, hi)]
    ax.set_xticks(sorted(set(edges)), [fmt_lr(e) for e in sorted(set(edges))])
    ax.minorticks_off()
    ax.set_xlabel("peak learning rate of the run (log scale)")
    ax.set_ylabel("final eval perplexity (lower is better)")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    caption = (
        "Each agent round at its peak LR (slightly spread in x so rounds at the same peak stay visible) and "
        "final ppl, coloured by round, over the cosine sweep (ppl vs peak). "
        + (
            f"Grey: peak bands the agent never explored ({', '.join(unexplored)})."
            if unexplored
            else "The agent explored every band of the sweep's range."
        )
        + _cap_note(a, cap, extra_over)
    )
    return Figure("landscape", title, caption, _save(fig, out / "landscape.png"))


# ----------------------------------------------------------------------------------------------- (e)


def fig_loss_curves(a: Analysis, out: Path) -> Figure:
    title = "Training loss: best agent round vs best cosine run"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN))
    notes, drawn = [], 0
    shown: list[tuple[RoundSummary, str, str]] = []
    if a.best_round is not None:
        shown.append((a.best_round, "crimson", f"best round {a.best_round.round}"))
        if not a.best_round.rollbacks:
            with_rb = [r for r in a.rounds if r.rollbacks]
            if with_rb:
                r = max(with_rb, key=lambda r: len(r.rollbacks))
                shown.append(
                    (r, "tab:orange", f"round {r.round} ({len(r.rollbacks)} rollback{'s' * (len(r.rollbacks) > 1)})")
                )
    ys_all: list[float] = []
    rb_labelled = False
    est_total = campaign_total_steps(a.rounds)
    nudge = 0.012 * (est_total or 1)  # final-eval stars of runs that end together sit side by side
    for k, (r, color, label) in enumerate(shown):
        traj = r.loss_trajectory()
        if not traj:
            notes.append(f"round {r.round} logged no losses")
            continue
        xs, ys = zip(*traj, strict=True)
        ys_all += ys
        ax.plot(
            xs,
            ys,
            color=color,
            marker="o",
            ms=3,
            lw=1.5 if "best" in label else 1.1,
            label=f"{label}: train loss at decisions"
            + (f" (final eval {r.final_eval_loss:.3f})" if math.isfinite(r.final_eval_loss) else f" ({r.status})"),
        )
        drawn += 1
        for rb in r.rollbacks:
            cs, back = as_float(rb.get("crash_step")), as_float(rb.get("rolled_back_to_step"))
            if not math.isfinite(cs):
                continue
            ax.axvline(
                cs,
                color=color,
                alpha=0.5,
                lw=1,
                ls="--",
                label="rollback: crash step (dashed), arrow to the restored step" if not rb_labelled else None,
            )
            rb_labelled = True
            if math.isfinite(back):
                ax.annotate(
                    "",
                    xy=(back, 0.97),
                    xytext=(cs, 0.97),
                    xycoords=("data", "axes fraction"),
                    arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.7, "lw": 1},
                )
        if math.isfinite(r.final_eval_loss):
            ax.scatter(
                [_round_end(r, est_total) + k * nudge],
                [r.final_eval_loss],
                marker="*",
                s=140,
                color=color,
                edgecolor="k",
                zorder=5,
            )
    bb = a.best_baseline
    if bb is not None:
        if bb.loss_trajectory:
            xs, ys = zip(*bb.loss_trajectory, strict=True)
            ys_all += [y for y in ys if math.isfinite(y)]
            ax.plot(
                xs, ys, color="k", lw=1.2, label=f"best {bb.label}: train loss (final eval {bb.final_eval_loss:.3f})"
            )
            drawn += 1
        else:
            notes.append(
                f"{bb.label} logged no loss trajectory; only its final eval loss ({bb.final_eval_loss:.3f}) is shown"
            )
        if math.isfinite(bb.final_eval_loss):
            end = int(bb.raw.get("total_steps") or bb.update_step or (max(ax.get_xlim()) if drawn else 1))
            ax.scatter(
                [end + len(shown) * nudge],
                [bb.final_eval_loss],
                marker="*",
                s=140,
                color="k",
                zorder=5,
                label=f"final eval loss (★); best {bb.label}: {bb.final_eval_loss:.3f}",
            )
            ys_all.append(bb.final_eval_loss)
    if not drawn and (bb is None or not math.isfinite(bb.final_eval_loss)):
        plt.close(fig)
        return Figure(
            "loss_curves", title, "No loss data in the logs: " + ("; ".join(notes) or "no rounds, no baselines") + "."
        )
    if ys_all:
        lo, hi = min(ys_all), max(ys_all)
        ax.set_ylim(lo - 0.05 * (hi - lo + 0.1), min(hi, lo + 3.0) + 0.1 * (hi - lo + 0.1))
    ax.set_xlim(left=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.legend(loc="upper right", framealpha=0.9)
    caption = (
        "Training loss the agent saw at each decision point of the best round (the path the final model trained "
        "on), and of the round with the most rollbacks, whose crash steps are dashed with an arrow back to the "
        "restored checkpoint; ★ marks each run's final eval loss. "
        + ("Notes: " + "; ".join(notes) + "." if notes else "")
    )
    return Figure("loss_curves", title, caption, _save(fig, out / "loss_curves.png"))


# ------------------------------------------------------------------------------------------ side by side

#: a ppl axis switches to log scale when its largest value is this many times its smallest
LOG_Y_RATIO = 3.0


def _baseline_box(groups: list[SideBySideRow]) -> str:
    """The baseline runs as a small monospace table: one line per run, peak and ppl, the best marked."""
    lines = []
    for g in groups:
        best = next((b for b in g.baselines if b.ok and b.label == g.best_at), None)
        lines += [f"{g.name}", f"{'peak LR':>8}  {'ppl':>8}"]
        for b in g.baselines:
            ppl = f"{b.final_eval_ppl:8.2f}" if b.ok else "diverged"
            lines.append(f"{fmt_lr(b.peak_lr):>8}  {ppl:>8}" + (" ◀ best" if b is best else ""))
        lines.append("")
    return "\n".join(lines).rstrip()


def fig_side_by_side(s: SideBySide, out: Path) -> Figure:
    title = "Side by side: best-so-far perplexity per round"
    camps = [r for r in s.campaigns if any(math.isfinite(p) for _, p in r.best_so_far)]
    groups = [g for g in s.baseline_groups if g.baselines]
    if not camps and not any(math.isfinite(g.best_ppl) for g in groups):
        return Figure("side_by_side", title, "No campaign round and no baseline run finished with a perplexity.")
    plt = _plt()
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter

    # narrower than the others: the table of baseline runs sits to the right of the axes
    fig, ax = plt.subplots(figsize=(WIDTH_IN - 1.4, HEIGHT_IN))
    colors = ["crimson", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive"]
    ys: list[float] = []
    xmax = 1
    for i, c in enumerate(camps):
        color = colors[i % len(colors)]
        pts = c.best_so_far
        xs, vals = [x for x, _ in pts], [v for _, v in pts]
        ys += [v for v in vals if math.isfinite(v)]
        xmax = max(xmax, *xs)
        z = 3 + 0.1 * (len(camps) - i)  # the main campaign (first) on top where lines meet
        ax.plot(
            xs,
            vals,
            color=color,
            lw=2.0,
            marker="o",
            ms=4.5,
            label=f"{c.name} ({c.method}): best {fmt_ppl(c.best_ppl)} at {c.best_at}",
            zorder=z,
        )
        failed = [(x, v) for (x, v), r in zip(pts, c.rounds, strict=True) if not r.ok and math.isfinite(v)]
        if failed:
            ax.scatter(
                *zip(*failed, strict=True),
                marker="x",
                s=70,
                color=color,
                lw=2,
                zorder=z + 1,
                label=f"{c.name}: failed round{'s' * (len(failed) > 1)} (best so far unchanged)",
            )
    styles = [("k", "--"), ("0.45", "-."), ("tab:cyan", ":"), ("tab:olive", "--")]
    for i, g in enumerate(groups):
        if not math.isfinite(g.best_ppl):
            continue
        color, ls = styles[i % len(styles)]
        label = f"{g.name}: best run {fmt_lr(g.best_peak_lr)}, ppl {fmt_ppl(g.best_ppl)}"
        ax.axhline(g.best_ppl, color=color, ls=ls, lw=1.6, zorder=2, label=label)
        ys.append(g.best_ppl)
    lo, hi = min(ys), max(ys)
    if hi / lo > LOG_Y_RATIO:
        ax.set_yscale("log")
        ax.set_ylim(lo / 1.12, hi * 1.12)
        # plain numbers at 1, 2, 3, 5 x 10^k rather than only 10^k: the range is often under a decade
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ylabel = "best final eval perplexity so far (log scale)"
    else:
        pad = 0.08 * (hi - lo) if hi > lo else 0.05 * hi
        ax.set_ylim(lo - pad, hi + pad)
        ylabel = "best final eval perplexity so far"
    ax.set_xlim(0.5, xmax + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    if groups:
        ax.text(
            1.02,
            1.0,
            _baseline_box(groups),
            transform=ax.transAxes,
            ha="left",
            va="top",
            family="monospace",
            fontsize=8.5,
            bbox={"boxstyle": "round,pad=0.4", "facecolor": "0.96", "edgecolor": "0.8"},
        )
    skipped = [r.name for r in s.campaigns if r not in camps]
    caption = (
        "For each campaign, the lowest final eval perplexity reached by that round or any earlier one (lower is "
        "better; × marks a failed round). Dashed: the best run of each baseline sweep; the box lists every "
        "baseline run's peak LR and perplexity. "
        + (f"Not drawn (no round finished with a perplexity): {', '.join(skipped)}. " if skipped else "")
        + s.budget_note
    )
    return Figure("side_by_side", title, caption, _save(fig, out / "side_by_side.png"))


def fig_range_tests(tests: list[RangeTest], out: Path) -> Figure:
    """Training loss against LR (log axis) of the campaign's LR range tests (at least one), each with the
    ceiling it set."""
    title = "LR range tests: training loss of each update against its LR"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN))
    for i, t in enumerate(tests):
        color = plt.get_cmap("tab10")(i % 10)
        ax.plot(t.lrs, t.losses, color=color, lw=1.2, label=f"round {t.round}, step {t.step}")
        if _plottable_lr(t.ceiling):
            ax.axvline(t.ceiling, color=color, ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("LR of the update")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8, loc="best")
    caption = (
        "Each curve is one range test: from the state at the end of warmup the trainer swept the LR upward, one "
        "update per LR, then restored the state. Dashed: the ceiling the rules set from it (the LR of the lowest "
        "smoothed loss / range_divisor)."
    )
    return Figure("range_tests", title, caption, _save(fig, out / "range_tests.png"))


def safe_figure(name: str, fn, *args) -> Figure:
    """fn(*args), or a note (with a warning) when it fails on odd data instead of losing the report."""
    try:
        return fn(*args)
    except DiskWriteError:
        raise  # the disk, not the data: no later file would be written either
    except Exception as e:  # noqa: BLE001 - a figure is not worth the whole report
        warnings.warn(f"report: figure {name} skipped ({e.__class__.__name__}: {e})", stacklevel=2)
        _plt().close("all")
        return Figure(name, name, f"This figure could not be drawn ({e.__class__.__name__}: {e}).")


def all_figures(a: Analysis, out: Path) -> list[Figure]:
    """Every figure (the range tests' only when a round ran one); one that fails on odd data becomes a note
    (with a warning) instead of losing the report."""
    tests = [t for r in a.rounds for t in r.range_tests()]
    return [
        safe_figure(name, fn, a, out)
        for name, fn in (
            ("ppl_per_round", fig_ppl_per_round),
            ("lr_schedules", fig_lr_schedules),
            ("landscape", fig_landscape),
            ("loss_curves", fig_loss_curves),
        )
    ] + ([safe_figure("range_tests", fig_range_tests, tests, out)] if tests else [])


__all__ = ["Figure", "all_figures", "cosine_curve", "fig_side_by_side", "ppl_limits", "safe_figure"]
