"""The trainer launch under supervision: one launch at a time (lrpilot.launcher starts and kills its process
group), the launch count over the run, which telemetry lines belong to the live launch, how it ended (exit code)
and whether it hangs (guard.is_hung). The round (lrpilot.supervisor) decides when to launch and kill.

    python -m pytest -q tests/test_supervision.py -k process
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from lrpilot import guard
from lrpilot.config import RunConfig
from lrpilot.launcher import kill_launch, start_launch, trainer_command
from lrpilot.supervision import SupervisorError

#: crash reason for a trainer that wrote no telemetry for guard.hang_timeout_s
HANG = "hang"


class Crash(Exception):
    """The current launch crashed (reason is a crash code, detail its words)."""

    def __init__(self, reason: str, detail: str = "", step: int | None = None) -> None:
        super().__init__(reason)
        #: the step of the bad telemetry line; None = the last step the launch reported
        self.reason, self.detail, self.step = reason, detail, step


def sigterm_as_exit() -> Any:
    """SIGTERM becomes SystemExit(143) while the round runs, so its finally clause kills the trainer's group
    (it has its own session and would otherwise outlive us). Main thread only, and only when nobody else
    handles SIGTERM. Returns the handler to put back (None: nothing was installed)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def _raise(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, _raise)


class TrainerProcess:
    """The trainer launches of one run: the live one (its process group, token and rank-0 pid), the launch
    counts (over the run and in this supervisor session), the step it started from and when it was last heard
    from (time.monotonic() seconds), for the hang check."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        *,
        trainer_args: Sequence[str] = (),
        first_launch_args: Sequence[str] = (),
        blocking: bool = True,
        launches: int = 0,
    ) -> None:
        self.cfg, self.g, self.run_dir = cfg, cfg.guard, Path(run_dir)
        self.trainer_args = list(trainer_args)
        self.first_launch_args = list(first_launch_args)
        self.blocking = blocking
        self.popen: subprocess.Popen | None = None
        self.launches = launches  # over the whole run (across supervisor sessions)
        self.session_launches = 0
        self.token = ""  # LRPILOT_LAUNCH of the live launch
        self.pid: int | None = None  # rank-0 trainer pid, from its start event
        self.stepped = False  # the live launch reported its first step (until then start_timeout_s applies)
        self.phase: str | None = None  # a slow phase the trainer announced, until its next line
        self.dead_pids: set[int] = set()  # rank-0 pids of launches already ended
        self.start_step = 0  # the step the live launch started from
        self.last_seen = time.monotonic()

    # ------------------------------------------------------------------------------- launch and kill

    def launch(
        self,
        resume: Path | None,
        lr: float | None,
        start_step: int,
        min_seq: int,
        log: IO[bytes],
        note: Callable[[str], Any],
    ) -> list[str]:
        """Start a launch (after the previous one ended) from the checkpoint `resume` (None: from scratch) with
        --lr `lr` (None: the config's); its output goes to `log`, its command line to note(). Returns it."""
        extra = list(self.trainer_args)
        if self.session_launches == 0:
            extra += self.first_launch_args
        cmd, env = trainer_command(
            self.cfg, self.run_dir, resume=resume, lr=lr, min_seq=min_seq, wait_for_decisions=self.blocking,
            extra_args=extra,
        )  # fmt: skip
        self.launches += 1
        self.session_launches += 1
        if self.pid is not None:
            self.dead_pids.add(self.pid)
        self.pid = None
        self.stepped, self.phase = False, None
        self.token = f"{os.getpid()}-{self.launches}-{time.time_ns()}"
        self.start_step = start_step
        note(f"launch {self.launches}: {' '.join(cmd)}")
        self.popen = start_launch(cmd, env, self.token, log)
        self.last_seen = time.monotonic()
        return cmd

    def kill(self) -> None:
        """Kill every process of the live launch (lrpilot.launcher.kill_launch)."""
        assert self.popen is not None
        kill_launch(self.popen, self.token)

    def stop(self) -> None:
        """At the end of the round: kill the launch if it runs, else its stragglers (an exited launcher)."""
        if self.popen is not None and self.popen.poll() is None:
            kill_launch(self.popen, self.token)
        elif self.popen is not None:
            kill_launch(self.popen, self.token, timeout=5.0)

    def poll(self) -> int | None:
        """The live launch's exit code, None while it runs."""
        assert self.popen is not None
        return self.popen.poll()

    # ------------------------------------------------------------------------------- telemetry

    def follows(self, ev: dict[str, Any]) -> bool:
        """Whether the telemetry line `ev` is the live launch's (its start event names its rank-0 pid); a line
        of a dead launch, or from before this launch's start, is not. A line that is counts as a sign of life
        and ends an announced slow phase (or starts one: a `phase` event)."""
        kind, launch = ev.get("event"), ev.get("launch")
        if kind == "start" and self.pid is None and launch not in self.dead_pids:
            self.pid = launch
        elif self.pid is None or launch != self.pid:
            return False
        self.last_seen = time.monotonic()
        self.phase = str(ev.get("phase")) if kind == "phase" else None
        return True

    # ------------------------------------------------------------------------------- how it ended

    def trainer_error(self) -> str:
        """The trainer's own one-line error: the last non-supervisor line of trainer.log."""
        try:
            lines = (self.run_dir / "trainer.log").read_text(errors="replace").splitlines()
        except OSError:
            return "see trainer.log"
        mine = [ln for ln in lines if ln.strip() and not ln.startswith("[supervisor")]
        return mine[-1].strip() if mine else f"see {self.run_dir / 'trainer.log'}"

    def exit_error(self, rc: int, note: Callable[[str], Any]) -> Exception:
        """What a launch that exited `rc` without its done event is (not exit code 3, the disk's): a Crash, or
        for exit code 2 (the trainer refused its config, data, flags or checkpoint) a SupervisorError."""
        if rc < 0:
            return Crash(
                f"signal_{signal.Signals(-rc).name}" if -rc in signal.valid_signals() else f"exit_code_{rc}",
                f"trainer killed by signal {-rc}",
            )
        if rc == 0:
            return Crash("exit_without_done", "trainer exited 0 without a done event")
        if rc == 2:
            # the trainer rejected its config, data, flags or checkpoint (a usage error): retrying at
            # half the LR cannot help, and counting it as a crash would store a diverged run
            note(f"trainer exited 2 (usage error): {self.trainer_error()}")
            return SupervisorError(f"trainer refused to start: {self.trainer_error()}")
        return Crash(f"exit_code_{rc}", f"trainer exited with code {rc}")

    def hung(self) -> bool:
        """No telemetry for too long: guard.hang_timeout_s, or start_timeout_s until the launch's first step
        (compiling it may take long) and in an announced slow phase (eval, checkpoint)."""
        started = self.pid is not None and self.stepped and self.phase is None
        return guard.is_hung(time.monotonic() - self.last_seen, self.g, started=started)

    def hang(self) -> Crash:
        """The crash of a hung launch, naming the limit it ran past."""
        limit = f"hang_timeout_s={self.g.hang_timeout_s:g}"
        if self.pid is None:
            limit = f"no start event yet; start_timeout_s={self.g.start_timeout_s:g}"
        elif not self.stepped:
            limit = f"no first step yet; start_timeout_s={self.g.start_timeout_s:g}"
        elif self.phase is not None:
            limit = f"in phase {self.phase}; start_timeout_s={self.g.start_timeout_s:g}"
        return Crash(HANG, f"no telemetry for {time.monotonic() - self.last_seen:.1f}s ({limit})")


__all__ = ["HANG", "Crash", "TrainerProcess", "sigterm_as_exit"]
