"""In-process rollbacks of lrpilot.Pilot: an LLM's request to go back (Decision.rollback_to_step) over a real HTTP
server, and the step numbering rule (rewind=True: your loop re-trains the undone steps under the same numbers;
rewind=False: a framework's step count goes on) with real NaNs on the cpu-smoke model.

    python -m pytest -q tests/test_pilot_rollbacks.py
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from lrpilot.logs import read_jsonl
from lrpilot.pilot import Pilot


def _setup(smoke_config):
    from lrpilot.data import build_data
    from lrpilot.model import LLaMA

    torch.manual_seed(0)
    model = LLaMA(smoke_config.model)
    data = build_data(smoke_config.data, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    return model, data, opt


def _llm(server_url: str, guard, tmp_path):
    from lrpilot.config import AgentConfig
    from lrpilot.controllers.llm import LLMController
    from lrpilot.llm.base import make_backend

    agent = AgentConfig(backend="openai", base_url=server_url, model="scripted", api_key_env="LRPILOT_TEST_KEY",
                        retries=0, timeout_s=30)  # fmt: skip
    return LLMController(make_backend(agent, "controller", tmp_path / "llm_calls.jsonl"), guard=guard, blocking=True)


def test_an_llm_rollback_request_restores_the_snapshot_of_that_step(smoke_config, tmp_path, monkeypatch):
    pytest.importorskip("openai", reason="needs the `openai` extra")
    from llm_servers import TEST_KEY, ScriptedServer, rollback_responder

    prompts: list[str] = []
    server = ScriptedServer(responder=rollback_responder(40, 20, 35, prompts))
    monkeypatch.setenv("LRPILOT_TEST_KEY", TEST_KEY)
    model, data, opt = _setup(smoke_config)
    batch = {"i": 0}
    at_10: dict[str, torch.Tensor] = {}
    try:
        pilot = Pilot(
            opt, controller=_llm(server.base_url, smoke_config.guard, tmp_path), total_steps=40, warmup_steps=5,
            decision_every=5, run_dir=tmp_path, model=model, guard=smoke_config.guard, snapshot_keep=4,
            extra_state=(lambda: dict(batch), lambda s: batch.update(s)),
        )  # fmt: skip
        infos = []
        while pilot.step_count < 40:
            x, y = data.train_batch(batch["i"], 0, 4)
            batch["i"] += 1
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            info = pilot.step(loss.item())
            infos.append(info)
            if info.step == 10 and not at_10:
                at_10 = {k: v.clone() for k, v in model.state_dict().items()}
            if info.rolled_back:
                # the model, the caller's data position and the step count are those of the snapshot at step 10
                assert info.step == 10 and batch["i"] == 10 and info.decision == "agent_rollback"
                assert all(torch.equal(v, at_10[k]) for k, v in model.state_dict().items())
                assert opt.param_groups[0]["lr"] == pytest.approx(0.002)
        res = pilot.finish(final_eval_loss=2.0)
    finally:
        server.stop()
    assert sum(i.rolled_back for i in infos) == 1 and res["agent_rollbacks"] == 1 and res["crash_count"] == 0
    # the prompt offered the kept snapshots (the one of step 20 is taken after its decision) as the steps it may name
    offered = re.search(r'"rollback_to_step": <one of ([\d, ]+)>', prompts[0]).group(1)
    assert [int(s) for s in offered.split(", ")] == [0, 5, 10, 15]
    decisions = read_jsonl(tmp_path / "decisions.jsonl")
    (g,) = [d for d in decisions if d["kind"] == "agent_rollback"]
    assert (g["step"], g["rollback_to_step"], g["effective_step"], g["new_lr"], g["seq"]) == (20, 10, 10, 0.002, None)
    assert (g["undone_steps"], g["next_step"], g["step_numbering"]) == ([11, 20], 11, "rewind")
    assert "step 10" in g["rollback_reason"] and g["reasoning"] == "the climb since step 10 was wasted"
    # steps 15 and 20 were decided again on the new branch; the request at 35 was refused, its LR stands
    assert [d["step"] for d in decisions] == [5, 10, 15, 20, 15, 20, 25, 30, 35]
    refused = decisions[-1]
    assert refused["kind"] == "decision" and refused["new_lr"] == pytest.approx(0.0025)
    assert "in the last 0.2 of the run" in refused["rollback_refused"]
    assert not (tmp_path / "rollbacks.jsonl").exists()  # not a crash
    # the telemetry's step events: 1..20, then 11..40 again (the rule of rewind=True); update 11 of the new
    # branch used the agent's LR
    steps = [e for e in read_jsonl(tmp_path / "telemetry.jsonl") if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 21)) + list(range(11, 41))
    assert steps[20]["lr"] == pytest.approx(0.002)
    assert json.loads((tmp_path / "result.json").read_text())["agent_rollbacks"] == 1


def test_an_llm_rollback_request_without_a_model_is_a_logged_refusal(smoke_config, tmp_path, monkeypatch):
    pytest.importorskip("openai", reason="needs the `openai` extra")
    from llm_servers import TEST_KEY, ScriptedServer, chat_body

    server = ScriptedServer([(200, chat_body('{"reason": "back", "lr": 0.002, "rollback_to_step": 0}'), {})])
    monkeypatch.setenv("LRPILOT_TEST_KEY", TEST_KEY)
    _, _, opt = _setup(smoke_config)
    try:
        pilot = Pilot(opt, controller=_llm(server.base_url, smoke_config.guard, tmp_path), total_steps=20,
                      warmup_steps=2, decision_every=5, run_dir=tmp_path, guard=smoke_config.guard)  # fmt: skip
        kinds = [pilot.step(3.0).decision for _ in range(10)]
        pilot.finish()
    finally:
        server.stop()
    assert kinds.count("decision") == 2 and "agent_rollback" not in kinds and pilot.step_count == 10
    d = read_jsonl(tmp_path / "decisions.jsonl")[0]
    assert d["kind"] == "decision" and d["new_lr"] == pytest.approx(0.002) and d["rollback_to_step"] == 0
    assert "no model to restore" in d["rollback_refused"] and d["rollback_refused"] in d["clamp_reasons"]


def test_without_rewind_the_step_count_goes_on_and_the_record_says_what_was_undone(smoke_config, tmp_path):
    """A framework's step counter is not rewound by a rollback: with rewind=False (the callbacks' setting) the
    pilot's steps are the framework's, every step is logged once, the run reaches total_steps, and the rollback
    record names the undone updates."""
    model, data, opt = _setup(smoke_config)
    pilot = Pilot(opt, controller="rules", total_steps=30, warmup_steps=5, decision_every=5, run_dir=tmp_path,
                  model=model, guard=smoke_config.guard, rewind=False)  # fmt: skip
    framework_step = 0
    rolled = []
    while framework_step < 30:  # the framework's loop: its own counter, one pilot.step per update
        x, y = data.train_batch(framework_step, 0, 4)
        _, loss = model(x, y)
        if framework_step + 1 == 17:
            loss = loss * math.nan
        loss.backward()
        opt.step()
        opt.zero_grad()
        framework_step += 1
        info = pilot.step(loss.item())
        assert info.step == framework_step == pilot.step_count
        if info.rolled_back:
            rolled.append(info)
            assert all(torch.isfinite(p).all() for p in model.parameters())
    res = pilot.finish(final_eval_loss=2.0)
    assert len(rolled) == 1 and res["update_step"] == 30 and res["crash_count"] == 1
    (rb,) = read_jsonl(tmp_path / "rollbacks.jsonl")
    # smoke's rollback_back_steps=10 before step 17 is 7; the earliest kept snapshot (keep 2: 10, 15) is 10
    assert (rb["crash_step"], rb["rolled_back_to_step"]) == (17, 10)
    assert (rb["undone_steps"], rb["next_step"], rb["step_numbering"]) == ([11, 17], 18, "continue")
    steps = [e["step"] for e in read_jsonl(tmp_path / "telemetry.jsonl") if e["event"] == "step"]
    assert steps == list(range(1, 31))
    # the decision points are the framework's steps, through the end of the run
    assert [d["step"] for d in read_jsonl(tmp_path / "decisions.jsonl")] == [5, 10, 15, 20, 25]
