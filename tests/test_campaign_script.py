"""`lrpilot campaign --script`: rounds run as the user's own loop (examples/plain_torch.py, a real subprocess
building its Pilot with Pilot.from_env), Optuna memory across rounds, real SIGKILLs and the resume."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from waiting import wait_until

from lrpilot.logs import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plain_torch.py"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cmd(d: Path, script: str, rounds: int = 2, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lrpilot", "campaign", "--preset", "cpu-smoke", "--set", "train.total_steps=40",
            "--rounds", str(rounds), "--dir", str(d), "--script", script, *extra]  # fmt: skip


def _script(*extra: str) -> str:
    return shlex.join([sys.executable, str(EXAMPLE), "--checkpoint-every", "10", *extra])


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the campaign ended (rc {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)  # polling a file with a deadline, not a timing assumption


def _kill_in_round_2_then_resume(cmd: list[str], d: Path, also=None) -> list[dict]:
    """Start the campaign, SIGKILL it (and its script) once round 2 paused at its step-20 checkpoint (and `also()`
    is true), check that only round 1 finished, run the same command again and return final_results.jsonl."""
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(d / "rounds" / "round_002" / "paused", proc)  # round 2 checkpointed step 20 and blocks there
        if also is not None:
            wait_until(also, 240, "round 1's result line")
        os.killpg(proc.pid, signal.SIGKILL)  # the campaign and its script, as a Ctrl-\ or an OOM kill would
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert [r["round"] for r in read_jsonl(d / "final_results.jsonl")] == [1]
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    return read_jsonl(d / "final_results.jsonl")


def _starts(run_dir: Path) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "telemetry.jsonl") if e.get("event") == "start"]


@pytest.mark.slow
def test_script_campaign_learns_across_rounds_and_resumes_after_sigkill(tmp_path):
    d = tmp_path / "camp"
    cmd = _cmd(d, _script("--pause-at-step", "20", "--pause-round", "2"), 2, "--memory", "optuna")
    finals = _kill_in_round_2_then_resume(cmd, d)
    assert [r["round"] for r in finals] == [1, 2]  # one line per round, round 1 never counted twice
    assert all(r["status"] == "ok" and r["update_step"] == 40 and r["script"] for r in finals)
    assert len(_starts(d / "rounds" / "round_001")) == 1  # round 1 not re-run
    starts = _starts(d / "rounds" / "round_002")
    assert starts[-1]["resumed_from"] == "state_dict step 20"  # round 2 resumed from its checkpoint
    briefs = read_jsonl(d / "briefs.jsonl")
    assert [b["round"] for b in briefs] == [1, 2] and all(b["memory"] == "optuna" and b["params"] for b in briefs)
    assert "Best ppl" in briefs[1]["brief"]  # round 2's brief learned from round 1
    from lrpilot.config import load_config
    from lrpilot.controllers.rules import RuleController, RuleParams
    from lrpilot.decision import warmup_end_lr

    smoke = load_config("cpu-smoke")
    for b, f in zip(briefs, finals, strict=True):
        assert f["rule_params"] == b["params"]  # Optuna's proposal steered the script's Pilot
        # the line's init_lr is where the Pilot's warmup ended, not the preset's init_lr
        rules = RuleController(RuleParams(**b["params"]))
        assert f["init_lr"] == warmup_end_lr(rules, smoke.schedule.init_lr, smoke.guard)
        pilot_json = (d / "rounds" / f"round_{b['round']:03d}" / "pilot.json").read_text()
        assert str(b["params"]["ceiling"]) in pilot_json
    decisions = read_jsonl(d / "decisions.jsonl")
    assert {x["round"] for x in decisions} == {1, 2}
    rep = subprocess.run([sys.executable, "-m", "lrpilot", "report", str(d), "--out", str(tmp_path / "rep")],
                         env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert rep.returncode == 0, rep.stderr
    assert (tmp_path / "rep" / "report.md").exists()


@pytest.mark.slow
def test_a_killed_script_is_relaunched_from_its_checkpoint(tmp_path):
    d = tmp_path / "camp"
    cmd = _cmd(d, _script("--pause-at-step", "20"), 1, "--memory", "none")
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        paused = d / "rounds" / "round_001" / "paused"
        _wait_for(paused, proc)
        os.kill(int(paused.read_text()), signal.SIGKILL)  # the script only: the campaign relaunches it
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    (fin,) = read_jsonl(d / "final_results.jsonl")
    assert fin["status"] == "ok" and fin["update_step"] == 40 and fin["crash_count"] == 1
    starts = _starts(d / "rounds" / "round_001")
    assert [s["resumed_from"] for s in starts] == [None, None, "state_dict step 20"]  # launch 2: built, then loaded


def test_a_script_that_keeps_crashing_fails_its_round_after_max_fast_crash(tmp_path):
    d = tmp_path / "camp"
    script = shlex.join([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    res = subprocess.run(_cmd(d, script, 1, "--memory", "none", "--set", "guard.max_fast_crash=2"),
                         env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    (fin,) = read_jsonl(d / "final_results.jsonl")
    assert fin["status"] == "failed" and fin["crash_count"] == 3  # the first launch and 2 relaunches
    assert "exited with code 3" in fin["failure_reason"] and "boom" in fin["failure_reason"]
    assert f"reason: {fin['failure_reason']}" in res.stdout  # the round's line says why, not only the log
    log = (d / "rounds" / "round_001" / "script.log").read_text()
    assert log.count("boom") == 3


@pytest.mark.parametrize(
    ("script", "extra", "field"),
    [
        ("  ", (), "--script: empty"),
        ("python 'a", (), "--script"),
        ("python a.py", ("--controller", "replay", "--replay-from", "x"), "--script runs rules or llm"),
        # a mistyped program failed every round silently (the reason only in final_results.jsonl) and exited 0
        ("nonexistent_cmd_xyz train.py", (), "--script: 'nonexistent_cmd_xyz' is not a command on PATH"),
    ],
)
def test_bad_script_settings_are_refused_in_one_line(tmp_path, script, extra, field):
    res = subprocess.run(_cmd(tmp_path / "c", script, 1, *extra), env=_env(), capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith(f"lrpilot: error: {field}") and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "c").exists()


def test_a_changed_script_is_refused_naming_the_field(tmp_path):
    d = tmp_path / "c"
    first = subprocess.run(_cmd(d, "python -c 'import sys; sys.exit(1)'", 1, "--memory", "none",
                                "--set", "guard.max_fast_crash=1"), env=_env(), capture_output=True, text=True)  # fmt: skip
    assert first.returncode == 0, first.stderr
    res = subprocess.run(_cmd(d, "python other.py", 1, "--memory", "none", "--set", "guard.max_fast_crash=1"),
                         env=_env(), capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 2 and "different settings (script)" in res.stderr, res.stderr


@pytest.mark.slow
def test_llm_controller_and_llm_memory_reach_the_script(tmp_path, monkeypatch):
    from llm_servers import ScriptedServer, chat_body

    from lrpilot.campaign import CampaignSettings, run_campaign
    from lrpilot.config import load_config

    def respond(req: dict) -> tuple[int, dict, dict]:
        if "response_format" in req:  # the Controller (in the script's Pilot) asks for JSON
            return 200, chat_body('{"reason": "loss falls, hold", "lr": 0.003}'), {}
        return 200, chat_body("Round 1 held 3e-3 and ended well; hold it again."), {}

    for name in ("DASHSCOPE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    srv = ScriptedServer(responder=respond, models=("scripted",))
    try:
        cfg = load_config(
            "cpu-smoke",
            ["train.total_steps=30", f"agent.base_url={srv.base_url}", "agent.model=scripted", "agent.retries=0",
             "agent.wait_for_decisions=true"],
        )  # fmt: skip
        settings = CampaignSettings(preset="cpu-smoke", overrides=(), controller="llm", memory="llm", script=_script())
        recs = run_campaign(cfg, tmp_path / "c", 2, settings, echo=lambda *_: None)
    finally:
        srv.stop()
    assert [r["status"] for r in recs] == ["ok", "ok"], recs
    briefs = read_jsonl(tmp_path / "c" / "briefs.jsonl")
    assert briefs[1]["brief"].startswith("Round 1 held")  # the Memory agent's brief for round 2 ...
    assert '"memory_brief": "Round 1 held' in (tmp_path / "c" / "rounds" / "round_002" / "pilot.json").read_text()
    decisions = read_jsonl(tmp_path / "c" / "decisions.jsonl")
    assert {d["round"] for d in decisions} == {1, 2} and any(d["kind"] == "decision" for d in decisions)
    assert any("response_format" in r["json"] for r in srv.requests)  # ... and the script's controller asked


@pytest.mark.slow
def test_a_campaign_killed_alone_takes_its_script_with_it(tmp_path):
    d = tmp_path / "camp"
    proc = subprocess.Popen(_cmd(d, _script("--pause-at-step", "10"), 1, "--memory", "none"), env=_env(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        paused = d / "rounds" / "round_001" / "paused"
        _wait_for(paused, proc)
        script_pid = int(paused.read_text())
        os.kill(proc.pid, signal.SIGKILL)  # the campaign only, not its process group
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{script_pid}").exists() and "Z" not in _state(script_pid):
            assert time.monotonic() < deadline, "the script outlived its campaign"
            time.sleep(0.05)  # polling a condition with a deadline
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@pytest.mark.slow
def test_two_script_rounds_in_parallel_then_a_resume_after_sigkill(tmp_path):
    """`campaign --parallel 2 --script`: both rounds run at once (Optuna proposes round 2 while round 1 runs), the
    campaign is killed with round 1 done and round 2 mid-way, and the same command finishes round 2 from its
    checkpoint; each round's decisions reach the campaign's log once and `lrpilot status` reads both."""
    d = tmp_path / "camp"
    cmd = _cmd(d, _script("--pause-at-step", "20", "--pause-round", "2"), 2, "--memory", "optuna", "--parallel", "2")
    # with rounds in parallel, round 1 may still be finishing when round 2 pauses: kill once it has its result
    finals = _kill_in_round_2_then_resume(cmd, d, also=lambda: read_jsonl(d / "final_results.jsonl"))
    assert [r["round"] for r in finals] == [1, 2]
    assert all(r["status"] == "ok" and r["update_step"] == 40 and r["crash_count"] == 0 for r in finals)
    assert len(_starts(d / "rounds" / "round_001")) == 1
    assert _starts(d / "rounds" / "round_002")[-1]["resumed_from"] == "state_dict step 20"
    briefs = read_jsonl(d / "briefs.jsonl")
    assert [b["round"] for b in briefs] == [1, 2] and briefs[0]["params"] != briefs[1]["params"]
    assert "1 running" in briefs[0]["brief"] and "2 running" in briefs[1]["brief"]  # proposed side by side
    assert "the first round uses the default rule parameters" in briefs[1]["brief"]
    for b, f in zip(briefs, finals, strict=True):
        assert f["rule_params"] == b["params"]
    campaign_log = read_jsonl(d / "decisions.jsonl")
    for r in (1, 2):
        own = read_jsonl(d / "rounds" / f"round_{r:03d}" / "decisions.jsonl")
        copied = [x for x in campaign_log if x["round"] == r]
        assert own and [(x["step"], x["new_lr"]) for x in copied] == [(x["step"], x["new_lr"]) for x in own]
    st = subprocess.run([sys.executable, "-m", "lrpilot", "status", str(d)], env=_env(), capture_output=True,
                        text=True, timeout=120)  # fmt: skip
    lines = st.stdout.splitlines()
    assert st.returncode == 0 and lines[-1] == "2 finished", st.stdout
    assert all("step 40/40" in ln and "no decision yet" not in ln for ln in lines[:2]), st.stdout
