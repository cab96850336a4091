"""An LLM campaign's own logs: llm_calls.jsonl lines join their round, and a brief cut at max_tokens is marked.

    .venv/bin/python -m pytest -q tests/test_llm_campaign_logs.py

A real campaign (cpu-smoke trainer subprocesses) whose Controller and Memory agent talk to a real stdlib HTTP
server on 127.0.0.1 (tests/llm_servers.py); the server cuts every Memory reply at max_tokens, as an endpoint
does when a brief outgrows agent.memory_max_tokens.
"""

from __future__ import annotations

import pytest
from llm_servers import ScriptedServer, chat_body

from lrpilot.campaign import CampaignSettings, run_campaign
from lrpilot.config import load_config
from lrpilot.logs import read_jsonl

CUT_BRIEF = "Round 1 reached ppl 9.1 at peak 3e-3; the band 1e-2..3e-2 is untested, so try a higher peak and decay"


def _respond(req: dict) -> tuple[int, dict, dict]:
    if "response_format" in req:  # the Controller asks for JSON
        return 200, chat_body('{"reason": "loss falls, hold", "lr": 0.003}'), {}
    body = chat_body(CUT_BRIEF)
    body["choices"][0]["finish_reason"] = "length"  # cut at max_tokens mid-sentence
    return 200, body, {}


@pytest.mark.slow
def test_llm_calls_carry_round_and_run_start_and_a_cut_brief_is_marked(tmp_path, monkeypatch):
    for name in ("DASHSCOPE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    srv = ScriptedServer(responder=_respond, models=("scripted",))
    try:
        cfg = load_config(
            "cpu-smoke",
            ["train.total_steps=30", f"agent.base_url={srv.base_url}", "agent.model=scripted", "agent.retries=0"],
        )
        settings = CampaignSettings(preset="cpu-smoke", overrides=(), controller="llm", memory="llm")
        recs = run_campaign(cfg, tmp_path / "c", 2, settings, echo=lambda *_: None)
    finally:
        srv.stop()
    assert [r["status"] for r in recs] == ["ok", "ok"]
    iso = {r["round"]: r["run_start_iso"] for r in recs}
    calls = read_jsonl(tmp_path / "c" / "llm_calls.jsonl")
    assert {c["role"] for c in calls} == {"controller", "memory"}
    for c in calls:
        assert c["round"] in iso and c["run_start_iso"] == iso[c["round"]], c
    assert [c["round"] for c in calls if c["role"] == "memory"] == [2]  # round 1 has no past: no call
    assert {c["finish_reason"] for c in calls} == {"stop", "length"}
    briefs = {b["round"]: b for b in read_jsonl(tmp_path / "c" / "briefs.jsonl")}
    assert briefs[2]["truncated"] is True and briefs[2]["truncated_by"] == ["max_tokens"]
    assert briefs[2]["brief"] == CUT_BRIEF and not briefs[2]["fallback"]
    assert "truncated" not in briefs[1] or briefs[1]["truncated"] is False
