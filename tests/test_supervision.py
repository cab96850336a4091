"""The round supervisor's parts, each alone (lrpilot.supervision): TrainerProcess, BranchHistory, CrashRecovery.

    python -m pytest -q tests/test_supervision.py

The history and recovery tests read the real log files of one cpu-smoke round (a NaN injected at step 25 of its
first launch: one crash, one rollback, trained to the end); the process tests start and kill a real trainer.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from waiting import wait_until

from lrpilot.channel import CONTROL_FILE, TELEMETRY_FILE, TelemetryReader
from lrpilot.config import load_config
from lrpilot.controllers.base import RollbackRecord
from lrpilot.controllers.schedules import ConstantController
from lrpilot.errors import DiskWriteError
from lrpilot.launcher import launch_processes
from lrpilot.logs import read_jsonl
from lrpilot.supervision import SupervisorError
from lrpilot.supervision.history import SENT_FILE, BranchHistory, read_round_file
from lrpilot.supervision.process import HANG, Crash, TrainerProcess
from lrpilot.supervision.recovery import CrashRecovery, Relaunch
from lrpilot.supervisor import ROLLBACK_FIELDS, RoundLogs, run_round

NAN_STEP = 25


def smoke(*overrides: str):
    return load_config("cpu-smoke", list(overrides))


def damage(path: Path) -> None:
    """Same size, flipped bytes: only the checksum tells."""
    data = path.read_bytes()
    path.write_bytes(data[:-64] + bytes(b ^ 0xFF for b in data[-64:]))


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """One real cpu-smoke round with a NaN at step 25 of its first launch, and its log files."""
    tmp = tmp_path_factory.mktemp("crashed")
    logs = RoundLogs(decisions=tmp / "decisions.jsonl", rollbacks=tmp / "rollbacks.jsonl", extra={"round": 1})
    cfg = smoke()
    ctrl = ConstantController(cfg.schedule.init_lr, cfg.train.total_steps, cfg.schedule.warmup_steps)
    with pytest.MonkeyPatch.context() as mp:  # the tokenized corpus cache of the test session (conftest)
        mp.setenv("LRPILOT_CACHE", str(tmp_path_factory.getbasetemp() / "lrpilot-cache"))
        res = run_round(cfg, tmp / "run", ctrl, logs, trainer_args_first_launch=["--inject-nan-at-step", str(NAN_STEP)])
    assert res.status == "ok" and res.crash_count == 1
    decisions = read_jsonl(logs.decisions, strict=True)
    (rollback,) = read_jsonl(logs.rollbacks, strict=True)
    return SimpleNamespace(cfg=cfg, run_dir=tmp / "run", logs=logs, res=res, decisions=decisions, rollback=rollback)


def restored(crashed) -> BranchHistory:
    h = BranchHistory(crashed.cfg.schedule.warmup_steps)
    h.replay(crashed.run_dir / TELEMETRY_FILE, crashed.cfg.schedule.init_lr)
    h.restore_rollback_points(crashed.logs.rollbacks, crashed.res.run_start_iso)
    return h


def copy_run(crashed, dest: Path) -> Path:
    shutil.copytree(crashed.run_dir, dest)
    return dest


# ------------------------------------------------------------------------------------------- history


@pytest.mark.slow
def test_history_replay_rebuilds_the_branch_the_round_ended_on(crashed):
    h = BranchHistory(crashed.cfg.schedule.warmup_steps)
    applied, last_eval = h.replay(crashed.run_dir / TELEMETRY_FILE, crashed.cfg.schedule.init_lr)
    res = crashed.res
    # the rolled-back steps (the NaN among them) are gone: the final branch, as the live round saw it
    assert sorted(h.lrs.items()) == [tuple(p) for p in res.lr_trajectory]
    assert sorted(h.losses.items()) == [tuple(p) for p in res.loss_trajectory]
    assert all(math.isfinite(v) for v in h.losses.values()) and h.head() == crashed.cfg.train.total_steps
    assert h.peak_lr == res.peak_lr_seen and h.min_lr == res.min_lr_seen  # the abandoned branch's LRs count too
    assert [s for s, _ in h.loss_history] == [s for s, _ in h.lr_history] == list(range(10, 60, 10))
    for d in crashed.decisions:
        if isinstance(d["effective_step"], int):
            assert applied[d["seq"]] == d["effective_step"]
    assert last_eval is None or last_eval["event"] == "eval"


@pytest.mark.slow
def test_history_claims_are_the_decisions_the_final_branch_trained_with(crashed):
    h = restored(crashed)
    to = crashed.rollback["rolled_back_to_step"]
    assert h.rollback_points == [(1, to)]
    claims = h.claims(to, crashed.decisions)
    # one claim per decision point of the final branch after `to` (the abandoned branch's excluded) ...
    assert [c["effective_step"] for c in claims] == [s for s in range(10, 60, 10) if s > to]
    assert all(c["launch"] == 2 for c in claims)
    assert any(d["launch"] == 1 and d["effective_step"] > to for d in crashed.decisions)
    # ... and each is the LR the trainer used from its effective step on
    for c in claims:
        assert h.lrs[c["effective_step"] + 1] == pytest.approx(c["new_lr"], rel=1e-9)
    assert [c["effective_step"] for c in h.claims(40, crashed.decisions)] == [50]


@pytest.mark.slow
def test_history_plan_resume_resends_claims_and_marks_their_points_answered(crashed, tmp_path):
    h, notes = restored(crashed), []
    resend, now = h.plan_resume(30, crashed.decisions, crashed.run_dir, notes.append)
    assert [r["effective_step"] for r, _ in resend] == [40, 50] and all(c["seq"] == r["seq"] for r, c in resend)
    assert h.answered == {40: None, 50: None} and now == [] and notes == []
    # a claim whose command is not in control.jsonl is not re-applied, with a note
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / CONTROL_FILE).write_text("")
    h2, notes2 = restored(crashed), []
    resend2, _ = h2.plan_resume(30, crashed.decisions, bare, notes2.append)
    assert resend2 == [] and h2.answered == {} and len(notes2) == 2
    assert all("not re-applied" in n for n in notes2)


@pytest.mark.slow
def test_history_restore_sent_logs_what_was_applied_and_keeps_what_was_not(crashed):
    *logged, last = [json.loads(json.dumps(d)) for d in crashed.decisions]  # the supervisor died before the last
    h = restored(crashed)
    applied, _ = BranchHistory(10).replay(crashed.run_dir / TELEMETRY_FILE, 1.0)
    (got,) = h.restore_sent(crashed.run_dir, crashed.res.run_start_iso, logged, applied)
    assert got["seq"] == last["seq"] and got["effective_step"] == last["effective_step"] and h.unapplied_sent == []
    # sent, never applied: kept to be sent again, and answered when the resumed trainer reaches its point
    h2 = restored(crashed)
    assert h2.restore_sent(crashed.run_dir, crashed.res.run_start_iso, logged, {}) == []
    assert [r["seq"] for r in h2.unapplied_sent] == [last["seq"]] and h2.unapplied_sent[0]["effective_step"] is None
    _, now = h2.plan_resume(last["step"] - 10, logged, crashed.run_dir, lambda _: None)
    assert now == [] and h2.answered[last["step"]]["seq"] == last["seq"] and h2.unapplied_sent == []
    # another run's write-ahead records are not this run's
    assert BranchHistory(10).restore_sent(crashed.run_dir, "1999-01-01T00:00:00", logged, applied) == []
    assert (crashed.run_dir / SENT_FILE).exists()


def test_read_round_file(tmp_path):
    path = tmp_path / "round.json"
    assert read_round_file(path) is None
    path.write_text(json.dumps({"run_start_iso": "2026-01-01T00:00:00", "launches": 2}))
    assert read_round_file(path) == {"run_start_iso": "2026-01-01T00:00:00", "launches": 2}
    for bad in ("{not json", json.dumps({"launches": 2}), "[]"):
        path.write_text(bad)
        with pytest.raises(SupervisorError, match="unreadable round record; delete the run directory"):
            read_round_file(path)


def test_history_record_point_and_truncate():
    h = BranchHistory(warmup_steps=2)
    for s, loss, lr in [(1, 5.0, 1e-3), (2, 4.0, 2e-3), (3, 3.5, 2e-3), (4, 3.0, 1e-3)]:
        h.track_step(s, {"loss": loss, "lr": lr})
    assert h.peak_lr == 2e-3 and h.min_lr == 1e-3  # min only past the warmup (step 3 on)
    h.track_observe(2, {"losses": [4.0, 5.0], "lr": 2e-3}, 9.0)
    h.track_observe(4, {"losses": [3.0]}, 9.0)  # no LR in the event: the LR in force
    assert h.loss_history == [(2, 4.5), (4, 3.0)] and h.lr_history == [(2, 2e-3), (4, 9.0)]
    h.record_point(4, math.nan, 1e-3)  # re-observed without losses of its own: keeps the old mean
    assert h.loss_history == [(2, 4.5), (4, 3.0)] and h.lr_history[-1] == (4, 1e-3)
    h.truncate(2)
    assert h.losses == {1: 5.0, 2: 4.0} and h.lrs == {1: 1e-3, 2: 2e-3} and h.loss_history == [(2, 4.5)]
    assert h.peak_lr == 2e-3 and h.head() == 2


# ------------------------------------------------------------------------------------------ recovery


def recovery(cfg, run_dir: Path, log: Path, events: list, waits: list | None = None) -> CrashRecovery:
    return CrashRecovery(
        cfg, run_dir, log, {"round": 1}, note=lambda t: events.append(("note", t)), emit=events.append,
        skipped=lambda *a: events.append(("skipped", *a)), wait=(waits if waits is not None else []).append,
    )  # fmt: skip


@pytest.mark.slow
def test_recovery_restore_counts_this_runs_crashes(crashed):
    r = recovery(crashed.cfg, crashed.run_dir, crashed.logs.rollbacks, [])
    r.restore(crashed.res.run_start_iso, crashed.decisions)
    rb = crashed.rollback
    assert r.counter.total == crashed.res.crash_count == 1
    assert r.rollbacks == [RollbackRecord(rb["crash_step"], rb["lr_at_crash"], rb["rolled_back_to_step"], rb["new_lr"],
                                          rb["crash_reason"])]  # fmt: skip
    other = recovery(crashed.cfg, crashed.run_dir, crashed.logs.rollbacks, [])
    other.restore("1999-01-01T00:00:00", crashed.decisions)
    assert other.counter.total == 0 and other.rollbacks == []


@pytest.mark.slow
def test_recovery_skips_a_corrupt_checkpoint_for_the_one_before(crashed, tmp_path):
    run_dir = copy_run(crashed, tmp_path / "run")
    events: list = []
    r = recovery(crashed.cfg, run_dir, tmp_path / "rollbacks.jsonl", events)
    losses = [(s, 3.0) for s in range(1, 56)]
    plan, skipped = r.choose_checkpoint(55, 1e-3, losses)
    assert plan is not None and skipped == [] and events == []
    damage(Path(plan.checkpoint.path))
    plan2, skipped2 = r.choose_checkpoint(55, 1e-3, losses)
    assert plan2 is not None and plan2.to_step < plan.to_step
    assert [s["step"] for s in skipped2] == [plan.to_step] and "checksum" in skipped2[0]["reason"]
    assert events == [("skipped", plan.to_step, Path(plan.checkpoint.path), skipped2[0]["reason"])]
    # a checkpoint at or after the branch's first bad loss is never chosen
    plan3, _ = r.choose_checkpoint(55, 1e-3, [*losses[:20], (21, math.nan)])
    assert plan3 is not None and plan3.to_step <= 20


@pytest.mark.slow
def test_recovery_on_crash_logs_backs_off_and_gives_up(crashed, tmp_path):
    cfg = smoke("guard.max_fast_crash=2", "guard.crash_backoff_s=1.5")
    run_dir = copy_run(crashed, tmp_path / "run")
    log, events, waits = tmp_path / "rollbacks.jsonl", [], []
    r = recovery(cfg, run_dir, log, events, waits)
    kw = dict(lr_at_crash=2e-3, lr_used=2e-3, losses=[(s, 3.0) for s in range(1, 53)], run_start_iso="iso")
    out = r.on_crash("nan_loss", "step 52: loss nan", crash_step=52, start_step=50, launch=3, **kw)
    assert isinstance(out, Relaunch) and out.to_step <= 50 and out.checkpoint is not None
    assert out.new_lr == pytest.approx(cfg.guard.crash_lr_factor * 2e-3) and waits == [1.5]
    out2 = r.on_crash("hang", "no telemetry", crash_step=out.to_step + 1, start_step=out.to_step, launch=4, **kw)
    assert isinstance(out2, str) and out2.startswith("gave up after 2 consecutive quick crashes") and waits == [1.5]
    r1, r2 = read_jsonl(log, strict=True)
    assert set(ROLLBACK_FIELDS) <= r1.keys() and r1["round"] == 1 and r1["launch"] == 3 and r1["backoff_s"] == 1.5
    assert (r1["crash_step"], r1["rolled_back_to_step"], r1["crash_count_in_run"]) == (52, out.to_step, 1)
    assert r2["gave_up"] and r2["rolled_back_to_step"] is None and r2["crash_count_in_run"] == 2
    kinds = [e.get("event") if isinstance(e, dict) else e[0] for e in events]
    assert kinds == ["note", "rollback", "note", "backoff", "note", "rollback", "note"]
    assert r.counter.total == 2 and [x.crash_step for x in r.rollbacks] == [52]


def test_recovery_disk_failure_reads_the_last_launchs_own_line(tmp_path):
    r = recovery(smoke(), tmp_path, tmp_path / "rollbacks.jsonl", [])
    assert r.disk_failure() is None  # no trainer.log, and the disk takes the probe write
    full = DiskWriteError(tmp_path / "ckpt.pt", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    log = tmp_path / "trainer.log"
    log.write_text(f"[supervisor t] launch 1: python -m lrpilot.trainer\nlrpilot: error: {full}\n")
    got = r.disk_failure()
    assert isinstance(got, DiskWriteError) and got.errno == errno.ENOSPC and str(got) == str(full)
    with log.open("a") as f:  # the next launch's part of the log has no such line
        f.write("[supervisor t] launch 2: python -m lrpilot.trainer\nstep 1\n")
    assert r.disk_failure() is None


@pytest.mark.slow
def test_recovery_grants_an_agent_rollback_only_to_a_sound_checkpoint(crashed, tmp_path):
    run_dir = copy_run(crashed, tmp_path / "run")
    r = recovery(crashed.cfg, run_dir, tmp_path / "rollbacks.jsonl", [])
    assert [c.step for c in r.checkpoint_infos()] == sorted(c.step for c in r.checkpoint_infos())
    to, path, why = r.grant_agent_rollback(30, 20, [])
    assert to == 20 and path == run_dir / "checkpoints" / "step_000020.pt" and why
    used = [{"kind": "agent_rollback", "rollback_to_step": 10}, {"kind": "agent_rollback", "rollback_to_step": 0}]
    assert CrashRecovery.agent_rollbacks_used(used) == [10, 0]
    assert r.grant_agent_rollback(30, 20, used) == (None, None, "rollback to step 20 refused: already 2 this round "
                                                                "(guard.agent_rollbacks)")  # fmt: skip
    damage(path)
    to, path2, why = r.grant_agent_rollback(30, 20, [])
    assert to is None and path2 is None and "its checkpoint is unusable" in why


# ------------------------------------------------------------------------------------------- process


def test_process_follows_only_the_live_launch_and_names_how_it_ended(tmp_path):
    cfg = smoke()
    p = TrainerProcess(cfg, tmp_path)
    assert not p.follows({"event": "step", "step": 1, "launch": 5})  # before its start event
    assert p.follows({"event": "start", "step": 0, "launch": 5}) and p.pid == 5
    assert p.follows({"event": "phase", "phase": "eval", "launch": 5}) and p.phase == "eval"
    assert not p.follows({"event": "step", "step": 1, "launch": 6}) and p.phase == "eval"
    assert p.follows({"event": "step", "step": 1, "launch": 5}) and p.phase is None
    p.last_seen = time.monotonic() - cfg.guard.start_timeout_s - 1
    assert p.hung()  # no first step yet: start_timeout_s
    crash = p.hang()
    assert crash.reason == HANG and "no first step yet; start_timeout_s=" in crash.detail
    p.stepped = True
    p.last_seen = time.monotonic() - cfg.guard.hang_timeout_s - 1
    assert p.hung() and f"hang_timeout_s={cfg.guard.hang_timeout_s:g}" in p.hang().detail
    p.last_seen = time.monotonic()
    assert not p.hung()
    notes: list[str] = []
    assert p.exit_error(-9, notes.append).reason == "signal_SIGKILL"
    assert p.exit_error(0, notes.append).reason == "exit_without_done"
    assert p.exit_error(1, notes.append).reason == "exit_code_1" and notes == []
    (tmp_path / "trainer.log").write_text("[supervisor t] launch 1: x\nlrpilot: error: --foo: bad value\n")
    err = p.exit_error(2, notes.append)
    assert isinstance(err, SupervisorError) and str(err) == "trainer refused to start: lrpilot: error: --foo: bad value"
    assert notes == ["trainer exited 2 (usage error): lrpilot: error: --foo: bad value"]


@pytest.mark.slow
def test_process_launches_a_real_trainer_kills_its_group_and_ignores_it_after(tmp_path):
    cfg = smoke("train.total_steps=100000")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg.save(run_dir / "config.json")  # the trainer reads its config from the run directory
    p = TrainerProcess(cfg, run_dir, blocking=False, first_launch_args=["--inject-nan-at-step", "99999"])
    reader, notes = TelemetryReader(run_dir), []

    def first_step():  # every line goes through follows(), the start event first
        assert p.poll() is None, (run_dir / "trainer.log").read_text()[-2000:]
        return next((e for e in reader.poll() if p.follows(e) and e.get("event") == "step"), None)

    with open(run_dir / "trainer.log", "ab") as log:
        cmd = p.launch(None, None, 0, 0, log, notes.append)
        assert notes == [f"launch 1: {' '.join(cmd)}"] and "--inject-nan-at-step" in cmd and p.launches == 1
        assert p.pid is None and not p.stepped
        wait_until(first_step, 300, "the trainer's first step")
        assert p.pid is not None
        token, first = p.token, p.pid
        assert launch_processes(token)
        p.kill()
        assert launch_processes(token) == [] and p.poll() is not None
        err = p.exit_error(p.poll(), notes.append)
        assert isinstance(err, Crash) and err.reason == "signal_SIGKILL"
        # the next launch: no first-launch args, and the dead launch's lines are not its own
        cmd2 = p.launch(None, 1e-3, 0, 0, log, notes.append)
        assert p.launches == p.session_launches == 2 and "--inject-nan-at-step" not in cmd2 and first in p.dead_pids
        assert not p.follows({"event": "start", "step": 0, "launch": first}) and p.pid is None
        p.stop()
        assert launch_processes(p.token) == []
