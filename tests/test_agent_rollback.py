"""Agent-requested rollback: the LLM asks to go back to a checkpoint, the guard validates, the supervisor obeys.

    python -m pytest -q tests/test_agent_rollback.py

The end-to-end test runs a real trainer under a real LLM controller that talks to an OpenAI-compatible stdlib
server on 127.0.0.1 (tests/llm_servers.py); the server asks for one rollback, then for one the guard refuses.
"""

from __future__ import annotations

import json
import re

import pytest

from lrpilot import guard
from lrpilot.config import GuardConfig, load_config
from lrpilot.controllers.base import Decision
from lrpilot.controllers.llm import parse_rollback
from lrpilot.guard import CheckpointInfo, agent_rollback_steps, check_agent_rollback
from lrpilot.logs import read_jsonl
from lrpilot.progress import RunWatch
from lrpilot.supervisor import RoundLogs, run_round

CKPTS = [CheckpointInfo(10), CheckpointInfo(20), CheckpointInfo(30, healthy=False), CheckpointInfo(40)]


@pytest.mark.parametrize(
    ("requested", "step", "used", "cfg", "refusal"),
    [
        ("ten", 45, [], GuardConfig(), "not a non-negative integer"),
        (10.5, 45, [], GuardConfig(), "not a non-negative integer"),
        (True, 45, [], GuardConfig(), "not a non-negative integer"),
        (-10, 45, [], GuardConfig(), "not a non-negative integer"),
        (10, 45, [], GuardConfig(agent_rollbacks=0), "disabled"),
        (10, 45, [20, 40], GuardConfig(agent_rollbacks=2), "already 2 this round"),
        (10, 80, [], GuardConfig(agent_rollback_end_fraction=0.2), "in the last 0.2 of the run"),
        (40, 35, [], GuardConfig(), "after the decision step 35"),
        (20, 45, [20], GuardConfig(), "already rolled back to it once"),
        (30, 45, [], GuardConfig(), "no healthy checkpoint"),
        (25, 45, [], GuardConfig(), "no healthy checkpoint"),
    ],
)
def test_the_guard_refuses_bad_agent_rollbacks(requested, step, used, cfg, refusal):
    v = check_agent_rollback(requested, step, 100, CKPTS, used, cfg)
    assert not v.ok and v.to_step is None and refusal in v.reason


def test_the_guard_grants_a_valid_agent_rollback_and_lists_what_may_be_asked():
    v = check_agent_rollback(20, 45, 100, CKPTS, [10], GuardConfig())
    assert v.ok and v.to_step == 20 and "from step 45 to the checkpoint at step 20" in v.reason
    assert check_agent_rollback(20.0, 45, 100, CKPTS, [], GuardConfig()).to_step == 20
    assert agent_rollback_steps(45, 100, CKPTS, [10], GuardConfig()) == (20, 40)
    assert agent_rollback_steps(35, 100, CKPTS, [], GuardConfig()) == (10, 20)
    assert agent_rollback_steps(85, 100, CKPTS, [], GuardConfig()) == ()  # the last part of the run
    assert agent_rollback_steps(45, 100, CKPTS, [10, 20], GuardConfig()) == ()  # none left
    # every answer the guard gives is one of the offered steps, and every offered step is granted
    for step in range(0, 100, 5):
        for used in ([], [10], [10, 20]):
            offered = agent_rollback_steps(step, 100, CKPTS, used, GuardConfig())
            for to in range(0, 50, 5):
                assert check_agent_rollback(to, step, 100, CKPTS, used, GuardConfig()).ok == (to in offered)


def test_parse_rollback_reads_only_a_non_negative_integer_step():
    assert parse_rollback('{"reason": "x", "lr": 0.001}') == (None, None)
    assert parse_rollback('{"reason": "x", "lr": 0.001, "rollback_to_step": null}') == (None, None)
    assert parse_rollback('{"reason": "x", "lr": 0.001, "rollback_to_step": 300}') == (300, None)
    assert parse_rollback('{"lr": 0.001, "rollback_to_step": "300"}') == (300, None)
    assert parse_rollback('{"lr": 0.001, "rollback_to_step": 300.0}') == (300, None)
    for bad in ('"soon"', "-1", "12.5", "true", "[300]", '"1e400"'):
        step, err = parse_rollback('{"lr": 0.001, "rollback_to_step": ' + bad + "}")
        assert step is None and "non-negative integer" in err, bad
    with pytest.raises(ValueError, match="rollback_to_step"):
        Decision(lr=1e-3, rollback_to_step=-1)


