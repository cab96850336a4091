"""OpenAIBackend against real HTTP servers on 127.0.0.1: llama_cpp.server (SmolLM2) and a scripted stdlib server.

    .venv/bin/python -m pytest -q tests/test_openai_backend.py

The llama_cpp.server tests are marked slow+llm and skip (with the reason) only when llama_cpp is not
importable; the scripted-server tests need only the openai client.
"""

from __future__ import annotations

import json
import time

import pytest
from llm_servers import LlamaServer, ScriptedServer, chat_body, error_body, free_port, llama_cpp_missing

from lrpilot.controllers.base import Observation
from lrpilot.controllers.llm import REPLY_SCHEMA, LLMController
from lrpilot.llm.base import AuditedBackend, LLMError
from lrpilot.llm.openai_backend import OpenAIBackend
from lrpilot.logs import read_jsonl

pytest.importorskip("openai", reason="the openai client is needed: pip install 'lrpilot[openai]'")

SCHEMA = {
    "type": "object",
    "properties": {"reason": {"type": "string"}, "lr": {"type": "number"}},
    "required": ["reason", "lr"],
}
MSGS = [
    {"role": "system", "content": "You choose learning rates. Answer in JSON."},
    {"role": "user", "content": "Loss 4.1 and falling, LR 3e-4, step 3000 of 10000. Give the new LR."},
]


