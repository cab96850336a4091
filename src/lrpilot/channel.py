"""The file channel between the trainer and the round supervisor (docs/architecture.md).

    python -m pytest -q tests/test_channel.py

Two append-only jsonl files in the run directory carry everything:

- `telemetry.jsonl`, trainer -> supervisor: `TelemetryWriter` (trainer, rank 0) and `TelemetryReader`
  (supervisor). Per-step events are flushed per line; the rare events a supervisor acts on (observe,
  applied, checkpoint, eval, done, start) are fsync'd as well.
- `control.jsonl`, supervisor -> trainer: `ControlWriter` (supervisor) and `ControlReader` (trainer).
  `seq` increases by one per command over the whole run, across relaunches: a new writer continues from
  the largest `seq` already in the file, and a relaunched trainer ignores commands below `--min-seq`.

`LRState` is the pure (torch-free) post-warmup LR logic both sides can share: the LR in force and an
optional plan of (step, lr) knots, interpolated linearly.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lrpilot.logs import JsonlFollower, JsonlLog, iter_jsonl
from lrpilot.lr import check_lr, plan_lr

TELEMETRY_FILE = "telemetry.jsonl"
CONTROL_FILE = "control.jsonl"

#: the trainer's exit code when the disk refused a write (full, read-only): not a training crash, so the
#: supervisor stops the round with that error instead of rolling back (lrpilot.errors.DiskWriteError)
EXIT_DISK = 3

#: telemetry events a supervisor acts on: fsync'd so a crash right after cannot lose them
DURABLE_EVENTS = frozenset({"start", "observe", "applied", "checkpoint", "eval", "done", "probe"})


def _positive_lr(value: Any, what: str) -> float:
    return check_lr(value, f"{what} lr")


def _parse_plan(plan: Any, what: str) -> tuple[tuple[int, float], ...] | None:
    """Validate a plan [[step, lr], ...] (lr >= 0 finite, integer steps); sorted by step, stable."""
    if plan is None:
        return None
    if not isinstance(plan, (list, tuple)):
        raise ValueError(f"{what}: plan must be a list of [step, lr] pairs, got {type(plan).__name__}")
    knots = []
    for knot in plan:
        if not isinstance(knot, (list, tuple)) or len(knot) != 2:
            raise ValueError(f"{what}: plan knot {knot!r} is not a [step, lr] pair")
        s, v = knot
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s != int(s):
            raise ValueError(f"{what}: plan step {s!r} is not an integer")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{what}: plan LR at step {int(s)} must be finite and >= 0, got {v!r}")
        knots.append((int(s), float(v)))
    if not knots:
        return None
    return tuple(sorted(knots, key=lambda k: k[0]))


class LRState:
    """The LR after warmup: the LR in force, or the linear interpolation of a plan of (step, lr) knots."""

    def __init__(self, lr: float, plan: Sequence[Sequence[float]] | None = None) -> None:
        self.lr = _positive_lr(lr, "LRState")
        self.plan = _parse_plan(plan, "LRState")
        #: the last command applied: its seq, the step it was decided at, and the first update that used it
        self.seq: int | None = None
        self.decided_at_step: int | None = None
        self.applied_step: int | None = None

    @property
    def plan(self) -> tuple[tuple[int, float], ...] | None:
        return self._plan

    @plan.setter
    def plan(self, plan: tuple[tuple[int, float], ...] | None) -> None:
        self._plan = plan
        self._knot_steps = [s for s, _ in plan] if plan else []  # for bisect, once per plan, not per step

    def lr_for(self, step: int) -> float:
        """LR for update number `step`: the plan interpolated between knots and held after the last one;
        the LR in force before the first knot or without a plan."""
        return plan_lr(self.plan, step, self.lr, self._knot_steps)

    def apply(self, command: dict[str, Any], step: int) -> None:
        """Take an LR command (`lr`, optional `plan`, `seq`, `decided_at_step`); update `step` is the first
        to use it. Raises ValueError (and changes nothing) if the command is malformed."""
        lr = _positive_lr(command.get("lr"), f"command seq={command.get('seq')!r}")
        plan = _parse_plan(command.get("plan"), f"command seq={command.get('seq')!r}")
        self.lr, self.plan = lr, plan
        seq = command.get("seq")
        self.seq = int(seq) if isinstance(seq, int) and not isinstance(seq, bool) else self.seq
        decided = command.get("decided_at_step")
        self.decided_at_step = int(decided) if isinstance(decided, int) and not isinstance(decided, bool) else None
        self.applied_step = int(step)

    def override(self, lr: float) -> None:
        """Set the LR directly (the trainer's --lr after a rollback); clears any plan."""
        self.lr = _positive_lr(lr, "--lr")
        self.plan = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "plan": [list(k) for k in self.plan] if self.plan else None,
            "seq": self.seq,
            "decided_at_step": self.decided_at_step,
            "applied_step": self.applied_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr = _positive_lr(state["lr"], "LRState.load_state_dict")
        self.plan = _parse_plan(state.get("plan"), "LRState.load_state_dict")
        self.seq = state.get("seq")
        self.decided_at_step = state.get("decided_at_step")
        self.applied_step = state.get("applied_step")

    def __repr__(self) -> str:
        n = len(self.plan) if self.plan else 0
        return f"LRState(lr={self.lr:.4g}, plan={n} knots, seq={self.seq}, applied_step={self.applied_step})"


# ------------------------------------------------------------------------------------- trainer side


class TelemetryWriter:
    """Appends telemetry events to RUN/telemetry.jsonl (rank 0 only); every line has event, step, time, launch."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / TELEMETRY_FILE
        self.launch = os.getpid()
        self._log = JsonlLog(self.path, fsync=False)

    def emit(self, event: str, step: int, **fields: Any) -> dict[str, Any]:
        """Write one event; DURABLE_EVENTS are fsync'd, the rest only flushed. Returns the record."""
        record = {"event": event, "step": int(step), "time": time.time(), "launch": self.launch, **fields}
        self._log.append(record, fsync=event in DURABLE_EVENTS)
        return record

    def close(self) -> None:
        self._log.close()


class ControlReader:
    """New control commands with seq >= min_seq, in file order, each once. `poll` costs one stat when idle."""

    def __init__(self, run_dir: str | Path, min_seq: int = 0) -> None:
        self.path = Path(run_dir) / CONTROL_FILE
        self.min_seq = int(min_seq)
        self._follower = JsonlFollower(self.path)
        self._last_seq: int | None = None

    def poll(self) -> list[dict[str, Any]]:
        out = []
        for cmd in self._follower.poll():
            seq = cmd.get("seq")
            if isinstance(seq, bool) or not isinstance(seq, int):
                warnings.warn(
                    f"{self.path}: control command without an integer seq skipped: {cmd!r:.120}", stacklevel=2
                )
                continue
            if seq < self.min_seq or (self._last_seq is not None and seq <= self._last_seq):
                continue  # an earlier launch's command, or one already returned
            self._last_seq = seq
            out.append(cmd)
        return out


# ---------------------------------------------------------------------------------- supervisor side


def max_seq(run_dir: str | Path) -> int:
    """The largest seq in RUN/control.jsonl, or -1 if there is none."""
    best = -1
    for cmd in iter_jsonl(Path(run_dir) / CONTROL_FILE):
        seq = cmd.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            best = max(best, seq)
    return best


class ControlWriter:
    """Appends commands to RUN/control.jsonl (fsync'd); seq continues after the largest seq already there."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / CONTROL_FILE
        self._log = JsonlLog(self.path, fsync=True)
        self._next = max_seq(self.run_dir) + 1

    @property
    def next_seq(self) -> int:
        return self._next

    def _append(self, record: dict[str, Any]) -> int:
        seq = self._next
        self._log.append({"seq": seq, **record})
        self._next += 1
        return seq

    def send(
        self,
        decided_at_step: int,
        lr: float,
        plan: Iterable[Sequence[float]] | None = None,
        *,
        at_step: int | None = None,
        replays_seq: int | None = None,
    ) -> int:
        """Ask the trainer to use `lr` (and the optional plan) from its next update on, or, with `at_step`,
        from update `at_step` on (a resumed run re-applying command `replays_seq` where it was applied before);
        returns the seq."""
        lr = _positive_lr(lr, "ControlWriter.send")
        knots = _parse_plan(list(plan) if plan is not None else None, "ControlWriter.send")
        rec: dict[str, Any] = {
            "decided_at_step": int(decided_at_step),
            "lr": lr,
            "plan": [list(k) for k in knots] if knots else None,
        }
        if at_step is not None:
            rec["at_step"] = int(at_step)
        if replays_seq is not None:
            rec["replays_seq"] = int(replays_seq)
        return self._append(rec)

    def probe(self, at_step: int, lrs: Sequence[float], steps: int, after_batches: int, sweep: bool = False) -> int:
        """Ask the trainer, waiting at decision point `at_step`, for a lookahead probe: `steps` updates at each
        LR from its current state, then `after_batches` forward-only batches, state restored after each branch;
        with `sweep`, lrs = [lo, hi] and one LR range test branch instead (lrpilot.lr.sweep_lrs). The trainer
        answers with a `probe` telemetry event and keeps waiting for the decision. Returns the seq."""
        lrs = [_positive_lr(x, "ControlWriter.probe") for x in lrs]
        req: dict[str, Any] = {
            "at_step": int(at_step),
            "lrs": lrs,
            "steps": int(steps),
            "after_batches": int(after_batches),
        }
        if sweep:
            req["sweep"] = True
        return self._append({"probe": req})

    def stop(self) -> int:
        """Ask the trainer to checkpoint and exit 0; returns the seq."""
        return self._append({"stop": True})

    def close(self) -> None:
        self._log.close()


class TelemetryReader:
    """Follows RUN/telemetry.jsonl: `poll()` returns the events appended since the last call."""

    def __init__(self, run_dir: str | Path, offset: int = 0) -> None:
        self.path = Path(run_dir) / TELEMETRY_FILE
        self._follower = JsonlFollower(self.path, offset=offset)

    @property
    def offset(self) -> int:
        """Bytes of complete lines consumed so far (a reader started at this offset sees only later events)."""
        return self._follower.offset - len(self._follower._buf)

    def poll(self) -> list[dict[str, Any]]:
        return self._follower.poll()