@pytest.mark.slow
def test_llm_asks_for_a_rollback_over_http_the_supervisor_obeys_and_replay_reproduces_it(tmp_path, monkeypatch):
    pytest.importorskip("openai", reason="needs the `openai` extra")
    from llm_servers import TEST_KEY, ScriptedServer, rollback_responder

    from lrpilot.config import AgentConfig
    from lrpilot.controllers.llm import LLMController
    from lrpilot.controllers.replay import ReplayController
    from lrpilot.llm.base import make_backend

    asked: list[str] = []
    server = ScriptedServer(responder=rollback_responder(60, 30, 50, asked))
    monkeypatch.setenv("LRPILOT_TEST_KEY", TEST_KEY)
    cfg = load_config("cpu-smoke")
    logs = RoundLogs(tmp_path / "decisions.jsonl", tmp_path / "rollbacks.jsonl", {"round": 7, "controller": "llm"})
    launches: list[dict] = []
    try:
        agent = AgentConfig(backend="openai", base_url=server.base_url, model="scripted", api_key_env="LRPILOT_TEST_KEY",
                            retries=0, timeout_s=30)  # fmt: skip
        ctrl = LLMController(make_backend(agent, "controller", tmp_path / "llm_calls.jsonl"), guard=cfg.guard,
                             blocking=True)  # fmt: skip
        res = run_round(cfg, tmp_path / "run", ctrl, logs, round_index=7,
                        on_event=lambda ev: launches.append(ev) if ev.get("event") == "launch" else None)  # fmt: skip
    finally:
        server.stop()
    assert res.status == "ok" and res.update_step == 60 and res.crash_count == 0 and res.agent_rollbacks == 1
    # the prompt listed the checkpoints the agent may name (those on disk before step 30, none used yet)
    offered = re.search(r'"rollback_to_step": <one of ([\d, ]+)>', asked[0]).group(1)
    assert [int(s) for s in offered.split(", ")] == [10, 20] and "2 such rollbacks left" in asked[0]
    decisions = read_jsonl(tmp_path / "decisions.jsonl")
    granted = [d for d in decisions if d["kind"] == "agent_rollback"]
    assert len(granted) == 1
    g = granted[0]
    assert (g["step"], g["rollback_to_step"], g["new_lr"], g["effective_step"]) == (30, 10, 0.002, 10)
    assert g["reasoning"] == "the climb since step 10 was wasted" and "step 10" in g["rollback_reason"]
    # the supervisor relaunched from the checkpoint at step 10 at the agent's LR; no crash was recorded
    assert len(launches) == 2 and "--resume" in launches[1]["cmd"] and launches[1]["start_step"] == 10
    assert launches[1]["lr"] == pytest.approx(0.002) and "step_000010" in launches[1]["resume"]
    assert read_jsonl(tmp_path / "rollbacks.jsonl") == []
    # steps 20 and 30 were decided again on the new branch
    assert [d["step"] for d in decisions if d["kind"] != "emergency"] == [10, 20, 30, 20, 30, 40, 50]
    refused = next(d for d in decisions if d["step"] == 50)
    assert refused["kind"] == "decision" and refused["new_lr"] == pytest.approx(0.0025)
    assert "in the last 0.2 of the run" in refused["rollback_refused"] and refused["clamped"]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["agent_rollbacks"] == 1
    watch = RunWatch(tmp_path / "run")  # progress / status see it from the logs
    watch.poll()
    assert watch.status().rollbacks == 1 and watch.status().state == "finished"

    # replay: the same request at the same step, granted again, and the same run
    replay = ReplayController.from_log(tmp_path / "decisions.jsonl", round=7)
    logs2 = RoundLogs(tmp_path / "replay.jsonl", tmp_path / "replay_rollbacks.jsonl", {"round": 7})
    res2 = run_round(cfg, tmp_path / "run2", replay, logs2, round_index=7)
    assert res2.status == "ok" and res2.agent_rollbacks == 1
    again = read_jsonl(tmp_path / "replay.jsonl")
    assert [(d["step"], d["kind"], d["new_lr"]) for d in again] == [
        (d["step"], d["kind"], d["new_lr"]) for d in decisions
    ]
    assert res2.final_eval_loss == pytest.approx(res.final_eval_loss, rel=1e-6)


def test_rules_and_schedules_never_ask_for_a_rollback():
    from lrpilot.controllers.base import Observation
    from lrpilot.controllers.rules import RuleController, RuleParams
    from lrpilot.controllers.schedules import make_schedule

    cfg = load_config("cpu-smoke")
    obs = Observation(step=20, total_steps=60, warmup_steps=10, decision_every=10, lr=3e-3, init_lr=3e-3,
                      recent_losses=(4.0,) * 10, loss_history=((10, 4.5), (20, 4.0)), lr_history=((10, 3e-3), (20, 3e-3)),
                      rollback_steps=(10,), agent_rollbacks_left=2)  # fmt: skip
    controllers = [RuleController(RuleParams.for_init_lr(3e-3))] + [
        make_schedule(s, 3e-3, cfg) for s in ("cosine", "d2z", "wsd", "constant")
    ]
    assert all(c.decide(obs).rollback_to_step is None for c in controllers)
    assert guard.agent_rollback_steps(20, 60, [CheckpointInfo(10)], [], cfg.guard) == (10,)
