"""The controller contract: `decide(observation) -> Decision`.

Every way of steering the LR after warmup is a controller: the LLM agent, the rule heuristic, the
baseline schedules (cosine, linear-to-zero, WSD, constant) and replay of a logged round. The round
supervisor builds an `Observation` from the trainer's telemetry every `decision_every` steps, asks the
controller, passes the `Decision` through the SafetyGuard and sends it to the trainer over the control
channel. So agents and baselines share one code path, one guard and one log format.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrpilot.logs import finite_mean
from lrpilot.lr import check_lr, is_positive_finite
from lrpilot.records import DecisionRecord, RollbackRecord  # the log's own records, as a controller sees them

__all__ = ["BaseController", "Decision", "DecisionRecord", "Observation", "ProbeResult", "RollbackRecord"]


@dataclass(frozen=True)
class ProbeResult:
    """One branch of a lookahead probe (Decision.probe_lrs): from the decision point's state the trainer
    trained `len(losses)` updates at `lr` on the run's own next batches, then restored the state exactly.

    `losses` are the branch's per-step training losses (oldest first); `after` is the mean loss of the
    following `after_batches` training batches under the branch's final weights, forward only (batches no
    branch trained on, so the branches are compared on the same unseen data). NaN when not measured."""

    lr: float
    losses: tuple[float, ...]
    after: float = math.nan
    after_batches: int = 0
    #: an LR range test branch (Decision.probe_sweep): the LR of each update, oldest first; losses[i] is that
    #: update's training loss, taken before its step (so it shows the effect of lrs[:i], as in fastai's
    #: lr_find); empty for a branch at the fixed LR `lr`
    lrs: tuple[float, ...] = ()

    @property
    def end_loss(self) -> float:
        """The branch's score: `after` if measured, else the mean of the second half of its losses."""
        if math.isfinite(self.after):
            return self.after
        return finite_mean(self.losses[len(self.losses) // 2 :])


@dataclass(frozen=True)
class Observation:
    """What a controller sees at a decision point. All numbers come from the run itself."""

    step: int  # optimizer updates completed so far
    total_steps: int
    warmup_steps: int
    decision_every: int
    lr: float  # LR in force now
    init_lr: float  # the LR the warmup ended at (BaseController.warmup_to; for most controllers schedule.init_lr)
    #: dense per-step losses since the previous decision point (oldest first)
    recent_losses: tuple[float, ...]
    #: (step, mean loss over the interval ending at step), one per decision point, whole round
    loss_history: tuple[tuple[int, float], ...]
    #: (step, lr) at each decision point, whole round
    lr_history: tuple[tuple[int, float], ...]
    grad_norm: float = math.nan
    tokens_per_s: float = math.nan
    decisions: tuple[DecisionRecord, ...] = ()
    rollbacks: tuple[RollbackRecord, ...] = ()
    memory_brief: str = ""
    # guard limits, so the controller can be told the rules it is held to
    floor: float = 1e-6
    ceiling: float = 5e-2
    min_ratio: float = 0.5
    max_ratio: float = 2.0
    round_index: int = 0
    #: steps of the healthy checkpoints the controller may ask to roll back to now (Decision.rollback_to_step;
    #: the guard's rules already applied: empty when it may not ask)
    rollback_steps: tuple[int, ...] = ()
    #: agent-requested rollbacks it has left this round
    agent_rollbacks_left: int = 0
    #: the guard only lets the LR go down (schedule-free optimizer; lrpilot.guard.clamp_lr lower_only)
    lower_only: bool = False
    #: results of the lookahead probe run at this decision point (empty unless the controller asked for one
    #: with Decision.probe_lrs; the supervisor then asks again with them)
    probes: tuple[ProbeResult, ...] = ()

    @property
    def progress(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    @property
    def loss(self) -> float:
        """Mean of the recent losses (the interval's loss), NaN if none."""
        return finite_mean(self.recent_losses)

    @property
    def steps_left(self) -> int:
        return max(0, self.total_steps - self.step)


@dataclass(frozen=True)
class Decision:
    """A controller's answer. `lr` is the LR from the decision step on; `plan`, for schedules, is an
    optional list of (step, lr) knots that the trainer interpolates linearly until the next decision."""

    lr: float
    reason: str = ""
    raw: str | None = None  # the raw LLM reply, if any
    plan: tuple[tuple[int, float], ...] | None = None
    #: the controller could not produce a valid LR and kept the current one
    fallback: bool = False
    #: anything else worth logging (LLM usage, rule parameters, ...)
    meta: dict[str, Any] = field(default_factory=dict)
    #: go back to the checkpoint at this step first and continue from there at `lr` (the LLM agent's request
    #: when it judges a phase wasted; the guard validates it: guard.check_agent_rollback). Rules and schedules
    #: never set it.
    rollback_to_step: int | None = None
    #: ask for a lookahead probe first: the trainer trains `probe_steps` updates at each of these LRs from the
    #: current state (each through the guard's clamp), restores the state, and the supervisor asks again with
    #: Observation.probes; `lr` is used if the probe cannot run (probes off, a non-blocking controller).
    probe_lrs: tuple[float, ...] | None = None
    probe_steps: int = 0
    #: with probe_lrs = (lo, hi), lo < hi: one LR range test branch instead (Smith 2017, "Cyclical Learning
    #: Rates for Training Neural Networks", sec. 3.3): `probe_steps` updates whose LR rises geometrically from lo
    #: to hi, stopped early once the loss diverges; each end goes through the guard's [floor, ceiling] (not
    #: its ratio band: the run's own LR does not change), and the state is restored as after any probe
    probe_sweep: bool = False

    def __post_init__(self) -> None:
        if self.probe_lrs is not None:
            if not (1 <= len(self.probe_lrs) <= 8) or not all(is_positive_finite(x) for x in self.probe_lrs):
                raise ValueError(f"Decision.probe_lrs: 1..8 positive finite LRs, got {self.probe_lrs!r}")
            if isinstance(self.probe_steps, bool) or not isinstance(self.probe_steps, int) or self.probe_steps < 1:
                raise ValueError(f"Decision.probe_steps: a positive int with probe_lrs, got {self.probe_steps!r}")
            if self.probe_sweep and not (len(self.probe_lrs) == 2 and self.probe_lrs[0] < self.probe_lrs[1]):
                raise ValueError(f"Decision.probe_lrs: (lo, hi) with lo < hi for probe_sweep, got {self.probe_lrs!r}")
        if self.probe_sweep and self.probe_lrs is None:
            raise ValueError("Decision.probe_sweep needs probe_lrs = (lo, hi)")
        r = self.rollback_to_step
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise ValueError(f"Decision.rollback_to_step must be None or a non-negative int step, got {r!r}")
        check_lr(self.lr, "Decision.lr")
        if self.plan is not None:
            for s, v in self.plan:
                if not (math.isfinite(v) and v >= 0):
                    raise ValueError(f"Decision.plan: LR at step {s} must be finite and >= 0, got {v!r}")


class BaseController(ABC):
    """Decides the LR every `decision_every` steps after warmup. Subclasses implement `decide`."""

    #: short name used in logs and the CLI
    name: str = "base"
    #: True if decide() is instant and deterministic: the trainer then waits for each decision, so
    #: the LR takes effect exactly at the decision step. False (LLM): training continues meanwhile.
    blocking: bool = True

    def start_round(self, round_index: int = 0, memory_brief: str = "") -> None:  # noqa: B027
        """Called once before the round's first decision; resets per-round state."""

    def warmup_to(self, init_lr: float) -> float:
        """The LR the run's linear warmup ends at (the LR in force at the first decision point), given the
        run's configured warmup target `init_lr` (schedule.init_lr, or the Pilot's init_lr). Default: init_lr.
        The hosts (the round supervisor, the Pilot) ask once, before the first update, and keep the answer
        inside the guard's [floor, ceiling] (lrpilot.decision.warmup_end_lr); Observation.init_lr is then that LR.
        Must be a pure function of the controller's settings (a resumed run asks again)."""
        return init_lr

    @abstractmethod
    def decide(self, obs: Observation) -> Decision:
        """Return the LR to use from obs.step on. Must not raise on odd telemetry (NaN losses, empty
        history); return the current LR with fallback=True instead."""

    def describe(self) -> dict[str, Any]:
        """Settings recorded with each round."""
        return {"controller": self.name}


@dataclass(frozen=True)
class ControllerContext:
    """What a campaign (or a test) hands a registered controller's `build` for one round.

    cfg: the round's RunConfig (its schedule, guard and agent settings); round_index: 1-based round number;
    params: the rule parameters chosen for the round (Optuna's proposal or `--rule`; None = the controller's
    defaults); replay_from: `--replay-from` DIR; audit_path / audit_extra: where an LLM controller appends its
    calls (DIR/llm_calls.jsonl) and the fields each line carries; backend: an LLM backend to use instead of
    the one cfg.agent describes (tests, in-process hosts)."""

    cfg: Any
    round_index: int = 1
    params: Any = None
    replay_from: str = ""
    audit_path: Path | None = None
    audit_extra: dict[str, Any] = field(default_factory=dict)
    backend: Any = None


@dataclass(frozen=True)
class ControllerSpec:
    """A registered controller (lrpilot.controllers.CONTROLLERS): how to build it for a round, the campaign
    memory it gets when `--memory` is not given (a MEMORIES name), and whether it talks to an LLM (then the
    campaign pings cfg.agent's backend before round 1 and records backend/model with each round)."""

    build: Callable[[ControllerContext], BaseController]
    default_memory: str = "none"
    uses_llm: bool = False

    def __post_init__(self) -> None:
        if not callable(self.build):
            raise TypeError(f"ControllerSpec.build must be callable, got {self.build!r}")
