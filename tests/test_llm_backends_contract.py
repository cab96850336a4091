"""The LLM backend contract (lrpilot.llm.base.LLMBackend), checked on every backend in LLM_BACKENDS by name.

    python -m pytest -q tests/test_llm_backends_contract.py

Every registered backend, built by `make_backend(AgentConfig(backend=NAME, ...), role, audit)` (its
`from_agent` through the registry), must: ping; answer a chat with a Reply (str text, a usage dict, no error for
a good answer) that the controller's parser reads; append one audited line per call to llm_calls.jsonl; use the
Memory agent's model for role "memory"; describe itself as JSON; list its secrets as strings. openai runs
against a real HTTP server on 127.0.0.1 (tests/llm_servers.py); local is skipped when llama-cpp-python or the
SmolLM2 wheel is missing; toy-fixed (tests/toy_components/toy_backend.py) shows that a backend registered in
its own file is covered with no edit here. Registry entries are lazy: `import lrpilot.cli` imports no backend.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from llm_servers import ScriptedServer, chat_body, llama_cpp_missing
from toy_components import toy_backend  # noqa: F401 - registers toy-fixed

from lrpilot.config import AgentConfig, ConfigError
from lrpilot.llm import LLM_BACKENDS
from lrpilot.llm.base import LLMBackend, Reply, make_backend, model_for_role, parse_json_object
from lrpilot.logs import read_jsonl


@pytest.fixture
def server():
    srv = ScriptedServer([(200, chat_body('{"reason": "steady", "lr": 0.001}'), {})], models=("ctl", "mem"))
    yield srv
    srv.stop()


def _agent(name: str, server: ScriptedServer) -> AgentConfig:
    if name == "openai":
        return AgentConfig(backend="openai", base_url=server.base_url, model="ctl", memory_model="mem", retries=0)
    if name == "local":
        return AgentConfig(backend="local", max_tokens=200, timeout_s=120)
    return AgentConfig(backend=name, model="ctl", memory_model="mem")


def _params():
    for name in LLM_BACKENDS.names():
        marks = []
        if name == "local":
            marks = [pytest.mark.slow, pytest.mark.llm, pytest.mark.skipif(llama_cpp_missing() is not None,
                                                                           reason=llama_cpp_missing() or "")]  # fmt: skip
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_params()))
def test_backend_contract(name, server, tmp_path, monkeypatch):
    for var in ("DASHSCOPE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)  # a 127.0.0.1 endpoint needs no key
    agent = _agent(name, server)
    audit = tmp_path / "llm_calls.jsonl"
    backend = make_backend(agent, "controller", audit, {"round": 3})
    assert isinstance(backend, LLMBackend)
    backend.ping()
    schema = {"type": "object", "properties": {"reason": {"type": "string"}, "lr": {"type": "number"}}}
    msgs = [{"role": "system", "content": 'Answer only JSON: {"reason": str, "lr": number}.'},
            {"role": "user", "content": "Loss falls steadily at lr 1e-3. Your lr?"}]  # fmt: skip
    reply = backend.generate(msgs, schema)
    assert isinstance(reply, Reply) and isinstance(reply.text, str) and isinstance(reply.usage, dict)
    if name != "local":  # SmolLM2 may answer off-format; the controller's fallback handles that
        assert reply.error is None and float(parse_json_object(reply.text)["lr"]) > 0
    lines = read_jsonl(audit)
    assert len(lines) == 1 and lines[0]["role"] == "controller" and lines[0]["round"] == 3
    memory = LLM_BACKENDS.get(name).from_agent(agent, "memory")
    if name != "local":
        assert memory.model == model_for_role(agent, "memory") == "mem"
    json.dumps(backend.describe(), allow_nan=False)
    assert all(isinstance(s, str) for s in backend.secret_values())


def test_unknown_backend_is_one_line_naming_the_field_and_the_choices():
    with pytest.raises(ConfigError) as e:
        make_backend(AgentConfig(backend="opena1"), "controller", None)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("agent.backend 'opena1': unknown LLM backend")
    assert all(n in msg for n in LLM_BACKENDS.names())
    # a config naming one (--set agent.backend=...) fails before anything runs, in the same line
    from lrpilot.config import apply_overrides, load_config
    from lrpilot.preflight import check_run

    with pytest.raises(ConfigError, match=r"^agent.backend 'opena1': unknown LLM backend; choose one of: openai"):
        check_run(apply_overrides(load_config("cpu-smoke"), ["agent.backend=opena1"]))


def test_backends_are_imported_only_when_chosen():
    """Lazy entries: the CLI, the campaign and llm.base import no backend module (nor openai, llama_cpp)."""
    code = (
        "import sys, lrpilot.cli, lrpilot.campaign, lrpilot.llm.base, lrpilot.controllers.llm\n"
        "print(sorted(m for m in sys.modules if m.endswith('_backend') or m in ('openai', 'llama_cpp')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
