"""The trainer: AdamW pre-training whose LR is steered from outside over the file control channel.

    python -m lrpilot.trainer --run-dir RUN [--resume CKPT] [--lr LR] [--min-seq N] [--wait-for-decisions]
    python -m torch.distributed.run --nproc_per_node=2 -m lrpilot.trainer --run-dir RUN   (gloo on CPU)

RUN/config.json (a lrpilot.config.RunConfig) says everything; the protocol is in docs/architecture.md.
The LR of update t is a linear warmup to the LR in force (schedule.init_lr unless --lr says otherwise)
while t < warmup_steps, then whatever the last control command set (an LR or a plan of knots). Every
`decision_every` steps after warmup rank 0 publishes an `observe` event and keeps training (or, with
--wait-for-decisions, blocks until the command decided at that step arrives); the LR it is told is
broadcast to every rank and takes effect at the next update, recorded by an `applied` event. The
trainer knows nothing about LLMs or the guard: it only trains, reports and obeys.

Optimizer (train.optimizer): AdamW with weight decay on *all* parameters (norm gains included), as the GaLore
reference's `torch.optim.AdamW(model.parameters(), weight_decay=0.01)` does, and grad clipping
(train.grad_clip); or schedule-free AdamW / Prodigy with the same betas, eps and weight decay (`make_optimizer`).
Schedule-free trains at one point (y) and evaluates at another (its average x): every evaluation and
checkpoint switches it to eval mode (x) and afterwards restores y bit for bit, so evaluating never changes
the trajectory; checkpoints hold x as the model (what to evaluate or deploy) and y as `train_params`.

Structure (docs/architecture.md, "The trainer"): `Trainer.__init__` sets up processes, model, data, optimizer,
RNG and the resumed state; `run()` loops over `train_step()` (one optimizer update), `observe()` and `control()`
at decision points, `evaluate()` and `checkpoint()`; `probe()` runs lookahead branches; `train()` wraps it.

Checkpoints (every checkpoint_every steps, and on stop) hold what an exact resume needs: model,
optimizer, RNG states, data position, LR state, step and the telemetry bookkeeping of the current
decision interval, so on CPU a resumed run reproduces the uninterrupted loss curve bit for bit.

Exit codes: 0 finished (or stopped on request / at --stop-at-step), 2 bad config or usage, 1 crash,
3 (channel.EXIT_DISK) the disk refused a write (full, read-only): one `cannot write FILE (...)` line on stderr.
Testing hooks: --inject-nan-at-step N (or LRPILOT_INJECT_NAN_AT_STEP=N) multiplies the loss by NaN in the
update that completes step N, so the step event with step == N reports loss "nan" (for guard tests);
--inject-start-delay S waits S seconds before the start event (a slow start: data, process groups);
--inject-first-step-delay S makes the first update of every launch S seconds slower (as torch.compile
is) and --inject-eval-delay S makes every evaluation S seconds slower (a big eval set).

Silent phases: the first update of a launch may take long (compile); the supervisor allows it
guard.start_timeout_s. Before each other long silent phase (an evaluation, a checkpoint save) rank 0
emits a `phase` event naming it, and the supervisor allows start_timeout_s until the next line.

A checkpoint is never written once this launch has seen a non-finite loss, nor when the weights or the
optimizer moments hold a NaN/Inf: such a state is no rollback target. The trainer emits
`checkpoint_refused` (with the reason) instead and trains on; the supervisor decides what happens.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import math
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from lrpilot.argtypes import non_negative_int, positive_float, positive_int
from lrpilot.channel import EXIT_DISK, ControlReader, LRState, TelemetryWriter
from lrpilot.checkpoint import FORMAT, CheckpointError, fingerprint, load_checkpoint, save_checkpoint
from lrpilot.config import RunConfig
from lrpilot.data import DataError, build_data, check_vocab, evaluate
from lrpilot.errors import LrpilotError, disk_error, is_disk_error
from lrpilot.logs import write_atomic
from lrpilot.lr import SWEEP_DIVERGED, is_positive_finite, sweep_lrs, warmup_lr
from lrpilot.model import LLaMA

EXIT_OK, EXIT_CRASH, EXIT_USAGE = 0, 1, 2
#: how often a trainer waiting for a decision looks at control.jsonl
WAIT_POLL_S = 0.002


class TrainerError(LrpilotError):
    """The trainer cannot start with this config or command line (one line: what and how to fix it)."""


# ------------------------------------------------------------------------------------------ helpers


def config_fingerprint(cfg: RunConfig) -> str:
    """What a checkpoint must match to be resumed: the model shape and the data (not the cache path)."""
    data = {k: v for k, v in asdict(cfg.data).items() if k != "cache_dir"}
    return fingerprint({"model": asdict(cfg.model), "data": data})


def is_decision_point(step: int, cfg: RunConfig) -> bool:
    s = cfg.schedule
    return s.warmup_steps <= step < cfg.train.total_steps and (step - s.warmup_steps) % s.decision_every == 0


def batch_geometry(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """(micro_batch_size, accumulation steps) per rank for the global train.batch_size."""
    bs = cfg.train.batch_size
    if bs % world_size:
        raise TrainerError(f"train.batch_size ({bs}) must be divisible by the number of processes ({world_size})")
    per_rank = bs // world_size
    micro = cfg.train.micro_batch_size or per_rank
    if per_rank % micro:
        raise TrainerError(
            f"train.micro_batch_size ({micro}) must divide the per-process batch "
            f"(train.batch_size / processes = {per_rank}); set it to a divisor or 0"
        )
    return micro, per_rank // micro


def _ddp_params() -> set[str]:
    """DistributedDataParallel's keyword arguments in the installed torch."""
    import inspect

    return set(inspect.signature(DDP.__init__).parameters)


