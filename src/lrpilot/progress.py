"""What each run is doing, read from its logs only: live progress for long commands and `lrpilot status`.

    lrpilot status runs/demo            # every run under the directory: state, step, loss, LR, decision, ETA
    lrpilot status runs/demo --watch    # the same, refreshed

A run directory (an agent round, a baseline run, a bench run) is any directory holding `round.json` or
`telemetry.jsonl` (docs/architecture.md). `RunWatch` tails its files incrementally: the trainer's
`telemetry.jsonl` (step, loss, LR, start/done), the supervisor's `decisions_sent.jsonl` (each decision as it
is sent: kind, new LR, reasoning), the rollback log named in `round.json` (`logs.rollbacks`; older run dirs:
`RUN/rollbacks.jsonl` or the campaign's `DIR/rollbacks.jsonl`) and `result.json`. Nothing here imports torch
or changes a run: it only reads.

`LiveProgress` shows the runs under some directories while a command works: on a terminal one tqdm bar per
running run (label, step / total, loss, LR, last decision, ETA); elsewhere (a pipe, CI, a log file) one line
per event that matters (a run starts, a decision point, a rollback, a run ends). Lines the command prints go
through `LiveProgress.write` so they do not tear the bars.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from lrpilot.locks import RUN_LOCK, holder_alive
from lrpilot.logs import JsonlFollower, as_float, finite_mean
from lrpilot.records import NO_LR_KINDS, Kind

#: how deep under a directory run directories are looked for: the deepest layout is a bench's, 5 levels
#: (BENCH/runs/<method>/seed<S>/rounds/round_001 for a campaign method, replay_<name>_<hash> included, and
#: BENCH/runs/<method>/seed<S>/runs/<run> for a sweep or single run); DIR/rounds/round_001,
#: OUT/runs/cosine_lr1e-3 and DEMO/campaign/rounds/round_001 are shallower
MAX_DEPTH = 5
#: a run whose telemetry is older than this (and that has no result) is reported as stopped, unless its
#: config's guard.hang_timeout_s is longer; one whose run.lock names no live holder is stopped at once
STALE_S = 120.0
#: a run.lock that names no live holder means stopped once it has been unchanged this long (seconds)
LOCK_GRACE_S = 5.0
#: characters of a decision's reasoning shown on a bar / in a line
REASON_CHARS = 60


def is_run_dir(path: Path) -> bool:
    """round.json or telemetry.jsonl (a run that started), or pilot.json (a `campaign --script` round whose script
    has not built its Pilot yet)."""
    return any((path / name).is_file() for name in ("round.json", "telemetry.jsonl", "pilot.json"))


def find_runs(root: str | Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Run directories at or under root (sorted by path; a run directory's own subdirectories are not searched)."""
    root = Path(root)
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        if is_run_dir(d):
            found.append(d)
            return
        if depth >= max_depth:
            return
        with contextlib.suppress(OSError):
            for child in sorted(p for p in d.iterdir() if p.is_dir() and p.name != "checkpoints"):
                walk(child, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return found


def run_label(run_dir: Path) -> str:
    """'round 3' for a campaign round (DIR/rounds/round_003), else the directory's name (cosine_lr1e-3)."""
    name = run_dir.name
    if run_dir.parent.name == "rounds" and name.startswith("round_") and name[6:].isdigit():
        return f"round {int(name[6:])}"
    return name


def _place(s: RunStatus, root: Path) -> str:
    """'rules/round 1': the run's label after the folder that holds it (a round's campaign, a sweep run's --out),
    relative to root."""
    run_dir = Path(s.run_dir)
    holder = run_dir.parent.parent if run_dir.parent.name in ("rounds", "runs") else run_dir.parent
    try:
        where = holder.relative_to(root).as_posix()
    except ValueError:
        where = holder.as_posix()
    return s.label if where in ("", ".") else f"{where}/{s.label}"


def fmt_duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m; '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _short(text: str, n: int = REASON_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


@dataclass(frozen=True)
class RunStatus:
    """One run as its logs show it. state: pending | running | finishing | stopped | finished | failed."""

    label: str
    run_dir: str
    state: str
    step: int
    total_steps: int
    #: mean loss of the last decision interval (the last step's loss before the first decision point)
    loss: float
    #: LR of the last update
    lr: float
    #: the last decision: its kind (decision, emergency, fallback, ...), the LR it set, its step and reason
    decision_kind: str
    decision_lr: float
    decision_step: int | None
    reason: str
    rollbacks: int
    #: seconds to the end at the current launch's speed (NaN when unknown or not running)
    eta_s: float
    final_ppl: float
    #: unix time of the last telemetry line (NaN before the first)
    last_seen: float

    def decision_text(self) -> str:
        if not self.decision_kind:
            return "no decision yet"
        return f"{self.decision_kind} {self.decision_lr:.2e} @ {self.decision_step}"

    def line(self, reason_chars: int = REASON_CHARS) -> str:
        """One line: label, state, step/total, loss, LR, last decision (reason), rollbacks, ETA or final ppl."""
        parts = [f"{self.label:<14} {self.state:<9} step {self.step:>{len(str(self.total_steps))}}/{self.total_steps}"]
        if math.isfinite(self.loss):
            parts.append(f"loss {self.loss:.3f}")
        if math.isfinite(self.lr):
            parts.append(f"lr {self.lr:.2e}")
        parts.append(self.decision_text() + (f" ({_short(self.reason, reason_chars)})" if self.reason else ""))
        parts.append(f"rollbacks {self.rollbacks}")
        if self.state in ("finished", "failed") and math.isfinite(self.final_ppl):
            parts.append(f"ppl {self.final_ppl:.3f}")
        elif self.state == "running":
            parts.append(f"ETA {fmt_duration(self.eta_s)}")
        return "  ".join(parts)


class RunWatch:
    """Tails one run directory's logs; `poll()` reads what was appended and returns the new notable events
    (start, decision, rollback, end), `status()` says where the run is."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.label = run_label(self.run_dir)
        self._telemetry = JsonlFollower(self.run_dir / "telemetry.jsonl")
        self._sent = JsonlFollower(self.run_dir / "decisions_sent.jsonl")
        self._pilot_checked = False
        self._rollbacks: JsonlFollower | None = None
        self.run_start_iso = ""
        self.total_steps = 0
        self.stale_s = STALE_S
        self.step = 0
        self.step_loss = math.nan
        self.interval_loss = math.nan
        self.lr = math.nan
        self.last_seen = math.nan
        self.done = False
        self.started = False
        self.last_decision: dict[str, Any] | None = None
        self.rollbacks = 0
        self.result: dict[str, Any] | None = None
        # speed of the current launch: (time, step) of its first and latest step events
        self._rate_from: tuple[float, int] | None = None
        self._rate_to: tuple[float, int] | None = None

    def _read_settings(self) -> None:
        if not self.total_steps:
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, KeyError):
                cfg = json.loads((self.run_dir / "config.json").read_text())
                self.total_steps = int(cfg["train"]["total_steps"])
                self.stale_s = max(STALE_S, float(cfg.get("guard", {}).get("hang_timeout_s", STALE_S)))
        # a Pilot's run has no config.json (or another program's, e.g. HF's model config): its round.json says, or
        # before the script built its Pilot, the pilot.json `campaign --script` wrote
        for name in ("round.json", "pilot.json"):
            if not self.total_steps:
                with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, KeyError):
                    self.total_steps = int(json.loads((self.run_dir / name).read_text())["total_steps"])
        if not self._pilot_checked:  # a Pilot logs each decision once, in RUN/decisions.jsonl (no decisions_sent)
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                rnd = json.loads((self.run_dir / "round.json").read_text())
                self._pilot_checked = True
                if rnd.get("source") == "pilot" and not (self.run_dir / "decisions_sent.jsonl").exists():
                    self._sent = JsonlFollower(self.run_dir / "decisions.jsonl")
                    hang = as_float((rnd.get("guard") or {}).get("hang_timeout_s"))
                    self.stale_s = max(self.stale_s, hang) if math.isfinite(hang) else self.stale_s
        if self._rollbacks is None:
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                rnd = json.loads((self.run_dir / "round.json").read_text())
                self.run_start_iso = str(rnd.get("run_start_iso", ""))
                named = (rnd.get("logs") or {}).get("rollbacks")
                candidates = [Path(named)] if named else []
                candidates += [self.run_dir / "rollbacks.jsonl", self.run_dir.parent.parent / "rollbacks.jsonl"]
                path = next((p for p in candidates if p.is_file()), candidates[0])
                if self.run_start_iso:
                    self._rollbacks = JsonlFollower(path)

    def poll(self) -> list[dict[str, Any]]:
        """Read what the run's logs gained since the last call. Returns notable events, in order of kind:
        {"kind": "start" | "decision" | "rollback" | "end", ...the record}."""
        self._read_settings()
        out: list[dict[str, Any]] = []
        for ev in self._telemetry.poll():
            kind, t = ev.get("event"), as_float(ev.get("time"))
            if math.isfinite(t):
                self.last_seen = t
            step = ev.get("step")
            if isinstance(step, int) and not isinstance(step, bool):
                self.step = step
            if kind == "start":
                self._rate_from = self._rate_to = None
                self.done = False
                if not self.started:
                    out.append({"kind": "start", **ev})
                self.started = True
            elif kind == "step":
                self.step_loss = as_float(ev.get("loss"))
                lr = as_float(ev.get("lr"))
                self.lr = lr if math.isfinite(lr) else self.lr
                if self._rate_from is None:
                    self._rate_from = (t, self.step)
                self._rate_to = (t, self.step)
            elif kind == "observe":
                losses = ev.get("losses")
                mean = finite_mean([as_float(x) for x in losses]) if isinstance(losses, list) else math.nan
                self.interval_loss = mean if math.isfinite(mean) else self.interval_loss
            elif kind == "done":
                self.done = True
        for rec in self._sent.poll():
            if rec.get("kind") in NO_LR_KINDS:  # a Pilot's log: answers that set no LR (superseded, unanswered)
                continue
            self.last_decision = rec
            self.rollbacks += rec.get("kind") == Kind.AGENT_ROLLBACK  # the agent's own rollbacks count too
            out.append({"kind": "decision", **rec})
        if self._rollbacks is not None:
            for rec in self._rollbacks.poll():
                if rec.get("run_start_iso") == self.run_start_iso:
                    self.rollbacks += 1
                    out.append({"kind": "rollback", **rec})
        if self.result is None and (self.run_dir / "result.json").is_file():
            with contextlib.suppress(OSError, ValueError):
                self.result = json.loads((self.run_dir / "result.json").read_text())
                out.append({"kind": "end", **self.result})
        return out

    def eta_s(self) -> float:
        """Seconds to total_steps at the current launch's speed (NaN before two step events)."""
        if self._rate_from is None or self._rate_to is None or not self.total_steps:
            return math.nan
        (t0, s0), (t1, s1) = self._rate_from, self._rate_to
        if s1 <= s0 or not (math.isfinite(t0) and math.isfinite(t1)) or t1 <= t0:
            return math.nan
        return (self.total_steps - s1) * (t1 - t0) / (s1 - s0)

    def _holder_gone(self, now: float) -> bool:
        lock = self.run_dir / RUN_LOCK
        try:
            quiet = now - lock.stat().st_mtime >= LOCK_GRACE_S
        except OSError:
            return False  # no run.lock (a Pilot's run): the staleness rule decides
        return quiet and holder_alive(lock) is False

    def state(self, now: float | None = None) -> str:
        if self.result is not None:
            return "finished" if self.result.get("status") == "ok" else "failed"
        now = time.time() if now is None else now
        # its supervisor released run.lock (Ctrl-C) or died, LOCK_GRACE_S ago or more (a lock being taken is
        # empty for an instant); read before result.json, which is written first
        if self._holder_gone(now) and not (self.run_dir / "result.json").is_file():
            return "stopped"
        if not self.started:
            return "pending"
        if self.done:
            return "finishing"
        return "stopped" if math.isfinite(self.last_seen) and now - self.last_seen > self.stale_s else "running"

    def status(self, now: float | None = None) -> RunStatus:
        d = self.last_decision or {}
        res = self.result or {}
        state = self.state(now)
        step = int(res.get("update_step") or self.step) if self.result is not None else self.step
        return RunStatus(
            label=self.label,
            run_dir=str(self.run_dir),
            state=state,
            step=step,
            total_steps=self.total_steps,
            loss=self.interval_loss if math.isfinite(self.interval_loss) else self.step_loss,
            lr=self.lr,
            decision_kind=str(d.get("kind", "")),
            decision_lr=as_float(d.get("new_lr")),
            decision_step=d.get("step") if isinstance(d.get("step"), int) else None,
            reason=str(d.get("reasoning", "")),
            rollbacks=self.rollbacks,
            eta_s=self.eta_s() if state == "running" else math.nan,
            final_ppl=as_float(res.get("final_eval_ppl")),
            last_seen=self.last_seen,
        )


class DirWatch:
    """Every run directory under some roots (found again on each poll, so runs that start later appear)."""

    def __init__(self, roots: Iterable[str | Path]) -> None:
        self.roots = [Path(r) for r in roots]
        self.runs: dict[Path, RunWatch] = {}

    def poll(self) -> list[tuple[RunWatch, dict[str, Any]]]:
        """New notable events of every run; a run that had already ended when it was first seen (a resumed
        campaign's earlier rounds, a sweep's finished peaks) is listed in statuses() but brings no events."""
        events = []
        for root in self.roots:
            for run_dir in find_runs(root):
                if run_dir not in self.runs:
                    watch = self.runs[run_dir] = RunWatch(run_dir)
                    if (run_dir / "result.json").is_file():
                        watch.poll()  # read its history silently
        for watch in self.runs.values():
            events += [(watch, ev) for ev in watch.poll()]
        return events

    def statuses(self, now: float | None = None) -> list[RunStatus]:
        return [w.status(now) for w in self.runs.values()]


def event_line(watch: RunWatch, ev: dict[str, Any]) -> str:
    """The line a non-terminal progress display prints for a notable event."""
    s = watch.status()
    total = s.total_steps or "?"
    kind = ev["kind"]
    if kind == "start":
        return f"[{s.label}] started ({total} steps)"
    if kind == "decision":
        loss = as_float(ev.get("loss"))
        return (
            f"[{s.label}] step {ev.get('step')}/{total}  loss {loss:.3f}  lr {as_float(ev.get('old_lr')):.2e} -> "
            f"{as_float(ev.get('new_lr')):.2e}  {ev.get('kind', 'decision')}: {_short(ev.get('reasoning', ''))}  "
            f"ETA {fmt_duration(s.eta_s)}"
        )
    if kind == "rollback":
        to = ev.get("rolled_back_to_step")
        where = f"rolled back to step {to}, lr {as_float(ev.get('new_lr')):.2e}" if to is not None else "gave up"
        wait = as_float(ev.get("backoff_s"))
        more = f", back-off {wait:g}s" if math.isfinite(wait) and wait > 0 else ""
        return f"[{s.label}] crash at step {ev.get('crash_step')} ({ev.get('crash_reason')}): {where}{more}"
    status = ev.get("status", "?")
    if status == "pruned":  # campaign --prune: its ppl is an intermediate eval's
        return (
            f"[{s.label}] pruned at step {ev.get('pruned_at_step')} ({ev.get('steps_saved')} steps saved): "
            f"eval ppl {as_float(ev.get('final_eval_ppl')):.3f}"
        )
    return f"[{s.label}] {'finished' if status == 'ok' else status}: ppl {as_float(ev.get('final_eval_ppl')):.3f}"


def status_table(statuses: Sequence[RunStatus], root: Path | None = None) -> str:
    """`lrpilot status` output: one line per run and a count per state. Runs that share a label (round 1 of
    two campaigns under `root`) are told apart by the folder, relative to `root`, that holds them."""
    if not statuses:
        return "no runs yet"
    seen: dict[str, int] = {}
    for s in statuses:
        seen[s.label] = seen.get(s.label, 0) + 1
    if root is not None:
        statuses = [dataclasses.replace(s, label=_place(s, root)) if seen[s.label] > 1 else s for s in statuses]
    lines = [s.line() for s in statuses]
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()))
    return "\n".join(lines)


