"""End-to-end campaigns on cpu-smoke: real trainer subprocesses, real Optuna study, real local LLM.

Each round is a full (tiny) pre-training run; these tests check the rounds loop, its logs, the lock that
refuses a second process, and kill-and-resume of the whole campaign.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lrpilot.campaign import CampaignError, CampaignLock, CampaignSettings, run_campaign
from lrpilot.config import ConfigError, apply_overrides, load_config
from lrpilot.logs import read_jsonl

SMOKE = ["train.total_steps=40", "schedule.warmup_steps=10", "schedule.decision_every=10"]
PUBLISHED_FIELDS = {
    "run_start_iso", "final_eval_ppl", "final_eval_loss", "total_decisions", "crash_count", "peak_lr_seen",
    "min_lr_seen", "warmup_steps", "decision_every", "init_lr", "optimizer",
}  # fmt: skip


def _cfg():
    return apply_overrides(load_config("cpu-smoke"), SMOKE)


def _wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)  # polling a condition with a deadline, not synchronising by sleep
    raise AssertionError(f"timed out waiting for {what}")


def _check_round_logs(d: Path, rounds: int, decisions_per_round: int) -> list[dict]:
    finals = read_jsonl(d / "final_results.jsonl", strict=True)
    assert [r["round"] for r in finals] == list(range(1, rounds + 1))
    for r in finals:
        assert r.keys() >= PUBLISHED_FIELDS
        assert r["status"] == "ok" and r["update_step"] == 40
    decisions = read_jsonl(d / "decisions.jsonl", strict=True)
    for r in range(1, rounds + 1):
        mine = [x for x in decisions if x["round"] == r]
        # every decision point was decided; none logged twice (a rollback may legitimately re-decide a step,
        # but then under a new command seq)
        assert len({x["step"] for x in mine}) == decisions_per_round, (r, mine)
        seqs = [x["seq"] for x in mine]
        assert len(seqs) == len(set(seqs)), (r, seqs)
    return finals


@pytest.mark.slow
def test_rules_campaign_with_optuna_memory(tmp_path):
    d = tmp_path / "camp"
    settings = CampaignSettings(preset="cpu-smoke", overrides=tuple(SMOKE), controller="rules", memory="optuna")
    lines: list[str] = []
    run_campaign(_cfg(), d, 3, settings, echo=lines.append)
    finals = _check_round_logs(d, 3, decisions_per_round=3)  # decision points at steps 10, 20, 30
    # Optuna proposed each round's rule parameters and was told each result
    assert all("rule_params" in r for r in finals)
    briefs = read_jsonl(d / "briefs.jsonl", strict=True)
    assert [b["round"] for b in briefs] == [1, 2, 3]
    assert any(p.name.startswith("optuna") for p in d.iterdir())
    assert "best so far" in lines[0] and "3 rounds" in lines[-1]
    # running the same command again is a no-op: nothing counted twice
    run_campaign(_cfg(), d, 3, settings, echo=lines.append)
    assert len(read_jsonl(d / "final_results.jsonl")) == 3
    # extending the campaign runs only the new round
    run_campaign(_cfg(), d, 4, settings, echo=lines.append)
    assert [r["round"] for r in read_jsonl(d / "final_results.jsonl")] == [1, 2, 3, 4]


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="--memory optuna"):
        CampaignSettings(preset="cpu-smoke", overrides=(), controller="llm", memory="optuna")
    with pytest.raises(ConfigError, match="--replay-from"):
        CampaignSettings(preset="cpu-smoke", overrides=(), controller="replay", memory="none")
    with pytest.raises(ConfigError, match="use it with --controller rules"):
        CampaignSettings(preset="cpu-smoke", overrides=(), controller="llm", memory="llm", rule_params={"ceiling": 1})
    with pytest.raises(ConfigError, match="--rule celing: unknown parameter"):
        CampaignSettings(preset="cpu-smoke", overrides=(), controller="rules", memory="none", rule_params={"celing": 1})
    fixed = CampaignSettings(preset="p", overrides=(), controller="rules", memory="none", rule_params={"ceiling": 3e-2})
    assert fixed.rules_for(3e-4).ceiling == 3e-2 and fixed.rules_for(3e-4).climb_factor == 1.5
    with pytest.raises(ConfigError, match="rules.climb_factor"):
        CampaignSettings(preset="p", overrides=(), controller="rules", memory="none",
                         rule_params={"climb_factor": 5.0}).rules_for(3e-4)  # fmt: skip


@pytest.mark.slow
def test_fixed_rule_params_are_used_every_round_and_left_out_of_the_search(tmp_path):
    """`lrpilot campaign --rule NAME=VALUE`: fixed for every round, recorded, not searched by Optuna."""
    import optuna

    d = tmp_path / "camp"
    cmd = [sys.executable, "-m", "lrpilot", "campaign", "--preset", "cpu-smoke", "--rounds", "2", "--dir", str(d),
           "--controller", "rules", "--memory", "optuna", "--rule", "ceiling=5e-3", "--rule", "climb_factor=2",
           *[a for o in SMOKE for a in ("--set", o)]]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    finals = _check_round_logs(d, 2, decisions_per_round=3)
    assert all(f["rule_params"]["ceiling"] == 5e-3 and f["rule_params"]["climb_factor"] == 2.0 for f in finals)
    assert all(f["peak_lr_seen"] <= 5e-3 * (1 + 1e-9) for f in finals)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(d / "optuna_journal.log")))
    trials = optuna.load_study(study_name="lrpilot_rules", storage=storage).trials
    assert len(trials) == 2 and all({"ceiling", "climb_factor"}.isdisjoint(t.params) for t in trials)
    assert trials[1].params and finals[1]["rule_params"] != finals[0]["rule_params"]  # the rest was searched
    assert json.loads((d / "campaign.json").read_text())["settings"]["rule_params"] == {
        "ceiling": 5e-3,
        "climb_factor": 2.0,
    }
    # another --rule value on the same directory is a different campaign: refused, naming the field
    r = subprocess.run([*cmd[:-1], cmd[-1], "--rule", "decay_start=0.6"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "rule_params" in r.stderr and r.stderr.count("\n") == 1


def test_changed_settings_on_an_existing_campaign_are_refused(tmp_path):
    d = tmp_path / "camp"
    s1 = CampaignSettings(preset="cpu-smoke", overrides=(), controller="rules", memory="none")
    from lrpilot.campaign import _check_settings

    d.mkdir()
    _check_settings(d, s1)
    assert "rule_params" not in json.loads((d / "campaign.json").read_text())["settings"]  # as before --rule
    s2 = CampaignSettings(preset="cpu-smoke", overrides=(), controller="rules", memory="optuna")
    with pytest.raises(CampaignError, match="memory"):
        _check_settings(d, s2)


def test_second_process_is_refused(tmp_path):
    d = tmp_path / "camp"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lrpilot.campaign import CampaignLock; from pathlib import Path\n"
         "with CampaignLock(Path(sys.argv[1])):\n    print('locked', flush=True); sys.stdin.read()", str(d)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CampaignError, match="in use by a running campaign"), CampaignLock(d):
            pass
        r = subprocess.run(
            [sys.executable, "-m", "lrpilot", "campaign", "--preset", "cpu-smoke", "--rounds", "1",
             "--controller", "rules", "--dir", str(d)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 2 and "in use" in r.stderr and f"pid {holder.pid}" in r.stderr
        assert not (d / "final_results.jsonl").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with CampaignLock(d):  # released once the holder is gone
        pass


def test_fewer_rounds_than_the_directory_holds_are_counted_as_asked(tmp_path):
    """Issue 9, item 7: `campaign --rounds 1` on a directory with 2 finished rounds prints 1 round, and says
    that the directory holds more."""
    d = tmp_path / "camp"
    settings = CampaignSettings(preset="cpu-smoke", overrides=tuple(SMOKE), controller="rules", memory="none")
    d.mkdir()
    for r, ppl in ((1, 5.0), (2, 4.0)):  # two rounds already finished (no training needed for --rounds 1)
        (d / "final_results.jsonl").open("a").write(
            json.dumps(
                {
                    "round": r,
                    "status": "ok",
                    "final_eval_ppl": ppl,
                    "wall_time_s": 1.0,
                    "peak_lr_seen": 3e-3,
                    "min_lr_seen": 1e-3,
                    "crash_count": 0,
                }
            )
            + "\n"  # fmt: skip
        )
    lines: list[str] = []
    recs = run_campaign(_cfg(), d, 1, settings, echo=lines.append)
    assert [r["round"] for r in recs] == [1]
    assert lines[-2].splitlines()[-1].startswith("1 round: best ppl 5.000"), lines
    assert "already holds 1 more round (2) than --rounds 1; run with --rounds 2" in lines[-1]


@pytest.mark.slow
def test_kill_and_resume(tmp_path):
    d = tmp_path / "camp"
    cmd = [sys.executable, "-m", "lrpilot", "campaign", "--preset", "cpu-smoke", "--rounds", "3",
           "--controller", "rules", "--memory", "optuna", "--dir", str(d)]  # fmt: skip
    for s in SMOKE:
        cmd += ["--set", s]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # kill the whole campaign (and its trainer) once round 2 has a checkpoint
        _wait_for(lambda: list((d / "rounds" / "round_002" / "checkpoints").glob("*.json")), 300, "round 2 ckpt")
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert len(read_jsonl(d / "final_results.jsonl")) == 1
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    _check_round_logs(d, 3, decisions_per_round=3)
    # the interrupted round resumed (its run directory holds more than one trainer launch)
    starts = [e for e in read_jsonl(d / "rounds" / "round_002" / "telemetry.jsonl") if e.get("event") == "start"]
    assert len(starts) >= 2 and starts[-1].get("resumed_from")


@pytest.mark.slow
@pytest.mark.llm
def test_local_llm_campaign(tmp_path):
    pytest.importorskip("llama_cpp", reason="needs the `local` extra (make test installs it)")
    # the trainer waits for each answer: a smoke round (seconds) would otherwise end before SmolLM2's first one
    local = ["agent.backend=local", "agent.wait_for_decisions=true"]
    cfg = apply_overrides(_cfg(), local)
    d = tmp_path / "llm"
    settings = CampaignSettings(preset="cpu-smoke", overrides=(*SMOKE, *local), controller="llm",
                                memory="llm", backend="local", model="SmolLM2-135M")  # fmt: skip
    run_campaign(cfg, d, 3, settings, echo=lambda s: None)
    finals = read_jsonl(d / "final_results.jsonl", strict=True)
    assert [r["round"] for r in finals] == [1, 2, 3] and all(r["update_step"] == 40 for r in finals)
    calls = read_jsonl(d / "llm_calls.jsonl", strict=True)
    roles = {c.get("role") for c in calls}
    assert {"controller", "memory"} <= roles
    briefs = read_jsonl(d / "briefs.jsonl", strict=True)
    assert all(len(b["brief"].split()) <= 150 for b in briefs)
    _check_round_logs(d, 3, decisions_per_round=3)
    decisions = read_jsonl(d / "decisions.jsonl", strict=True)
    assert all(x["new_lr"] > 0 and x["effective_step"] == x["step"] for x in decisions)
    assert json.dumps(calls).count("sk-") == 0


@pytest.mark.slow
@pytest.mark.llm
@pytest.mark.parametrize("server", ["think", "reasoning_content", "thinks_forever"])
def test_reasoning_model_round_is_parsed_or_flagged(tmp_path, monkeypatch, server):
    """Issue 9, item 3: a reasoning model behind a real OpenAI-compatible server on 127.0.0.1. Its reasoning
    is removed before the reply is read and kept in llm_calls.jsonl; a round in which most decisions fell
    back (here: the model never finishes thinking) is flagged in the terminal, final_results and report."""
    pytest.importorskip("openai", reason="needs the `openai` extra")
    from llm_servers import ScriptedServer, chat_body

    from lrpilot.report.report import build_report

    for name in ("DASHSCOPE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)

    def answer(req):
        body = chat_body('{"reason": "hold", "lr": 0.0015}')
        msg = body["choices"][0]["message"]
        if server == "think":
            msg["content"] = '<think>\nthe loss falls, {"lr": 0.04} would be too much\n</think>\n\n' + msg["content"]
        elif server == "reasoning_content":
            msg["reasoning_content"] = "the loss falls; 1.5e-3"
        else:
            msg["content"] = "<think>\nhmm, {maybe} 1e-3, or"
            body["choices"][0]["finish_reason"] = "length"
        return 200, body, {}

    srv = ScriptedServer(responder=answer)
    try:
        agent = [f"agent.base_url={srv.base_url}", "agent.model=scripted", "agent.wait_for_decisions=true",
                 "agent.retries=0"]  # fmt: skip
        cfg = apply_overrides(_cfg(), agent)
        d = tmp_path / "camp"
        settings = CampaignSettings(preset="cpu-smoke", overrides=(*SMOKE, *agent), controller="llm",
                                    memory="none", backend="openai", model="scripted")  # fmt: skip
        lines: list[str] = []
        run_campaign(cfg, d, 1, settings, echo=lines.append)
    finally:
        srv.stop()
    (final,) = read_jsonl(d / "final_results.jsonl", strict=True)
    decisions = read_jsonl(d / "decisions.jsonl", strict=True)
    calls = read_jsonl(d / "llm_calls.jsonl", strict=True)
    assert len(decisions) == 3 and len(calls) == 3
    assert all(c["reasoning"] for c in calls) and not any("<think>" in c["reply"] for c in calls)
    report = build_report(d, [], d / "report").md_path.read_text()
    if server == "thinks_forever":
        assert {x["kind"] for x in decisions} == {"fallback"}
        assert all("only reasoning" in c["error"] for c in calls)
        assert final["mostly_fallback"] is True and final["fallback_decisions"] == 3
        assert "MOSTLY FALLBACK (3 of 3" in lines[0]
        assert "most decisions fell back" in report and "mostly fallback (3/3" in report
    else:
        assert {x["kind"] for x in decisions} == {"decision"} and {x["new_lr"] for x in decisions} == {0.0015}
        assert all(c["error"] is None for c in calls)
        assert final["mostly_fallback"] is False and final["fallback_decisions"] == 0
        assert "FALLBACK" not in lines[0] and "fell back" not in report


def _final_branch_lrs(run_dir: Path) -> dict[int, float]:
    """step -> LR of the update that completed it, on the branch the final model was trained on (a resumed
    launch re-trains the steps after its checkpoint: the last event of a step is the one that counts)."""
    lrs: dict[int, float] = {}
    for ev in read_jsonl(run_dir / "telemetry.jsonl"):
        if ev.get("event") == "step":
            lrs[ev["step"]] = ev["lr"]
    return lrs


def _logged_lrs(records: list[dict], steps: list[int], warmup: int, init_lr: float) -> dict[int, float]:
    """step -> LR that decisions.jsonl says the update completing that step used (after warmup)."""
    applied = sorted((r["effective_step"], r["seq"] or 0, r["new_lr"]) for r in records
                     if isinstance(r.get("effective_step"), int))  # fmt: skip
    out = {}
    for n in steps:
        update = n - 1
        if update < warmup:
            continue
        out[n] = next((lr for eff, _, lr in reversed(applied) if eff <= update), init_lr)
    return out


@pytest.mark.slow
@pytest.mark.llm
def test_killed_non_blocking_campaign_resumes_on_the_logged_branch(tmp_path, monkeypatch):
    """Issue 9, item 4: a non-blocking LLM controller (a real HTTP server on 127.0.0.1), decisions and
    checkpoints every 20 steps. The decision at step 40 takes effect some steps later; the campaign is
    SIGKILLed after that and resumed from step_000040 (later checkpoints truncated, as if the kill came before
    them). The resumed round must train the branch decisions.jsonl describes, and a replay of the round must
    give the same LR at every step."""
    pytest.importorskip("openai", reason="needs the `openai` extra")
    from llm_servers import ScriptedServer, chat_body

    for name in ("DASHSCOPE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    d = tmp_path / "camp"
    run = d / "rounds" / "round_001"
    # batch 16: steps slow enough (> 5 ms) that the decision at 40 lands well before the one at 60
    steps = ["train.total_steps=200", "train.batch_size=16", "schedule.warmup_steps=20",
             "schedule.decision_every=20", "checkpoint.every=20", "checkpoint.keep=100", "agent.retries=0"]  # fmt: skip
    first_run = [True]

    def trainer_step() -> int:
        evs = [e for e in read_jsonl(run / "telemetry.jsonl") if e.get("event") == "step"]
        return evs[-1]["step"] if evs else 0

    def answer(req):
        prompt = req["messages"][-1]["content"]
        m = re.search(r"\nstep (\d+) of \d+ \(", prompt)
        step = int(m.group(1)) if m else 0
        if step == 40 and first_run[0]:  # the trainer trains on while this decision is pending
            deadline = time.monotonic() + 120
            while trainer_step() < 46 and time.monotonic() < deadline:
                time.sleep(0.005)  # polling the trainer's progress, not synchronising by sleep
        lr = 3e-3 * (0.75, 1.0, 1.25)[(step // 20) % 3]
        return 200, chat_body(json.dumps({"reason": f"step {step}", "lr": lr})), {}

    srv = ScriptedServer(responder=answer)
    cmd = [sys.executable, "-m", "lrpilot", "campaign", "--preset", "cpu-smoke", "--rounds", "1", "--controller",
           "llm", "--memory", "none", "--backend", "openai", "--base-url", srv.base_url, "--model", "scripted",
           "--dir", str(d)]  # fmt: skip
    for s in steps:
        cmd += ["--set", s]
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            applied = _wait_for(
                lambda: [
                    e
                    for e in read_jsonl(run / "telemetry.jsonl")
                    if e.get("event") == "applied" and e.get("decided_at_step") == 40
                ],  # fmt: skip
                300,
                "the step-40 decision applied",
            )
            os.killpg(p.pid, signal.SIGKILL)  # the campaign; the trainer has its own session
            p.wait(timeout=30)
            trainer = [e for e in read_jsonl(run / "telemetry.jsonl") if e.get("event") == "start"][-1]["launch"]
            with contextlib.suppress(OSError):
                if b"lrpilot.trainer" in Path(f"/proc/{trainer}/cmdline").read_bytes():
                    os.kill(trainer, signal.SIGKILL)
            _wait_for(lambda: not Path(f"/proc/{trainer}").exists(), 30, "the trainer gone")
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        first_run[0] = False
        assert applied[0]["step"] > 46 and not (d / "final_results.jsonl").exists()
        cut = [c for c in (run / "checkpoints").glob("step_*.pt") if int(c.stem.split("_")[1]) > 40]
        for ckpt in cut:  # as if the kill had come before them: cut short
            with open(ckpt, "r+b") as f:
                f.truncate(ckpt.stat().st_size // 2)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    finally:
        srv.stop()

    starts = [e for e in read_jsonl(run / "telemetry.jsonl") if e.get("event") == "start"]
    assert starts[-1]["resumed_from"].endswith("step_000040.pt")
    records = [x for x in read_jsonl(d / "decisions.jsonl", strict=True) if x["round"] == 1]
    # one record per decision point: the re-trained points were not asked again
    assert len({x["step"] for x in records}) == len(records), sorted(x["step"] for x in records)
    d40 = next(x for x in records if x["step"] == 40)
    assert d40["effective_step"] == applied[0]["step"]
    trained = _final_branch_lrs(run)
    assert sorted(trained) == list(range(1, 201))
    logged = _logged_lrs(records, sorted(trained), warmup=20, init_lr=3e-3)
    wrong = {n: (trained[n], logged[n]) for n in logged if trained[n] != pytest.approx(logged[n], rel=1e-12)}
    assert not wrong, f"steps whose trained LR differs from decisions.jsonl: {dict(list(wrong.items())[:5])}"
    # skipped checkpoints get a note, as checksum mismatches do
    log = (run / "trainer.log").read_text()
    assert all(f"resume: checkpoint {c.name} skipped" in log for c in cut), log[-3000:]
    assert "re-applied at their effective steps" in log

    # replay of the resumed round: the same LR at every step
    d2 = tmp_path / "replay"
    rcmd = [sys.executable, "-m", "lrpilot", "campaign", "--preset", "cpu-smoke", "--rounds", "1", "--controller",
            "replay", "--replay-from", str(d), "--dir", str(d2)]  # fmt: skip
    for s in steps:
        rcmd += ["--set", s]
    r = subprocess.run(rcmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    replayed = _final_branch_lrs(d2 / "rounds" / "round_001")
    diff = [n for n in trained if replayed.get(n) != pytest.approx(trained[n], rel=1e-12)]
    assert not diff, f"replay differs at steps {diff[:10]}: {[(trained[n], replayed.get(n)) for n in diff[:3]]}"
