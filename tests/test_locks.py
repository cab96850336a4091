"""One writer per run directory (lrpilot.locks): a second `baseline` / `train` process on the same run is refused
in one line that names the holder, runs of other peaks under one --out go on in parallel, and a lock left by a
process that died is taken over with a note. Real processes, synchronised on the lock file and telemetry.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from waiting import wait_until

from lrpilot.locks import DirInUseError, DirLock, holder_alive, holder_line
from lrpilot.logs import read_jsonl

SMOKE = ["--set", "train.total_steps=40"]


def _lrpilot(*args: str) -> list[str]:
    return [sys.executable, "-m", "lrpilot", *args]


def _holding(p: subprocess.Popen, run_dir: Path) -> None:
    """Wait until process p's trainer has started in run_dir, then freeze p (SIGSTOP), so the run is certainly
    in progress while a second process tries it."""

    def ready() -> bool:
        assert p.poll() is None, p.communicate()[1][-2000:]
        tele = run_dir / "telemetry.jsonl"
        return tele.exists() and tele.stat().st_size > 0

    wait_until(ready, 180, f"the trainer of pid {p.pid} started in {run_dir}")
    os.kill(p.pid, signal.SIGSTOP)


def _check_clean_run(run_dir: Path, result: Path, decision_points: int) -> None:
    """The first process's run is intact: one launch, each control seq and each decision once, no crash."""
    tele = read_jsonl(run_dir / "telemetry.jsonl", strict=True)
    assert [e["event"] for e in tele].count("start") == 1
    seqs = [c["seq"] for c in read_jsonl(run_dir / "control.jsonl", strict=True)]
    assert seqs == list(range(len(seqs)))
    decisions = read_jsonl(run_dir / "decisions.jsonl", strict=True)
    assert len(decisions) == decision_points and len({d["seq"] for d in decisions}) == decision_points
    assert not (run_dir / "rollbacks.jsonl").exists()
    rec = json.loads(result.read_text())
    assert rec["status"] == "ok" and rec["crash_count"] == 0 and rec["update_step"] == 40


@pytest.mark.slow
@pytest.mark.parametrize("command", ["baseline", "train"])
def test_second_process_on_the_same_run_is_refused_in_one_line(tmp_path, command):
    out = tmp_path / "out"
    where = ["--peaks", "3e-3", "--out", str(out)] if command == "baseline" else ["--peak", "3e-3", "--dir", str(out)]
    args = [command, "--preset", "cpu-smoke", *SMOKE, *where]
    run_dir = out / "runs" / "cosine_lr3e-3"
    first = subprocess.Popen(_lrpilot(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _holding(first, run_dir)
        second = subprocess.run(_lrpilot(*args), capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.count("\n") == 1, second.stderr
    line = second.stderr.strip()
    assert line.startswith("lrpilot: error: ") and f"{run_dir} is in use by another run" in line
    assert f"pid {first.pid} on {socket.gethostname()}" in line and f"lrpilot {command}" in line
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    _check_clean_run(run_dir, out / "cosine_lr3e-3.json", decision_points=3)


@pytest.mark.slow
def test_runs_of_different_peaks_under_one_out_go_on_together(tmp_path):
    out = tmp_path / "sweep"
    base = ["baseline", "--preset", "cpu-smoke", *SMOKE, "--out", str(out)]
    first = subprocess.Popen(_lrpilot(*base, "--peaks", "3e-3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        _holding(first, out / "runs" / "cosine_lr3e-3")
        # the other peak runs start to finish while the first process is frozen mid-run
        other = subprocess.run(_lrpilot(*base, "--peaks", "1e-3"), capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert other.returncode == 0, other.stderr[-2000:]
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    for peak in ("1e-3", "3e-3"):
        _check_clean_run(out / "runs" / f"cosine_lr{peak}", out / f"cosine_lr{peak}.json", decision_points=3)


_HOLD = (
    "import sys\nfrom pathlib import Path\nfrom lrpilot.locks import DirLock\n"
    "with DirLock(Path(sys.argv[1])):\n    print('locked', flush=True)\n    sys.stdin.read()\n"
)


def test_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    d = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(d)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DirInUseError, match=rf"in use by another run \(pid {holder.pid} on "), DirLock(d):
            pass
    finally:
        holder.kill()  # dies holding it: the kernel drops the lock, its line stays
        holder.wait(timeout=30)
    assert f"pid {holder.pid} " in (d / "run.lock").read_text()
    notes: list[str] = []
    with DirLock(d, note=notes.append):
        assert f"pid {os.getpid()} " in (d / "run.lock").read_text()
    assert len(notes) == 1 and f"pid {holder.pid} " in notes[0] and "taking it over" in notes[0]
    assert (d / "run.lock").read_text() == ""  # a clean release leaves no stale line
    with DirLock(d, note=notes.append):
        pass
    assert len(notes) == 1


def test_lock_is_reentrant_for_its_thread_and_refuses_other_threads(tmp_path):
    d = tmp_path / "run"
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with DirLock(d):
                pass
        except BaseException as e:  # noqa: BLE001 - checked below
            errors.append(e)

    with DirLock(d):
        with DirLock(d):  # run_one holds it and run_round takes it again
            pass
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(errors) == 1 and isinstance(errors[0], DirInUseError)
        assert "another thread of this process" in str(errors[0])
    errors.clear()
    other()
    assert not errors


def test_holder_alive_reads_the_lock_line_without_taking_the_lock(tmp_path):
    lock = tmp_path / "run.lock"
    assert holder_alive(lock) is None  # no lock file: cannot tell
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    me = f"pid {os.getpid()} "
    host = socket.gethostname()
    cases = {
        "": False,  # a clean release
        "\n": False,
        holder_line().replace(me, f"pid {dead.pid} ", 1): False,  # a holder that died
        holder_line(): True,
        holder_line().replace(f" on {host} ", f" on not-{host} ", 1): None,  # another host's pid
        holder_line().replace(me, "pid 0 ", 1): None,
        "garbage that names no holder\n": None,
    }
    for text, alive in cases.items():
        lock.write_text(text)
        assert holder_alive(lock) is alive, text
    with DirLock(tmp_path):
        assert holder_alive(lock) is True
    assert holder_alive(lock) is False