class LiveProgress:
    """Shows the runs under `roots` while a command works (a context manager; a daemon thread polls the logs
    every interval_s seconds). stream: default stdout, where the command's own lines go; tty=None asks it."""

    def __init__(
        self,
        roots: Iterable[str | Path],
        stream: TextIO | None = None,
        interval_s: float = 1.0,
        tty: bool | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.watch = DirWatch(roots)
        self.interval_s = interval_s
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bars: dict[Path, Any] = {}

    def write(self, text: str) -> None:
        """Print lines without tearing the live bars (use it for whatever the command prints meanwhile)."""
        with self._lock:
            if self.tty and self._bars:
                from tqdm import tqdm

                for ln in str(text).splitlines() or [""]:
                    tqdm.write(ln, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)

    def refresh(self) -> None:
        """One poll: lines for new events (not a terminal) or updated bars (a terminal)."""
        with self._lock:
            events = self.watch.poll()
            if not self.tty:
                for watch, ev in events:
                    print(event_line(watch, ev), file=self.stream, flush=True)
                return
            for watch, ev in events:  # rollbacks and ends are worth a line of their own on a terminal too
                if ev["kind"] in ("rollback", "end"):
                    self._close_bar(watch.run_dir)
                    self.write(event_line(watch, ev))
            for watch in self.watch.runs.values():
                self._update_bar(watch)

    def _update_bar(self, watch: RunWatch) -> None:
        s = watch.status()
        if s.state not in ("pending", "running", "finishing", "stopped"):  # pending: shown while it starts
            self._close_bar(watch.run_dir)
            return
        from tqdm import tqdm

        bar = self._bars.get(watch.run_dir)
        if bar is None:
            bar = tqdm(
                total=s.total_steps or None,
                desc=f"{s.label:<14}",
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
                bar_format="{desc} {bar:16} {n_fmt}/{total_fmt}{postfix}",
            )
            self._bars[watch.run_dir] = bar
        bar.n = s.step
        tail = (
            f"ETA {fmt_duration(s.eta_s)}" if s.state == "running" else "starting" if s.state == "pending" else s.state
        )
        loss = f"loss {s.loss:.3f}  " if math.isfinite(s.loss) else ""
        lr = f"lr {s.lr:.2e}  " if math.isfinite(s.lr) else ""
        bar.set_postfix_str(f"{loss}{lr}{s.decision_text()}  {tail}", refresh=False)
        bar.refresh()

    def _close_bar(self, run_dir: Path) -> None:
        bar = self._bars.pop(run_dir, None)
        if bar is not None:
            bar.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):  # a display problem must never stop the command
                self.refresh()

    def __enter__(self) -> LiveProgress:
        self._thread = threading.Thread(target=self._loop, name="lrpilot-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(Exception):
            self.refresh()
        with self._lock:
            for run_dir in list(self._bars):
                self._close_bar(run_dir)


__all__ = [
    "DirWatch",
    "LiveProgress",
    "RunStatus",
    "RunWatch",
    "event_line",
    "find_runs",
    "fmt_duration",
    "run_label",
    "status_table",
]
