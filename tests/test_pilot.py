"""lrpilot.Pilot / PilotScheduler in a plain torch loop: the real cpu-smoke model and data, real NaNs, real
SIGKILL of examples/plain_torch.py, real replay through `lrpilot export-schedule`."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lrpilot.logs import read_jsonl
from lrpilot.pilot import Pilot, PilotError
from lrpilot.scheduler import PilotScheduler

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plain_torch.py"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run_example(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args], env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _steps(run_dir: Path) -> dict[int, dict]:
    """step -> the last `step` telemetry event of that step (the branch the run ended on)."""
    out: dict[int, dict] = {}
    for ev in read_jsonl(run_dir / "telemetry.jsonl"):
        if ev.get("event") == "step":
            out[int(ev["step"])] = ev
    return out


def _setup(smoke_config):
    from lrpilot.data import build_data
    from lrpilot.model import LLaMA

    torch.manual_seed(0)
    model = LLaMA(smoke_config.model)
    data = build_data(smoke_config.data, 0)
    embed = [p for n, p in model.named_parameters() if "embed" in n]
    rest = [p for n, p in model.named_parameters() if "embed" not in n]
    opt = torch.optim.AdamW([{"params": rest, "lr": 3e-3}, {"params": embed, "lr": 1e-3}])
    return model, data, opt


@pytest.mark.parametrize("controller", ["rules", "cosine"])
def test_lr_the_pilot_set_is_the_lr_the_optimizer_used(smoke_config, tmp_path, controller):
    model, data, opt = _setup(smoke_config)
    total = 40
    pilot = Pilot(
        opt, controller=controller, total_steps=total, warmup_steps=5, decision_every=5, run_dir=tmp_path,
        model=model, guard=smoke_config.guard,
    )  # fmt: skip
    used: list[tuple[float, float]] = []
    for t in range(total):
        x, y = data.train_batch(t, 0, 4)
        _, loss = model(x, y)
        loss.backward()
        used.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))  # read back what step() will use
        opt.step()
        opt.zero_grad()
        pilot.step(loss.item())
    pilot.finish(final_eval_loss=1.0)
    tel = _steps(tmp_path)
    assert sorted(tel) == list(range(1, total + 1))
    for t, (g0, g1) in enumerate(used):
        assert tel[t + 1]["lr"] == g0, f"update {t}: telemetry {tel[t + 1]['lr']} != optimizer {g0}"
        assert g1 == pytest.approx(g0 / 3, rel=1e-12)  # the groups keep their ratio
    # the warmup ramp, then the controller: the LR of update t < warmup is init_lr * (t + 1) / warmup, where
    # init_lr is the controller's warmup end: the group's 3e-3 for cosine, the rules' ceiling 10/3 x 3e-3
    assert pilot.init_lr == pytest.approx(1e-2 if controller == "rules" else 3e-3)
    assert [u[0] for u in used[:5]] == pytest.approx([pilot.init_lr * (t + 1) / 5 for t in range(5)])
    decisions = read_jsonl(tmp_path / "decisions.jsonl")
    assert [d["step"] for d in decisions] == list(range(5, total, 5))
    for d in decisions:
        assert d["effective_step"] == d["step"]
        assert tel[d["step"] + 1]["lr"] == pytest.approx(d["new_lr"]) or d.get("plan_knots")
    assert (tmp_path / "result.json").is_file() and len(read_jsonl(tmp_path / "final_results.jsonl")) == 1


def test_scheduler_is_a_torch_lr_scheduler_and_resumes_the_pilot(smoke_config, tmp_path):
    model, data, opt = _setup(smoke_config)

    def make(d: Path, o: torch.optim.Optimizer) -> PilotScheduler:
        return PilotScheduler(Pilot(o, controller="cosine", total_steps=30, warmup_steps=3, decision_every=5, init_lr=3e-3,
                                    run_dir=d, model=model))  # fmt: skip

    sched = make(tmp_path / "a", opt)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    lrs = []
    saved = None
    for t in range(30):
        x, y = data.train_batch(t, 0, 4)
        _, loss = model(x, y)
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        opt.zero_grad()
        sched.report(loss.detach())
        sched.step()
        assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]
        if t == 14:
            saved = sched.state_dict()
    # a fresh scheduler on a fresh optimizer resumed from the state at step 15 sets the same LRs afterwards
    opt2 = torch.optim.AdamW(opt.param_groups[0]["params"], lr=1.0)
    sched2 = make(tmp_path / "b", opt2)
    sched2.load_state_dict(saved)
    again = []
    for _ in range(15, 30):
        again.append(opt2.param_groups[0]["lr"])
        sched2.step(2.0)
    assert again == lrs[15:]
    with pytest.raises(PilotError, match="no loss"):
        sched2.step()


def test_a_nan_in_process_restores_a_finite_snapshot_and_halves_the_lr(smoke_config, tmp_path):
    model, data, opt = _setup(smoke_config)
    batch = {"i": 0}
    pilot = Pilot(
        opt, controller="rules", total_steps=40, warmup_steps=5, decision_every=5, run_dir=tmp_path, model=model,
        guard=smoke_config.guard, extra_state=(lambda: dict(batch), lambda s: batch.update(s)), skip_batches=3,
    )  # fmt: skip
    rolled = 0
    while pilot.step_count < 40:
        if pilot.skip_batch():
            batch["i"] += 1
            continue
        x, y = data.train_batch(batch["i"], 0, 4)
        batch["i"] += 1
        _, loss = model(x, y)
        if pilot.step_count == 22 and rolled == 0:
            loss = loss * math.nan
        loss.backward()
        opt.step()
        opt.zero_grad()
        lr_at_crash = pilot.lr_state.lr_for(pilot.step_count)
        info = pilot.step(loss.item())
        if info.rolled_back:
            rolled += 1
            assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN weights are gone
            # rollback_back_steps=10 before step 23 is 13; the earliest snapshot kept (keep=2: 15, 20) is 15
            assert info.step == 15 and batch["i"] == 15  # the snapshot's step and the caller's data position
            assert pilot.lr_state.lr == pytest.approx(lr_at_crash * 0.5)
            assert opt.param_groups[1]["lr"] == pytest.approx(info.lr / 3)
    res = pilot.finish(final_eval_loss=2.0)
    assert rolled == 1 and res["crash_count"] == 1
    (rb,) = read_jsonl(tmp_path / "rollbacks.jsonl")
    for k in ("run_start_iso", "crash_step", "lr_at_crash", "rolled_back_to_step", "new_lr", "crash_reason",
              "crash_count_in_run"):  # fmt: skip
        assert k in rb
    assert rb["crash_step"] == 23 and rb["rolled_back_to_step"] == 15 and rb["crash_reason"] == "nan_loss"
    assert rb["skip_batches"] == 3
    # a non-finite state is never snapshotted
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)
    before = [s for s, _ in pilot._snapshots]
    pilot._snapshot()
    assert [s for s, _ in pilot._snapshots] == before


def test_a_non_finite_grad_norm_is_a_crash(smoke_config):
    model, _, opt = _setup(smoke_config)
    pilot = Pilot(opt, controller="constant", total_steps=10, warmup_steps=2, decision_every=2, model=model)
    pilot.step(3.0, 1.0)
    pilot.step(3.0, 1.0)
    info = pilot.step(3.0, math.inf)
    assert info.rolled_back and info.step == 0  # default rollback_back_steps=1000: the earliest snapshot


def test_bad_settings_name_the_argument(smoke_config):
    _, _, opt = _setup(smoke_config)
    with pytest.raises(PilotError, match="total_steps"):
        Pilot(opt, total_steps=0)
    with pytest.raises(PilotError, match="warmup_steps"):
        Pilot(opt, total_steps=10, warmup_steps=10)
    with pytest.raises(PilotError, match="controller 'nope'"):
        Pilot(opt, total_steps=10, controller="nope")
    with pytest.raises(PilotError, match="replay:"):
        Pilot(opt, total_steps=10, controller="replay:/nonexistent/plan.json")


def test_a_plan_of_other_decision_steps_is_refused(smoke_config, tmp_path):
    """A plan found with decisions every 100 steps, replayed in a loop that decides every 10 from step 5, would
    hold the LR at every step: refused, naming the settings to pass (as campaign --replay-from refuses it)."""
    _, _, opt = _setup(smoke_config)
    log = tmp_path / "decisions.jsonl"
    log.write_text("".join(json.dumps({"step": s, "old_lr": 1e-3, "new_lr": 2e-3}) + "\n" for s in (100, 200)))
    with pytest.raises(PilotError, match=r"decided at steps 100, 200, none of this loop's decision points"):
        Pilot(opt, total_steps=150, warmup_steps=5, decision_every=10, controller=f"replay:{log}")
    p = Pilot(opt, total_steps=250, warmup_steps=0, decision_every=100, controller=f"replay:{log}")
    assert p.controller_name == "replay"


def test_a_plan_is_replayed_only_as_it_was_found(smoke_config, tmp_path):
    """Refused in one line each: a plan exported under other warmup_steps/decision_every (its decisions would
    land elsewhere), a plan with no decisions (it would hold the LR), and a decisions.jsonl of several rounds
    (their records would replay as visits of one round's steps)."""
    _, _, opt = _setup(smoke_config)
    plan = {"format": "lrpilot-schedule", "version": 1, "warmup_steps": 10, "decision_every": 10,
            "decisions": [{"step": 10, "old_lr": 1e-3, "new_lr": 2e-3}, {"step": 20, "old_lr": 2e-3, "new_lr": 1e-3}]}  # fmt: skip
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(plan))
    # every logged step is still a decision point of a loop that decides every 5 steps: only the settings tell
    with pytest.raises(PilotError, match=r"found with decision_every=10, this Pilot has 5; pass decision_every=10"):
        Pilot(opt, total_steps=40, warmup_steps=10, decision_every=5, controller=f"replay:{f}")
    with pytest.raises(PilotError, match=r"found with warmup_steps=10, this Pilot has 0"):
        Pilot(opt, total_steps=40, warmup_steps=0, decision_every=10, controller=f"replay:{f}")
    assert Pilot(opt, total_steps=40, warmup_steps=10, decision_every=10, controller=f"replay:{f}").controller_name
    f.write_text(json.dumps({**plan, "version": 99}))  # a later format: its fields may mean something else
    with pytest.raises(PilotError, match="schedule version 99; this lrpilot reads version 1"):
        Pilot(opt, total_steps=40, warmup_steps=10, decision_every=10, controller=f"replay:{f}")
    f.write_text(json.dumps({**plan, "decisions": []}))
    with pytest.raises(PilotError, match="holds no decisions to replay"):
        Pilot(opt, total_steps=40, warmup_steps=10, decision_every=10, controller=f"replay:{f}")
    camp = tmp_path / "camp"
    camp.mkdir()
    (camp / "decisions.jsonl").write_text("".join(json.dumps({"round": r, "run_start_iso": f"t{r}", "step": 10,
                                                              "new_lr": 1e-3}) + "\n" for r in (1, 2)))  # fmt: skip
    with pytest.raises(PilotError, match=r"holds 2 rounds; export one with `lrpilot export-schedule"):
        Pilot(opt, total_steps=40, warmup_steps=10, decision_every=10, controller=f"replay:{camp}")


