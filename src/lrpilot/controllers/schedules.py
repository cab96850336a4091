"""Baseline LR schedules as controllers: cosine (the reference), linear-to-zero (D2Z), WSD and constant.

    python -m pytest -q tests/test_schedules.py

A baseline goes through the same supervisor, guard and logs as the LLM agent, so the comparison is
fair: at each decision point it answers with the schedule's LR and a `plan` holding one knot per step
until the next decision point, so the trainer follows the closed-form curve exactly (not a staircase).

Step convention (docs/architecture.md): `lr_at(t)` is the LR used for update number t (0-based). For
t < warmup_steps it is the trainer's linear warmup `peak * (t + 1) / warmup_steps`; the schedule proper
starts at t = warmup_steps with the peak and reaches its end value at t = total_steps (one past the last
update, as in GaLore's `get_cosine_schedule_with_min_lr_lambda`).

The trainer warms up to `schedule.init_lr`, so a baseline at peak P must run with init_lr = P: build its
config with `baseline_config(cfg, "cosine", P)` and its controller with `make_schedule("cosine", P, cfg)`.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace
from typing import Any

from lrpilot.config import ConfigError, RunConfig, _check
from lrpilot.controllers.base import BaseController, ControllerSpec, Decision, Observation
from lrpilot.lr import (
    COSINE_MIN_RATIO,
    WSD_DECAY_FRACTION,
    WSD_FINAL_RATIO,
    cosine_lr,
    d2z_lr,
    is_positive_finite,
    warmup_lr,
    wsd_decay_start,
    wsd_lr,
)
from lrpilot.registry import Registry


class ScheduleController(BaseController):
    """A closed-form LR curve `lr_at(step)`; decide() returns it with a per-step plan to the next decision."""

    name = "schedule"
    blocking = True

    def __init__(self, peak_lr: float, total_steps: int, warmup_steps: int) -> None:
        _check(
            is_positive_finite(peak_lr),
            f"{self.name}.peak_lr",
            f"must be a positive number, got {peak_lr!r}",
        )
        _check(int(total_steps) >= 1, f"{self.name}.total_steps", "must be >= 1")
        _check(
            0 <= int(warmup_steps) < int(total_steps),
            f"{self.name}.warmup_steps",
            f"must be in [0, total_steps={total_steps})",
        )
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)

    def _warmup_lr(self, step: int) -> float:
        # the trainer's own warmup (docs/architecture.md), so lr_at describes the whole run
        return warmup_lr(max(step, 0), self.peak_lr, self.warmup_steps)

    def lr_at(self, step: int) -> float:
        """LR used for update number `step` (0-based) over the whole run, warmup included."""
        if step < self.warmup_steps:
            return self._warmup_lr(step)
        return self._after_warmup(min(step, self.total_steps))

    @abstractmethod
    def _after_warmup(self, step: int) -> float:
        """The schedule for warmup_steps <= step <= total_steps."""

    def decide(self, obs: Observation) -> Decision:
        step = max(int(obs.step), 0)
        end = min(step + max(int(obs.decision_every), 1), self.total_steps)
        plan = tuple((s, self.lr_at(s)) for s in range(step, end)) or None
        # past the end (or on a schedule that ends at 0) the headline LR must still be positive: hold
        # the LR of the last update, which is > 0 for every schedule here
        lr = self.lr_at(min(step, self.total_steps - 1))
        if not is_positive_finite(lr):
            lr = self.peak_lr
        return Decision(
            lr=lr,
            reason=f"{self.name} schedule: lr {lr:.3e} at step {step} (peak {self.peak_lr:.3e})",
            plan=plan,
            meta={"schedule": self.name},
        )

    def describe(self) -> dict[str, Any]:
        return {
            "controller": self.name,
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }


class CosineController(ScheduleController):
    """Cosine decay from peak_lr at warmup to min_ratio * peak_lr at total_steps (GaLore's reference)."""

    name = "cosine"

    def __init__(
        self, peak_lr: float, total_steps: int, warmup_steps: int, min_ratio: float = COSINE_MIN_RATIO
    ) -> None:
        super().__init__(peak_lr, total_steps, warmup_steps)
        _check(0.0 <= min_ratio <= 1.0, "cosine.min_ratio", "must be in [0, 1]")
        self.min_ratio = float(min_ratio)

    def _after_warmup(self, step: int) -> float:
        return cosine_lr(step, self.peak_lr, self.total_steps, self.warmup_steps, self.min_ratio)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "min_ratio": self.min_ratio}


class LinearDecayController(ScheduleController):
    """D2Z: linear decay from peak_lr at warmup to 0 at total_steps."""

    name = "d2z"

    def _after_warmup(self, step: int) -> float:
        return d2z_lr(step, self.peak_lr, self.total_steps, self.warmup_steps)


