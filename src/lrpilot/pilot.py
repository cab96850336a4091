"""`lrpilot.Pilot`: the LR pilot inside your own training loop (no trainer subprocess, no framework).

    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    pilot = Pilot(opt, controller="rules", total_steps=1000, warmup_steps=100, decision_every=50,
                  run_dir="runs/mine", model=model)
    while pilot.step_count < 1000:
        if pilot.skip_batch():          # after a rollback (PaLM's recipe): drop this batch
            next(batches); continue
        loss = model(next(batches)); loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad()
        pilot.step(loss.item(), gn.item())
    pilot.finish(final_eval_loss=evaluate(model))

The pieces are the ones lrpilot's own rounds use (docs/architecture.md): the controllers
(lrpilot.controllers: rules, the schedules, replay, the LLM agent), the SafetyGuard's pure functions
(lrpilot.guard), the LR state with warmup and plans (lrpilot.channel.LRState / warmup_lr) and the log writers
(lrpilot.logs). `step` is the number of optimizer updates done; the LR of update t is
`init_lr * (t + 1) / warmup_steps` while t < warmup_steps, then whatever the controller last set; decision
points are `warmup_steps + n * decision_every` < total_steps. The LR is written into every param group as
`lr x (the group's LR / group 0's LR at construction)`, so groups keep their ratios (group 0 is the reference).

At a decision point the published emergency rule (safety.check_emergency) comes first; otherwise a blocking
controller (rules, schedules, replay) is asked inline and its answer takes effect at the decision step; a
non-blocking one (the LLM agent) is asked in a worker thread and its answer takes effect at the first update
after it arrives (training never waits; a decision point reached while a question is open is skipped). Every
answer goes through safety.clamp_lr / clamp_plan.

In-process safety: a loss that safety.check_loss calls a crash (NaN, Inf, above crash_loss) or a non-finite
gradient norm restores the last healthy snapshot (model, optimizer, the caller's extra state through
`extra_state=(get, set)`, and the pilot's own state) chosen by safety.choose_rollback, sets the LR to
safety.crash_lr(LR in force) (x crash_lr_factor, 0.5 by default) and asks the caller to skip the next
`skip_batches` batches (PaLM, Chowdhery et al. 2022, sec. 5.1: restart ~100 steps before the spike and skip
200-500 batches; default 0 here). Snapshots are taken every `snapshot_every` updates (in memory, or on disk
under RUN/snapshots/ with snapshot_to="disk"), only after a healthy step whose parameters are all finite. An LLM's
request to go back (Decision.rollback_to_step) is granted by safety.check_agent_rollback with the kept snapshots
as the checkpoints and restores that snapshot at the reply's LR (a decision of kind agent_rollback, not a crash).
After either rollback, rewind=True (your loop) sets step_count back to the snapshot's step; rewind=False (the
framework callbacks: their step counters go on) keeps it; the record says which updates were undone
(undone_steps, next_step, step_numbering).

Several processes (torch.distributed, torchrun): every rank builds the same Pilot and calls step(); the losses
are averaged over the ranks, rank 0 alone decides and writes the logs, and broadcasts the next LR and any
rollback so that every rank sets the same LR at the same step (see Pilot.step).

Run directory (the same formats as a campaign directory with one round, so `lrpilot report RUN --out R` and
`--controller replay --replay-from RUN` work on it): telemetry.jsonl, decisions.jsonl, rollbacks.jsonl,
round.json, and at `finish()` result.json and final_results.jsonl (one line).

`state_dict()` / `load_state_dict()` make a resume exact: save the pilot's state with your checkpoint; on
resume, decisions this run directory already logged after the checkpoint's step are applied again at their
logged effective steps instead of asking the controller again (as the supervisor does), so the logs keep one
record per decision point.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lrpilot import guard as safety
from lrpilot.channel import LRState
from lrpilot.config import GuardConfig
from lrpilot.controllers.base import BaseController, ControllerContext, Observation, RollbackRecord
from lrpilot.decision import (
    DEFAULT_GUARD_RULES,
    GUARD_RULES,
    Command,
    DecisionCore,
    Point,
    RunShape,
    interval_trend,
    sample_trajectory,
    warmup_end_lr,
)
from lrpilot.errors import LrpilotError
from lrpilot.logs import (
    JsonlLog,
    append_jsonl,
    as_float,
    finite_mean,
    iter_jsonl,
    now_iso,
    perplexity,
    write_atomic,
    write_json_atomic,
)
from lrpilot.lr import is_positive_finite, warmup_lr
from lrpilot.records import ANSWER_KINDS, COUNTED_KINDS, Kind
from lrpilot.schedule_export import SCHEDULE_FORMAT

#: the environment variable `Pilot.from_env()` reads: a JSON object of Pilot keyword arguments (or @FILE)
ENV_SETTINGS = "LRPILOT_PILOT"
#: RUN/result.json and final_results.jsonl keep at most this many (step, value) points per trajectory


class PilotError(LrpilotError, ValueError):
    """A Pilot setting or a saved state is unusable; the message names the argument and the fix."""


class PilotGaveUp(LrpilotError, RuntimeError):
    """guard.max_fast_crash consecutive quick crashes, or guard.max_repeat_crash crashes in a row at the same
    place (none past the furthest of them): the rollbacks do not help; the run should stop."""


@dataclass(frozen=True)
class StepInfo:
    """What `Pilot.step` did: the update count now, the LR of the next update, whether it rolled back."""

    step: int
    lr: float
    rolled_back: bool = False
    #: the decision-log kind of a decision made at this step (decision, fallback, emergency), else None
    decision: str | None = None


def _clone(obj: Any) -> Any:
    """A deep copy whose tensors are detached clones (state dicts of model and optimizer)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj)
    return copy.deepcopy(obj)


def _rank_and_world(distributed: bool | None) -> tuple[int, int]:
    """(rank, world size) of this process. distributed=False: (0, 1). Otherwise torch.distributed's when it is
    initialised, else $RANK / $WORLD_SIZE when WORLD_SIZE > 1 (torchrun sets them; HF's Trainer and Lightning
    initialise the process group only after the Pilot is built, before the first step); else (0, 1), or
    PilotError with distributed=True."""
    if distributed is False:
        return 0, 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError as e:
        raise PilotError(f"$RANK / $WORLD_SIZE: not integers ({e}); launch with torchrun") from e
    if world > 1:
        if not 0 <= rank < world:
            raise PilotError(f"$RANK={rank} is not in [0, $WORLD_SIZE={world}); launch with torchrun")
        return rank, world
    if distributed:
        raise PilotError(
            "distributed=True: torch.distributed is not initialised and $WORLD_SIZE is not > 1; call "
            "torch.distributed.init_process_group() first (torchrun sets its environment)"
        )
    return 0, 1