def rng_state() -> dict[str, Any]:
    """Every RNG the run touches, in types torch.load(weights_only=True) accepts."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "kind": kind,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], key, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


#: RUN/wandb_id: the run's wandb id, so every launch of a run (relaunches after rollbacks, resumes) logs into
#: one wandb run
WANDB_ID_FILE = "wandb_id"


class MetricLoggers:
    """Optional wandb / TensorBoard mirrors of the step and eval metrics (train.loggers), rank 0 only.

    One wandb run per run directory, resumed across launches (the id in RUN/wandb_id, resume="allow"); every
    metric is plotted against `train/step`, the training step, logged as a value (wandb's own step must only
    grow, so a rolled-back branch logged by `step=` would be dropped; as a value it shows as the branch it is).
    TensorBoard writes to RUN/tensorboard for every launch, at the training step."""

    def __init__(self, names: str, cfg: RunConfig, run_dir: Path) -> None:
        self.wandb: Any = None
        self.tb: Any = None
        wanted = {x.strip() for x in names.split(",") if x.strip()}
        if "wandb" in wanted:
            try:
                import wandb
            except ImportError:
                raise TrainerError("train.loggers=wandb needs wandb: pip install 'lrpilot[wandb]'") from None
            id_file = run_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else ""
            if not run_id:
                run_id = os.urandom(6).hex()
                write_atomic(id_file, run_id.encode())
            self.wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "lrpilot"),
                name=f"{cfg.name}-{run_dir.name}",
                dir=str(run_dir),
                config=cfg.to_dict(),
                id=run_id,
                resume="allow",
            )
            self.wandb.define_metric("train/step")
            self.wandb.define_metric("*", step_metric="train/step")
        if "tensorboard" in wanted:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainerError(
                    "train.loggers=tensorboard needs tensorboard: pip install 'lrpilot[tensorboard]'"
                ) from None
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.wandb is not None:
            self.wandb.log({"train/step": step, **metrics})
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


class Steering:
    """Rank 0's end of the control channel: applies commands to the LRState and logs `applied` events."""

    def __init__(self, reader: ControlReader, lr_state: LRState, telemetry: TelemetryWriter) -> None:
        self.reader = reader
        self.lr_state = lr_state
        self.telemetry = telemetry
        self.stop = False
        #: the latest decision step any command answered (to know when a waited-for decision arrived)
        self.answered_step = -1
        #: seconds spent blocked waiting for decisions, over the whole run (carried in checkpoints)
        self.wait_s = 0.0
        #: commands with an `at_step` still ahead (a resumed run re-applies its past decisions where they were)
        self.held: list[dict[str, Any]] = []
        #: lookahead probe requests not yet run, and the function that runs one (set by train(); None: refused)
        self.probes: list[dict[str, Any]] = []
        self.run_probe: Callable[[int, dict[str, Any]], None] | None = None

    def poll(self, step: int) -> None:
        """Apply every new command; `step` is the next update, the first to use them. A command with
        `at_step` > step is held until update `at_step` (commands that were applied at that update before a
        resume: the resumed run trains the branch the logs describe)."""
        for cmd in self.reader.poll():
            if cmd.get("stop") is True:
                self.stop = True
                continue
            if "probe" in cmd:
                self.probes.append(cmd)
                continue
            decided = cmd.get("decided_at_step")
            if isinstance(decided, int) and not isinstance(decided, bool):
                # a malformed answer still answers: the trainer keeps its LR rather than block forever
                self.answered_step = max(self.answered_step, decided)
            at = cmd.get("at_step")
            if at is not None and (isinstance(at, bool) or not isinstance(at, int) or at < 0):
                print(f"lrpilot.trainer: warning: control command seq={cmd['seq']}: at_step {at!r} is not a "
                      "step; applied now", file=sys.stderr, flush=True)  # fmt: skip
                cmd = {k: v for k, v in cmd.items() if k != "at_step"}
            self.held.append(cmd)
        due = [c for c in self.held if c.get("at_step") is None or c["at_step"] <= step]
        if not due:
            return
        self.held = [c for c in self.held if c.get("at_step") is not None and c["at_step"] > step]
        for cmd in sorted(due, key=lambda c: c["seq"]):  # the newest command wins
            try:
                self.lr_state.apply(cmd, step)
            except ValueError as e:
                print(f"lrpilot.trainer: warning: control command ignored: {e}", file=sys.stderr, flush=True)
                continue
            self.telemetry.emit(
                "applied",
                step,
                seq=cmd["seq"],
                lr=self.lr_state.lr_for(step),
                decided_at_step=cmd.get("decided_at_step"),
                plan_knots=len(self.lr_state.plan or ()),
                **({"replays_seq": cmd["replays_seq"]} if "replays_seq" in cmd else {}),
            )

    def wait_for_decision(self, step: int) -> None:
        """Block until the command decided at `step` (or a stop) has arrived and been applied."""
        t0 = time.perf_counter()
        self.poll(step)
        while self.answered_step < step and not self.stop:
            if self.probes:  # a lookahead probe asked for at this decision point: run it, then keep waiting
                self._probe(step, self.probes.pop(0))
                continue
            time.sleep(WAIT_POLL_S)
            self.poll(step)
        self.wait_s += time.perf_counter() - t0

    def _probe(self, step: int, cmd: dict[str, Any]) -> None:
        """Run one probe request (or refuse it with a `probe` event carrying `error`: never block the run)."""
        req = cmd.get("probe")
        at = req.get("at_step") if isinstance(req, dict) else None
        error = None
        if at != step:
            error = f"asked for step {at!r}, the trainer waits at step {step}"
        elif self.run_probe is None:
            error = "probes are not supported here (distributed run)"
        if error is None:
            try:
                self.run_probe(step, req)
                return
            except (ValueError, TypeError, KeyError) as e:
                error = f"malformed probe request: {e}"
        print(f"lrpilot.trainer: warning: probe seq={cmd.get('seq')} refused: {error}", file=sys.stderr, flush=True)
        self.telemetry.emit("probe", step, seq=cmd.get("seq"), error=error, branches=[])


