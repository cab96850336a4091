"""Crash recovery: the run's crash count (guard.CrashCounter), the rollbacks so far (crashes and granted agent
requests), the checkpoint a crash rolls back to (guard.choose_rollback, the chosen file verified; a corrupt one
is skipped for the one before), the fast-crash back-off, the verdict on an agent's rollback request
(guard.check_agent_rollback) and whether a launch ended because the disk refused a write.

    python -m pytest -q tests/test_supervision.py -k recovery
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrpilot import guard
from lrpilot.checkpoint import list_checkpoints, verify_checkpoint
from lrpilot.config import RunConfig
from lrpilot.controllers.base import RollbackRecord
from lrpilot.errors import DISK_ERRNOS, DiskWriteError, is_disk_error
from lrpilot.logs import append_jsonl, as_float, iter_jsonl, now_iso, temp_name

#: the one-line disk error of the trainer (lrpilot.errors.DiskWriteError), as it appears in trainer.log
_CANNOT_WRITE = re.compile(r"error: cannot write (.+) \(([^()]+)\); ")
_DISK_STRERROR = {os.strerror(code): code for code in DISK_ERRNOS}


@dataclass(frozen=True)
class Relaunch:
    """Where a crashed run goes on: from the checkpoint at `to_step` (path None: from scratch) with --lr new_lr."""

    to_step: int
    new_lr: float
    checkpoint: Path | None

    def __post_init__(self) -> None:
        if self.to_step < 0:
            raise ValueError(f"Relaunch.to_step must be >= 0, got {self.to_step}")


class CrashRecovery:
    """The crash and rollback bookkeeping of one run. `note(text)` writes a [supervisor] line in trainer.log,
    `emit(event)` reports a supervisor event, `skipped(step, path, why)` reports a checkpoint passed over and
    `wait(seconds)` is the back-off's pause (time.sleep; tests pass a recorder)."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        rollbacks_log: Path,
        extra: dict[str, Any],
        *,
        note: Callable[[str], Any],
        emit: Callable[[dict[str, Any]], Any],
        skipped: Callable[[int, Path, str], Any],
        wait: Callable[[float], Any] = time.sleep,
    ) -> None:
        self.cfg, self.g, self.run_dir = cfg, cfg.guard, Path(run_dir)
        self.rollbacks_log, self.extra = Path(rollbacks_log), extra
        self.note, self.emit, self.skipped, self.wait = note, emit, skipped, wait
        self.counter = guard.CrashCounter()
        self.rollbacks: list[RollbackRecord] = []  # crash rollbacks and granted agent rollbacks, in order

    def restore(self, run_start_iso: str, decisions: Iterable[dict[str, Any]]) -> None:
        """Rebuild the counter and the rollbacks from the decision records and the rollback log of this run."""
        for d in decisions:  # granted agent rollbacks are decisions, not crashes
            if d.get("kind") == "agent_rollback" and isinstance(d.get("rollback_to_step"), int):
                self.rollbacks.append(RollbackRecord(int(d["step"]), as_float(d.get("old_lr")),
                                                     int(d["rollback_to_step"]), as_float(d.get("new_lr")),
                                                     "agent_request"))  # fmt: skip
        for r in iter_jsonl(self.rollbacks_log):
            if r.get("run_start_iso") != run_start_iso:
                continue
            self.counter = self.counter.record(int(r.get("crash_step") or 0), int(r.get("launch_start_step") or 0))
            if isinstance(r.get("rolled_back_to_step"), int):
                self.rollbacks.append(
                    RollbackRecord(
                        crash_step=int(r["crash_step"]),
                        lr_at_crash=as_float(r.get("lr_at_crash")),
                        rolled_back_to_step=int(r["rolled_back_to_step"]),
                        new_lr=as_float(r.get("new_lr")),
                        crash_reason=str(r.get("crash_reason", "")),
                    )
                )

    # ------------------------------------------------------------------------------- crashes

    def on_crash(
        self,
        reason: str,
        detail: str,
        *,
        crash_step: int,
        lr_at_crash: float,
        lr_used: float,
        start_step: int,
        losses: Iterable[tuple[int, float]],
        run_start_iso: str,
        launch: int,
    ) -> Relaunch | str:
        """Count the crash at `crash_step` of the launch that started at `start_step`, log it (rollbacks.jsonl)
        and choose where to go on: a Relaunch (after the back-off, waited here), or the failure reason when the
        round is given up (guard.max_fast_crash consecutive quick crashes, or guard.max_repeat_crash crashes in
        a row that get no further than the furthest of them)."""
        self.counter = self.counter.record(crash_step, start_step)
        n = self.counter.total
        self.note(f"crash {n}: {reason} at step {crash_step} ({detail})")

        def record(to_step: int | None, new_lr: float | None, **more: Any) -> None:
            self.append({
                "run_start_iso": run_start_iso, "crash_step": crash_step, "lr_at_crash": lr_at_crash,
                "lr_used_at_crash": lr_used, "rolled_back_to_step": to_step, "new_lr": new_lr,
                "crash_reason": reason, "crash_count_in_run": n, "crash_detail": detail,
                "launch_start_step": start_step, **more,
            }, launch)  # fmt: skip

        why = self.counter.give_up_reason(self.g)
        if why:
            failure = f"{why}; last: {reason} at step {crash_step}"
            record(None, None, gave_up=True, skipped_checkpoints=[])
            self.note(failure)
            return failure

        plan, skipped = self.choose_checkpoint(crash_step, lr_at_crash, losses)
        new_lr = plan.new_lr if plan is not None else guard.crash_lr(lr_at_crash, self.g)
        to_step = plan.to_step if plan is not None else 0
        backoff = self.counter.backoff_s(self.g)
        record(
            to_step,
            new_lr,
            checkpoint=plan.checkpoint.path if plan is not None else None,
            skipped_checkpoints=skipped,
            rollback_reason=plan.reason if plan is not None else "no usable checkpoint: restart from step 0",
            backoff_s=backoff,
        )
        self.rollbacks.append(
            RollbackRecord(
                crash_step=crash_step,
                lr_at_crash=lr_at_crash,
                rolled_back_to_step=to_step,
                new_lr=new_lr,
                crash_reason=reason,
            )
        )
        if backoff > 0:
            fast = self.counter.consecutive_fast(self.g)
            self.note(f"back-off: {backoff:g}s before the relaunch ({fast} consecutive quick crashes)")
            self.emit({"event": "backoff", "source": "supervisor", "seconds": backoff, "consecutive_fast": fast})
            self.wait(backoff)
        return Relaunch(to_step, new_lr, Path(plan.checkpoint.path) if plan is not None else None)

    def append(self, rec: dict[str, Any], launch: int) -> None:
        """A line in the rollback log (stamped with the time, the launch that crashed and the campaign's fields)
        and a rollback event."""
        rec = {**rec, "timestamp": now_iso(), "launch": launch}
        for k, v in self.extra.items():
            rec.setdefault(k, v)
        rec = RollbackRecord.from_dict(rec).to_dict()  # records.RollbackRecord's types; the line as built
        append_jsonl(self.rollbacks_log, rec)
        self.emit({"event": "rollback", "source": "supervisor", **rec})

    def disk_failure(self) -> DiskWriteError | None:
        """Why the launch that just ended could not go on, when it is the disk: the trainer's own `cannot write`
        line in trainer.log (this launch's part; torchrun hides the trainer's exit code), or a probe write to the
        run directory that the disk refuses (full, read-only). None when the disk takes writes."""
        try:
            lines = (self.run_dir / "trainer.log").read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        start = max((i for i, ln in enumerate(lines) if ln.startswith("[supervisor") and "] launch " in ln), default=-1)
        for ln in reversed(lines[start + 1 :]):
            m = _CANNOT_WRITE.search(ln)
            if m and m.group(2) in _DISK_STRERROR:
                return DiskWriteError(m.group(1), OSError(_DISK_STRERROR[m.group(2)], m.group(2)))
        probe = temp_name(self.run_dir / ".write-probe")
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if is_disk_error(e):
                return DiskWriteError(self.run_dir, e)
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
        return None

    def choose_checkpoint(
        self, crash_step: int, lr_at_crash: float, losses: Iterable[tuple[int, float]]
    ) -> tuple[guard.RollbackPlan | None, list[dict[str, Any]]]:
        """The guard's choice among the checkpoints on disk; one that turns out incomplete or corrupt is
        marked unhealthy and the guard chooses again (so the one before it is used). `losses`: (step, loss) of
        the branch. Returns the plan and the skipped checkpoints (step, path, reason)."""
        infos = {c.step: c for c in list_checkpoints(self.run_dir)}
        bad: dict[int, str] = {}
        skipped: list[dict[str, Any]] = []
        # a checkpoint written at or after the branch's first bad loss holds what that update did to the weights
        bad_from = guard.first_bad_loss_step(losses, self.g)
        while True:
            cands = [guard.CheckpointInfo(step=s, healthy=s not in bad, path=str(c.path)) for s, c in infos.items()]
            plan = guard.choose_rollback(cands, crash_step, lr_at_crash, self.g, bad_from=bad_from)
            if plan is None:
                return None, skipped
            info = infos[plan.to_step]
            why = info.reason if not info.complete else verify_checkpoint(info.path)
            if why is None:
                return plan, skipped
            bad[info.step] = why
            skipped.append({"step": info.step, "path": str(info.path), "reason": why})
            self.skipped(info.step, info.path, why)

    # ------------------------------------------------------------------------------- agent rollbacks

    def checkpoint_infos(self) -> list[guard.CheckpointInfo]:
        """The complete checkpoints on disk as the guard sees them (verified only when one is chosen)."""
        return [guard.CheckpointInfo(c.step, c.complete, str(c.path)) for c in list_checkpoints(self.run_dir)]

    @staticmethod
    def agent_rollbacks_used(decisions: Iterable[dict[str, Any]]) -> list[int]:
        """Steps the granted agent rollbacks among `decisions` went back to."""
        return [int(d["rollback_to_step"]) for d in decisions if d.get("kind") == "agent_rollback"]

    def grant_agent_rollback(
        self, step: int, requested: Any, decisions: Iterable[dict[str, Any]]
    ) -> tuple[int | None, Path | None, str]:
        """The guard's verdict on a controller's request at `step` to go back to `requested`, plus the
        checkpoint's integrity: (step, path, reason) when granted, (None, None, why not) when refused."""
        infos = self.checkpoint_infos()
        verdict = guard.check_agent_rollback(
            requested, step, self.cfg.train.total_steps, infos, self.agent_rollbacks_used(decisions), self.g
        )
        if not verdict.ok or verdict.to_step is None:
            return None, None, verdict.reason
        path = Path(next(c.path for c in infos if c.step == verdict.to_step))
        why = verify_checkpoint(path)
        if why is not None:
            return None, None, f"rollback to step {verdict.to_step} refused: its checkpoint is unusable ({why})"
        return verdict.to_step, path, verdict.reason


__all__ = ["CrashRecovery", "Relaunch"]