def _collective_device() -> torch.device:
    """Where the pilot's small per-step tensors live for the collectives: the GPU for NCCL, else the CPU.
    Raises PilotError when the process group is not initialised (by the first step)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise PilotError(
            "several processes ($WORLD_SIZE > 1) but torch.distributed is not initialised at the first "
            "pilot.step(); call torch.distributed.init_process_group() before training, or pass distributed=False"
        )
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


#: StepInfo.decision <-> the code rank 0 broadcasts
_KIND_CODES = (None, "decision", "fallback", "emergency", "agent_rollback")


def load_schedule(path: str | Path) -> list[dict[str, Any]]:
    """The decision records of an `lrpilot export-schedule` file (or a decisions.jsonl / a run directory
    holding one with a single round). Raises PilotError naming the file and the fix."""
    return _load_plan(path)[0]


def _load_plan(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(decision records, the settings that placed them: warmup_steps and decision_every where the file has
    them) of an export-schedule file, a decisions.jsonl or a run directory holding one round."""
    p = Path(path)
    if p.is_dir():
        p = p / "decisions.jsonl"
    if not p.is_file():
        raise PilotError(f"controller replay:{path}: no such file; give a plan.json from `lrpilot export-schedule`")
    if p.suffix == ".jsonl":
        recs = [r for r in iter_jsonl(p)]
        runs = {(str(r.get("round", "")), str(r.get("run_start_iso", ""))) for r in recs if isinstance(r, dict)}
        if len(runs) > 1:  # several rounds' records would replay as extra visits of each step
            raise PilotError(
                f"controller replay:{path}: {p} holds {len(runs)} rounds; export one with "
                f"`lrpilot export-schedule {p.parent} --round R --out plan.json` and replay that"
            )
        return recs, {}
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PilotError(f"controller replay:{p}: not a JSON schedule ({e.__class__.__name__}: {e})") from e
    if not isinstance(d, dict) or d.get("format") != SCHEDULE_FORMAT or not isinstance(d.get("decisions"), list):
        raise PilotError(
            f"controller replay:{p}: not an lrpilot schedule (needs format {SCHEDULE_FORMAT!r} and 'decisions'); "
            "write one with `lrpilot export-schedule DIR --round R --out plan.json`"
        )
    if d.get("version", 1) != 1:  # a later format this code cannot read right
        raise PilotError(
            f"controller replay:{p}: schedule version {d.get('version')!r}; this lrpilot reads version 1 (upgrade "
            "lrpilot, or export the schedule again with this one)"
        )
    placing = {k: d[k] for k in ("warmup_steps", "decision_every") if type(d.get(k)) is int}
    return list(d["decisions"]), placing


def make_controller(
    spec: str | BaseController,
    *,
    init_lr: float,
    total_steps: int,
    warmup_steps: int,
    guard_cfg: GuardConfig,
    agent: Any = None,
    run_dir: Path | None = None,
) -> BaseController:
    """A controller by name: rules, cosine, d2z (linear), wsd, constant (peak = init_lr), replay:PATH (a plan.json
    from export-schedule, or a run/campaign directory with one round), llm (`agent`: a lrpilot.config.AgentConfig,
    default AgentConfig()). An instance is returned as is. Raises PilotError for an unknown name."""
    if isinstance(spec, BaseController):
        return spec
    if not isinstance(spec, str):
        raise PilotError(f"controller: must be a name or a BaseController, got {type(spec).__name__}")
    name = spec.strip()
    key = name.lower()
    if key == "rules":
        from lrpilot.controllers.rules import RuleController, RuleParams

        return RuleController(RuleParams.for_init_lr(init_lr))
    if key.startswith("replay:"):
        from lrpilot.controllers.replay import ReplayController

        path = name.split(":", 1)[1]
        recs, placing = _load_plan(path)
        return ReplayController(recs, source=path, settings=placing)
    from lrpilot.controllers import schedules as sch

    if key in sch.SCHEDULES or key in sch.SCHEDULE_ALIASES:  # a registered baseline schedule (or linear = d2z)
        if warmup_steps >= total_steps:
            raise PilotError(f"controller {name}: warmup_steps ({warmup_steps}) must be < total_steps ({total_steps})")
        return sch.SCHEDULES.get(sch.SCHEDULE_ALIASES.get(key, key))(init_lr, total_steps, warmup_steps)
    if key == "llm":
        from lrpilot.config import AgentConfig
        from lrpilot.controllers.llm import LLMController
        from lrpilot.llm.base import make_backend

        agent = agent if agent is not None else AgentConfig()
        audit = run_dir / "llm_calls.jsonl" if run_dir is not None else None
        return LLMController(
            make_backend(agent, "controller", audit), guard=guard_cfg, blocking=agent.wait_for_decisions
        )
    from lrpilot.controllers import CONTROLLERS

    if name in CONTROLLERS:  # any other registered controller (CONTRIBUTING.md, Extending), built for this loop
        return CONTROLLERS.get(name).build(
            ControllerContext(_loop_config(init_lr, total_steps, warmup_steps, guard_cfg, agent), audit_path=None)
        )
    raise PilotError(
        f"controller {spec!r}: unknown; choose one of {', '.join(n for n in CONTROLLERS.names() if n != 'replay')}, "
        "replay:PLAN.json, or pass a BaseController"
    )


def _loop_config(init_lr: float, total_steps: int, warmup_steps: int, guard_cfg: GuardConfig, agent: Any) -> Any:
    """The RunConfig a registered controller's build() reads (lrpilot.controllers.base.ControllerContext.cfg) for
    a loop the Pilot steers: the loop's steps, warmup, peak, guard and agent; the other sections are defaults."""
    from dataclasses import replace

    from lrpilot.config import AgentConfig, RunConfig

    base = RunConfig()
    return replace(
        base,
        train=replace(base.train, total_steps=total_steps),
        schedule=replace(base.schedule, init_lr=init_lr, warmup_steps=warmup_steps),
        guard=guard_cfg,
        agent=agent if agent is not None else AgentConfig(),
    )


