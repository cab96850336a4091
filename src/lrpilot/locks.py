"""One writer per directory: an exclusive, non-blocking lock on a file in it that names its holder.

    python -m pytest -q tests/test_locks.py

`DirLock(DIR, NAME)` holds an fcntl lock on DIR/NAME for a `with` block (campaign.lock for a campaign, run.lock
for a run directory). The kernel releases it when the holder dies, so a lock can never be left held; the file
keeps one line, `pid N on HOST since ISO: COMMAND`, which a second process quotes in its refusal. A clean
release empties the file; a line left by a holder that died is noted on stderr when the next process takes
the lock over; `holder_alive` reads that line without taking the lock (`lrpilot status`: a run whose holder is
gone has stopped). Within one process the lock is re-entrant for the thread that holds it (run_one holds a
run's lock and run_round takes it again) and refuses every other thread, as it refuses other processes.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from lrpilot.errors import LrpilotError, writing
from lrpilot.logs import charge_write, now_iso

RUN_LOCK = "run.lock"


class DirInUseError(LrpilotError, RuntimeError):
    """Another process (or thread) holds the directory's lock; the message names the holder."""


def _command() -> str:
    """This process's command line, as a user typed it (`lrpilot baseline ...`), at most 200 characters."""
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py") and Path(argv[0]).parent.name == "lrpilot":
        argv[0] = "lrpilot"
    elif argv:
        argv[0] = Path(argv[0]).name
    cmd = " ".join(argv) or "python"
    return cmd if len(cmd) <= 200 else cmd[:197] + "..."


def holder_line() -> str:
    """What a lock file says about its holder: pid, host, start time and command."""
    return f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()}: {_command()}"


_HOLDER = re.compile(r"pid (\d+) on (\S+) since ")


def holder_alive(path: str | Path) -> bool | None:
    """Whether the holder a lock file names is alive, from its text alone (never taking the lock, which could
    refuse a run starting at that moment). False: the file is empty (a clean release, Ctrl-C included) or names
    a pid on this host that no longer exists (a holder that died). True: it names a live pid on this host.
    None, when it cannot tell: no file, unreadable, another host's pid, a line it cannot parse."""
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text:
        return False
    m = _HOLDER.match(text)
    if m is None or m.group(2) != socket.gethostname() or int(m.group(1)) <= 0:
        return None
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    except (OSError, OverflowError):  # a pid out of range
        return None
    return True


def _note(text: str) -> None:
    print(f"lrpilot: note: {text}", file=sys.stderr, flush=True)


class DirLock:
    """An exclusive, non-blocking lock on DIR/NAME; refused (DirInUseError, or `error`) while another process or
    thread holds it; released at the end of the `with` block or when the process dies."""

    _guard = threading.Lock()
    #: locks held by this process: resolved lock path -> [owning thread ident, depth, open file]
    _held: dict[str, list[Any]] = {}

    def __init__(
        self,
        directory: str | Path,
        name: str = RUN_LOCK,
        *,
        what: str = "another run",
        hint: str = "wait for it to finish or use another directory",
        error: type[Exception] = DirInUseError,
        note: Callable[[str], None] = _note,
    ) -> None:
        self.path = Path(directory) / name
        self.what, self.hint, self.error, self.note = what, hint, error, note

    def _refuse(self, holder: str) -> Exception:
        return self.error(f"{self.path.parent} is in use by {self.what} ({holder}); {self.hint}")

    def __enter__(self) -> DirLock:
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        me = threading.get_ident()
        with DirLock._guard:
            held = DirLock._held.get(key)
            if held is not None:
                if held[0] != me:
                    raise self._refuse(f"another thread of this process, pid {os.getpid()}")
                held[1] += 1
                return self
            with writing(self.path):
                f: IO[str] = open(self.path, "a+")  # noqa: SIM115 - held until __exit__
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise self._refuse(holder) from None
            f.seek(0)
            stale = f.read().strip()
            try:
                with writing(self.path):
                    line = holder_line() + "\n"
                    charge_write(len(line), self.path)
                    f.seek(0)
                    f.truncate()
                    f.write(line)
                    f.flush()
            except BaseException:
                f.close()
                raise
            DirLock._held[key] = [me, 1, f]
        if stale:
            self.note(f"{self.path} was left by a process that is gone ({stale}); taking it over")
        return self

    def __exit__(self, *exc: object) -> None:
        key = str(self.path.resolve())
        with DirLock._guard:
            held = DirLock._held.get(key)
            if held is None:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del DirLock._held[key]
            f = held[2]
            try:
                f.seek(0)
                f.truncate()  # a clean release: the next holder finds no stale line
            except OSError:
                pass
            f.close()
