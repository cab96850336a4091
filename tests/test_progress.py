"""Live progress and `lrpilot status`, on real cpu-smoke run directories (real trainer subprocesses).

python -m pytest -q tests/test_progress.py
"""

from __future__ import annotations

import io
import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from waiting import wait_until

from lrpilot.cli import main
from lrpilot.config import load_config
from lrpilot.controllers.base import Decision, Observation
from lrpilot.controllers.schedules import ConstantController
from lrpilot.locks import DirLock
from lrpilot.progress import (
    LOCK_GRACE_S,
    DirWatch,
    LiveProgress,
    RunWatch,
    find_runs,
    fmt_duration,
    run_label,
    status_table,
)
from lrpilot.supervisor import RoundLogs, run_round


def smoke(*overrides: str):
    return load_config("cpu-smoke", list(overrides))


def logs_in(d: Path, r: int) -> RoundLogs:
    return RoundLogs(decisions=d / "decisions.jsonl", rollbacks=d / "rollbacks.jsonl", extra={"round": r})


class GateController(ConstantController):
    """A constant schedule that, at decision step `hold_at`, waits until `release` is set (the trainer waits
    with it: a blocking controller), after setting `holding`."""

    name = "gate"

    def __init__(self, cfg, hold_at: int) -> None:
        super().__init__(cfg.schedule.init_lr, cfg.train.total_steps, cfg.schedule.warmup_steps)
        self.hold_at = hold_at
        self.holding, self.release = threading.Event(), threading.Event()

    def decide(self, obs: Observation) -> Decision:
        if obs.step == self.hold_at:
            self.holding.set()
            assert self.release.wait(120), "test never released the controller"
        return super().decide(obs)


def test_labels_durations_and_discovery(tmp_path):
    assert run_label(tmp_path / "camp" / "rounds" / "round_012") == "round 12"
    assert run_label(tmp_path / "sweep" / "runs" / "cosine_lr1e-3") == "cosine_lr1e-3"
    assert [fmt_duration(s) for s in (5, 185, 3720, math.nan, -1)] == ["5s", "3m05s", "1h02m", "?", "?"]
    for d in ("camp/rounds/round_001", "camp/rounds/round_002", "sweep/runs/cosine_lr1e-3", "camp/baselines/x"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "round.json").write_text("{}")
    (tmp_path / "camp/rounds/round_001/checkpoints").mkdir()
    assert [p.relative_to(tmp_path).as_posix() for p in find_runs(tmp_path)] == [
        "camp/baselines/x", "camp/rounds/round_001", "camp/rounds/round_002", "sweep/runs/cosine_lr1e-3",
    ]  # fmt: skip
    assert status_table([]) == "no runs yet"


@pytest.mark.slow
def test_status_and_progress_follow_a_running_round_with_a_rollback(tmp_path, capsys):
    """One real round, NaN injected at step 25 (a rollback), its controller held at decision step 40 while the
    test looks: `status` and the non-terminal progress lines come from the logs alone, and so does the end."""
    cfg = smoke()
    camp = tmp_path / "camp"
    run_dir = camp / "rounds" / "round_001"
    ctl = GateController(cfg, hold_at=40)
    out = io.StringIO()
    box: dict = {}

    def work() -> None:
        box["res"] = run_round(cfg, run_dir, ctl, logs_in(camp, 1), round_index=1,
                               trainer_args_first_launch=["--inject-nan-at-step", "25"])  # fmt: skip

    live = LiveProgress([camp / "rounds"], stream=out, interval_s=0.2, tty=False)
    with live:
        t = threading.Thread(target=work)
        t.start()
        try:
            assert ctl.holding.wait(180), "the round never reached decision step 40"
            watch = RunWatch(run_dir)
            watch.poll()
            s = watch.status()
            assert s.state == "running" and s.label == "round 1" and s.total_steps == 60
            assert s.step == 40 and s.rollbacks == 1
            assert s.decision_step == 30 and s.decision_kind == "decision" and "at step 30" in s.reason
            assert math.isfinite(s.loss) and s.lr == pytest.approx(cfg.schedule.init_lr)
            assert math.isfinite(s.eta_s) and s.eta_s >= 0
            assert main(["status", str(camp)]) == 0
            printed = capsys.readouterr().out
            assert "round 1" in printed and "running" in printed and "step 40/60" in printed
            assert "rollbacks 1" in printed and "ETA " in printed and "1 running" in printed
        finally:
            ctl.release.set()
            t.join(300)
    assert box["res"].status == "ok"
    lines = out.getvalue().splitlines()
    assert lines[0] == "[round 1] started (60 steps)"
    crash = [i for i, ln in enumerate(lines) if "crash at step 25 (nan_loss): rolled back to step" in ln]
    assert len(crash) == 1
    decided = [ln for ln in lines if ln.startswith("[round 1] step ")]
    # one line per decision sent: 10, 20 before the crash; 10 or 20 again after the rollback, then 30, 40, 50
    assert [int(ln.split()[3].split("/")[0]) for ln in decided][-3:] == [30, 40, 50]
    assert all("/60  loss " in ln and " -> " in ln and "ETA " in ln for ln in decided)
    assert lines[-1].startswith("[round 1] finished: ppl ")
    # finished: status says so, with the final ppl, from the logs only
    assert main(["status", str(camp)]) == 0
    printed = capsys.readouterr().out
    assert "finished" in printed and "step 60/60" in printed and "ppl " in printed and "rollbacks 1" in printed
    # a watcher started after the end lists it but prints no events for it
    quiet = DirWatch([camp])
    assert quiet.poll() == [] and [s.state for s in quiet.statuses()] == ["finished"]