def make_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer train.optimizer names, with the run's betas, eps and weight decay. Its LR is set before
    every update by the trainer (warmup, then the controller), so the constructor's lr is only a placeholder.

    - adamw: torch.optim.AdamW (decoupled weight decay on every parameter, as GaLore's reference).
    - schedulefree_adamw: schedulefree.AdamWScheduleFree (Defazio et al. 2024) with warmup_steps=0 (the
      trainer warms up) and its defaults otherwise (r=0, weight_lr_power=2); weight decay is applied at y.
    - prodigy: prodigyopt.Prodigy (Mishchenko & Defazio 2024), decoupled weight decay; safeguard_warmup=True
      when schedule.warmup_steps > 0, as its README advises for a run with warmup; the LR is a multiplier
      of its own estimate (1.0 by default).
    Raises TrainerError naming the extra when the package is missing.
    """
    t = cfg.train
    betas = (t.beta1, t.beta2)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.schedule.init_lr, betas=betas, eps=t.eps, weight_decay=t.weight_decay)
    if t.optimizer == "schedulefree_adamw":
        try:
            from schedulefree import AdamWScheduleFree
        except ImportError:
            raise TrainerError(
                "train.optimizer=schedulefree_adamw needs schedulefree: pip install 'lrpilot[optim]'"
            ) from None
        opt = AdamWScheduleFree(
            params, lr=cfg.schedule.init_lr, betas=betas, eps=t.eps, weight_decay=t.weight_decay, warmup_steps=0
        )
        opt.train()
        return opt
    if t.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise TrainerError("train.optimizer=prodigy needs prodigyopt: pip install 'lrpilot[optim]'") from None
        return Prodigy(
            params,
            lr=cfg.schedule.init_lr,
            betas=betas,
            eps=t.eps,
            weight_decay=t.weight_decay,
            safeguard_warmup=cfg.schedule.warmup_steps > 0,
        )
    raise TrainerError(f"train.optimizer={t.optimizer!r}: unknown (config validation should have caught it)")


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """True for an optimizer with separate train and eval points (schedulefree's .train()/.eval())."""
    return bool(optimizer.param_groups) and "train_mode" in optimizer.param_groups[0] and hasattr(optimizer, "eval")


@contextlib.contextmanager
def eval_point(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]):
    """Inside: the parameters hold the point to evaluate (schedule-free: its average x, via optimizer.eval()).
    Yields the training point's tensors (schedule-free: copies of y; otherwise None). On exit the training
    point is restored bit for bit (not by optimizer.train(), whose lerp does not invert eval()'s exactly), so
    an evaluation or checkpoint never changes the run's trajectory."""
    if not is_schedule_free(optimizer):
        yield None
        return
    saved = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, y in zip(params, saved, strict=True):
                p.copy_(y)
        for group in optimizer.param_groups:
            group["train_mode"] = True


def update_lr(step: int, cfg: RunConfig, lr_state: LRState) -> float:
    """The LR of update number `step`: warmup to the LR in force, then the LR state (docs/architecture.md)."""
    lr = lr_state.lr_for(step)
    if step < cfg.schedule.warmup_steps:
        return warmup_lr(step, lr, cfg.schedule.warmup_steps)
    return lr


# --------------------------------------------------------------------------------------------- train


@dataclass(frozen=True)
class TrainerOptions:
    """What one launch of the trainer is told besides RUN/config.json: the command line of
    `python -m lrpilot.trainer` (parse_args), as typed fields. Raises TrainerError on a negative count."""

    #: the run directory: config.json in it; telemetry, control channel, checkpoints and logs go here
    run_dir: Path
    #: the checkpoint this launch resumes from (only named in the start event; `train` loads it)
    resume: str | None = None
    #: use this LR from the (resumed) start on, clearing any plan (None: the LR state's)
    lr: float | None = None
    #: ignore control commands with seq < min_seq (None: 0, or one past the resumed checkpoint's last command)
    min_seq: int | None = None
    #: block at each decision point until the command decided there arrives
    wait_for_decisions: bool = False
    #: checkpoint at this step and exit 0 (None: train to train.total_steps)
    stop_at_step: int | None = None
    #: testing hooks (parse_args): a NaN loss at this step; delays in seconds before the start event, in the
    #: first update and in every evaluation (None: none)
    inject_nan_at_step: int | None = None
    inject_start_delay: float | None = None
    inject_first_step_delay: float | None = None
    inject_eval_delay: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        for name in ("min_seq", "stop_at_step", "inject_nan_at_step"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise TrainerError(f"--{name.replace('_', '-')} {value}: must be >= 0")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainerOptions:
        """The options in a parse_args() Namespace (attributes it lacks keep their defaults)."""
        names = [f.name for f in fields(cls) if f.name != "run_dir"]
        return cls(run_dir=Path(args.run_dir), **{n: getattr(args, n) for n in names if hasattr(args, n)})


class StepResult(NamedTuple):
    """One optimizer update (Trainer.train_step): mean loss over the global batch, gradient norm before
    clipping, and its wall-clock seconds."""

    loss: float
    grad_norm: float
    seconds: float


class Trainer:
    """One launch of the trainer, top to bottom: __init__ sets up processes, model, data, optimizer, RNG and the
    resumed state; run() is the loop (train_step, then at decision points observe and obey the control channel,
    evaluate, checkpoint) and finish(). Rank 0 alone writes telemetry and checkpoints and reads commands."""

    def __init__(self, cfg: RunConfig, opts: TrainerOptions, resume: dict[str, Any] | None = None) -> None:
        self.cfg, self.opts = cfg, opts
        self.run_dir = run_dir = opts.run_dir

        # ---- processes and devices
        self.world_size = world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = rank = int(os.environ.get("RANK", "0"))
        self.local_rank = local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.master = master = rank == 0
        self.ddp = ddp = world_size > 1
        if cfg.train.device == "cuda" and not torch.cuda.is_available():
            raise TrainerError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
        use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
        self.device = device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        use_bf16 = cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and use_cuda)
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.dtype_name = "bfloat16" if use_bf16 else "float32"
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.micro_bs, self.accum = batch_geometry(cfg, world_size)
        self.tokens_per_update = cfg.train.batch_size * cfg.data.seq_len
        self.total = cfg.train.total_steps
        #: updates done; train_step() makes update number `step`
        self.step = self.start_step = int(resume["step"]) if resume else 0
        if opts.stop_at_step is not None and opts.stop_at_step <= self.start_step:
            raise TrainerError(f"--stop-at-step {opts.stop_at_step} must be after the start step {self.start_step}")
        #: the first step of this launch whose loss was not finite: no checkpoint from then on
        self.nonfinite_since: int | None = None
        #: the LR of the next update and whether to stop, as control() last said
        self.lr, self.stop = 0.0, False
        self._first_update = True
        # fails early on a missing extra
        self.loggers = MetricLoggers(cfg.train.loggers, cfg, run_dir) if master else None

        if ddp:
            if use_cuda:
                torch.cuda.set_device(device)
            # long timeout: rank 0 may block on a decision or evaluate while the others wait in a collective
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=2))

        # ---- seeds, model, optimizer, data (the model is initialised identically on every rank)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        self.data = data = build_data(cfg.data, cfg.train.seed, rank=rank, world_size=world_size)
        check_vocab(data.vocab_size, cfg.model.vocab_size)
        self.raw_model = raw_model = LLaMA(cfg.model).to(device)
        self.params = params = list(raw_model.parameters())
        self.optimizer = make_optimizer(cfg, params)
        self.lr_state = lr_state = LRState(cfg.schedule.init_lr)
        #: telemetry bookkeeping of the current decision interval (rank 0; carried in checkpoints)
        self.interval: dict[str, Any] = {"losses": [], "tokens": 0, "seconds": 0.0, "grad_norm": math.nan}
        wait_s = self._load(resume) if resume else 0.0
        if opts.lr is not None:
            lr_state.override(opts.lr)
        model: torch.nn.Module = torch.compile(raw_model) if cfg.train.compile else raw_model
        if ddp:
            # the only buffers (RoPE tables) are constants: no need to broadcast them every forward. torch >= 2.13
            # deprecates broadcast_buffers (a FutureWarning from every rank into trainer.log) for
            # forward_sync_buffers, which still syncs them once at init: harmless, they are equal on every rank
            no_sync = "forward_sync_buffers" if "forward_sync_buffers" in _ddp_params() else "broadcast_buffers"
            model = DDP(model, device_ids=[local_rank] if use_cuda else None, **{no_sync: False})
        self.model = model
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

        # ---- rank 0: telemetry, control channel, progress bar
        self.telemetry: TelemetryWriter | None = None
        self.steering: Steering | None = None
        self.pbar: tqdm | None = None
        if master:
            self._start_rank0(resume, wait_s)

    def _load(self, resume: dict[str, Any]) -> float:
        """Restore a checkpoint's model, optimizer, data position, LR state, RNG and interval (the exact resume);
        returns the seconds the run had waited for decisions before it."""
        optimizer, params = self.optimizer, self.params
        self.raw_model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if is_schedule_free(optimizer):  # the model holds x; training continues from y, exactly
            with torch.no_grad():
                for p, y in zip(params, resume["train_params"], strict=True):
                    p.copy_(y.to(p.device))
            for group in optimizer.param_groups:
                group["train_mode"] = True
        self.data.load_state_dict(resume["data"])
        self.lr_state.load_state_dict(resume["lr_state"])
        set_rng_state(resume["rng"])
        self.interval = dict(resume["interval"])
        return float(resume["wait_s"])

    def _start_rank0(self, resume: dict[str, Any] | None, wait_s: float) -> None:
        """Rank 0: open telemetry and the control channel, emit `start`, open the progress bar."""
        cfg, opts, lr_state, start_step = self.cfg, self.opts, self.lr_state, self.start_step
        self.telemetry = telemetry = TelemetryWriter(self.run_dir)
        min_seq = opts.min_seq
        if min_seq is None:  # commands up to the checkpoint's are already in its LR state
            min_seq = lr_state.seq + 1 if resume and lr_state.seq is not None else 0
        self.steering = Steering(ControlReader(self.run_dir, min_seq), lr_state, telemetry)
        self.steering.wait_s = wait_s
        if opts.inject_start_delay:
            time.sleep(opts.inject_start_delay)  # fault injection (a slow start), not synchronisation
        telemetry.emit(
            "start",
            start_step,
            lr=update_lr(start_step, cfg, lr_state),
            world_size=self.world_size,
            resumed_from=str(opts.resume) if opts.resume else None,
            device=str(self.device),
            dtype=self.dtype_name,
            params=self.raw_model.num_parameters(),
            min_seq=min_seq,
            wait_for_decisions=bool(opts.wait_for_decisions),
        )
        self.pbar = tqdm(
            total=self.total,
            initial=start_step,
            desc=cfg.name,
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not cfg.train.progress,
            unit="step",
        )
        print(
            f"lrpilot.trainer: {cfg.name} steps {start_step}->{self.total} on {self.world_size}x{self.device} "
            f"{self.dtype_name}, {self.raw_model.num_parameters():,} params, "
            f"micro-batch {self.micro_bs} x {self.accum} accumulation",
            flush=True,
        )
        if not self.ddp:
            self.steering.run_probe = self.probe

    # ---- the loop

    def run(self) -> int:
        """Train from the start step to train.total_steps (or a stop), then finish(). Returns EXIT_OK."""
        cfg, opts = self.cfg, self.opts
        if self.master and self.step == 0 and is_decision_point(0, cfg):
            self.observe(0)  # warmup_steps == 0: the controller sets the very first LR
        wait = opts.wait_for_decisions and self.step == 0 and is_decision_point(0, cfg)
        self.lr, self.stop = self.control(self.step, wait=wait)
        self.raw_model.train()
        while self.step < self.total and not self.stop:
            result = self.train_step()
            step = self.step
            at_decision = is_decision_point(step, cfg)
            if self.nonfinite_since is None and not math.isfinite(result.loss):
                self.nonfinite_since = step
            if self.master:
                self.report_step(result)
                if at_decision:
                    self.observe(step)
            self.lr, self.stop = self.control(step, wait=opts.wait_for_decisions and at_decision)

            if self.master and cfg.eval.every and step % cfg.eval.every == 0 and step < self.total:
                self.evaluate(step)
            stop_here = self.stop or step == opts.stop_at_step
            if step < self.total and (step % cfg.checkpoint_every == 0 or stop_here):
                self.checkpoint(step, self.lr)
            if stop_here:
                break
        return self.finish()

    def train_step(self) -> StepResult:
        """One optimizer update at self.lr (update number self.step, on its batch): forward and backward over
        the micro-batches, grad clip (train.grad_clip; 0 only measures the norm), optimizer step; the loss is
        averaged over ranks. Advances self.step by one."""
        if self._first_update and self.opts.inject_first_step_delay and self.master:
            # fault injection (a compiling first step), not synchronisation
            time.sleep(self.opts.inject_first_step_delay)
        self._first_update = False
        step, accum, optimizer, inject_nan_at = self.step, self.accum, self.optimizer, self.opts.inject_nan_at_step
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self.data.train_batch(step, micro, self.micro_bs)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # gradients are all-reduced only on the last micro-batch
            sync = self.model.no_sync() if self.ddp and micro < accum - 1 else contextlib.nullcontext()
            with sync:
                with self.autocast:
                    _, loss = self.model(x, y)
                if inject_nan_at is not None and step + 1 == inject_nan_at:
                    loss = loss * float("nan")  # testing hook: a real NaN through backward and AdamW
                loss = loss / accum
                loss.backward()
            loss_sum += loss.detach().float()
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf  # inf: just measure the norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            loss_sum /= self.world_size
        loss_f, grad_norm_f = loss_sum.item(), grad_norm.item()  # .item() waits for the GPU: dt is honest
        dt = time.perf_counter() - t0
        self.step = step + 1
        return StepResult(loss_f, grad_norm_f, dt)

    def report_step(self, result: StepResult) -> None:
        """Rank 0 after an update: add it to the interval, emit the `step` event, log it, tick the progress bar."""
        step, lr, interval = self.step, self.lr, self.interval
        loss_f, grad_norm_f = result.loss, result.grad_norm
        tokens_per_s = self.tokens_per_update / result.seconds
        interval["losses"].append(loss_f)
        interval["tokens"] += self.tokens_per_update
        interval["seconds"] += result.seconds
        interval["grad_norm"] = grad_norm_f
        self.telemetry.emit("step", step, loss=loss_f, lr=lr, grad_norm=grad_norm_f, tokens_per_s=tokens_per_s)
        self.loggers.log(
            step,
            {
                "train/loss": loss_f,
                "train/lr": lr,
                "train/grad_norm": grad_norm_f,
                "train/tokens_per_s": tokens_per_s,
            },
        )
        self.pbar.set_postfix(loss=f"{loss_f:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.pbar.update(1)

    def finish(self) -> int:
        """The end: final evaluation and `done` (rank 0) unless stopped early; close everything. EXIT_OK."""
        step = self.step
        if self.master:
            self.pbar.close()
            if step >= self.total:
                result = self.evaluate(step)
                self.telemetry.emit(
                    "done",
                    step,
                    final_eval_loss=result["eval_loss"],
                    final_eval_ppl=result["eval_ppl"],
                    final_eval_tokens=result["eval_tokens"],
                    wait_s=self.steering.wait_s,
                )
                print(f"lrpilot.trainer: done at step {step}: eval loss {result['eval_loss']:.4f}", flush=True)
            else:
                print(f"lrpilot.trainer: stopped at step {step} (checkpoint written)", flush=True)
            self.telemetry.close()
            self.loggers.close()
        if self.ddp:
            dist.barrier()
            dist.destroy_process_group()
        return EXIT_OK

    # ---- decision points: observe and obey

    def observe(self, step: int) -> None:
        """Rank 0 at a decision point: publish the interval's losses (then start a new interval)."""
        interval = self.interval
        secs = interval["seconds"]
        self.telemetry.emit(
            "observe",
            step,
            lr=update_lr(step, self.cfg, self.lr_state),
            losses=interval["losses"],
            grad_norm=interval["grad_norm"],
            tokens_per_s=interval["tokens"] / secs if secs else math.nan,
            wait_s=self.steering.wait_s,
        )
        interval.update(losses=[], tokens=0, seconds=0.0)

    def control(self, step: int, wait: bool) -> tuple[float, bool]:
        """Before update `step`: rank 0 applies new commands (blocking for a decision if `wait`); every rank
        gets the LR for the update and whether to stop."""
        if self.master:
            if wait:
                self.steering.wait_for_decision(step)
            else:
                self.steering.poll(step)
            lr, stop = update_lr(step, self.cfg, self.lr_state), self.steering.stop
        else:
            lr, stop = 0.0, False
        if self.ddp:
            msg = torch.tensor([lr, float(stop)], dtype=torch.float64, device=self.device)
            dist.broadcast(msg, 0)
            lr, stop = msg[0].item(), bool(msg[1].item())
        return lr, stop

    def evaluate(self, step: int) -> dict[str, float]:
        """Rank 0: evaluate at the optimizer's evaluation point (eval.tokens), emit and log `eval`."""
        self.telemetry.emit("phase", step, phase="eval")  # a long silent phase: not a hang
        if self.opts.inject_eval_delay:
            time.sleep(self.opts.inject_eval_delay)  # fault injection (a slow eval), not synchronisation
        cfg = self.cfg
        # the unwrapped module: DDP's forward would wait for the other ranks
        with eval_point(self.optimizer, self.params):
            result = evaluate(
                self.raw_model,
                self.data,
                cfg.eval.tokens,
                cfg.eval.batch_size,
                self.device,
                autocast_dtype=self.autocast_dtype,
            )
        self.telemetry.emit("eval", step, **result)
        self.loggers.log(step, {f"eval/{k}": v for k, v in result.items()})
        return result

    # ---- checkpoints

    def checkpoint(self, step: int, lr: float) -> None:
        """Every rank: gather the data positions (a stream's is per rank); rank 0 writes the checkpoint."""
        data_state: Any = self.data.state_dict()
        if self.ddp:
            every_rank: list[Any] = [None] * self.world_size
            dist.all_gather_object(every_rank, data_state)
            data_state = {"ranks": every_rank}
        if not self.master:
            return
        telemetry, cfg = self.telemetry, self.cfg
        if self.nonfinite_since is not None:
            why = f"not written: the loss at step {self.nonfinite_since} was not finite (the state is poisoned)"
            telemetry.emit("checkpoint_refused", step, reason=why)
            print(f"lrpilot.trainer: warning: checkpoint at step {step} {why}", file=sys.stderr, flush=True)
            return
        telemetry.emit("phase", step, phase="checkpoint")  # a long silent phase: not a hang
        optimizer_state = self.optimizer.state_dict()  # in train mode, as a resume continues
        with eval_point(self.optimizer, self.params) as train_params:
            state = {
                "format": FORMAT,
                "fingerprint": config_fingerprint(cfg),
                "step": step,
                "lr": lr,
                "model": self.raw_model.state_dict(),
                "optimizer": optimizer_state,
                "rng": rng_state(),
                "data": data_state,
                "lr_state": self.lr_state.state_dict(),
                "interval": dict(self.interval),
                "wait_s": self.steering.wait_s,
                "world_size": self.world_size,
                "config": cfg.to_dict(),
            }
            if train_params is not None:
                state["train_params"] = train_params
            try:
                path = save_checkpoint(
                    self.run_dir,
                    step,
                    state,
                    keep=cfg.checkpoint.keep,
                    retain_back_steps=cfg.guard.rollback_back_steps,
                )
            except CheckpointError as e:  # non-finite weights or optimizer moments: nothing was written
                telemetry.emit("checkpoint_refused", step, reason=str(e))
                print(f"lrpilot.trainer: warning: {e}", file=sys.stderr, flush=True)
                return
        telemetry.emit("checkpoint", step, path=str(path), lr=lr)

    # ---- lookahead probes

    def probe(self, step: int, req: dict[str, Any]) -> None:
        """A lookahead probe at decision point `step` (rank 0, one process): from the current state, for each
        LR train `steps` updates on the run's own next batches (step .. step+steps-1), then measure the mean loss
        of the `after_batches` batches after them, forward only; restore model, optimizer, RNG and data
        position exactly after each branch. With req["sweep"] (an LR range test) there is one branch instead, its
        LR rising geometrically from lrs[0] to lrs[1] (lrpilot.lr.sweep_lrs), stopped once the loss diverges.
        One `probe` event carries every branch; the run then continues as if nothing happened (the same losses
        as a run without the probe). Raises ValueError on a bad request."""
        lrs = [float(x) for x in req["lrs"]]
        n, after_n = int(req["steps"]), int(req.get("after_batches", 0))
        sweep = req.get("sweep", False) is True
        if not lrs or n < 1 or after_n < 0 or not all(is_positive_finite(x) for x in lrs):
            raise ValueError(f"lrs {lrs!r}, steps {n}, after_batches {after_n}")
        if sweep and not (len(lrs) == 2 and lrs[0] < lrs[1]):
            raise ValueError(f"a sweep needs lrs [lo, hi] with lo < hi, got {lrs!r}")
        n = min(n, self.total - step)  # never past the end of the run's batches
        self.telemetry.emit("phase", step, phase="probe")  # a long silent phase: not a hang
        t0 = time.perf_counter()
        raw_model, optimizer, data = self.raw_model, self.optimizer, self.data
        snap_model = {k: v.detach().clone() for k, v in raw_model.state_dict().items()}
        snap_opt = copy.deepcopy(optimizer.state_dict())
        snap_rng, snap_data = rng_state(), copy.deepcopy(data.state_dict())

        def restore() -> None:  # the decision point's state; copies, since the next branch trains on it
            raw_model.load_state_dict(snap_model)
            optimizer.load_state_dict(copy.deepcopy(snap_opt))
            optimizer.zero_grad(set_to_none=True)
            set_rng_state(snap_rng)
            data.load_state_dict(copy.deepcopy(snap_data))

        branches = []
        plans = [sweep_lrs(lrs[0], lrs[1], n)] if sweep else [[lr_b] * n for lr_b in lrs]
        for plan in plans:
            try:
                branches.append(self._probe_branch(step, plan, after_n, stop_on_divergence=sweep))
            finally:  # whatever happened, the next branch and the run start from the decision point's state
                restore()
        spent = sum(len(b["losses"]) for b in branches)
        self.telemetry.emit(
            "probe", step, branches=branches, steps=n, probe_steps=spent, sweep=sweep, seconds=time.perf_counter() - t0
        )

    def _probe_branch(
        self, step: int, plan: list[float], after_n: int, stop_on_divergence: bool = False
    ) -> dict[str, Any]:
        """One probe branch from the current state: update step+i at LR plan[i] on batches step ..
        step+len(plan)-1, then the mean forward-only loss of the next `after_n` batches. With
        `stop_on_divergence` (a range test) it stops after an update whose loss is not finite or above
        SWEEP_DIVERGED x the lowest so far. Leaves the state changed (probe() restores it)."""
        accum, micro_bs, device, optimizer = self.accum, self.micro_bs, self.device, self.optimizer
        grad_clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        losses: list[float] = []
        for i, lr_b in enumerate(plan):
            t = step + i
            if stop_on_divergence and losses and not (losses[-1] <= SWEEP_DIVERGED * min(losses)):
                break  # diverged (or NaN): the rest of the sweep would only cost time
            for group in optimizer.param_groups:
                group["lr"] = lr_b
            loss_sum = 0.0
            for micro in range(accum):
                x, y = self.data.train_batch(t, micro, micro_bs)
                with self.autocast:
                    _, loss = self.model(x.to(device), y.to(device))
                (loss / accum).backward()
                loss_sum += loss.detach().float().item() / accum
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss_sum)
        after = []
        with torch.no_grad():
            end = step + len(plan)
            for t in range(end, min(end + after_n, self.total)):
                for micro in range(accum):
                    x, y = self.data.train_batch(t, micro, micro_bs)
                    with self.autocast:
                        _, loss = self.model(x.to(device), y.to(device))
                    after.append(loss.float().item())
        out = {"lr": plan[0], "losses": losses, "after": sum(after) / len(after) if after else None,
               "after_batches": len(after) // max(accum, 1)}  # fmt: skip
        if stop_on_divergence:
            out["lrs"] = plan[: len(losses)]
        return out


def train(cfg: RunConfig, args: argparse.Namespace, resume: dict[str, Any] | None) -> int:
    """One launch from parse_args()'s Namespace (the CLI's entry; see Trainer). Returns the exit code.

    The Trainer sits in reference cycles (its bound methods handed to Steering and the loggers), so only the
    cyclic GC frees it, with its model, DDP reducer and the process group's objects. Left to interpreter exit,
    that ran while the interpreter was being torn down, and a torchrun rank died after "done" with SIGABRT
    ("terminate called without an active exception"; seen once in CI, test_torchrun_two_processes_match_...).
    So it is collected here, while the interpreter is whole."""
    trainer = Trainer(cfg, TrainerOptions.from_args(args), resume)
    try:
        return trainer.run()
    finally:
        del trainer
        gc.collect()


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lrpilot.trainer",
        description="Train RUN/config.json's model, publishing telemetry.jsonl and obeying control.jsonl "
        "(docs/architecture.md). Exit codes: 0 done or stopped, 2 bad config/usage, 1 crash, "
        "3 the disk refused a write (full or read-only).",
    )
    p.add_argument("--run-dir", required=True, help="run directory holding config.json; logs and checkpoints go here")
    p.add_argument("--resume", metavar="CKPT", help="resume exactly from this checkpoint (a checkpoints/step_*.pt)")
    p.add_argument("--lr", type=positive_float, help="use this LR from the (resumed) start on, clearing any plan")
    p.add_argument(
        "--min-seq",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="ignore control commands with seq < N (an earlier launch's); default: 0, or one past "
        "the last command in the resumed checkpoint",
    )
    p.add_argument(
        "--wait-for-decisions",
        action="store_true",
        help="block at each decision point until the command decided at that step arrives, so the "
        "LR takes effect exactly there (for instant, deterministic controllers)",
    )
    p.add_argument(
        "--stop-at-step",
        type=positive_int,
        metavar="N",
        help="checkpoint at step N and exit 0 (tests; simulates an interrupted run)",
    )
    p.add_argument(
        "--inject-nan-at-step",
        type=positive_int,
        metavar="N",
        help="TESTING HOOK: make the loss of the update that completes step N NaN (the step event "
        "with step N reports loss 'nan'); also LRPILOT_INJECT_NAN_AT_STEP=N",
    )
    p.add_argument(
        "--inject-start-delay",
        type=positive_float,
        metavar="S",
        help="TESTING HOOK: wait S seconds before the start event, as a slow data or process-group set-up would",
    )
    p.add_argument(
        "--inject-first-step-delay",
        type=positive_float,
        metavar="S",
        help="TESTING HOOK: make the first update of this launch S seconds slower, as torch.compile would",
    )
    p.add_argument(
        "--inject-eval-delay",
        type=positive_float,
        metavar="S",
        help="TESTING HOOK: make every evaluation S seconds slower, as a big eval set would",
    )
    args = p.parse_args(argv)
    env_nan = os.environ.get("LRPILOT_INJECT_NAN_AT_STEP", "").strip()
    if args.inject_nan_at_step is None and env_nan:
        try:
            args.inject_nan_at_step = positive_int(env_nan)
        except argparse.ArgumentTypeError as e:
            p.error(f"LRPILOT_INJECT_NAN_AT_STEP: {e}")
    return args


def main(argv: list[str] | None = None) -> int:
    from lrpilot.logs import setup_cli_logging

    setup_cli_logging("lrpilot.trainer")  # warnings as one line each in trainer.log
    args = parse_args(argv)
    try:
        config_path = Path(args.run_dir) / "config.json"
        cfg = RunConfig.load(config_path)
        batch_geometry(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        resume = None
        if args.resume:
            resume = load_checkpoint(args.resume, fingerprint=config_fingerprint(cfg))
        return train(cfg, args, resume)
    except Exception as e:
        if is_disk_error(e):  # a write the disk refused: not a crash, and no LR change can help
            err = disk_error(Path(args.run_dir) / "trainer.log", e)  # no file name: a print to the log failed
            with contextlib.suppress(OSError):
                print(f"lrpilot.trainer: error: {err}", file=sys.stderr, flush=True)
            return EXIT_DISK
        if isinstance(e, (LrpilotError, DataError)):
            print(f"lrpilot.trainer: error: {e}", file=sys.stderr, flush=True)
            return EXIT_USAGE
        traceback.print_exc()
        return EXIT_CRASH


if __name__ == "__main__":
    sys.exit(main())