@pytest.fixture(autouse=True)
def _no_real_keys(monkeypatch):
    for name in ("DASHSCOPE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    why = llama_cpp_missing()
    if why:
        pytest.skip(why)
    srv = LlamaServer(tmp_path_factory.mktemp("llama") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def scripted():
    servers: list[ScriptedServer] = []

    def make(*args, **kwargs) -> ScriptedServer:
        s = ScriptedServer(*args, **kwargs)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def _llama_backend(srv: LlamaServer, monkeypatch, **kw) -> OpenAIBackend:
    monkeypatch.setenv("DASHSCOPE_API_KEY", srv.api_key)
    args = {
        "base_url": srv.base_url,
        "model": srv.model_id,
        "timeout_s": 120,
        "retries": 1,
        "max_tokens": 96,
        "backoff_s": 0.1,
    }
    args.update(kw)
    return OpenAIBackend(**args)


# ------------------------------------------------------------------------------ llama_cpp.server


@pytest.mark.slow
@pytest.mark.llm
def test_llama_server_reply_and_json_mode_fallback(llama, monkeypatch):
    be = _llama_backend(llama, monkeypatch)
    assert be.json_mode == "json_schema"
    n500 = llama.log_text().count(" 500")
    r = be.generate(MSGS, SCHEMA)
    assert r.error is None, r.error
    assert isinstance(r.parsed, dict) and set(r.parsed) >= {"reason", "lr"}
    assert isinstance(r.parsed["lr"], (int, float))
    assert r.usage["prompt_tokens"] > 10 and r.usage["completion_tokens"] > 0
    assert r.usage["total_tokens"] == r.usage["prompt_tokens"] + r.usage["completion_tokens"]
    assert r.latency_s > 0
    # llama_cpp.server refuses OpenAI's json_schema with HTTP 500; the backend steps down once and remembers
    assert be.json_mode == "json_object_schema"
    assert llama.log_text().count(" 500") == n500 + 1
    r2 = be.generate(MSGS, SCHEMA)
    assert r2.error is None and r2.parsed is not None
    assert llama.log_text().count(" 500") == n500 + 1, "the remembered mode must not hit the 500 again"
    # without a schema: plain chat, no JSON parsing
    r3 = be.generate([{"role": "user", "content": "Say hello."}])
    assert r3.error is None and r3.parsed is None and r3.text.strip()


@pytest.mark.slow
@pytest.mark.llm
def test_llama_server_ping(llama, monkeypatch):
    _llama_backend(llama, monkeypatch).ping()  # the right model id: no error
    # wrong port: nothing listens there -> fails fast with one line naming the endpoint
    dead = _llama_backend(llama, monkeypatch, base_url=f"http://127.0.0.1:{free_port()}/v1")
    t0 = time.monotonic()
    with pytest.raises(LLMError, match="unreachable") as e:
        dead.ping()
    assert time.monotonic() - t0 < 5 and "\n" not in str(e.value)
    # wrong model name: /v1/models does not list it -> "unknown", naming what the server does serve
    wrong = _llama_backend(llama, monkeypatch, model="qwen-not-here")
    with pytest.raises(LLMError, match="unknown") as e:
        wrong.ping()
    assert "qwen-not-here" in str(e.value) and llama.model_path.name in str(e.value)
    # ... but llama_cpp.server itself does not reject unknown model names: chat requests go to its one model
    r = wrong.generate(MSGS, SCHEMA)
    assert r.error is None and r.parsed is not None
    # wrong key: the server was started with --api_key; 401 -> no retry, a one-line "rejected"
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-wrong")
    bad = OpenAIBackend(base_url=llama.base_url, model=llama.model_id, retries=3, backoff_s=5.0)
    with pytest.raises(LLMError, match="rejected"):
        bad.ping()
    n401 = llama.log_text().count('"POST /v1/chat/completions HTTP/1.1" 401')
    r = bad.generate(MSGS, SCHEMA)
    assert r.error and "401" in r.error and "rejected" in r.error
    # not retried: exactly one more 401 in the server's access log
    assert llama.log_text().count('"POST /v1/chat/completions HTTP/1.1" 401') == n401 + 1


@pytest.mark.slow
@pytest.mark.llm
def test_llama_server_timeout_is_clean(llama, monkeypatch):
    """Client timeout shorter than the generation: a clean error, no hang; the server keeps generating the
    abandoned request (it cannot be cancelled), so the next call waits for it and then succeeds."""
    be = _llama_backend(llama, monkeypatch, timeout_s=0.2, retries=0, max_tokens=200)
    long_msgs = [{"role": "user", "content": "Write a very long story about a learning rate, with many chapters."}]
    t0 = time.monotonic()
    r = be.generate(long_msgs)
    took = time.monotonic() - t0
    assert r.error is not None and r.error.startswith("timeout"), r.error
    assert r.parsed is None and took < 10  # a 0.2 s client timeout: no hang (generation alone takes >10 s)
    patient = _llama_backend(llama, monkeypatch, timeout_s=120, retries=0, max_tokens=16)
    r2 = patient.generate([{"role": "user", "content": "Say hi."}])
    assert r2.error is None and r2.text


# ------------------------------------------------------------------------------ scripted stdlib server


def test_retries_with_exponential_backoff(scripted):
    ok = chat_body('{"reason": "fine", "lr": 0.0006}')
    srv = scripted([(500, error_body("overloaded"), {}), (429, error_body("slow down"), {}), (200, ok, {})])
    be = OpenAIBackend(base_url=srv.base_url, model="scripted", retries=3, backoff_s=0.2, json_mode="json_object")
    r = be.generate(MSGS, SCHEMA)
    assert r.error is None and r.parsed == {"reason": "fine", "lr": 0.0006}
    assert r.usage == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    t = [p["time"] for p in srv.posts]
    assert len(t) == 3
    assert t[1] - t[0] >= 0.2 and t[2] - t[1] >= 0.4, f"backoff gaps {t[1] - t[0]:.3f}, {t[2] - t[1]:.3f}"
    assert t[2] - t[1] < 2.0
    # the dummy key for a local endpoint is sent, never a real one
    assert srv.posts[0]["auth"] == "Bearer sk-local-no-key"


def test_retry_after_header_is_respected(scripted):
    srv = scripted([(429, error_body("rate limited"), {"Retry-After": "0.5"}), (200, chat_body('{"lr": 1e-3}'), {})])
    be = OpenAIBackend(base_url=srv.base_url, model="scripted", retries=2, backoff_s=0.01, json_mode="json_object")
    r = be.generate(MSGS, SCHEMA)
    assert r.error is None
    t = [p["time"] for p in srv.posts]
    assert t[1] - t[0] >= 0.5


def test_gives_up_after_retries(scripted):
    srv = scripted([(503, error_body("down"), {})])
    be = OpenAIBackend(base_url=srv.base_url, model="scripted", retries=2, backoff_s=0.05, json_mode="json_object")
    r = be.generate(MSGS, SCHEMA)
    assert r.error and "503" in r.error and "after 3 attempts" in r.error
    assert len(srv.posts) == 3 and r.text == "" and r.parsed is None


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_are_not_retried(scripted, status):
    srv = scripted([(status, error_body("Incorrect API key provided"), {})])
    be = OpenAIBackend(base_url=srv.base_url, model="scripted", retries=3, backoff_s=0.5, json_mode="json_object")
    r = be.generate(MSGS, SCHEMA)
    assert r.error and str(status) in r.error and "rejected" in r.error
    assert len(srv.posts) == 1


def test_other_4xx_not_retried(scripted):
    srv = scripted([(400, error_body("messages: too long"), {})])
    be = OpenAIBackend(base_url=srv.base_url, model="scripted", retries=3, backoff_s=0.5, json_mode="json_object")
    r = be.generate(MSGS, SCHEMA)
    assert r.error and "400" in r.error and "too long" in r.error
    assert len(srv.posts) == 1


def test_json_mode_ladder_down_to_none(scripted):
    """An endpoint that refuses every response_format: json_schema -> json_object+schema -> json_object ->
    none, each tried once, and the working one remembered."""

    def respond(req):
        if "response_format" in req:
            return 400, error_body(f"response_format {req['response_format']['type']} is not supported"), {}
        return 200, chat_body('{"reason": "plain", "lr": 0.002}'), {}

    srv = scripted(responder=respond)
    be = OpenAIBackend(base_url=srv.base_url, model="scripted", retries=0)
    r = be.generate(MSGS, SCHEMA)
    assert r.error is None and r.parsed == {"reason": "plain", "lr": 0.002}
    formats = [p["json"].get("response_format") for p in srv.posts]
    assert formats[0]["type"] == "json_schema" and formats[0]["json_schema"]["schema"] == SCHEMA
    assert formats[1] == {"type": "json_object", "schema": SCHEMA}
    assert formats[2] == {"type": "json_object"}
    assert formats[3] is None
    assert be.json_mode == "none"
    be.generate(MSGS, SCHEMA)
    assert len(srv.posts) == 5 and "response_format" not in srv.posts[4]["json"]


def test_transient_500_does_not_downgrade_json_mode(scripted):
    srv = scripted([(500, error_body("internal error"), {}), (200, chat_body('{"lr": 0.001}'), {})])
    be = OpenAIBackend(base_url=srv.base_url, model="scripted", retries=1, backoff_s=0.01)
    assert be.generate(MSGS, SCHEMA).error is None
    assert be.json_mode == "json_schema"
    assert [p["json"]["response_format"]["type"] for p in srv.posts] == ["json_schema", "json_schema"]


def test_garbage_reply_controller_falls_back_and_logs_raw(scripted, tmp_path):
    garbage = "Sure!! I would go with something like three e minus four, maybe?"
    srv = scripted([(200, chat_body(garbage), {})])
    be = AuditedBackend(
        OpenAIBackend(base_url=srv.base_url, model="scripted", retries=0), "controller", tmp_path / "llm_calls.jsonl"
    )
    ctl = LLMController(be)
    obs = Observation(
        step=1300,
        total_steps=3000,
        warmup_steps=1000,
        decision_every=300,
        lr=4e-4,
        init_lr=3e-4,
        recent_losses=(4.1, 4.0),
        loss_history=((1000, 4.5), (1300, 4.05)),
        lr_history=((1000, 3e-4), (1300, 4e-4)),
    )
    d = ctl.decide(obs)
    assert d.fallback and d.lr == 4e-4 and d.raw == garbage
    assert d.reason.startswith("fallback: ") and "not a JSON object" in d.reason
    assert d.meta["usage"]["total_tokens"] == 18 and d.meta["model"] == "scripted"
    recs = read_jsonl(tmp_path / "llm_calls.jsonl")
    assert len(recs) == 1 and recs[0]["reply"] == garbage and recs[0]["role"] == "controller"
    assert recs[0]["messages"][1]["content"].startswith("## Rules")
    assert recs[0]["parsed"] is None


def test_non_json_http_body_is_a_failed_call(scripted):
    srv = scripted([(200, b"<html>gateway says hi</html>", {"Content-Type": "text/html"})])
    be = OpenAIBackend(base_url=srv.base_url, model="scripted", retries=0)
    r = be.generate(MSGS, REPLY_SCHEMA)
    assert r.error is not None and r.parsed is None


def test_connection_refused_is_retried_then_reported():
    be = OpenAIBackend(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", retries=1, backoff_s=0.05)
    r = be.generate(MSGS, SCHEMA)
    assert r.error and r.error.startswith("connection error") and "after 2 attempts" in r.error


def test_ping_against_scripted_models(scripted, monkeypatch):
    srv = scripted(models=("qwen-a", "qwen-b"))
    OpenAIBackend(base_url=srv.base_url, model="qwen-b").ping()
    with pytest.raises(LLMError, match=r"model 'qwen-c' unknown .*qwen-a, qwen-b"):
        OpenAIBackend(base_url=srv.base_url, model="qwen-c").ping()
    assert not srv.posts  # a local server's model list is trusted: no chat call


def test_ping_remote_model_missing_from_list_is_asked_directly(scripted, monkeypatch):
    """Hosted APIs may not list every model they serve: an unlisted model is tried with a 1-token call."""
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-test-remote")

    def respond(req):
        if req["model"] == "qwen-snapshot":
            return 200, chat_body("o"), {}
        return 404, error_body(f"The model `{req['model']}` does not exist"), {}

    srv = scripted(models=("qwen-a",), responder=respond)
    # the backend believes it talks to a remote host (so it does not trust the list); its HTTP client is
    # pointed at the scripted server on 127.0.0.1
    remote = "https://api.example.invalid/v1"
    be = OpenAIBackend(base_url=remote, model="qwen-snapshot")
    be._client = be._client.with_options(base_url=srv.base_url)
    be.ping()
    assert srv.posts[-1]["json"]["max_tokens"] == 1
    bad = OpenAIBackend(base_url=remote, model="qwen-typo")
    bad._client = bad._client.with_options(base_url=srv.base_url)
    with pytest.raises(LLMError, match=r"model 'qwen-typo' unknown.*does not exist"):
        bad.ping()


def test_dashscope_defaults_need_a_key(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env here
    with pytest.raises(LLMError, match="DASHSCOPE_API_KEY or OPENAI_API_KEY") as e:
        OpenAIBackend()
    assert "\n" not in str(e.value)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback-key-123")
    be = OpenAIBackend()
    assert be.key_name == "OPENAI_API_KEY" and be.model == "qwen3.6-plus-2026-04-02"
    assert "dashscope.aliyuncs.com/compatible-mode/v1" in be.base_url
    assert be.extra_body == {"enable_thinking": False}
    assert "sk-fallback-key-123" not in json.dumps(be.describe())


# ------------------------------------------------------------------- reasoning models (issue 9, item 3)


def _reasoning_body(content, reasoning_content=None, finish_reason="stop", field="reasoning_content") -> dict:
    body = chat_body(content)
    body["choices"][0]["message"]["content"] = content
    body["choices"][0]["finish_reason"] = finish_reason
    if reasoning_content is not None:
        body["choices"][0]["message"][field] = reasoning_content
    return body


@pytest.mark.parametrize(
    ("body", "thought"),
    [
        # Ollama / llama.cpp serving Qwen3 or DeepSeek-R1: the thinking comes inline, ahead of the JSON
        (_reasoning_body('<think>\nloss falls {"lr": 9e-3}?\n</think>\n\n{"reason": "up", "lr": 6e-4}'),
         'loss falls {"lr": 9e-3}?'),
        # vLLM --reasoning-parser, DeepSeek's API: a separate reasoning_content field
        (_reasoning_body('{"reason": "up", "lr": 6e-4}', "I think 6e-4."), "I think 6e-4."),
        # Ollama's and OpenRouter's name for the same field
        (_reasoning_body('{"reason": "up", "lr": 6e-4}', "R.", field="reasoning"), "R."),
    ],
)  # fmt: skip
def test_reasoning_is_removed_from_the_reply_and_kept_in_the_audit_log(scripted, tmp_path, body, thought):
    srv = scripted([(200, body, {})])
    audit = tmp_path / "llm_calls.jsonl"
    be = AuditedBackend(OpenAIBackend(base_url=srv.base_url, model="scripted", retries=0), "controller", audit)
    r = be.generate(MSGS, SCHEMA)
    assert r.error is None and r.parsed == {"reason": "up", "lr": 6e-4}
    assert r.text == '{"reason": "up", "lr": 6e-4}' and r.reasoning == thought
    (rec,) = read_jsonl(audit)
    assert rec["reply"] == r.text and rec["reasoning"] == thought and rec["error"] is None
    assert "parse_error" not in rec
    ctl = LLMController(be)
    d = ctl.decide(_obs())
    assert not d.fallback and d.lr == 6e-4 and "think" not in (d.raw or "")


def test_reasoning_without_an_answer_is_a_failed_call_with_the_reason(scripted, tmp_path):
    """A reasoning model that spends max_tokens thinking: no answer, and the audit log says so."""
    srv = scripted(
        [
            (200, _reasoning_body("<think>let me weigh {every} option", finish_reason="length"), {}),
            (200, _reasoning_body("", "still thinking", finish_reason="length"), {}),
            (200, _reasoning_body("Sure! 3e-4"), {}),
        ]
    )
    audit = tmp_path / "llm_calls.jsonl"
    be = AuditedBackend(OpenAIBackend(base_url=srv.base_url, model="scripted", retries=0), "controller", audit)
    for _ in range(2):
        r = be.generate(MSGS, SCHEMA)
        assert r.parsed is None and r.text == "" and "only reasoning" in r.error and "max_tokens" in r.error
    r = be.generate(MSGS, SCHEMA)
    assert r.error is None and r.parsed is None
    recs = read_jsonl(audit)
    assert [x["reasoning"] for x in recs] == ["let me weigh {every} option", "still thinking", None]
    assert "only reasoning" in recs[0]["error"] and "only reasoning" in recs[1]["error"]
    # a call that worked but whose answer is not the JSON asked for says why in the audit log too
    assert recs[2]["error"] is None and "not a JSON object" in recs[2]["parse_error"]


def _obs() -> Observation:
    return Observation(
        step=1300,
        total_steps=3000,
        warmup_steps=1000,
        decision_every=300,
        lr=4e-4,
        init_lr=3e-4,
        recent_losses=(4.1, 4.0),
        loss_history=((1000, 4.5), (1300, 4.05)),
        lr_history=((1000, 3e-4), (1300, 4e-4)),
    )


def test_retry_after_above_the_cap_is_capped_with_a_note(scripted, caplog):
    """Issue 9, item 7: a Retry-After longer than max_backoff_s (seconds, or an HTTP date) is capped, and the
    warning of the retry and the final error say so."""
    import email.utils

    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    srv = scripted(
        [
            (429, error_body("rate limited"), {"Retry-After": "120"}),
            (429, error_body("rate limited"), {"Retry-After": in_a_minute}),
            (429, error_body("rate limited"), {"Retry-After": "90"}),
        ]
    )
    be = OpenAIBackend(base_url=srv.base_url, model="scripted", retries=2, backoff_s=0.01, max_backoff_s=0.2,
                       json_mode="json_object")  # fmt: skip
    with caplog.at_level("WARNING", logger="lrpilot.llm.openai_backend"):
        r = be.generate(MSGS, SCHEMA)
    assert len(srv.posts) == 3
    t = [p["time"] for p in srv.posts]
    assert t[1] - t[0] < 5 and t[2] - t[1] < 5  # capped, not 120 s / a minute
    notes = [rec.getMessage() for rec in caplog.records if "retry" in rec.getMessage()]
    assert len(notes) == 2
    assert "Retry-After 120s; capped at max_backoff_s=0.2s" in notes[0]
    assert "capped at max_backoff_s=0.2s" in notes[1]  # the HTTP date, about 60 s ahead
    assert r.error and "429" in r.error and "Retry-After 90s; capped at max_backoff_s=0.2s" in r.error
