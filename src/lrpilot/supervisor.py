"""The round supervisor: runs one pre-training run (an agent round or a baseline run) end to end.

    python -m pytest -q tests/test_supervisor.py

`run_round` launches the trainer as a subprocess in its own process group (`python -m lrpilot.trainer`
for one device, `torchrun` for several; lrpilot.launcher), follows its telemetry (RUN/telemetry.jsonl), asks
the controller at every decision point (inline with the trainer waiting for a blocking controller, in a
worker thread while the trainer trains on for a non-blocking one such as the LLM agent), passes each answer
through the SafetyGuard (lrpilot.guard) and sends it to the trainer (RUN/control.jsonl). It keeps the run
alive: a non-zero exit, a NaN/Inf/catastrophic loss or a trainer that writes no telemetry for
guard.hang_timeout_s (guard.start_timeout_s before its first step and during a `phase` it announced: eval,
checkpoint) is a crash; the supervisor kills every process of the launch (its process group, and
torchrun's workers, which torch puts in sessions of their own), rolls back to the checkpoint the guard
chooses (a corrupt one is skipped for the one before; one at or after the branch's first bad loss is never
chosen) and relaunches with the LR at the crash x crash_lr_factor. After guard.max_fast_crash consecutive
quick crashes (each relaunch after a back-off that grows with every consecutive quick crash,
guard.crash_backoff_s), or after guard.max_repeat_crash crashes in a row that get no further than the furthest of
them (a bad batch or a fault at one step: each rollback reaches it again), the round is given up and recorded as
failed. Exit code 2 is the trainer refusing its config, data, flags or checkpoint: a usage error, never a crash
(SupervisorError; nothing is rolled back or stored).
A write the disk refused (the trainer's exit code 3 or its `cannot write` line, or a probe write to RUN that
fails) is not a crash either: the round stops with DiskWriteError, no rollback, no LR change. One supervisor
at a time runs a run directory (RUN/run.lock, lrpilot.locks).

Records (append-only jsonl through lrpilot.logs.JsonlLog):
- `logs.decisions`: one line per decision (published fields run_start_iso, step, loss, trend, old_lr,
  new_lr, raw_lr_request, clamped, reasoning, plus timestamp, effective_step, kind, clamp_reasons, ...).
  A line is written when the trainer reports the decision applied (`applied` event), or, if it never
  was (crash, end of run), then with effective_step null. So each decision is written exactly once.
- `logs.rollbacks`: one line per crash (published fields run_start_iso, crash_step, lr_at_crash,
  rolled_back_to_step, new_lr, crash_reason, crash_count_in_run; plus the checkpoints skipped as corrupt).
  crash_reason: nan_loss / inf_loss / catastrophic_loss (guard.check_loss), hang, exit_code_N,
  signal_SIGKILL (killed by a signal), exit_without_done. backoff_s: the seconds waited before the relaunch
  (guard.crash_backoff_s, doubling per consecutive quick crash, capped). During warmup lr_at_crash is the LR the warmup
  heads for (what --lr sets); the LR of the last update is lr_used_at_crash.
- RUN/config.json, RUN/round.json (run_start_iso and the round's settings), RUN/result.json (RoundResult),
  RUN/decisions_sent.jsonl (write-ahead copy of each decision record, for a supervisor killed mid-round),
  and "[supervisor]" lines in RUN/trainer.log (launch commands, crashes, skipped checkpoints).

A run directory can be resumed (`resume=True`) after the supervisor itself was stopped: the round continues
from the latest verified checkpoint with the same run_start_iso (each checkpoint passed over gets a note), and
a finished one returns its stored result. The resumed trainer re-applies every logged decision that took
effect after that checkpoint at its logged effective step (commands with `at_step`), so the run trains the
branch its logs describe and a replay of the round reproduces its LR at every step (docs/architecture.md).
A question to a non-blocking controller still open when the round ends is logged as kind "unanswered".
from the latest verified checkpoint with the same run_start_iso, and a finished one returns its stored result.
A run directory whose config.json differs from the config given (other than lrpilot.config.RESUMABLE_FIELDS)
is refused before anything is written (SupervisorError naming the field).

The round (_Round) dispatches the telemetry and keeps the decisions; the launches (TrainerProcess), the
branch history and its restore from the logs (BranchHistory) and the crash recovery (CrashRecovery) are
objects of lrpilot.supervision that own their state (docs/architecture.md, "Inside the round supervisor").
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import queue
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrpilot import guard
from lrpilot.channel import CONTROL_FILE, EXIT_DISK, TELEMETRY_FILE, ControlWriter, TelemetryReader
from lrpilot.checkpoint import list_checkpoints, verify_checkpoint
from lrpilot.config import ConfigError, RunConfig, check_same_config
from lrpilot.controllers.base import BaseController, Decision, Observation, ProbeResult, RollbackRecord
from lrpilot.decision import (
    Command,
    DecisionCore,
    Point,
    RunShape,
    interval_trend,
    plan_summary,
    sample_trajectory,
    warmup_end_lr,
)
from lrpilot.errors import writing
from lrpilot.locks import RUN_LOCK, DirLock
from lrpilot.logs import (
    JsonlLog,
    as_float,
    finite_mean,
    is_positive_finite,
    iter_jsonl,
    now_iso,
    write_json_atomic,
)
from lrpilot.lr import warmup_target
from lrpilot.records import (  # moved to lrpilot.records; still importable from here
    ANSWER_KINDS,
    ASKED_KINDS,
    COUNTED_KINDS,
    Kind,
    RoundResult,
)
from lrpilot.supervision import SupervisorError
from lrpilot.supervision.history import SENT_FILE, BranchHistory, read_round_file
from lrpilot.supervision.process import Crash as _Crash
from lrpilot.supervision.process import TrainerProcess, sigterm_as_exit
from lrpilot.supervision.recovery import CrashRecovery, Relaunch

#: fields of the published decision log, in its order
DECISION_FIELDS = (
    "run_start_iso",
    "step",
    "loss",
    "trend",
    "old_lr",
    "new_lr",
    "raw_lr_request",
    "clamped",
    "reasoning",
)
#: fields of the published rollback log
ROLLBACK_FIELDS = (
    "run_start_iso",
    "crash_step",
    "lr_at_crash",
    "rolled_back_to_step",
    "new_lr",
    "crash_reason",
    "crash_count_in_run",
)
#: how often telemetry is polled
POLL_S = 0.05
#: batches after a probe branch on which its loss is measured, forward only (ProbeResult.after)
PROBE_AFTER_BATCHES = 4
#: at most this many points in RoundResult.lr_trajectory / loss_trajectory


@dataclass(frozen=True)
class RoundLogs:
    """Where the round's records go (campaign-level files, shared by rounds) and the fields stamped on each."""

    decisions: Path
    rollbacks: Path
    #: added to every decision and rollback record, e.g. {"round": 3, "controller": "rules"}
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- helpers