class Pilot:
    """Steers the LR of `optimizer` from the losses your loop reports; see the module docstring.

    Arguments: controller (name or instance), total_steps (updates of the run), warmup_steps, init_lr (the LR
    the warmup reaches; default group 0's LR; a controller may move it: the rules warm up to their ceiling,
    start_ratio x (10/3 x init_lr)), decision_every (updates between decision points), guard
    (GuardConfig; default GuardConfig()), run_dir (None: no logs), memory_brief (text given to the controller),
    model (restored on a rollback; None: no rollback, a crash raises PilotGaveUp), extra_state ((get, set): the
    caller's state to snapshot and restore with the model, e.g. the data position and RNG), snapshot_every
    (updates between snapshots; default decision_every), snapshot_keep (snapshots kept, >= 1), snapshot_to
    ("memory" | "disk": RUN/snapshots/), skip_batches (batches skip_batch() drops after a rollback),
    round_index (the `round` of the logs, 1), lower_only (schedule-free: the LR may only fall), agent (AgentConfig
    for controller="llm"), rewind (True: a rollback rewinds step_count to the snapshot's step and your loop
    re-trains from there; False: step_count goes on, as a framework's step counter does; the framework callbacks
    set False), distributed (None: follow torch.distributed when it is initialised, rank 0 decides and writes the
    logs; False: act alone; True: require it), guard_rules (names in lrpilot.decision.GUARD_RULES, applied in
    order; default emergency, clamp, lower_only). Raises PilotError for a bad setting.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int,
        controller: str | BaseController = "rules",
        warmup_steps: int = 0,
        init_lr: float | None = None,
        decision_every: int = 50,
        guard: GuardConfig | None = None,  # noqa: A002 - the round's name for it
        run_dir: str | Path | None = None,
        memory_brief: str = "",
        model: torch.nn.Module | None = None,
        extra_state: tuple[Callable[[], Any], Callable[[Any], None]] | None = None,
        snapshot_every: int | None = None,
        snapshot_keep: int = 2,
        snapshot_to: str = "memory",
        skip_batches: int = 0,
        round_index: int = 1,
        lower_only: bool = False,
        agent: Any = None,
        rewind: bool = True,
        guard_rules: Sequence[str] = DEFAULT_GUARD_RULES,
        distributed: bool | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer) or not optimizer.param_groups:
            raise PilotError("optimizer: must be a torch.optim.Optimizer with at least one param group")
        self.optimizer = optimizer
        lrs = [float(g["lr"]) for g in optimizer.param_groups]
        base = init_lr if init_lr is not None else lrs[0]
        if not is_positive_finite(base):
            raise PilotError(f"init_lr: must be a positive number, got {base!r}")
        if not (isinstance(total_steps, int) and total_steps >= 1):
            raise PilotError(f"total_steps: must be an int >= 1, got {total_steps!r}")
        if not (isinstance(warmup_steps, int) and 0 <= warmup_steps < total_steps):
            raise PilotError(f"warmup_steps: must be an int in [0, total_steps={total_steps}), got {warmup_steps!r}")
        if not (isinstance(decision_every, int) and decision_every >= 1):
            raise PilotError(f"decision_every: must be an int >= 1, got {decision_every!r}")
        if snapshot_to not in ("memory", "disk"):
            raise PilotError(f"snapshot_to: must be 'memory' or 'disk', got {snapshot_to!r}")
        if snapshot_to == "disk" and run_dir is None:
            raise PilotError("snapshot_to='disk': needs run_dir (snapshots go to RUN/snapshots/)")
        if not (isinstance(snapshot_keep, int) and snapshot_keep >= 1):
            raise PilotError(f"snapshot_keep: must be an int >= 1, got {snapshot_keep!r}")
        if not (isinstance(skip_batches, int) and skip_batches >= 0):
            raise PilotError(f"skip_batches: must be an int >= 0, got {skip_batches!r}")
        self.ratios = [x / lrs[0] if lrs[0] > 0 else 1.0 for x in lrs]
        self.init_lr = float(base)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.decision_every = decision_every
        self.g = guard if guard is not None else GuardConfig()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.memory_brief = memory_brief
        self.model = model
        self.extra_state = extra_state
        self.snapshot_every = int(snapshot_every) if snapshot_every is not None else decision_every
        if self.snapshot_every < 1:
            raise PilotError(f"snapshot_every: must be >= 1, got {snapshot_every!r}")
        self.snapshot_keep = snapshot_keep
        self.snapshot_to = snapshot_to
        self.skip_batches = skip_batches
        self.round_index = round_index
        self.lower_only = bool(lower_only)
        #: True: a rollback rewinds the step count to the snapshot's (your loop re-trains those steps);
        #: False: the count goes on (a framework's own step counter does) and the rollback record says which
        #: updates were undone
        self.rewind = bool(rewind)
        self.rank, self.world = _rank_and_world(distributed)
        #: only rank 0 asks the controller, decides and writes logs; the other ranks follow its broadcast
        self.writer = self.rank == 0
        self._dist_device: torch.device | None = None  # found at the first collective (see _rank_and_world)
        self.controller = make_controller(
            controller,
            init_lr=self.init_lr,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            guard_cfg=self.g,
            agent=agent,
            run_dir=self.run_dir if self.writer else None,
        )
        self.controller_name = getattr(self.controller, "name", type(self.controller).__name__)
        self.blocking = bool(getattr(self.controller, "blocking", True))
        self._check_replay_steps()
        #: the LR the warmup reaches: the controller's choice (BaseController.warmup_to; the rules: start_ratio x
        #: their ceiling), the configured init_lr for every other controller
        try:
            self.init_lr = warmup_end_lr(self.controller, self.init_lr, self.g)
        except ValueError as e:
            raise PilotError(f"controller: {e}") from None
        #: the decision desk: observation -> controller -> guard rules -> command -> record (lrpilot.decision)
        unknown = [n for n in guard_rules if not isinstance(n, str) or n not in GUARD_RULES]
        if isinstance(guard_rules, str) or unknown:
            raise PilotError(
                f"guard_rules: {guard_rules!r} is not a sequence of rule names; choose from: "
                f"{', '.join(GUARD_RULES.names())}"
            )
        self.core = DecisionCore(
            self.controller,
            self.g,
            RunShape(
                total_steps=total_steps,
                warmup_steps=warmup_steps,
                decision_every=decision_every,
                init_lr=self.init_lr,
                memory_brief=memory_brief,
                round_index=round_index,
            ),
            lower_only=self.lower_only,
            rules=guard_rules,
            stamp={"round": round_index, "controller": self.controller_name},
            layout="pilot",
            thread_prefix="lrpilot-pilot",
        )
        if self.writer:
            self.controller.start_round(round_index, memory_brief)
        # ----- state that state_dict() saves
        self.step_count = 0
        self.run_start_iso = now_iso()
        self.lr_state = LRState(self.init_lr)
        self.seq = 0
        self.interval: list[float] = []
        self.last_grad_norm = math.nan
        self.loss_history: list[tuple[int, float]] = []
        self.lr_history: list[tuple[int, float]] = []
        self.rollbacks: list[RollbackRecord] = []
        self.counter = safety.CrashCounter()
        self.launch_start_step = 0
        #: the snapshot steps granted agent rollbacks went back to (kept across restores: the guard's budget)
        self.agent_rollback_steps: list[int] = []
        self.to_skip = 0
        self.lrs: dict[int, float] = {}
        self.losses: dict[int, float] = {}
        self.wall_before = 0.0
        #: commands waiting for their update: (at_step, lr, plan, record)
        self.pending: list[tuple[int, float, Any, dict[str, Any]]] = []
        # ----- not saved
        self._t0 = time.monotonic()
        self._answered: dict[int, dict[str, Any]] = {}
        self._launch = 0
        self._snapshots: list[tuple[int, Any]] = []
        self._finished = False
        self._tel: JsonlLog | None = None
        self._dlog: JsonlLog | None = None
        #: set by a step: the snapshot step it restored (a rollback) and whether it took a snapshot (broadcast)
        self._restored_to: int | None = None
        self._snapped = False
        #: an agent rollback the guard granted, carried out at the end of the decision (see _agent_rollback)
        self._agent_request: dict[str, Any] | None = None
        if self.run_dir is not None and self.writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._tel = JsonlLog(self.run_dir / "telemetry.jsonl", fsync=False)
            self._dlog = JsonlLog(self.run_dir / "decisions.jsonl", fsync=False)
            self._write_round_file()
        self._lr_used = self._lr_for(0)
        self._set_lr(self._lr_used)
        self._emit("start", lr=self.lr_state.lr, resumed_from=None)
        self._snapshot()

    # ------------------------------------------------------------------------------------------ settings

    @classmethod
    def from_env(cls, optimizer: torch.optim.Optimizer, **overrides: Any) -> Pilot:
        """A Pilot built from the JSON object in $LRPILOT_PILOT (or `@FILE`: the JSON in FILE), as
        `lrpilot campaign --script` sets it (run_dir, controller, memory_brief, total_steps, warmup_steps, init_lr,
        decision_every, guard and agent as dicts, round_index, and `rule_params`: the rule controller's parameters
        for this round); `overrides` (model, extra_state, ...) are added. Raises PilotError when the variable is missing or not JSON."""
        raw = os.environ.get(ENV_SETTINGS)
        if not raw:
            raise PilotError(
                f"Pilot.from_env: ${ENV_SETTINGS} is not set; run the script under `lrpilot campaign --script`"
            )
        try:
            text = Path(raw[1:]).read_text(encoding="utf-8") if raw.startswith("@") else raw
            settings = json.loads(text)
        except (OSError, ValueError) as e:
            raise PilotError(
                f"Pilot.from_env: ${ENV_SETTINGS} is not a JSON object ({e.__class__.__name__}: {e})"
            ) from e
        if not isinstance(settings, dict):
            raise PilotError(f"Pilot.from_env: ${ENV_SETTINGS} must hold a JSON object of Pilot arguments")
        if isinstance(settings.get("guard"), dict):
            settings["guard"] = GuardConfig(**settings["guard"])
        if isinstance(settings.get("agent"), dict):
            from lrpilot.config import AgentConfig

            settings["agent"] = AgentConfig(**settings["agent"])
        rule_params = settings.pop("rule_params", None)
        if isinstance(rule_params, dict) and settings.get("controller", "rules") == "rules":
            from lrpilot.controllers.rules import RuleController, RuleParams

            settings["controller"] = RuleController(RuleParams(**rule_params))  # the campaign's (Optuna's) proposal
        return cls(optimizer, **{**settings, **overrides})

    def describe(self) -> dict[str, Any]:
        return {
            "controller": self.controller_name,
            "controller_settings": self.controller.describe(),
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "decision_every": self.decision_every,
            "init_lr": self.init_lr,
            "group_ratios": self.ratios,
            "snapshot_every": self.snapshot_every,
            "snapshot_to": self.snapshot_to,
            "skip_batches": self.skip_batches,
            "rewind": self.rewind,
            "world_size": self.world,
            "guard": self.g.__dict__ if hasattr(self.g, "__dict__") else {},
        }

    def _write_round_file(self) -> None:
        assert self.run_dir is not None
        write_json_atomic(
            self.run_dir / "round.json",
            {
                "run_start_iso": self.run_start_iso,
                "source": "pilot",
                **self.describe(),
                "logs": {
                    "decisions": str(self.run_dir / "decisions.jsonl"),
                    "rollbacks": str(self.run_dir / "rollbacks.jsonl"),
                },
            },
        )

    # ------------------------------------------------------------------------------------------ the LR

    @property
    def lr(self) -> float:
        """The LR (of group 0) of the next update."""
        return self._lr_used

    def _lr_for(self, update: int) -> float:
        lr = self.lr_state.lr_for(update)
        return warmup_lr(update, lr, self.warmup_steps) if update < self.warmup_steps else lr

    def _set_lr(self, lr: float) -> None:
        for g, r in zip(self.optimizer.param_groups, self.ratios, strict=False):
            g["lr"] = lr * r

    def _in_force(self) -> float:
        """The LR in force for the controller: after warmup the LR of the next update; during warmup its target."""
        return self.lr_state.lr_for(self.step_count)

    def _check_replay_steps(self) -> None:
        """A replayed plan whose steps are none of this loop's decision points would hold the LR at every step and
        look like a run of that plan (as `campaign --replay-from` refuses it: preflight.check_replay_steps)."""
        from lrpilot.controllers.replay import ReplayController

        if not isinstance(self.controller, ReplayController):
            return
        name = f"controller replay:{self.controller.source}" if self.controller.source else "controller replay"
        for key, theirs in self.controller.settings.items():
            if theirs != getattr(self, key):
                raise PilotError(
                    f"{name}: the plan was found with {key}={theirs}, this Pilot has {getattr(self, key)}; pass "
                    f"{key}={theirs} (under other settings a replay trains another schedule)"
                )
        steps = self.controller.logged_steps()
        if not steps:  # would hold the LR at every step, as if it were the plan
            raise PilotError(f"{name}: the plan holds no decisions to replay; export a round that has some")
        if not any(self.is_decision_point(n) for n in steps):
            shown = ", ".join(map(str, steps[:3])) + (" ..." if len(steps) > 3 else "")
            raise PilotError(
                f"{name}: the plan decided at steps {shown}, none of this loop's decision points (from step "
                f"{self.warmup_steps} every {self.decision_every} steps, below {self.total_steps}); pass the "
                "warmup_steps, decision_every and total_steps it was found under (the plan file's fields of "
                "those names)"
            )

    def is_decision_point(self, step: int) -> bool:
        return (
            step >= self.warmup_steps
            and step < self.total_steps
            and (step - self.warmup_steps) % self.decision_every == 0
        )

    # ------------------------------------------------------------------------------------------ logs

    def _emit(self, event: str, **fields: Any) -> None:
        if self._tel is not None:
            self._tel.append(
                {"event": event, "step": self.step_count, "time": time.time(), "launch": os.getpid(), **fields}
            )

    # ------------------------------------------------------------------------------------------ step

    def skip_batch(self) -> bool:
        """True while batches are to be skipped after a rollback (each call consumes one): drop this batch."""
        if self.to_skip > 0:
            self.to_skip -= 1
            return True
        return False

    def step(self, loss: float | torch.Tensor, grad_norm: float | torch.Tensor | None = None) -> StepInfo:
        """Report the loss (and gradient norm) of the update just done; sets the LR of the next update.

        Call once per optimizer update, after optimizer.step(). A crash (safety.check_loss, or a non-finite
        grad_norm) rolls back (see the module docstring) and returns rolled_back=True with step = the
        snapshot's step (rewind=True) or the step count, which goes on (rewind=False). A granted agent rollback
        (Decision.rollback_to_step) does the same with the controller's LR. Raises PilotGaveUp after
        guard.max_fast_crash consecutive quick crashes or guard.max_repeat_crash crashes in a row at the same
        place, or on a crash with no model to restore.

        Several processes (torch.distributed initialised): every rank calls step() at every update with its own
        loss; the loss and grad norm are averaged over the ranks (a NaN on any rank is a NaN for all), rank 0
        decides alone and broadcasts the next LR, any rollback's snapshot step, whether it took a snapshot and
        the batches to skip, so every rank sets the same LR at the same step and restores the same step. Two
        collectives per step (an all_reduce of 3 numbers, a broadcast of 7)."""
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float().item()
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = grad_norm.detach().float().item()
        loss = float(loss)
        grad_norm = None if grad_norm is None else float(grad_norm)
        if self.world == 1:
            return self._step(loss, grad_norm)
        loss, grad_norm = self._all_reduce(loss, grad_norm)
        if not self.writer:
            return self._follow(loss, grad_norm)
        try:
            info = self._step(loss, grad_norm)
        except PilotGaveUp:
            self._broadcast([math.nan, self.step_count, -1, 0, 1, 0, 0])
            raise
        restored = -1 if self._restored_to is None else self._restored_to
        code = _KIND_CODES.index(info.decision) if info.decision in _KIND_CODES else 0
        self._broadcast([info.lr, info.step, restored, int(self._snapped), 0, code, self.to_skip])
        return info

    def _step(self, loss: float, grad_norm: float | None) -> StepInfo:
        """step() of one process (or rank 0): the decision logic."""
        self._restored_to, self._snapped = None, False
        gn = math.nan if grad_norm is None else float(grad_norm)
        used = self._lr_used
        self.step_count += 1
        step = self.step_count
        health = safety.check_loss(loss, self.g)
        if health.ok and grad_norm is not None and not math.isfinite(gn):
            reason = "nan_grad_norm" if math.isnan(gn) else "inf_grad_norm"
            health = safety.Health(False, reason, f"grad norm {gn} is not finite")
        self._emit("step", loss=loss, lr=used, grad_norm=gn)
        self.lrs[step] = used
        self.losses[step] = loss
        if not health.ok:
            return self._rollback(step, health)
        self.interval.append(loss)
        self.last_grad_norm = gn
        kind = None
        self._poll_replies()
        if self._agent_request is None and self.is_decision_point(step):
            kind = self._decision_point(step)
        if self._agent_request is not None:
            return self._agent_rollback()
        self._apply_pending(step)
        self._lr_used = self._lr_for(step)
        self._set_lr(self._lr_used)
        if step % self.snapshot_every == 0:
            self._snapped = self._snapshot()
        return StepInfo(step=step, lr=self._lr_used, decision=kind)

    # ------------------------------------------------------------------------------------------ several processes

    def _all_reduce(self, loss: float, grad_norm: float | None) -> tuple[float, float | None]:
        """The mean over the ranks of the loss (and of the grad norm when every rank gave one)."""
        import torch.distributed as dist

        if self._dist_device is None:
            self._dist_device = _collective_device()
        t = torch.tensor(
            [loss, 0.0 if grad_norm is None else grad_norm, 0.0 if grad_norm is None else 1.0],
            dtype=torch.float64,
            device=self._dist_device,
        )
        dist.all_reduce(t)
        total, gsum, given = t.tolist()
        return total / self.world, (gsum / self.world if int(given) == self.world else None)

    def _broadcast(self, values: list[float]) -> list[float]:
        """Rank 0's step outcome to every rank: [next LR, step, restored snapshot step or -1, snapshot taken,
        gave up, decision kind code, batches to skip] (float64: an LR arrives bit for bit)."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._dist_device)
        dist.broadcast(t, src=0)
        return t.tolist()

    def _follow(self, loss: float, grad_norm: float | None) -> StepInfo:
        """step() of a rank > 0: no controller, no logs; do what rank 0 broadcast."""
        lr, step, restored, snapped, gave_up, code, to_skip = self._broadcast([0.0] * 7)
        if gave_up:
            self._finished = True
            raise PilotGaveUp(f"rank {self.rank}: rank 0 gave up at step {int(step)} (see its rollbacks.jsonl)")
        self.step_count += 1
        self.lrs[self.step_count] = self._lr_used
        self.losses[self.step_count] = loss
        self.last_grad_norm = math.nan if grad_norm is None else grad_norm
        if restored >= 0:
            to = int(restored)
            held = dict(self._snapshots).get(to)
            if held is None or self.model is None:
                raise PilotError(
                    f"rank {self.rank}: rank 0 restored its snapshot of step {to}, this rank holds none "
                    f"(it holds {[s for s, _ in self._snapshots]}); every rank must pass the same model= and "
                    "snapshot settings"
                )
            self._restore_state(held, to)
            if self.rewind:
                self.step_count = to
                for s in [s for s in self.lrs if s > to]:
                    self.lrs.pop(s, None)
                    self.losses.pop(s, None)
        self.step_count = int(step)
        self.to_skip = int(to_skip)
        self._lr_used = float(lr)
        self._set_lr(self._lr_used)
        if snapped:
            self._snapshot()
        return StepInfo(
            step=self.step_count, lr=self._lr_used, rolled_back=restored >= 0, decision=_KIND_CODES[int(code)]
        )

    # ------------------------------------------------------------------------------------------ decisions

    # the decision core (lrpilot.decision) owns the decision history and the question in flight
    decisions = property(lambda self: self.core.decisions, lambda self, v: setattr(self.core, "decisions", v))
    run_start_iso = property(
        lambda self: self.core.run_start_iso, lambda self, v: setattr(self.core, "run_start_iso", v)
    )

    def _observation(self, step: int, lr: float, recent: Sequence[float]) -> Observation:
        return self.core.observation(
            step,
            lr,
            recent,
            loss_history=self.loss_history,
            lr_history=self.lr_history,
            grad_norm=self.last_grad_norm,
            rollbacks=self.rollbacks,
            rollback_steps=safety.agent_rollback_steps(
                step,
                self.total_steps,
                [safety.CheckpointInfo(s) for s, _ in self._snapshots],
                self.agent_rollback_steps,
                self.g,
            )
            if self.model is not None
            else (),
            agent_rollbacks_used=len(self.agent_rollback_steps),
        )

    def _decision_point(self, step: int) -> str | None:
        recent, self.interval = self.interval, []
        mean = finite_mean(recent)
        prev = self.loss_history[-1][1] if self.loss_history else math.nan
        lr = self._in_force()
        self.loss_history.append((step, mean))
        self.lr_history.append((step, lr))
        self._emit("observe", lr=lr, losses=recent, grad_norm=self.last_grad_norm)
        if step in self._answered:  # a resumed run re-trains this point: apply the logged answer again
            rec = self._answered.pop(step)
            eff = rec.get("effective_step")
            at = eff if isinstance(eff, int) and eff >= step else step
            self.pending.append((at, float(rec["new_lr"]), rec.get("plan_knots"), {**rec, "_logged": True}))
            self.decisions.append(rec)
            return str(rec.get("kind"))
        point = Point(obs=self._observation(step, lr, recent), trend=interval_trend(prev, mean), launch=self._launch)
        cmd = self.core.pre_empt(point, prev)  # the published emergency rule comes first
        if cmd is not None:
            self._command(point, cmd, step)
            return cmd.kind
        if self.blocking:
            decision, latency = self.core.ask_inline(point.obs)
            return self._apply_decision(point, decision, latency, at=step)
        self.core.ask(point)  # a worker thread; a point reached while one is in flight is skipped
        return None

    def _poll_replies(self) -> None:
        for reply in self.core.poll():
            point, decision, latency = reply
            stale = self.core.answered(reply, self._launch, rolled_back="run")
            if stale is not None:
                self._log(self.core.stale_record(point, decision, latency, stale))
                continue
            # takes effect at the next update (number step_count): the training went on meanwhile
            self._apply_decision(point, decision, latency, at=self.step_count)

    def _apply_decision(self, point: Point, decision: Any, latency: float, at: int) -> str:
        """Guard the answer (lrpilot.decision.DecisionCore.guard, the kept snapshots are the checkpoints an
        agent may name) and queue its command for update `at`; a granted agent rollback is carried out at the
        end of the step (_agent_rollback)."""
        cmd = self.core.guard(point, decision, latency, grant=self._grant)
        if cmd.kind == "agent_rollback":
            self._agent_request = {"point": point, "to_step": cmd.rollback_to, "new_lr": cmd.new_lr, "cmd": cmd}
            return cmd.kind
        self._command(point, cmd, at)
        return cmd.kind

    def _grant(self, point: Point, requested: Any) -> tuple[int | None, str, None]:
        verdict = self._check_agent_rollback(point.obs.step, requested)
        return (verdict.to_step if verdict.ok else None), verdict.reason, None

    def _check_agent_rollback(self, step: int, requested: Any) -> safety.AgentRollback:
        """The guard's verdict on a request to go back to the snapshot at step `requested` (the kept snapshots
        are the checkpoints; without a model there is nothing to restore)."""
        if self.model is None:
            why = f"rollback to step {requested!r} refused: no model to restore (pass model= to the Pilot)"
            return safety.AgentRollback(False, None, why)
        infos = [safety.CheckpointInfo(step=s) for s, _ in self._snapshots]
        return safety.check_agent_rollback(requested, step, self.total_steps, infos, self.agent_rollback_steps, self.g)

    def _record(self, point: Point, new_lr: float, *, kind: str, reasoning: str, **fields: Any) -> dict:
        """A decision-log record (lrpilot.decision.decision_record; round and controller after `launch`)."""
        return self.core.record(point, new_lr, kind=kind, reasoning=reasoning, **fields)

    def _command(self, point: Point, cmd: Command, at: int) -> None:
        self.seq += 1
        knots = [list(k) for k in cmd.plan] if cmd.plan else None
        rec = self.core.command_record(point, cmd, seq=self.seq)
        if knots:
            rec["plan"] = {"knots": len(knots), "first": knots[0], "last": knots[-1]}
            rec["plan_knots"] = knots
        self.pending.append((at, cmd.new_lr, knots, rec))
        self.decisions.append(rec)

    def _apply_pending(self, step: int) -> None:
        """Commands whose first update is `step` (the next one) take effect now; their records are logged."""
        keep = []
        for at, lr, knots, rec in sorted(self.pending, key=lambda c: (c[0], c[3].get("seq") or 0)):
            if at > step:
                keep.append((at, lr, knots, rec))
                continue
            self.lr_state.apply({"lr": lr, "plan": knots, "seq": rec.get("seq"), "decided_at_step": rec["step"]}, step)
            if rec.pop("_logged", False):
                continue
            rec["effective_step"] = step
            self._emit("applied", seq=rec.get("seq"), lr=lr, decided_at_step=rec["step"], plan_knots=len(knots or []))
            self._log(rec)
        self.pending = keep

    def _log(self, rec: dict[str, Any]) -> None:
        if self._dlog is not None:
            self._dlog.append(rec)

    # ------------------------------------------------------------------------------------------ safety

    def _own_state(self) -> dict[str, Any]:
        """The pilot's state now. Decision records are copied one level deep (a record's top-level fields are
        what changes after it is logged: effective_step, _logged; its lists and dicts never change), keeping a
        pending command's record the same object as in `decisions`: a deep copy of every record at every
        snapshot made the pilot's cost grow with the run's decisions (O(decisions) recursive copies per snapshot;
        benchmarks/pilot_overhead.py)."""
        copies = {id(d): dict(d) for d in self.decisions}
        return {
            "step": self.step_count,
            "lr_state": self.lr_state.state_dict(),
            "seq": self.seq,
            "interval": list(self.interval),
            "last_grad_norm": self.last_grad_norm,
            "loss_history": [list(x) for x in self.loss_history],
            "lr_history": [list(x) for x in self.lr_history],
            "decisions": [copies[id(d)] for d in self.decisions],
            "pending": [(at, lr, knots, copies.get(id(rec)) or dict(rec)) for at, lr, knots, rec in self.pending],
        }

    def _load_own_state(self, s: dict[str, Any]) -> None:
        self.step_count = int(s["step"])
        self.lr_state = LRState(self.init_lr)
        self.lr_state.load_state_dict(s["lr_state"])
        self.seq = max(self.seq, int(s["seq"]))
        self.interval = [float(x) for x in s["interval"]]
        self.last_grad_norm = float(s["last_grad_norm"])
        self.loss_history = [(int(a), float(b)) for a, b in s["loss_history"]]
        self.lr_history = [(int(a), float(b)) for a, b in s["lr_history"]]
        decisions, pending = copy.deepcopy((s["decisions"], s["pending"]))  # one copy: shared records stay shared
        self.decisions = decisions
        self.pending = [tuple(p) for p in pending]  # type: ignore[misc]

    def _params_finite(self) -> bool:
        """Every parameter finite: one fused norm over all of them (a NaN or Inf anywhere makes it non-finite;
        a finite model whose norm overflows float32 is also refused, which only skips a snapshot)."""
        if self.model is None:
            return True
        params = [p.detach() for p in self.model.parameters()]
        if not params:
            return True
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(params, norm_type=2.0)))

    def _snapshot(self) -> bool:
        """Keep the state after this step (healthy: only called after a finite loss) for a rollback. Returns
        whether it did (not without a model, nor from non-finite parameters)."""
        if self.model is None or not self._params_finite():
            return False
        snap = {
            "pilot": self._own_state(),
            "model": _clone(self.model.state_dict()),
            "optimizer": _clone(self.optimizer.state_dict()),
            "extra": _clone(self.extra_state[0]()) if self.extra_state is not None else None,
        }
        step = self.step_count
        self._snapshots = [(s, x) for s, x in self._snapshots if s != step]
        if self.snapshot_to == "disk":
            assert self.run_dir is not None
            d = self.run_dir / "snapshots" / (f"rank_{self.rank}" if self.rank else "")
            d.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            torch.save(snap, buf)
            path = d / f"step_{step:06d}.pt"
            write_atomic(path, buf.getvalue())
            self._snapshots.append((step, str(path)))
        else:
            self._snapshots.append((step, snap))
        while len(self._snapshots) > self.snapshot_keep:
            _, old = self._snapshots.pop(0)
            if isinstance(old, str):
                Path(old).unlink(missing_ok=True)
        return True

    def _load_snapshot(self, held: Any) -> dict[str, Any]:
        if isinstance(held, str):
            return torch.load(held, weights_only=False)
        return _clone(held)

    def _rollback(self, crash_step: int, health: safety.Health) -> StepInfo:
        lr_at_crash = self.lr_state.lr_for(crash_step - 1)
        self.counter = self.counter.record(crash_step, self.launch_start_step)
        n = self.counter.total
        rec: dict[str, Any] = {
            "run_start_iso": self.run_start_iso,
            "crash_step": crash_step,
            "lr_at_crash": lr_at_crash,
            "lr_used_at_crash": self.lrs.get(crash_step),
            "rolled_back_to_step": None,
            "new_lr": None,
            "crash_reason": health.reason,
            "crash_count_in_run": n,
            "crash_detail": health.detail,
            "launch_start_step": self.launch_start_step,
            "round": self.round_index,
            "controller": self.controller_name,
        }
        infos = [safety.CheckpointInfo(step=s, healthy=True) for s, _ in self._snapshots]
        plan = safety.choose_rollback(infos, crash_step, lr_at_crash, self.g) if self.model is not None else None
        why = self.counter.give_up_reason(self.g) or (
            "no snapshot to restore (pass model= to the Pilot)" if plan is None else ""
        )
        if why:
            rec.update(gave_up=True, rollback_reason=why)
            self._append_rollback(rec)
            raise PilotGaveUp(f"step {crash_step}: {health.detail}; {why}")
        undone = self._restore(plan.to_step, plan.new_lr)
        rec.update(rolled_back_to_step=plan.to_step, new_lr=plan.new_lr, rollback_reason=plan.reason,
                   skip_batches=self.skip_batches, backoff_s=0.0, **undone)  # fmt: skip
        self._append_rollback(rec)
        self.rollbacks.append(RollbackRecord(crash_step, lr_at_crash, plan.to_step, plan.new_lr, health.reason))
        self._emit("start", lr=self.lr_state.lr, resumed_from=f"snapshot step {plan.to_step}")
        return StepInfo(step=self.step_count, lr=self._lr_used, rolled_back=True)

    def _restore_state(self, held: Any, to_step: int) -> dict[str, Any]:
        """Model, optimizer and the caller's extra state from the snapshot of `to_step`; the snapshots after it
        (the abandoned branch's) are dropped. Returns the snapshot (its "pilot" entry is the pilot's state)."""
        snap = self._load_snapshot(held)
        for s, x in self._snapshots:
            if s > to_step and isinstance(x, str):
                Path(x).unlink(missing_ok=True)
        self._snapshots = [(s, x) for s, x in self._snapshots if s <= to_step]
        assert self.model is not None
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        if self.extra_state is not None:
            self.extra_state[1](snap["extra"])
        return snap

    def _restore(self, to_step: int, new_lr: float) -> dict[str, Any]:
        """Go back to the snapshot of `to_step` (a crash or a granted agent rollback) at `new_lr`. The rule for
        step numbers (docs/architecture.md): rewind=True (your loop) the step count goes back to `to_step` and
        the updates after it are trained again under the same numbers; rewind=False (a framework, whose own
        step counter goes on) the step count stays and the next update is the framework's next step. Either
        way the updates to_step+1 .. the current step were undone. Returns the rollback record's fields
        saying so: undone_steps [first, last], next_step (the number of the next update), step_numbering."""
        before = self.step_count
        snap = self._restore_state(dict(self._snapshots)[to_step], to_step)
        if self.rewind:
            self._load_own_state(snap["pilot"])
            for s in [s for s in self.lrs if s > to_step]:
                self.lrs.pop(s, None)
                self.losses.pop(s, None)
            self.launch_start_step = to_step
        else:
            self.interval = []  # the interval's losses were the abandoned updates'
            self.launch_start_step = before
        self.pending = []  # commands not applied by the snapshot's step belong to the abandoned branch
        self.lr_state.override(new_lr)
        self._launch += 1
        self.core.forget_questions()
        self.to_skip = self.skip_batches
        self._restored_to = to_step
        self._lr_used = self._lr_for(self.step_count)
        self._set_lr(self._lr_used)
        return {
            "undone_steps": [to_step + 1, before],
            "next_step": self.step_count + 1,
            "step_numbering": "rewind" if self.rewind else "continue",
        }

    def _agent_rollback(self) -> StepInfo:
        """Carry out the agent rollback the guard granted (Decision.rollback_to_step): restore the snapshot at
        its step with the controller's LR (guard-clamped), log the decision (kind agent_rollback, seq null,
        effective_step = the snapshot's step). Not a crash: rollbacks.jsonl and the crash counter are untouched
        (as the supervisor's)."""
        req, self._agent_request = self._agent_request, None
        assert req is not None
        to = int(req["to_step"])
        undone = self._restore(to, req["new_lr"])
        point, cmd = req["point"], req["cmd"]
        rec = self._record(point, cmd.new_lr, kind=cmd.kind, reasoning=cmd.reasoning, effective_step=to,
                           **cmd.fields, **undone)  # fmt: skip
        self.decisions.append(rec)
        self._log(rec)
        self.agent_rollback_steps.append(to)
        self.rollbacks.append(RollbackRecord(point.obs.step, point.obs.lr, to, req["new_lr"], "agent_request"))
        self._emit("start", lr=self.lr_state.lr, resumed_from=f"agent rollback to snapshot step {to}")
        return StepInfo(step=self.step_count, lr=self._lr_used, rolled_back=True, decision="agent_rollback")

    def _append_rollback(self, rec: dict[str, Any]) -> None:
        if self.run_dir is not None and self.writer:
            # records.RollbackRecord's types; the line as built
            append_jsonl(self.run_dir / "rollbacks.jsonl", RollbackRecord.from_dict(rec).to_dict())

    # ------------------------------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs (save it with the model and optimizer)."""
        return {
            "format": 1,
            **self._own_state(),
            "run_start_iso": self.run_start_iso,
            "rollbacks": [r.__dict__ for r in self.rollbacks],
            "crashes": [list(c) for c in self.counter.crashes],
            "launch_start_step": self.launch_start_step,
            "agent_rollback_steps": list(self.agent_rollback_steps),
            "to_skip": self.to_skip,
            "lrs": dict(self.lrs),
            "losses": dict(self.losses),
            "wall_s": self.wall_before + (time.monotonic() - self._t0),
            "lr_used": self._lr_used,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict(): the LR of the next update is the one the saved run would have used.
        Decisions the run directory logged after the saved step (a run killed after its checkpoint) are applied
        again at their logged steps, not asked again. Raises PilotError for a state of another format."""
        if not isinstance(state, dict) or state.get("format") != 1:
            raise PilotError(
                "load_state_dict: not a Pilot state_dict (format 1); pass what Pilot.state_dict() returned"
            )
        self._load_own_state(state)
        self.run_start_iso = str(state["run_start_iso"])
        self.rollbacks = [RollbackRecord(**r) for r in state["rollbacks"]]
        self.counter = safety.CrashCounter(tuple(tuple(c) for c in state["crashes"]))
        self.launch_start_step = int(state["launch_start_step"])
        self.agent_rollback_steps = [int(x) for x in state.get("agent_rollback_steps", [])]
        self.to_skip = int(state["to_skip"])
        self.lrs = {int(k): float(v) for k, v in state["lrs"].items()}
        self.losses = {int(k): float(v) for k, v in state["losses"].items()}
        self.wall_before = float(state["wall_s"])
        self._t0 = time.monotonic()
        self._lr_used = float(state["lr_used"])
        self._set_lr(self._lr_used)
        self._answered = {}
        if self.run_dir is not None and self.writer:
            self._write_round_file()
            logged = [
                r
                for r in iter_jsonl(self.run_dir / "decisions.jsonl")
                if r.get("run_start_iso") == self.run_start_iso and int(r.get("step", -1)) > self.step_count
            ]
            for r in logged:
                if r.get("kind") in ("decision", "fallback", "emergency"):
                    self._answered[int(r["step"])] = r  # the last visit of the step wins
        self._snapshots = []
        self._emit("start", lr=self.lr_state.lr, resumed_from=f"state_dict step {self.step_count}")
        self._snapshot()

    # ------------------------------------------------------------------------------------------ end

    def result(self, final_eval_loss: float = math.nan, final_eval_tokens: int = 0, status: str = "ok") -> dict:
        """The run's result (RUN/result.json's fields: lrpilot.supervisor.RoundResult's)."""
        counted = [d for d in self.decisions if d.get("kind") in COUNTED_KINDS]
        answers = [d for d in counted if d.get("kind") in ANSWER_KINDS]
        fallbacks = sum(d.get("kind") == Kind.FALLBACK for d in answers)
        after = [v for s, v in self.lrs.items() if s > self.warmup_steps]
        loss = float(final_eval_loss)
        ppl = perplexity(loss)
        return {
            "status": status,
            "run_start_iso": self.run_start_iso,
            "final_eval_loss": loss,
            "final_eval_ppl": ppl,
            "final_eval_tokens": int(final_eval_tokens),
            "update_step": self.step_count,
            "crash_count": self.counter.total,
            "total_decisions": len(counted),
            "peak_lr_seen": max(after) if after else math.nan,
            "min_lr_seen": min(after) if after else math.nan,
            "wall_time_s": self.wall_before + (time.monotonic() - self._t0),
            "wait_s": 0.0,
            "decision_latency_s": [as_float(d["latency_s"]) for d in counted if d.get("latency_s") is not None],
            "effect_delay_steps": [
                int(d["effective_step"]) - int(d["step"]) for d in counted if isinstance(d.get("effective_step"), int)
            ],
            "lr_trajectory": sample_trajectory(self.lrs),
            "loss_trajectory": sample_trajectory(self.losses),
            "failure_reason": None if status == "ok" else status,
            "unanswered_decisions": 0,
            "fallback_decisions": fallbacks,
            "mostly_fallback": fallbacks * 2 > len(answers) if answers else False,
            "agent_rollbacks": len(self.agent_rollback_steps),
        }

    def finish(self, final_eval_loss: float = math.nan, final_eval_tokens: int = 0, status: str = "ok") -> dict:
        """End the run: log open questions as unanswered, write RUN/result.json, the final_results.jsonl line
        and a `done` telemetry event. `final_eval_loss` is the held-out loss (ppl = exp(loss)). Returns the
        result. Calling it twice writes nothing more."""
        if self._finished:
            return self.result(final_eval_loss, final_eval_tokens, status)
        self._finished = True
        self._poll_replies()
        unanswered = 0
        if self.core.inflight is not None:
            q = self.core.inflight
            rec = self._record(q, q.obs.lr, kind="unanswered", reasoning="the run ended before the reply")
            rec["unanswered_for_s"] = time.monotonic() - q.t_asked
            self._log(rec)
            self.core.forget_questions()
            unanswered = 1
        for _, _, _, rec in self.pending:  # decided, never applied (the run ended first)
            if not rec.pop("_logged", False):
                self._log(rec)
        res = self.result(final_eval_loss, final_eval_tokens, status)
        res["unanswered_decisions"] = unanswered
        self._emit("done", final_eval_loss=res["final_eval_loss"], final_eval_ppl=res["final_eval_ppl"],
                   final_eval_tokens=res["final_eval_tokens"], wait_s=0.0)  # fmt: skip
        if self.run_dir is not None and self.writer:
            write_json_atomic(self.run_dir / "result.json", res)
            line = {
                "timestamp": now_iso(),
                **{k: res[k] for k in ("run_start_iso", "final_eval_ppl", "final_eval_loss", "total_decisions",
                                       "unanswered_decisions", "fallback_decisions", "mostly_fallback",
                                       "crash_count", "agent_rollbacks", "peak_lr_seen", "min_lr_seen")},
                "warmup_steps": self.warmup_steps,
                "decision_every": self.decision_every,
                "init_lr": self.init_lr,
                "optimizer": type(self.optimizer).__name__,
                "round": self.round_index,
                "status": res["status"],
                "failure_reason": res["failure_reason"],
                "controller": self.controller_name,
                "memory": "brief" if self.memory_brief else "none",
                "source": "pilot",
                "final_eval_tokens": res["final_eval_tokens"],
                "update_step": res["update_step"],
                "wall_time_s": res["wall_time_s"],
                "settings": {"total_steps": self.total_steps, "min_ratio": self.g.min_ratio,
                             "max_ratio": self.g.max_ratio, "floor": self.g.floor, "ceiling": self.g.ceiling},
            }  # fmt: skip
            append_jsonl(self.run_dir / "final_results.jsonl", line)
        self.close()
        return res

    def close(self) -> None:
        for log in (self._tel, self._dlog):
            if log is not None:
                log.close()