@pytest.mark.slow
def test_example_nan_gives_one_rollback_a_finite_loss_and_a_report(tmp_path):
    run = tmp_path / "nan"
    p = _run_example("--steps", "60", "--dir", str(run), "--inject-nan-at-step", "35", "--skip-batches", "2")
    assert p.returncode == 0, p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("final: step 60") and last.endswith("rollbacks 1")
    assert math.isfinite(float(last.split("eval_loss ")[1].split()[0]))
    (rb,) = read_jsonl(run / "rollbacks.jsonl")
    assert rb["crash_step"] == 35 and rb["crash_reason"] == "nan_loss"
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "lrpilot", "report", str(run), "--out", str(out)], env=_env(),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (out / "report.html").is_file()
    # replay of the finished run (exported schedule) reproduces its LR at every step, rollback included
    plan = tmp_path / "plans" / "plan.json"  # a folder that does not exist yet: export-schedule makes it
    e = subprocess.run([sys.executable, "-m", "lrpilot", "export-schedule", str(run), "--round", "1", "--out",
                        str(plan)], env=_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert e.returncode == 0, e.stderr
    rp = tmp_path / "replay"
    p2 = _run_example("--steps", "60", "--dir", str(rp), "--controller", f"replay:{plan}", "--inject-nan-at-step",
                      "35", "--skip-batches", "2")  # fmt: skip
    assert p2.returncode == 0, p2.stderr
    a, b = _steps(run), _steps(rp)
    assert sorted(a) == sorted(b) == list(range(1, 61))
    assert [a[s]["lr"] for s in a] == [b[s]["lr"] for s in a]


def test_export_schedule_bad_round_is_one_line(tmp_path):
    (tmp_path / "final_results.jsonl").write_text('{"round": 1, "run_start_iso": "x"}\n')
    r = subprocess.run([sys.executable, "-m", "lrpilot", "export-schedule", str(tmp_path), "--round", "4", "--out",
                        str(tmp_path / "p.json")], env=_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no round 4" in r.stderr and "[1]" in r.stderr


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_uninterrupted_lrs_and_losses(tmp_path):
    full = tmp_path / "full"
    p = _run_example("--steps", "60", "--dir", str(full), "--checkpoint-every", "20")
    assert p.returncode == 0, p.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--steps", "60", "--dir", str(run), "--checkpoint-every", "20",
         "--pause-at-step", "33"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not (run / "paused").exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the example never reached step 33"
        time.sleep(0.05)  # polling a file with a deadline, not a timing assumption
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(_steps(run))
    assert killed_at == 33
    r = _run_example("--steps", "60", "--dir", str(run), "--checkpoint-every", "20", "--resume")
    assert r.returncode == 0, r.stderr
    a, b = _steps(full), _steps(run)
    assert sorted(b) == list(range(1, 61))
    assert [b[s]["lr"] for s in sorted(b)] == [a[s]["lr"] for s in sorted(a)]
    assert [b[s]["loss"] for s in sorted(b)] == [a[s]["loss"] for s in sorted(a)]  # bit for bit on CPU
    # one decision record per decision point, as in the uninterrupted run
    da, db = read_jsonl(full / "decisions.jsonl"), read_jsonl(run / "decisions.jsonl")
    assert [(d["step"], d["new_lr"]) for d in db] == [(d["step"], d["new_lr"]) for d in da]
    assert p.stdout.strip().splitlines()[-1] == r.stdout.strip().splitlines()[-1]


def test_from_env_reads_the_settings_and_names_the_variable(smoke_config, tmp_path, monkeypatch):
    _, _, opt = _setup(smoke_config)
    monkeypatch.setenv("LRPILOT_PILOT", '{"controller": "cosine", "total_steps": 20, "warmup_steps": 2, '
                       f'"decision_every": 4, "run_dir": "{tmp_path}", "guard": {{"crash_loss": 60.0}}}}')  # fmt: skip
    pilot = Pilot.from_env(opt)
    assert pilot.controller_name == "cosine" and pilot.total_steps == 20 and pilot.g.crash_loss == 60.0
    assert (tmp_path / "round.json").is_file()
    monkeypatch.setenv("LRPILOT_PILOT", "{not json")
    with pytest.raises(PilotError, match=r"\$LRPILOT_PILOT is not a JSON object"):
        Pilot.from_env(opt)
    monkeypatch.delenv("LRPILOT_PILOT")
    with pytest.raises(PilotError, match="LRPILOT_PILOT is not set"):
        Pilot.from_env(opt)


def test_a_non_blocking_controller_never_holds_the_loop_and_takes_effect_when_it_answers(smoke_config, tmp_path):
    """The LLM path: decide() runs in a worker thread; the loop goes on; the answer applies at the first update
    after it arrives (effective_step > step), a decision point reached meanwhile is skipped."""
    import threading

    from lrpilot.controllers.base import BaseController, Decision

    release, asked = threading.Event(), threading.Event()

    class Slow(BaseController):
        name, blocking = "slow", False

        def decide(self, obs):
            asked.set()
            assert release.wait(30)
            return Decision(lr=obs.lr * 0.5, reason="halve")

    _, _, opt = _setup(smoke_config)
    pilot = Pilot(opt, controller=Slow(), total_steps=30, warmup_steps=2, decision_every=4, run_dir=tmp_path)
    for _ in range(2):
        pilot.step(3.0)
    assert asked.wait(30)  # asked at step 2, in the background
    lr_before = pilot.lr
    for _ in range(5):  # steps 3..7 go on at the old LR (step 6's decision point is skipped: one question at a time)
        pilot.step(3.0)
        assert pilot.lr == lr_before
    release.set()
    deadline = time.monotonic() + 30
    while pilot.core.replies.empty():  # the worker's answer is queued (a condition with a deadline, not a sleep)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pilot.step(3.0)  # step 8: the answer applies to update 8
    pilot.finish(1.0)
    d = read_jsonl(tmp_path / "decisions.jsonl")[0]
    assert d["step"] == 2 and d["effective_step"] == 8 and d["skipped_observes"] == [6]
    assert d["new_lr"] == pytest.approx(lr_before * 0.5) and pilot.lr == pytest.approx(lr_before * 0.5)