@pytest.mark.slow
def test_progress_bars_on_a_terminal_and_status_of_a_sweep(tmp_path, capsys):
    """On a terminal: a tqdm bar per running run (label, step/total, loss, LR, decision, ETA); lines printed
    through write() meanwhile are kept. `status` reads a baseline sweep's --out directory."""
    from lrpilot.baseline import run_sweep

    out = io.StringIO()
    sweep = tmp_path / "sweep"
    with LiveProgress([sweep / "runs"], stream=out, interval_s=0.1, tty=True) as live:
        run_sweep(smoke(), "cosine", [3e-3], sweep)
        live.refresh()
        live.write("a line from the command")
    text = out.getvalue()
    assert "cosine_lr3e-3" in text and "/60" in text and "a line from the command" in text
    assert "[cosine_lr3e-3] finished: ppl" in text
    assert main(["status", str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "cosine_lr3e-3" in printed and "finished" in printed and "1 finished" in printed


def test_status_of_a_missing_directory_is_one_line(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrpilot: error: status ") and err.count("\n") == 1


def test_status_tells_apart_runs_of_the_same_name_in_two_directories(tmp_path, capsys):
    """`lrpilot status runs` with two sweeps (or campaigns) under runs/ printed the same label twice."""
    from lrpilot.baseline import run_sweep

    for name in ("a", "b"):
        run_sweep(smoke("train.total_steps=20", "schedule.warmup_steps=5"), "cosine", [3e-3], tmp_path / name)
    assert main(["status", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [x.split()[0] for x in lines[:2]] == ["a/cosine_lr3e-3", "b/cosine_lr3e-3"], lines
    assert main(["status", str(tmp_path / "a")]) == 0  # one of them alone: no folder needed
    assert capsys.readouterr().out.split()[0] == "cosine_lr3e-3"


def test_status_of_an_import_or_a_file_says_what_it_is(tmp_path, capsys):
    from lrpilot.importer import import_published

    d = tmp_path / "published"
    import_published(Path(__file__).parent / "data" / "seed-experiments", d)
    assert main(["status", str(d)]) == 0
    assert f"holds logs brought in by import-logs; see lrpilot report {d}" in capsys.readouterr().out
    assert main(["status", str(d / "import.json")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_prints_an_estimate_then_progress_then_each_round_once_and_the_report_url(tmp_path):
    """`lrpilot demo` piped (not a terminal): the estimate first, a line per run start and decision point
    while it works, each round's summary line once, and the report as a file:// URL at the end."""
    d = tmp_path / "demo"
    cmd = [sys.executable, "-m", "lrpilot.cli", "demo", "--preset", "cpu-smoke", "--dir", str(d),
           "--rounds", "2", "--peaks", "3e-3"]  # fmt: skip
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:]
    lines = proc.stdout.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("[round 1] "))
    assert lines[0].startswith("demo: ") and lines[1].startswith("estimate: about ")
    assert first < next(i for i, ln in enumerate(lines) if ln.startswith("round   1 "))  # progress before the end
    for r in (1, 2):
        assert sum(ln.startswith(f"round {r:>3} ") for ln in lines) == 1, "\n".join(lines)
        assert any(ln.startswith(f"[round {r}] step 10/60") for ln in lines)
    url = [ln for ln in lines if ln.startswith("open: file://")]
    assert url == [f"open: {(d / 'report' / 'report.html').resolve().as_uri()}"]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _steps_of(run_dir: Path) -> list[int]:
    tele = run_dir / "telemetry.jsonl"
    lines = tele.read_text().splitlines() if tele.is_file() else []
    return [e["step"] for e in map(json.loads, lines[:-1]) if e.get("event") == "step"]  # the last may be partial


@pytest.mark.slow
def test_a_run_stopped_with_ctrl_c_is_stopped_within_seconds_not_running(tmp_path):
    """`lrpilot train` interrupted (SIGINT) mid-run: `status` says stopped, with no ETA, within seconds (its
    run.lock was released), not "running" until the telemetry goes stale (guard.hang_timeout_s)."""
    d = tmp_path / "t"  # 200000 steps: 2000 could end before the Ctrl-C on a loaded machine
    cmd = [sys.executable, "-m", "lrpilot", "train", "--preset", "cpu-smoke", "--dir", str(d),
           "--set", "train.total_steps=200000"]  # fmt: skip
    # SIGINT at its default in the child: a CI shell that started the tests in the background ignores it, and
    # children inherit an ignored signal (POSIX), so the Ctrl-C below would be lost
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        run_dir = d / "runs" / "cosine_lr3e-3"

        def stepping() -> bool:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            return bool(_steps_of(run_dir))

        wait_until(stepping, 180, "a step event in the run's telemetry")
        watch = DirWatch([d])
        watch.poll()
        assert [s.state for s in watch.statuses()] == ["running"]  # its holder is alive
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and _steps_of(run_dir)[-1] < 200000
    watch = DirWatch([d])
    watch.poll()
    stopped_at = time.time()
    wait_until(lambda: [s.state for s in watch.statuses()] == ["stopped"], 60, "status: stopped")
    assert time.time() - stopped_at < 60 < 120  # well before the staleness rule (hang_timeout_s >= 120 s)
    table = status_table(watch.statuses())
    assert "cosine_lr3e-3  stopped" in table and "running" not in table and "ETA" not in table, table
    assert table.splitlines()[-1] == "1 stopped"


def test_state_follows_the_run_lock_holder(tmp_path):
    """Fresh telemetry: running while this process holds the run's lock (or the lock names another host's
    holder), stopped at once when the lock is released without a result, finished once result.json exists."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    now = time.time()
    events = [{"event": "start", "step": 0, "time": now - 2}]
    events += [{"event": "step", "step": s, "time": now - 2 + s / 10, "loss": 5.0, "lr": 1e-3} for s in (1, 10)]
    (run_dir / "config.json").write_text(json.dumps({"train": {"total_steps": 100}}))
    (run_dir / "telemetry.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))

    def status(at: float = now):
        watch = RunWatch(run_dir)
        watch.poll()
        return watch.status(at)

    assert status().state == "running"  # no run.lock (a Pilot's run): the staleness rule alone
    with DirLock(run_dir):
        for _ in range(3):  # and it stays so while the holder lives
            s = status()
            assert s.state == "running" and math.isfinite(s.eta_s)
    assert status().state == "running"  # just released: a lock being taken is empty for an instant too
    s = status(now + LOCK_GRACE_S + 1)
    assert s.state == "stopped" and math.isnan(s.eta_s) and "ETA" not in s.line()
    (run_dir / "run.lock").write_text(f"pid 1 on not-{socket.gethostname()} since 2024-01-01T00:00:00Z: lrpilot\n")
    assert status(now + LOCK_GRACE_S + 1).state == "running"  # another host's holder: the staleness rule decides
    (run_dir / "run.lock").write_text("")
    (run_dir / "result.json").write_text(json.dumps({"status": "ok", "update_step": 100}))
    assert status().state == "finished"
