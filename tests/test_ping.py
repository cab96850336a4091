"""The campaign's ping names what is wrong: the URL (no /v1), the Controller's model or the Memory agent's.

    .venv/bin/python -m pytest -q tests/test_ping.py

Against a real stdlib HTTP server on 127.0.0.1 that, like llama_cpp.server and vLLM, serves only /v1/...
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from llm_servers import ScriptedServer

from lrpilot.config import AgentConfig
from lrpilot.llm.base import LLMError
from lrpilot.llm.openai_backend import OpenAIBackend

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def v1_server():
    srv = ScriptedServer(models=("ctl-model", "mem-model"), api_prefix="/v1")
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _no_real_keys(monkeypatch):
    for name in ("DASHSCOPE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_url_without_v1_is_blamed_on_the_url_not_the_model(v1_server):
    with pytest.raises(LLMError) as e:
        OpenAIBackend(base_url=v1_server.root_url, model="ctl-model").ping()
    msg = str(e.value)
    assert "should agent.base_url end in /v1" in msg and f"{v1_server.root_url}/v1" in msg, msg
    assert "model" not in msg.split(";")[-1] and "fix agent.model" not in msg and "\n" not in msg
    paths = [r["path"] for r in v1_server.requests]
    assert paths == ["/models", "/chat/completions"]  # both tried before blaming the URL
    OpenAIBackend(base_url=v1_server.base_url, model="ctl-model").ping()  # the /v1 URL works


def test_ping_checks_every_model_and_names_the_right_field(v1_server):
    from lrpilot.llm.base import ping_backends

    good = AgentConfig(base_url=v1_server.base_url, model="ctl-model", memory_model="mem-model")
    ping_backends(good, ["controller", "memory"])
    with pytest.raises(LLMError, match=r"^Memory agent: model 'mem-typo' unknown .*fix agent.memory_model"):
        ping_backends(AgentConfig(base_url=v1_server.base_url, model="ctl-model", memory_model="mem-typo"),
                      ["controller", "memory"])  # fmt: skip
    with pytest.raises(LLMError, match=r"^Controller: model 'ctl-typo' unknown .*fix agent.model"):
        ping_backends(AgentConfig(base_url=v1_server.base_url, model="ctl-typo"), ["controller", "memory"])
    # memory_model empty: the Memory agent uses agent.model, and one ping covers both
    n = len(v1_server.requests)
    ping_backends(AgentConfig(base_url=v1_server.base_url, model="ctl-model"), ["controller", "memory"])
    assert len(v1_server.requests) == n + 1


def _campaign(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    env.pop("DASHSCOPE_API_KEY", None)
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "lrpilot", "campaign", "--preset", "cpu-smoke", "--rounds", "1",
         "--controller", "llm", "--dir", str(tmp_path / "camp"), *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip


@pytest.mark.slow
def test_campaign_command_stops_in_one_line_before_writing_anything(v1_server, tmp_path):
    r = _campaign(tmp_path, "--base-url", v1_server.root_url, "--model", "ctl-model")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("lrpilot: error: Controller: endpoint") and "end in /v1" in r.stderr
    r = _campaign(tmp_path, "--base-url", v1_server.base_url, "--model", "ctl-model", "--memory-model", "mem-x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "Memory agent: model 'mem-x' unknown" in r.stderr and "--memory-model" in r.stderr
    assert not (tmp_path / "camp").exists()