def is_mostly_fallback(fallbacks: int, answers: int) -> bool:
    """More than half of a round's controller answers (kinds decision + fallback) fell back."""
    return answers > 0 and 2 * fallbacks > answers


class _AgentRollback(Exception):
    """Internal: the controller asked to roll back and the guard granted it (unwinds to the main loop)."""

    def __init__(self, point: Any, to_step: int, path: Path, new_lr: float, fields: dict[str, Any]) -> None:
        super().__init__(to_step)
        self.point, self.to_step, self.path, self.new_lr, self.fields = point, to_step, path, new_lr, fields


# ------------------------------------------------------------------------------------------- the round


#: a decision point (lrpilot.decision.Point; the name tests and the crash handlers use)
_Point = Point


class _Round:
    """One run under supervision: reads the telemetry and dispatches it, and wires the parts that own their
    state: the trainer launches (self.proc, TrainerProcess), the branch of the trajectory the trainer is on
    (self.history, BranchHistory), the crashes and rollbacks (self.recovery, CrashRecovery); the decisions so
    far and the questions in flight are its own."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        controller: BaseController,
        logs: RoundLogs,
        *,
        memory_brief: str,
        round_index: int,
        on_event: Callable[[dict[str, Any]], Any] | None,
        trainer_args: Sequence[str],
        trainer_args_first_launch: Sequence[str],
        poll_s: float,
        wait: Callable[[float], Any] = time.sleep,
        prune: Callable[[int, float], bool] | None = None,
    ) -> None:
        self.cfg, self.g = cfg, cfg.guard
        #: prune(step, eval_loss) -> stop the round now (run_round's `prune`); None: never
        self.prune = prune
        #: the step of the eval at which `prune` said stop (the stop command was sent); None: not pruned
        self.pruned_at_eval: int | None = None
        self.run_dir = Path(run_dir)
        self.controller, self.logs = controller, logs
        self.memory_brief, self.round_index = memory_brief, round_index
        self.on_event = on_event
        self.poll_s = poll_s
        self.blocking = bool(getattr(controller, "blocking", True))
        #: the decision desk: observation -> controller -> guard rules -> command -> record (lrpilot.decision)
        self.core = DecisionCore(
            controller,
            cfg.guard,
            RunShape(
                total_steps=cfg.train.total_steps,
                warmup_steps=cfg.schedule.warmup_steps,
                decision_every=cfg.schedule.decision_every,
                init_lr=cfg.schedule.init_lr,
                memory_brief=memory_brief,
                round_index=round_index,
            ),
            lower_only=cfg.lr_may_only_fall,
            rules=cfg.guard.rule_names(),
            stamp=logs.extra,
            layout="supervisor",
        )
        self.run_start_iso = ""
        self.new_run_start_iso = ""  # the identity a fresh run takes (default: now); a resumed run keeps its own
        self.t0 = time.monotonic()
        self.wall_before = 0.0
        # the trainer launches; the branch the trainer is on; crashes and rollbacks
        self.proc = TrainerProcess(
            cfg, self.run_dir, trainer_args=trainer_args, first_launch_args=trainer_args_first_launch,
            blocking=self.blocking,
        )  # fmt: skip
        self.history = BranchHistory(cfg.schedule.warmup_steps)
        # wait: the fast-crash back-off's pause (injectable: tests record it instead of sleeping)
        self.recovery = CrashRecovery(cfg, self.run_dir, logs.rollbacks, logs.extra, note=self._note, emit=self._emit,
                                      skipped=self._skipped_checkpoint, wait=wait)  # fmt: skip
        self.last_step = 0
        #: the LR in force: the LR of the last update, or during warmup the LR the warmup is heading to
        #: (what the trainer's --lr sets, so what a rollback halves)
        self.current_lr = cfg.schedule.init_lr
        self.done: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] | None = None
        self.pending: dict[int, dict[str, Any]] = {}  # seq -> record not yet written (waits for `applied`)
        # decisions, questions in flight and replies: self.core (decisions / asked / inflight / replies below)
        #: a lookahead probe sent to the waiting trainer: (point, seq, clamped LRs, clamp reasons, first latency)
        self.probing: tuple[_Point, int, list[float], list[str], float] | None = None
        self.dlog: JsonlLog | None = None
        self.sent_log: JsonlLog | None = None
        self.writer: ControlWriter | None = None
        self.reader: TelemetryReader | None = None
        self.backlog: collections.deque = collections.deque()  # events read but not handled yet
        self.draining = False  # handling a dead launch's last lines: record them, decide nothing
        self.trainer_log = None

    # ------------------------------------------------------------------------------ public entry

    def run(self, resume: bool) -> RoundResult:
        # one writer per run directory: a second supervisor (process or thread) is refused, naming the holder
        with DirLock(self.run_dir, RUN_LOCK, what="another run", hint="wait for it to finish or use another directory"):
            return self._run(resume)

    def _run(self, resume: bool) -> RoundResult:
        result_file = self.run_dir / "result.json"
        round_file = self.run_dir / "round.json"
        try:  # before anything is returned or written: a directory run with other settings is not this run
            check_same_config(self.run_dir / "config.json", self.cfg)
        except ConfigError as e:
            raise SupervisorError(str(e)) from None
        if resume and result_file.exists():
            try:
                return RoundResult.from_dict(json.loads(result_file.read_text()))
            except (ValueError, KeyError, TypeError):
                result_file.rename(result_file.with_suffix(".json.corrupt"))  # keep it; run the rest again
        prior = read_round_file(round_file)
        if prior is not None and not resume:
            raise SupervisorError(
                f"run dir {self.run_dir} was already used (round.json exists); pass resume=True "
                "to continue it or choose a new directory"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.save(self.run_dir / "config.json")
        if prior is not None:
            self.run_start_iso = str(prior["run_start_iso"])
            self.proc.launches = int(prior.get("launches", 0))
            self.wall_before = float(prior.get("wall_time_s", 0.0))
        else:
            self.run_start_iso = self.new_run_start_iso or now_iso()
        self._save_round_file(resumed=prior is not None)

        old_handler = sigterm_as_exit()
        try:
            self._open(restore=prior is not None)
            self.controller.start_round(self.round_index, self.memory_brief)
            if prior is None:
                self._launch(resume=None, lr=None)
            else:
                self._launch_resumed()
            result = self._supervise()
            write_json_atomic(result_file, result.to_dict())
            self._emit({"event": "result", **result.to_dict()})
            return result
        finally:
            self.proc.stop()
            with contextlib.suppress(OSError):  # a disk that refuses them: decisions_sent.jsonl has them
                self._drain_applied()
                self._flush_pending()
                self._flush_unanswered("the supervisor was interrupted")
            self.wall_before += time.monotonic() - self.t0
            self.t0 = time.monotonic()
            with contextlib.suppress(OSError):
                self._save_round_file(resumed=prior is not None)
            for closer in (self.dlog, self.sent_log, self.writer, self.trainer_log):
                if closer is not None:
                    with contextlib.suppress(OSError):
                        closer.close()
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)

    def _open(self, restore: bool) -> None:
        """Open the logs and both channel ends; a restarted supervisor first rebuilds its state from them."""
        self.dlog = JsonlLog(self.logs.decisions)
        self.sent_log = JsonlLog(self.run_dir / SENT_FILE)
        self.writer = ControlWriter(self.run_dir)
        telemetry = self.run_dir / TELEMETRY_FILE
        if restore:
            self._restore_history(telemetry)
        # only what launches of this session write from now on
        self.reader = TelemetryReader(self.run_dir, offset=telemetry.stat().st_size if telemetry.exists() else 0)
        with writing(self.run_dir / "trainer.log"):  # unbuffered: a refused note is not retried at close
            self.trainer_log = open(self.run_dir / "trainer.log", "ab", buffering=0)  # noqa: SIM115 - closed by run()

    # ---------------------------------------------------------------------------- round.json

    def _save_round_file(self, resumed: bool) -> None:
        write_json_atomic(
            self.run_dir / "round.json",
            {
                "run_start_iso": self.run_start_iso,
                "round": self.round_index,
                "controller": self.controller.describe(),
                "blocking": self.blocking,
                "memory_brief": self.memory_brief,
                "launch": {"devices": self.cfg.launch.devices, "nproc": self.cfg.launch.nproc},
                "guard": dataclasses.asdict(self.g),
                # where this run's decisions and rollbacks are logged (lrpilot status / progress read them)
                "logs": {"decisions": str(self.logs.decisions), "rollbacks": str(self.logs.rollbacks)},
                "launches": self.proc.launches,
                "resumed": resumed,
                "wall_time_s": self.wall_before + (time.monotonic() - self.t0),
            },
        )

    # ------------------------------------------------------------------------------- events

    def _emit(self, event: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _note(self, text: str) -> None:
        """A line in trainer.log from the supervisor (launches, crashes, skipped checkpoints)."""
        if self.trainer_log is not None:
            with writing(self.run_dir / "trainer.log"):
                self.trainer_log.write(f"[supervisor {now_iso()}] {text}\n".encode())

    # ------------------------------------------------------------------------------- launch

    def _launch(self, resume: Path | None, lr: float | None, start_step: int = 0, min_seq: int | None = None) -> None:
        assert self.writer is not None and self.trainer_log is not None
        min_seq = self.writer.next_seq if min_seq is None else min_seq
        cmd = self.proc.launch(resume, lr, start_step, min_seq, self.trainer_log, self._note)
        self.last_step = start_step
        self.done = None
        self._save_round_file(resumed=self.proc.launches > self.proc.session_launches)
        assert self.proc.popen is not None
        self._emit(
            {
                "event": "launch",
                "source": "supervisor",
                "pid": self.proc.popen.pid,
                "pgid": self.proc.popen.pid,
                "cmd": cmd,
                "token": self.proc.token,
                "launch_index": self.proc.launches,
                "resume": str(resume) if resume else None,
                "lr": lr,
                "start_step": start_step,
            }
        )

    def _launch_resumed(self) -> None:
        """Continue a run whose supervisor stopped: the latest complete, verified checkpoint (its own LR) on
        the branch the trainer was on (a later one left by a rolled-back branch is not its past)."""
        head = self.history.head()
        bad_from = guard.first_bad_loss_step(self.history.losses.items(), self.g)
        for info in reversed(list_checkpoints(self.run_dir)):
            if info.step > head:
                why = f"step {info.step} is past step {head}, the last one of the branch being resumed"
            elif bad_from is not None and info.step >= bad_from:
                why = f"step {info.step} is at or after the branch's first non-finite or catastrophic loss (step {bad_from})"
            else:
                why = info.reason if not info.complete else verify_checkpoint(info.path)
            if why is None:
                self.history.truncate(info.step)
                self._resume_branch(info.step, resume=info.path)
                return
            self._skipped_checkpoint(info.step, info.path, why, "resume: ")
        self.history.truncate(0)
        self._resume_branch(0, resume=None)

    def _skipped_checkpoint(self, step: int, path: Path, why: str, prefix: str = "") -> None:
        """A checkpoint passed over (on resume or rollback): a note in trainer.log and a checkpoint_skipped event."""
        self._note(f"{prefix}checkpoint {path.name} skipped ({why})")
        self._emit({"event": "checkpoint_skipped", "source": "supervisor", "step": step, "path": str(path),
                    "reason": why})  # fmt: skip

    def _resume_branch(self, step: int, resume: Path | None) -> None:
        """Relaunch a run whose supervisor stopped, from the checkpoint at `step` (None: from scratch), so that it
        trains the branch its logs describe: every logged decision the trainer applied after `step` is sent
        again with `at_step` = the update that used it (the trainer holds it until then), and its decision
        point is not asked again; a decision that was sent but never applied is sent again (now, or when the
        trainer reaches its decision point) and logged once applied."""
        assert self.writer is not None
        min_seq = self.writer.next_seq
        resend, now = self.history.plan_resume(step, self.decisions, self.run_dir, self._note)
        self._launch(resume=resume, lr=None, start_step=step, min_seq=min_seq)
        for rec, cmd in resend:
            self.writer.send(int(cmd["decided_at_step"]), float(cmd["lr"]), cmd.get("plan"),
                             at_step=int(rec["effective_step"]), replays_seq=int(cmd["seq"]))  # fmt: skip
        if resend:
            self._note(f"resume from step {step}: {len(resend)} logged decision(s) re-applied at their effective "
                       f"steps {', '.join(str(r['effective_step']) for r, _ in resend)}")  # fmt: skip
        for rec in now:
            self._resend(rec)

    def _resend(self, rec: dict[str, Any]) -> None:
        """Send again a decision that was sent but never applied before the supervisor stopped; its record (the
        original, with the new seq) is logged when the trainer applies it."""
        assert self.writer is not None and self.sent_log is not None
        commands = {c.get("seq"): c for c in iter_jsonl(self.run_dir / CONTROL_FILE)}
        cmd = commands.get(rec.get("seq"), {})
        rec = {**rec, "resent_from_seq": rec.get("seq"), "seq": self.writer.next_seq,
               "resent_in_launch": self.proc.launches}  # fmt: skip
        self.sent_log.append(rec)
        self.writer.send(int(rec["step"]), float(rec["new_lr"]), cmd.get("plan"))
        self.pending[rec["seq"]] = rec
        self.decisions.append(rec)

    # ------------------------------------------------------------------------------- main loop

    def _supervise(self) -> RoundResult:
        while True:
            try:
                self._watch()
            except _Crash as crash:
                if self.pruned_at_eval is not None:  # stopping anyway: no rollback, no relaunch
                    self.proc.kill()
                    self._stop_launch()
                    return self._result("pruned", None)
                failure = self._on_crash(crash)
                if failure is not None:
                    return self._result("failed", failure)
                continue
            except _AgentRollback as req:
                self._on_agent_rollback(req)
                continue
            return self._result("pruned" if self.done is None and self.pruned_at_eval is not None else "ok", None)

    def _watch(self) -> None:
        """Follow the current launch until it finishes (return) or crashes (raise _Crash)."""
        while True:
            self._pump()
            rc = self.proc.poll()
            if rc is not None:
                self._pump()  # whatever it wrote before exiting
                if self.done is not None:
                    if rc != 0:
                        self._note(f"trainer exited {rc} after its done event; the run is complete")
                    return
                if rc == 0 and self.pruned_at_eval is not None:  # it obeyed the stop sent by _on_eval
                    return
                if rc == EXIT_DISK:
                    raise self.recovery.disk_failure() or SupervisorError(
                        f"the trainer could not write in {self.run_dir} (exit code {EXIT_DISK}; see trainer.log); "
                        "free space and run the same command again"
                    )
                raise self.proc.exit_error(rc, self._note)
            if self.proc.hung():
                if self.done is not None:  # finished, but stuck tearing down (e.g. a collective)
                    self._note("trainer silent after its done event; killed, the run is complete")
                    self.proc.kill()
                    return
                raise self.proc.hang()
            try:  # the wait between polls doubles as the wait for a non-blocking controller's reply
                reply = self.replies.get(timeout=self.poll_s)
            except queue.Empty:
                continue
            self._on_reply(reply)

    def _pump(self) -> None:
        """Handle every telemetry event written so far. A crash raised mid-batch leaves the rest in the
        backlog, so the crash handler still sees them (applied decisions, later steps)."""
        assert self.reader is not None
        self.backlog.extend(self.reader.poll())
        while self.backlog:
            self._handle(self.backlog.popleft())
            while self.inflight is not None and not self.replies.empty():  # send a reply as soon as it is in
                self._on_reply(self.replies.get_nowait())

    def _handle(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if not self.proc.follows(ev):
            return  # a line from a launch that is already dead (or from before this launch's start)
        self._emit(ev)
        step = ev.get("step")
        step = int(step) if isinstance(step, int) and not isinstance(step, bool) else self.last_step
        if kind == "start":
            self.proc.start_step = step
            self.last_step = step
            if is_positive_finite(ev.get("lr")):
                self.current_lr = self._in_force(float(ev["lr"]), update=step)
        elif kind == "step":
            self.proc.stepped = True
            self._on_step(step, ev)
        elif kind == "observe":
            self._on_observe(step, ev)
        elif kind == "checkpoint_refused":
            self._note(f"trainer: checkpoint at step {step} {ev.get('reason', 'refused')}")
        elif kind == "applied":
            self._on_applied(step, ev)
        elif kind == "probe":
            self._on_probe(step, ev)
        elif kind == "eval":
            self.last_eval = ev
            self._on_eval(step, ev)
        elif kind == "done":
            self.done = ev
            self.last_step = step

    def _on_eval(self, step: int, ev: dict[str, Any]) -> None:
        """An intermediate eval: ask `prune` (campaign --prune) whether to stop the round; if so, send the
        trainer the stop command (it checkpoints after its next update and exits 0; the round ends "pruned")."""
        if self.prune is None or self.pruned_at_eval is not None or self.draining:
            return
        loss = as_float(ev.get("eval_loss"))
        if not self.prune(step, loss):
            return
        assert self.writer is not None
        self.pruned_at_eval = step
        self.writer.stop()
        self._note(f"pruned at the eval of step {step} (eval loss {loss:.4f}): the trainer was told to stop")
        self._emit({"event": "pruned", "source": "supervisor", "step": step, "eval_loss": loss})

    def _in_force(self, lr: float, update: int) -> float:
        """The LR in force given the LR of update number `update`: during warmup the trainer used
        target * (update + 1) / warmup_steps, so the target is recovered; after warmup it is lr itself."""
        return warmup_target(lr, update, self.cfg.schedule.warmup_steps)

    def _track_step(self, step: int, ev: dict[str, Any]) -> tuple[float, float]:
        """Record a step event on the trajectory; returns its (loss, lr)."""
        return self.history.track_step(step, ev)

    def _on_step(self, step: int, ev: dict[str, Any]) -> None:
        loss, lr = self._track_step(step, ev)
        self.last_step = step
        if is_positive_finite(lr):
            self.current_lr = self._in_force(lr, update=step - 1)
        health = guard.check_loss(loss, self.g)
        if not health.ok:
            raise _Crash(health.reason, f"step {step}: {health.detail}", step=step)

    # ------------------------------------------------------------------------------- decisions

    # the decision core (lrpilot.decision) owns the decision history and the questions in flight
    decisions = property(lambda self: self.core.decisions, lambda self, v: setattr(self.core, "decisions", v))
    asked = property(lambda self: self.core.asked, lambda self, v: setattr(self.core, "asked", v))
    inflight = property(lambda self: self.core.inflight, lambda self, v: setattr(self.core, "inflight", v))
    replies = property(lambda self: self.core.replies)
    run_start_iso = property(
        lambda self: self.core.run_start_iso, lambda self, v: setattr(self.core, "run_start_iso", v)
    )

    def _observation(self, step: int, lr: float, recent: Sequence[float], ev: dict[str, Any]) -> Observation:
        used = self._agent_rollbacks_used()
        return self.core.observation(
            step,
            lr,
            recent,
            loss_history=self.history.loss_history,
            lr_history=self.history.lr_history,
            grad_norm=as_float(ev.get("grad_norm")),
            tokens_per_s=as_float(ev.get("tokens_per_s")),
            rollbacks=self.recovery.rollbacks,
            rollback_steps=guard.agent_rollback_steps(
                step, self.cfg.train.total_steps, self.recovery.checkpoint_infos(), used, self.g
            ),
            agent_rollbacks_used=len(used),
        )

    def _track_observe(self, step: int, ev: dict[str, Any]) -> tuple[list[float], float, float]:
        """Record a decision point on the trajectory; returns (losses, mean, lr)."""
        return self.history.track_observe(step, ev, self.current_lr)

    def _on_observe(self, step: int, ev: dict[str, Any]) -> None:
        prev = next((v for s, v in reversed(self.history.loss_history) if s < step), math.nan)
        recent, mean, lr = self._track_observe(step, ev)
        if self.draining:
            return  # the launch is dead: nobody would apply a decision
        point = _Point(
            obs=self._observation(step, lr, recent, ev),  # its history includes this decision point
            trend=interval_trend(prev, mean),
            t_observed=as_float(ev.get("time")),
            launch=self.proc.launches,
        )
        if step in self.history.answered:  # re-trained after a resume: this point was answered on this branch already
            rec = self.history.answered.pop(step)
            if rec is not None:
                self._resend(rec)
            self._emit({"event": "observe_answered", "source": "supervisor", "step": step,
                        "resent_from_seq": rec.get("seq") if rec else None})  # fmt: skip
            return
        # the published emergency rule comes first and does not ask the controller
        cmd = self.core.pre_empt(point, prev)
        if cmd is not None:
            self._send(point, cmd)
            return
        if self.blocking:
            decision, latency = self.core.ask_inline(point.obs)
            if isinstance(decision, Decision) and decision.probe_lrs and self._start_probe(point, decision):
                return  # asked again when the trainer's `probe` event arrives (_on_probe)
            self._apply_decision(point, decision, latency)
            return
        pending = self.inflight
        if not self.core.ask(point):  # one question at a time: this decision point is skipped
            assert pending is not None
            self._emit({"event": "observe_skipped", "source": "supervisor", "step": step,
                        "pending_step": pending.obs.step})  # fmt: skip

    def _on_reply(self, reply: tuple[_Point, Decision | BaseException, float], stale: str | None = None) -> None:
        """A non-blocking controller answered: send it, unless the trainer moved on to another branch, an
        emergency cut came first or the round is over (`stale`; the answer is only logged, as kind "superseded")."""
        point, decision, latency = reply
        stale = self.core.answered(reply, self.proc.launches, stale)
        if stale is None:
            self._apply_decision(point, decision, latency)
            return
        rec = self.core.stale_record(point, decision, latency, stale)
        self._write(rec)
        self.decisions.append(rec)  # its latency counts, as it does when the round is restored from the log

    def _start_probe(self, point: _Point, decision: Decision) -> bool:
        """Send the lookahead probe `decision` asks for to the trainer (which waits at this decision point), every
        branch LR through the guard's clamp; False (the decision is applied as it is) when the trainer cannot
        run one: a non-blocking controller (the trainer does not wait) or a distributed run."""
        assert self.writer is not None and decision.probe_lrs is not None
        if not self.blocking or self.cfg.launch.nproc > 1:
            return False
        lr_now, lrs, reasons, sweep = point.obs.lr, [], [], decision.probe_sweep
        for x in decision.probe_lrs:
            # a range test's ends only meet [floor, ceiling] (bounded around themselves): the run's LR stays put
            c = self.core.bound_lr(x, x if sweep else lr_now)
            reasons += [f"probe lr {x:.6g}: {r}" for r in c.reasons]
            if c.lr not in lrs:
                lrs.append(c.lr)
        if sweep and (len(lrs) != 2 or lrs[0] >= lrs[1]):
            self._emit({"event": "probe_skipped", "source": "supervisor", "step": point.obs.step, "lrs": lrs,
                        "clamp_reasons": reasons, "why": "the guard's limits leave no range to sweep"})  # fmt: skip
            return False
        after = 0 if sweep else PROBE_AFTER_BATCHES
        seq = self.writer.probe(point.obs.step, lrs, decision.probe_steps, after, sweep=sweep)
        self.probing = (point, seq, lrs, reasons, time.monotonic())
        self._emit({"event": "probe_sent", "source": "supervisor", "step": point.obs.step, "seq": seq, "lrs": lrs,
                    "steps": decision.probe_steps, "sweep": sweep, "clamp_reasons": reasons})  # fmt: skip
        return True

    def _on_probe(self, step: int, ev: dict[str, Any]) -> None:
        """The trainer ran (or refused) the probe: ask the controller again with the branches' results in
        Observation.probes, and send that answer (a second probe request is not honoured)."""
        if self.probing is None or self.probing[0].obs.step != step or self.draining:
            return  # a probe of a dead launch, or one this supervisor session did not ask for
        point, seq, lrs, reasons, t = self.probing
        self.probing = None
        results = []
        for b in ev.get("branches") or []:
            if isinstance(b, dict) and is_positive_finite(b.get("lr")):
                results.append(ProbeResult(lr=float(b["lr"]), losses=_floats(b.get("losses")),
                                           after=as_float(b.get("after")), after_batches=_count(b.get("after_batches")),
                                           lrs=_floats(b.get("lrs"))))  # fmt: skip
        again = dataclasses.replace(point, obs=dataclasses.replace(point.obs, probes=tuple(results)))
        record = {
            "seq": seq, "lrs": lrs, "clamp_reasons": reasons, "steps": ev.get("steps"),
            "probe_steps": _count(ev.get("probe_steps")), "seconds": ev.get("seconds"), "error": ev.get("error"),
            "branches": [{"lr": r.lr, "end_loss": r.end_loss, "mean_loss": finite_mean(r.losses)} for r in results],
        }  # fmt: skip
        if ev.get("sweep"):  # a range test: keep its curve (a few dozen numbers) for the report
            record["sweep"] = [{"lrs": list(r.lrs), "losses": list(r.losses)} for r in results]
        t2 = time.monotonic()
        decision = self.core.decide(again.obs)
        if isinstance(decision, Decision) and decision.probe_lrs:
            record["second_request_ignored"] = True
        self._apply_decision(again, decision, time.monotonic() - t2 + (t2 - t), extra={"probe": record})

    def _apply_decision(
        self, point: _Point, decision: Decision | BaseException, latency: float, extra: dict[str, Any] | None = None
    ) -> None:
        """Guard a controller's answer (lrpilot.decision.DecisionCore.guard) and send it; a granted agent
        rollback unwinds to the main loop (_AgentRollback)."""
        cmd = self.core.guard(point, decision, latency, extra=extra, grant=self._grant)
        if cmd.kind == "agent_rollback":
            assert cmd.rollback_to is not None
            raise _AgentRollback(point, cmd.rollback_to, cmd.rollback_handle, cmd.new_lr,
                                 {"reasoning": cmd.reasoning, **cmd.fields})  # fmt: skip
        self._send(point, cmd)

    def _grant(self, point: _Point, requested: Any) -> tuple[int | None, str, Path | None]:
        to, path, why = self.recovery.grant_agent_rollback(point.obs.step, requested, self.decisions)
        return to, why, path

    def _send(self, point: _Point, cmd: Command) -> None:
        """Send the command decided at point to the trainer; its record waits in `pending` for the `applied`
        event."""
        assert self.writer is not None and self.sent_log is not None
        seq = self.writer.next_seq
        # the trainer waits from its observe event until this command arrives (blocking controllers only)
        t_obs = point.t_observed
        wait = max(0.0, time.time() - t_obs) if self.blocking and math.isfinite(t_obs) else 0.0
        self.proc.last_seen = time.monotonic()  # time spent deciding is not the trainer hanging
        # every knot too (as the Pilot logs them), so a replay of a baseline schedule's per-step plan is exact
        knots = {"plan_knots": [list(k) for k in cmd.plan]} if cmd.plan else {}
        rec = self.core.command_record(point, cmd, seq=seq, wait_s=wait, plan=plan_summary(cmd.plan), **knots)
        self.sent_log.append(rec)  # write-ahead: a restarted supervisor still logs it (see _restore_history)
        if self.writer.send(point.obs.step, cmd.new_lr, cmd.plan) != seq:
            raise SupervisorError(f"{self.run_dir / CONTROL_FILE}: another process writes control commands")
        self.pending[seq] = rec
        self.decisions.append(rec)
        self._emit({"event": "decision", "source": "supervisor", **rec})

    def _record(self, point: _Point, new_lr: float, *, kind: str, reasoning: str, **fields: Any) -> dict[str, Any]:
        """A decision-log record (lrpilot.decision.decision_record), stamped with the campaign's logs.extra."""
        return self.core.record(point, new_lr, kind=kind, reasoning=reasoning, **fields)

    def _on_applied(self, step: int, ev: dict[str, Any]) -> None:
        seq = ev.get("seq")
        rec = self.pending.pop(seq, None) if isinstance(seq, int) else None
        if rec is None:
            return  # a command from before this supervisor session, already accounted for
        rec["effective_step"] = step
        self._write(rec)

    def _write(self, rec: dict[str, Any]) -> None:
        assert self.dlog is not None
        self.dlog.append(rec)

    def _drain_applied(self) -> None:
        """After an interrupt: the commands the dead launch applied still get their effective step."""
        if self.reader is None or not self.pending:
            return
        with contextlib.suppress(OSError):
            self.backlog.extend(self.reader.poll())
        while self.backlog:
            ev = self.backlog.popleft()
            if ev.get("event") == "applied" and ev.get("launch") == self.proc.pid and isinstance(ev.get("step"), int):
                self._on_applied(ev["step"], ev)

    def _flush_unanswered(self, why: str) -> None:
        """Questions to a non-blocking controller still unanswered when the round ends (or is interrupted): one
        record each, kind "unanswered", LR kept, effective_step null. A reply that comes later is dropped."""
        if self.dlog is None:
            return
        while True:  # answers that came in but were not used yet
            try:
                reply = self.replies.get_nowait()
            except queue.Empty:
                break
            if any(p is reply[0] for p in self.asked):
                self._on_reply(reply, stale=f"discarded: {why} before the reply was used")
        for point in self.asked:
            fields: dict[str, Any] = {"skipped_observes": list(point.skipped)} if point.skipped else {}
            waited = time.monotonic() - point.t_asked
            rec = self._record(point, point.obs.lr, kind="unanswered",
                               reasoning=f"no answer from the controller {waited:.1f}s after it was asked: {why}",
                               unanswered_for_s=round(waited, 3), **fields)  # fmt: skip
            self._write(rec)
            self.decisions.append(rec)
        self.asked = []
        self.inflight = None

    def _flush_pending(self) -> None:
        """Decisions the trainer never applied (crash, end of run, interrupt): written with effective_step null."""
        if self.dlog is None:
            return
        for seq in sorted(self.pending):
            self._write(self.pending[seq])
        self.pending.clear()
        for step in sorted(self.history.answered):  # sent before a resume, never sent again: never applied
            rec = self.history.answered[step]
            if rec is not None:
                self._write(rec)
                self.decisions.append(rec)
        self.history.answered.clear()

    # ------------------------------------------------------------------------------- restore

    def _restore_history(self, telemetry: Path) -> None:
        """Rebuild the round's state from its own records after the supervisor itself was restarted."""
        applied, last_eval = self.history.replay(telemetry, self.current_lr)
        if last_eval is not None:
            self.last_eval = last_eval
        self.decisions = [d for d in iter_jsonl(self.logs.decisions) if d.get("run_start_iso") == self.run_start_iso]
        # decisions sent but not yet logged when the supervisor died: log them now if applied (those never
        # applied are sent again on resume, _resume_branch, and logged once applied)
        for rec in self.history.restore_sent(self.run_dir, self.run_start_iso, self.decisions, applied):
            self._write(rec)
            self.decisions.append(rec)
        self.recovery.restore(self.run_start_iso, self.decisions)
        self.history.restore_rollback_points(self.logs.rollbacks, self.run_start_iso)

    # ------------------------------------------------------------------------------- crashes

    def _stop_launch(self) -> None:
        """Kill the launch and handle what it wrote before it died (steps and applied decisions still count;
        nothing is decided); its unapplied decisions are logged and any question or probe in flight is stale."""
        assert self.reader is not None
        self.backlog.extend(self.reader.poll())
        self.draining = True
        try:
            while self.backlog:
                with contextlib.suppress(_Crash):
                    self._handle(self.backlog.popleft())
        finally:
            self.draining = False
        self._flush_pending()
        self.inflight = None  # its reply, if any, is stale (the relaunch changes proc.launches)
        self.probing = None

    def _on_crash(self, crash: _Crash) -> str | None:
        """Kill the launch, record the crash, relaunch from the guard's checkpoint. Returns the failure
        reason when the round is given up, else None."""
        self.proc.kill()
        disk = self.recovery.disk_failure()
        if disk is not None:  # a write the disk refused is not a training crash: stop, change no LR
            raise disk
        self._stop_launch()
        # a bad loss crashes at its own step (the trainer may have gone on a little before it was killed)
        crash_step = crash.step if crash.step is not None else self.last_step
        lrs = self.history.lrs
        lr_used = lrs.get(crash_step, self.current_lr)
        lr_at_crash = self._in_force(lr_used, crash_step - 1) if crash_step in lrs else self.current_lr
        self.last_step = crash_step
        if not is_positive_finite(lr_at_crash):
            lr_at_crash = self.cfg.schedule.init_lr
        outcome = self.recovery.on_crash(
            crash.reason, crash.detail, crash_step=crash_step, lr_at_crash=lr_at_crash, lr_used=lr_used,
            start_step=self.proc.start_step, losses=self.history.losses.items(), run_start_iso=self.run_start_iso,
            launch=self.proc.launches,
        )  # fmt: skip
        if not isinstance(outcome, Relaunch):
            return outcome
        self.history.rollback_points.append((self.proc.launches, outcome.to_step))
        self.history.truncate(outcome.to_step)
        self._launch(resume=outcome.checkpoint, lr=outcome.new_lr, start_step=outcome.to_step)
        return None

    # ------------------------------------------------------------------------------- agent rollbacks

    def _agent_rollbacks_used(self) -> list[int]:
        """Steps this round's granted agent rollbacks went back to."""
        return CrashRecovery.agent_rollbacks_used(self.decisions)

    def _on_agent_rollback(self, req: _AgentRollback) -> None:
        """Kill the launch, log the decision (kind agent_rollback) and relaunch from the granted checkpoint at
        the LR the controller set (guard-clamped). Not a crash: the crash counter and rollbacks.jsonl are
        untouched."""
        self.proc.kill()
        self._stop_launch()
        point, to = req.point, req.to_step
        fields = dict(req.fields)
        reasoning = fields.pop("reasoning", "")
        rec = self._record(point, req.new_lr, kind="agent_rollback", reasoning=reasoning, effective_step=to, **fields)
        assert self.sent_log is not None
        self.sent_log.append(rec)  # no command is sent (seq null), but progress/status read decisions from here
        self._write(rec)
        self.decisions.append(rec)
        self._emit({"event": "decision", "source": "supervisor", **rec})
        self.recovery.rollbacks.append(RollbackRecord(point.obs.step, point.obs.lr, to, req.new_lr, "agent_request"))
        self._note(f"agent rollback at step {point.obs.step} to step {to}, lr {req.new_lr:.6g}")
        self.history.truncate(to)
        self._launch(resume=req.path, lr=req.new_lr, start_step=to)

    # ------------------------------------------------------------------------------- result

    def _result(self, status: str, failure: str | None) -> RoundResult:
        self._flush_pending()
        self._flush_unanswered("the round ended first")
        if status == "ok" and self.done is not None:
            ev = self.done
            loss, ppl = as_float(ev.get("final_eval_loss")), as_float(ev.get("final_eval_ppl"))
            tokens, step = int(ev.get("final_eval_tokens") or 0), int(ev.get("step") or self.last_step)
        elif self.last_eval is not None:
            ev = self.last_eval
            loss, ppl = as_float(ev.get("eval_loss")), as_float(ev.get("eval_ppl"))
            tokens, step = int(ev.get("eval_tokens") or 0), self.last_step
        else:
            loss, ppl, tokens, step = math.nan, math.nan, 0, self.last_step
        counted = [d for d in self.decisions if d.get("kind") in COUNTED_KINDS]
        asked = [d for d in self.decisions if d.get("kind") in ASKED_KINDS]
        answers = [d for d in counted if d.get("kind") in ANSWER_KINDS]
        fallbacks = sum(d.get("kind") == Kind.FALLBACK for d in answers)
        return RoundResult(
            status=status,
            run_start_iso=self.run_start_iso,
            final_eval_loss=loss,
            final_eval_ppl=ppl,
            final_eval_tokens=tokens,
            update_step=step,
            crash_count=self.recovery.counter.total,
            total_decisions=len(counted),
            peak_lr_seen=self.history.peak_lr if math.isfinite(self.history.peak_lr) else math.nan,
            min_lr_seen=self.history.min_lr if math.isfinite(self.history.min_lr) else math.nan,
            wall_time_s=self.wall_before + (time.monotonic() - self.t0),
            wait_s=sum(as_float(d.get("wait_s")) for d in counted if math.isfinite(as_float(d.get("wait_s")))),
            decision_latency_s=[as_float(d["latency_s"]) for d in asked if d.get("latency_s") is not None],
            effect_delay_steps=[
                int(d["effective_step"]) - int(d["step"]) for d in counted if isinstance(d.get("effective_step"), int)
            ],
            lr_trajectory=sample_trajectory(self.history.lrs),
            loss_trajectory=sample_trajectory(self.history.losses),
            failure_reason=failure,
            unanswered_decisions=sum(d.get("kind") == "unanswered" for d in self.decisions),
            fallback_decisions=fallbacks,
            mostly_fallback=is_mostly_fallback(fallbacks, len(answers)),
            agent_rollbacks=len(self._agent_rollbacks_used()),
            probe_steps=sum(
                _count(d["probe"].get("probe_steps")) for d in self.decisions if isinstance(d.get("probe"), dict)
            ),
            pruned_at_step=self.last_step if status == "pruned" else None,
            steps_saved=max(0, self.cfg.train.total_steps - self.last_step) if status == "pruned" else 0,
        )