class WSDController(ScheduleController):
    """Warmup-stable-decay: peak_lr until the last decay_fraction of the run, then linear to final_ratio * peak.

    The decay covers the last `round(decay_fraction * total_steps)` steps (at least 1, and never into the
    warmup). Linear decay is the common choice (MiniCPM, Hägele et al. 2024 find (1 - sqrt) slightly better
    but linear is the standard reference), and it makes WSD with decay_fraction=1 equal to D2Z.
    """

    name = "wsd"

    def __init__(
        self,
        peak_lr: float,
        total_steps: int,
        warmup_steps: int,
        decay_fraction: float = WSD_DECAY_FRACTION,
        final_ratio: float = WSD_FINAL_RATIO,
    ) -> None:
        super().__init__(peak_lr, total_steps, warmup_steps)
        _check(0.0 < decay_fraction <= 1.0, "wsd.decay_fraction", "must be in (0, 1]")
        _check(0.0 <= final_ratio <= 1.0, "wsd.final_ratio", "must be in [0, 1]")
        self.decay_fraction = float(decay_fraction)
        self.final_ratio = float(final_ratio)
        self.decay_start = wsd_decay_start(self.total_steps, self.warmup_steps, self.decay_fraction)

    def _after_warmup(self, step: int) -> float:
        return wsd_lr(step, self.peak_lr, self.total_steps, self.warmup_steps, self.decay_fraction, self.final_ratio)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "decay_fraction": self.decay_fraction,
            "final_ratio": self.final_ratio,
            "decay_start": self.decay_start,
        }


class ConstantController(ScheduleController):
    """A constant LR after warmup."""

    name = "constant"

    def __init__(self, lr: float, total_steps: int | None = None, warmup_steps: int = 0) -> None:
        # total/warmup only bound the plan and describe the warmup; without them the LR simply holds
        self.open_ended = total_steps is None
        super().__init__(lr, warmup_steps + 1 if total_steps is None else total_steps, warmup_steps)

    def _after_warmup(self, step: int) -> float:
        return self.peak_lr

    def decide(self, obs: Observation) -> Decision:
        if self.open_ended:  # one knot; the trainer holds it until the next decision
            return Decision(
                lr=self.peak_lr,
                reason=f"constant schedule: lr {self.peak_lr:.3e}",
                plan=((max(int(obs.step), 0), self.peak_lr),),
                meta={"schedule": self.name},
            )
        return super().decide(obs)


#: the baseline schedules by name: `lrpilot train/baseline --schedule NAME`, `bench --methods NAME`. A new one is a
#: ScheduleController subclass taking (peak_lr, total_steps, warmup_steps) in its own file and one line here
#: (CONTRIBUTING.md, Extending); add a ControllerSpec line in lrpilot.controllers to run it as a campaign controller.
SCHEDULES: Registry[type[ScheduleController]] = Registry("schedule", field="--schedule")
SCHEDULES.add("cosine", CosineController, help="cosine to 0.1x peak (the reference)")
SCHEDULES.add("d2z", LinearDecayController, help="linear to zero")
SCHEDULES.add("wsd", WSDController, help="warmup-stable-decay (the last fifth linear to zero)")
SCHEDULES.add("constant", ConstantController, help="the peak after warmup")
SCHEDULE_ALIASES = {"linear": "d2z"}


def make_schedule(name: str, peak: float, cfg: RunConfig) -> BaseController:
    """The baseline controller `name` (a SCHEDULES name, or the alias linear = d2z; any case) at peak LR `peak`,
    over cfg's total_steps and warmup_steps. Raises ConfigError (one line, naming the choices) for another name."""
    key = SCHEDULE_ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in SCHEDULES:
        choices = ", ".join(f"{n} (alias {a})" if a else n for n, a in ((n, _alias_of(n)) for n in SCHEDULES))
        raise ConfigError(f"schedule {name!r}: unknown; choose one of {choices}")
    return SCHEDULES.get(key)(peak, cfg.train.total_steps, cfg.schedule.warmup_steps)


def _alias_of(name: str) -> str:
    return ", ".join(a for a, n in SCHEDULE_ALIASES.items() if n == name)


def _schedule_spec(name: str) -> ControllerSpec:
    """Schedule `name` as a campaign controller (lrpilot.controllers.CONTROLLERS) at the preset's init_lr."""
    return ControllerSpec(build=lambda ctx: make_schedule(name, ctx.cfg.schedule.init_lr, ctx.cfg))


COSINE_SPEC, D2Z_SPEC, WSD_SPEC, CONSTANT_SPEC = (_schedule_spec(n) for n in ("cosine", "d2z", "wsd", "constant"))


def baseline_config(cfg: RunConfig, schedule: str, peak: float) -> RunConfig:
    """`cfg` with schedule.init_lr = peak, so the trainer's warmup ends where the `schedule` starts.

    The warmup trains at up to `peak` before the guard sees a decision, so a peak outside the guard's
    [floor, ceiling] is refused (ConfigError naming guard.ceiling / guard.floor), never clamped silently."""
    make_schedule(schedule, peak, cfg)  # validates the name and the peak with the usual one-line errors
    g = cfg.guard
    _check(
        peak <= g.ceiling,
        "peak",
        f"{peak:g} is above guard.ceiling ({g.ceiling:g}), so the warmup would train at it unguarded and the "
        f"guard would cut it at the first decision; use a peak <= {g.ceiling:g} or raise guard.ceiling "
        f"(--set guard.ceiling={peak:g})",
    )
    _check(
        peak >= g.floor,
        "peak",
        f"{peak:g} is below guard.floor ({g.floor:g}); use a peak >= {g.floor:g} or lower guard.floor",
    )
    return replace(cfg, schedule=replace(cfg.schedule, init_lr=float(peak)))
