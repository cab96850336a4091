"""LLM reply parsing, the Controller's prompt, .env secrets, and that no key ever reaches llm_calls.jsonl.

.venv/bin/python -m pytest -q tests/test_llm_parse.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llm_servers import LlamaServer, llama_cpp_missing

from lrpilot.config import AgentConfig, GuardConfig
from lrpilot.controllers.base import DecisionRecord, Observation, ProbeResult, RollbackRecord
from lrpilot.controllers.llm import REPLY_SCHEMA, LLMController, parse_recorded_reply, parse_reply
from lrpilot.llm.base import (
    AuditedBackend,
    LLMBackend,
    LLMError,
    Reply,
    get_secret,
    make_backend,
    read_dotenv,
    split_reasoning,
)
from lrpilot.llm.openai_backend import OpenAIBackend
from lrpilot.logs import read_jsonl

# ---------------------------------------------------------------------------------------- parse_reply


@pytest.mark.parametrize(
    ("text", "lr"),
    [
        ('{"lr": 0.0003, "reason": "keep"}', 3e-4),
        ('{"reason": "up", "lr": 6e-4}', 6e-4),
        ('{"lr": "3e-4", "reason": "string number"}', 3e-4),
        ('{"lr": " 1.5E-3 ", "reason": "spaces"}', 1.5e-3),
        ('{"lr": 1}', 1.0),  # big but finite and positive: the guard clamps it, not the parser
        ('{"lr": 3.95, "reason": "a loss value"}', 3.95),
        ('  {"lr": 2e-4}  \n', 2e-4),
        ('```json\n{"reason": "fenced", "lr": 5e-4}\n```', 5e-4),
        ('```\n{"lr": 5e-4}\n```', 5e-4),
        ('{"reason": "line one\nline two\ttab", "lr": 7e-4}', 7e-4),  # raw newline inside a string
    ],
)
def test_parse_good(text, lr):
    got, reason, err = parse_reply(text)
    assert err is None and got == pytest.approx(lr, rel=1e-12)
    assert "\n" not in reason


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("garbage !!", "not a JSON object"),
        ('I suggest {"lr": 3e-4}', "not a JSON object"),
        ('{"lr": 3e-4', "invalid JSON"),
        ('{"lr": 3e-4} {"lr": 1e-3}', "invalid JSON"),
        ('[{"lr": 3e-4}]', "not a JSON object"),
        ('{"reason": "no lr"}', "no 'lr'"),
        ('{"lr": null}', "NoneType"),
        ('{"lr": [0.001]}', "list"),
        ('{"lr": {"value": 0.001}}', "dict"),
        ('{"lr": true}', "boolean"),
        ('{"lr": NaN}', "invalid JSON"),
        ('{"lr": Infinity}', "invalid JSON"),
        ('{"lr": -Infinity}', "invalid JSON"),
        ('{"lr": "nan"}', "not a number"),
        ('{"lr": "inf"}', "not a number"),
        ('{"lr": 1e999}', "not finite"),
        ('{"lr": "1e400"}', "not finite"),
        ('{"lr": -3e-4}', "must be > 0"),
        ('{"lr": 0}', "must be > 0"),
        ('{"lr": "0.0"}', "must be > 0"),
        ('{"lr": "3e-4; import os"}', "not a number"),
        ("{\"lr\": \"__import__('os').system('true')\"}", "not a number"),
        ('{"lr": "0x1p-10"}', "not a number"),
        ('{"lr": "1/1000"}', "not a number"),
        ('{"lr": 1e-3, "lr": 2e-3}', "duplicate key"),
    ],
)
def test_parse_bad(text, fragment):
    lr, _, err = parse_reply(text)
    assert lr is None
    assert err and fragment in err


# ------------------------------------------------------------------- reasoning blocks (issue 9, item 3)


@pytest.mark.parametrize(
    ("text", "lr", "thought"),
    [
        ('<think>\nthe loss falls; go up\n</think>\n\n{"reason": "up", "lr": 6e-4}', 6e-4, "the loss falls; go up"),
        # braces and a whole JSON object inside the reasoning are not the answer
        ('<think>maybe {"lr": 0.05}? no: {"lr": 1e-2} is too high</think>{"reason": "r", "lr": 4e-4}', 4e-4,
         'maybe {"lr": 0.05}? no: {"lr": 1e-2} is too high'),
        ('<THINK>a</THINK><thinking>b</thinking>\n```json\n{"lr": 5e-4}\n```', 5e-4, "a\nb"),
        ('<reasoning type="x">c</reasoning> {"lr": 2e-4}', 2e-4, "c"),
        # DeepSeek-R1 templates open <think> in the prompt: the reply starts inside it
        ('the loss is flat, cut it\n</think>\n{"reason": "cut", "lr": 1e-4}', 1e-4, "the loss is flat, cut it"),
        ('<think></think>{"lr": 3e-4}', 3e-4, ""),
    ],
)  # fmt: skip
def test_reasoning_blocks_are_removed_before_parsing(text, lr, thought):
    got, _, err = parse_reply(text)
    assert err is None and got == pytest.approx(lr, rel=1e-12)
    answer, reasoning = split_reasoning(text)
    assert reasoning == thought and "think" not in answer.lower() and "reasoning>" not in answer


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('<think>I would say {"lr": 3e-4} but let me check', "only reasoning"),  # cut off while thinking
        ("<think>\n</think>\n", "empty reply"),
        ('<think>a</think> I pick {"lr": 3e-4}', "not a JSON object"),  # prose after the block is still prose
        ('{"lr": 3e-4} <think>after</think>', "invalid JSON"),  # only blocks ahead of the answer are reasoning
    ],
)
def test_reasoning_without_a_valid_answer_is_an_error(text, fragment):
    lr, _, err = parse_reply(text)
    assert lr is None and fragment in err


def test_split_reasoning_leaves_plain_replies_alone():
    for text in ('{"lr": 3e-4}', "  plain prose  ", "", '{"reason": "see </think> in here", "lr": 1e-3}'):
        assert split_reasoning(text) == (text, "")
    assert parse_reply('{"reason": "a </think> tag in the reason", "lr": 1e-3}')[0] == 1e-3
    # a recorded reply: a [FINAL_LR] tag inside the reasoning is not the answer
    assert parse_recorded_reply("<think>[FINAL_LR] 9e-3 [/FINAL_LR]</think>go [FINAL_LR] 2e-4 [/FINAL_LR]")[0] == 2e-4
    assert parse_recorded_reply("<think>[FINAL_LR] 9e-3 [/FINAL_LR]</think>")[0] is None


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_parse_never_raises(text):
    lr, reason, err = parse_reply(text)
    assert (lr is None) == (err is not None)
    assert lr is None or (math.isfinite(lr) and lr > 0)
    assert isinstance(reason, str)


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_parse_recorded_never_raises(text):
    lr, reason, err = parse_recorded_reply(text + "[FINAL_LR]" + text[:20] + "[/FINAL_LR]")
    assert (lr is None) == (err is not None)
    assert lr is None or (math.isfinite(lr) and lr > 0)


def test_parse_recorded_reads_every_published_reply():
    """All 1230 published replies end in [FINAL_LR] x [/FINAL_LR]; the parsed value is the logged request (which the study rounded to 4 digits)."""
    path = Path(__file__).parent / "data" / "seed-experiments" / "decisions_log_agent_60m.jsonl"
    recs = read_jsonl(path, strict=True)
    assert len(recs) == 1230
    for r in recs:
        lr, reason, err = parse_recorded_reply(r["reasoning"])
        assert err is None and lr == pytest.approx(r["raw_lr_request"], rel=1e-3), (r["step"], r["reasoning"][-60:])
        assert reason and "[FINAL_LR]" not in reason
    # the last tag counts; a tag that is not a number is an error naming it; JSON replies still parse
    assert parse_recorded_reply("[FINAL_LR] 1e-3 [/FINAL_LR] no, [FINAL_LR]2e-3[/FINAL_LR]")[0] == 2e-3
    lr, _, err = parse_recorded_reply("[FINAL_LR] 3e-4 * 2 [/FINAL_LR]")
    assert lr is None and "[FINAL_LR] is not a number" in err
    assert parse_recorded_reply("[FINAL_LR] -1e-3 [/FINAL_LR]")[2] == "[FINAL_LR] must be > 0, got -0.001"
    assert parse_recorded_reply('{"lr": 5e-4, "reason": "x"}')[:2] == (5e-4, "x")
    # a live Controller reply must be JSON: the tag format is for logs only
    assert parse_reply("[FINAL_LR] 3e-4 [/FINAL_LR]")[0] is None


@given(st.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False), st.text(max_size=50))
@settings(max_examples=200, deadline=None)
def test_parse_roundtrips_any_positive_float(lr, reason):
    got, why, err = parse_reply(json.dumps({"reason": reason, "lr": lr}))
    assert err is None and got == lr
    got2, _, err2 = parse_reply(json.dumps({"lr": repr(lr)}))
    assert err2 is None and got2 == lr


# ---------------------------------------------------------------------------------------- prompt


def _obs(**kw) -> Observation:
    base = dict(
        step=4300,
        total_steps=10000,
        warmup_steps=1000,
        decision_every=300,
        lr=1.2e-3,
        init_lr=3e-4,
        recent_losses=tuple(3.9 - 0.001 * i for i in range(300)),
        loss_history=((1000, 5.115), (1300, 4.7286), (1600, 4.4969), (3700, 3.9812), (4000, 3.9123), (4300, 3.7505)),
        lr_history=((1000, 3e-4), (1300, 6e-4), (1600, 1.2e-3), (3700, 1.2e-3), (4000, 1.2e-3), (4300, 1.2e-3)),
        grad_norm=0.42,
        decisions=(
            DecisionRecord(1000, 3e-4, 6e-4, 5.115, effective_step=1003, reason="a"),
            DecisionRecord(1300, 6e-4, 1.2e-3, 4.7286, effective_step=1302),
            DecisionRecord(2500, 1.2e-3, 3.6e-4, 9.5, effective_step=2500, kind="emergency"),
            DecisionRecord(4000, 1.0e-3, 1.2e-3, 3.9123, effective_step=4004),
        ),
        rollbacks=(RollbackRecord(2800, 1.2e-3, 1800, 6e-4, "nan_loss"),),
        memory_brief="Earlier rounds: peak 1.2e-3 gave ppl 32; band 3e-3..1e-2 never tried.",
    )
    base.update(kw)
    return Observation(**base)


class Canned(LLMBackend):
    """Scripted backend for unit tests of the controller's parsing and fallbacks."""

    model = "canned"

    def __init__(self, text: str = '{"reason": "r", "lr": 0.001}', error: str | None = None, raise_: bool = False):
        self.text, self.error, self.raise_ = text, error, raise_
        self.calls: list[tuple[list[dict], dict | None]] = []

    def generate(self, messages, schema=None):
        self.calls.append((messages, schema))
        if self.raise_:
            raise RuntimeError("backend exploded")
        return Reply(
            self.text,
            None,
            {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            0.25,
            self.model,
            self.error,
        )

    def ping(self):
        pass


def test_prompt_has_the_run_facts():
    ctl = LLMController(Canned(), guard=GuardConfig())
    msgs = ctl.build_prompt(_obs())
    assert [m["role"] for m in msgs] == ["system", "user"]
    text = msgs[1]["content"]
    for fact in [
        "step 4300 of 10000",
        "43.0% done",
        "5700 steps left",
        "current LR: 1.2e-3",
        "[0.5 x, 2 x] the current LR",
        "you may set 6e-4 .. 2.4e-3",  # the clamp rule, worked out
        "[1e-6, 5e-2]",  # floor and ceiling
        "Emergency cut (LR x 0.3)",
        "1000: 5.115 @ 3e-4",
        "4300: 3.751 @ 1.2e-3",  # one loss per decision and the LR in force
        "1300: 4.729 @ 6e-4",  # the decision history shows as the LR column
        "your decisions this round: 3 (changed the LR 3 times; kept it 0 times)",
        "300 per-step losses",
        "3.900",
        "3.601",  # dense sample: first and last of the interval
        "(-4.1%, falling)",  # computed trend
        "last decision: step 4000, 1e-3 -> 1.2e-3, in force from step 4004; loss 3.912 before -> 3.751 after (-0.162)",
        "crash at step 2800",
        "rolled back to step 1800",
        "emergency cut at step 2500: 1.2e-3 -> 3.6e-4",
        "band 3e-3..1e-2 never tried",  # the memory brief
        "gradient norm: 0.42",
    ]:
        assert fact in text, f"missing {fact!r}\n{text}"
    assert "lr" in REPLY_SCHEMA["required"] and "reason" in REPLY_SCHEMA["required"]


def test_prompt_names_no_schedule_and_no_outside_values():
    ctl = LLMController(Canned(), guard=GuardConfig())
    text = "\n".join(m["content"] for m in ctl.build_prompt(_obs())).lower()
    for word in [
        "cosine",
        "wsd",
        "warmup-stable-decay",
        "stable-decay",
        "linear-to-zero",
        "linear decay",
        "one-cycle",
        "onecycle",
        "inverse square",
        "inverse-sqrt",
        "step decay",
        "exponential decay",
        "schedule",
        "annealing",
        "recommended",
    ]:
        assert word not in text, word
    # the only LRs in the prompt come from the observation and the guard: 1e-3 is the old LR of a decision
    assert text.count("1e-3") == 1 and "1e-3 -> 1.2e-3" in text


def test_prompt_on_empty_and_nan_telemetry():
    ctl = LLMController(Canned())
    obs = _obs(
        step=1000,
        recent_losses=(),
        loss_history=(),
        lr_history=(),
        decisions=(),
        rollbacks=(),
        memory_brief="",
        grad_norm=math.nan,
    )
    text = ctl.build_prompt(obs)[1]["content"]
    assert "none yet" in text and "none (first round)" in text and "gradient norm" not in text
    nan_obs = _obs(recent_losses=(float("nan"),) * 5, loss_history=((1000, float("nan")),))
    text = ctl.build_prompt(nan_obs)[1]["content"]
    assert "all 5 losses are non-finite" in text


def test_decide_paths():
    obs = _obs()
    good = LLMController(Canned('{"reason": "raise it", "lr": "2.4e-3"}')).decide(obs)
    assert not good.fallback and good.lr == 2.4e-3 and good.reason == "raise it"
    assert good.meta == {
        "latency_s": 0.25,
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        "model": "canned",
    }
    assert good.raw == '{"reason": "raise it", "lr": "2.4e-3"}'
    bad = LLMController(Canned('{"lr": -1}')).decide(obs)
    assert bad.fallback and bad.lr == obs.lr and bad.raw == '{"lr": -1}' and "must be > 0" in bad.reason
    err = LLMController(Canned("partial", error="timeout: no answer within 60s")).decide(obs)
    assert err.fallback and err.lr == obs.lr and err.reason == "fallback: timeout: no answer within 60s"
    assert err.raw == "partial" and err.meta["error"].startswith("timeout")
    boom = LLMController(Canned(raise_=True)).decide(obs)
    assert boom.fallback and "backend exploded" in boom.reason
    nan_lr = LLMController(Canned("junk")).decide(_obs(lr=float("nan")))
    assert nan_lr.fallback and nan_lr.lr == 3e-4  # falls back to init_lr when the current LR is unusable
    assert LLMController(Canned()).blocking is False


def test_decide_passes_schema_and_brief_from_start_round():
    be = Canned()
    ctl = LLMController(be)
    ctl.start_round(3, "brief from start_round")
    ctl.decide(_obs(memory_brief=""))
    messages, schema = be.calls[0]
    assert schema == REPLY_SCHEMA and "brief from start_round" in messages[1]["content"]


# ---------------------------------------------------------------------------------------- secrets


def test_dotenv_parser(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(
        "# comment\nexport DASHSCOPE_API_KEY='sk-from-dotenv'\nOPENAI_API_KEY=sk-plain # trailing\n"
        'QUOTED="a b # c"\nnot a line\n=novalue\n'
    )
    env = read_dotenv(tmp_path / ".env")
    assert env == {"DASHSCOPE_API_KEY": "sk-from-dotenv", "OPENAI_API_KEY": "sk-plain", "QUOTED": "a b # c"}
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert get_secret("DASHSCOPE_API_KEY", "OPENAI_API_KEY") == ("DASHSCOPE_API_KEY", "sk-from-dotenv")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    # the environment wins over .env for each name in order; DASHSCOPE is still only in .env
    assert get_secret("DASHSCOPE_API_KEY", "OPENAI_API_KEY") == ("OPENAI_API_KEY", "sk-env")
    be = OpenAIBackend(base_url="https://example.invalid/v1", api_key_env="MISSING_VAR")
    assert be.key_name == "OPENAI_API_KEY"
    assert read_dotenv(tmp_path / "absent.env") == {}


def test_make_backend_models_per_role(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    agent = AgentConfig(base_url="http://127.0.0.1:9/v1", model="fast-model", memory_model="strong-model")
    ctl = make_backend(agent, "controller", tmp_path / "llm_calls.jsonl")
    mem = make_backend(agent, "memory", None)
    assert isinstance(ctl, AuditedBackend) and ctl.model == "fast-model" and ctl.role == "controller"
    assert isinstance(mem, OpenAIBackend) and mem.model == "strong-model"
    same = make_backend(AgentConfig(base_url="http://localhost:9/v1", model="only"), "memory", None)
    assert same.model == "only"
    with pytest.raises(LLMError, match="role"):
        make_backend(agent, "critic", None)


def test_audit_masks_a_key_that_slips_into_a_prompt(tmp_path, monkeypatch):
    secret = "sk-THIS-MUST-NOT-LEAK-123456"
    monkeypatch.setenv("DASHSCOPE_API_KEY", secret)

    class Echo(Canned):
        def secret_values(self):
            return (secret,)

    be = AuditedBackend(Echo(text=f'{{"lr": 1e-3, "reason": "{secret}"}}'), "controller", tmp_path / "c.jsonl")
    be.generate([{"role": "user", "content": f"my key is {secret}"}], REPLY_SCHEMA)
    raw = (tmp_path / "c.jsonl").read_text()
    assert secret not in raw and raw.count("***") == 2


@pytest.mark.slow
@pytest.mark.llm
def test_secret_never_in_llm_calls_log(tmp_path, monkeypatch, capfd):
    why = llama_cpp_missing()
    if why:
        pytest.skip(why)
    secret = "sk-FAKE-dashscope-SECRET-7d1e0b"
    monkeypatch.setenv("DASHSCOPE_API_KEY", secret)
    srv = LlamaServer(tmp_path / "server.log", api_key=secret)  # the server really requires this key
    try:
        srv.wait_ready()
        agent = AgentConfig(base_url=srv.base_url, model=srv.model_id, max_tokens=64, timeout_s=120)
        audit = tmp_path / "llm_calls.jsonl"
        backend = make_backend(agent, "controller", audit)
        backend.ping()
        d = LLMController(backend, guard=GuardConfig()).decide(_obs())
        assert d.meta["usage"].get("total_tokens", 0) > 0, d.reason  # the call went through with the key
        make_backend(agent, "memory", audit).generate([{"role": "user", "content": "Summarise: loss fell."}])
    finally:
        srv.stop()
    recs = read_jsonl(audit)
    assert [r["role"] for r in recs] == ["controller", "memory"]
    for r in recs:
        assert {"time", "role", "model", "messages", "reply", "usage", "latency_s", "error"} <= set(r)
    raw = audit.read_text()
    assert secret not in raw
    for word in ("authorization", "bearer", "api_key", "headers"):
        assert word not in raw.lower(), word
    out, err = capfd.readouterr()
    assert secret not in out and secret not in err


def test_prompt_table_is_bounded_and_marks_kept_and_fallback():
    hist = tuple((1000 + 300 * i, 5.0 - 0.03 * i) for i in range(40))
    lrs = tuple((s, 1e-3) for s, _ in hist)
    decs = tuple(DecisionRecord(s, 1e-3, 1e-3, v, effective_step=s + 3) for s, v in hist[:-2]) + (
        DecisionRecord(hist[-2][0], 1e-3, 1e-3, hist[-2][1], effective_step=None, kind="fallback"),
    )
    obs = _obs(step=hist[-1][0], total_steps=13000, loss_history=hist, lr_history=lrs, decisions=decs, rollbacks=())
    text = LLMController(Canned(), max_history=30).build_prompt(obs)[1]["content"]
    assert "(10 earlier intervals, steps 1000-3700: loss 5.000 -> 4.730)" in text
    assert "3700: 4.730" not in text and "4000: 4.700 @ 1e-3" in text
    assert f"kept it 38 times; no valid answer (LR kept) at steps {hist[-2][0]})" in text
    assert "not applied yet; its effect is not measurable yet" in text
    # consecutive prompts of a round share a long prefix (the local model re-evaluates only the tail)
    ctl = LLMController(Canned(), guard=GuardConfig())
    a = ctl.build_prompt(_obs(step=3700, loss_history=hist[:10], decisions=decs[:9]))[1]["content"]
    b = ctl.build_prompt(_obs(step=4000, loss_history=hist[:11], decisions=decs[:10]))[1]["content"]
    head = a.split("\n## Now")[0]
    assert b.startswith(head) and head.count("\n") > 15  # rules, brief and the whole table


def test_prompt_says_the_lr_may_only_fall_with_schedule_free():
    ctl = LLMController(Canned(), guard=GuardConfig())
    text = ctl.build_prompt(_obs(lower_only=True))[1]["content"]
    assert "you may only keep or lower the LR" in text
    assert "you may set 6e-4 .. 1.2e-3" in text  # the upper end is the current LR
    assert "only keep or lower" not in ctl.build_prompt(_obs())[1]["content"]


def test_prompt_has_the_rules_evidence_noise_and_probe_results():
    """The LLM sees what the rule controller sees: the noise-relative change and, after a lookahead probe, every
    branch's result."""
    ctl = LLMController(Canned(), guard=GuardConfig())
    text = ctl.build_prompt(_obs())[1]["content"]
    assert "noise: per-step std around the interval's trend line 0.0000" in text
    assert "standard errors of that noise (interval means)" in text
    assert "lookahead probe" not in text
    probes = (ProbeResult(6e-4, (3.8, 3.7), after=3.71), ProbeResult(1.2e-3, (3.8, 3.6), after=3.65))
    text = ctl.build_prompt(_obs(probes=probes))[1]["content"]
    assert "lookahead probe at this step" in text and "2 updates at each LR" in text
    assert "LR 6e-4 -> loss 3.710" in text and "LR 1.2e-3 -> loss 3.650" in text