def run_round(
    cfg: RunConfig,
    run_dir: Path,
    controller: BaseController,
    logs: RoundLogs,
    *,
    memory_brief: str = "",
    round_index: int = 0,
    resume: bool = False,
    on_event: Callable[[dict[str, Any]], Any] | None = None,
    trainer_args: Sequence[str] = (),
    trainer_args_first_launch: Sequence[str] = (),
    poll_s: float = POLL_S,
    wait: Callable[[float], Any] = time.sleep,
    run_start_iso: str = "",
    prune: Callable[[int, float], bool] | None = None,
) -> RoundResult:
    """Run one pre-training run under supervision and return how it ended (also in RUN/result.json).

    on_event(event) sees every telemetry event of the live launch and the supervisor's own events
    (`"source": "supervisor"`: launch (with pid/pgid/cmd), decision, observe_skipped, checkpoint_skipped,
    rollback, result). trainer_args are added to every trainer command line, trainer_args_first_launch
    only to the first launch of this call (fault injection in tests, e.g. ["--inject-nan-at-step", "25"]).
    With resume=True an existing run directory is continued (a finished one returns its stored result).
    wait(seconds) is the fast-crash back-off's pause before a relaunch (guard.crash_backoff_s; default
    time.sleep; tests pass a recorder).     run_start_iso: the identity of a fresh run (default now_iso()), so that a campaign can stamp the LLM calls
    made before the run starts (the Memory agent's) with it; a resumed run keeps the one in its round.json.
    SIGTERM / KeyboardInterrupt kill the trainer's process group and propagate.
    prune(step, eval_loss) (optional; `campaign --prune`): asked at every intermediate eval (eval.every) with
    its step and loss (nats); True sends the trainer the stop command, and the round ends with status "pruned",
    pruned_at_step (the trainer's last update) and steps_saved (total_steps - pruned_at_step); the eval loss is
    the round's last (not a final result). A crash after that ends the round the same way, without a rollback.
    The warmup ends at the controller's `warmup_to(schedule.init_lr)` (lrpilot.decision.warmup_end_lr): where
    that differs from the preset's init_lr, the run's config (RUN/config.json, what the trainer reads) carries
    it as schedule.init_lr, as a baseline at peak P runs with init_lr = P.
    """
    start = warmup_end_lr(controller, cfg.schedule.init_lr, cfg.guard)
    if start != cfg.schedule.init_lr:
        cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, init_lr=start))
    rnd = _Round(
        cfg,
        Path(run_dir),
        controller,
        logs,
        memory_brief=memory_brief,
        round_index=round_index,
        on_event=on_event,
        trainer_args=trainer_args,
        trainer_args_first_launch=trainer_args_first_launch,
        poll_s=poll_s,
        wait=wait,
        prune=prune,
    )
    rnd.new_run_start_iso = run_start_iso
    return rnd.run(resume)


def _floats(v: Any) -> tuple[float, ...]:
    """A telemetry list of numbers as floats (garbage -> NaN); () unless it is a list (an untrusted event)."""
    return tuple(as_float(x) for x in v) if isinstance(v, list) else ()


def _count(v: Any) -> int:
    """A telemetry count; 0 unless it is a non-negative whole number (an untrusted event)."""
    x = as_float(v)
    return int(x) if math.isfinite(x) and x >= 0 and x.is_integer() else 0


__all__ = [
    "DECISION_FIELDS",
    "ROLLBACK_FIELDS",
    "RoundLogs",
    "RoundResult",
    "SupervisorError",
    "run_round",
]
