"""Memory agent evidence (history, plateau rule, band table) on the published study's 40 rounds, and the brief.

    .venv/bin/python -m pytest -q tests/test_memory.py

The seed logs come from tests/data/seed-experiments (a copy of the published logs), imported into a tmp
campaign with lrpilot.importer. The expected numbers below were worked out by hand from
final_results_log_agent_60m.jsonl (peak_lr_seen, final_eval_ppl per line).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from llm_servers import llama_cpp_missing

from lrpilot.campaign_logs import CampaignLogs, load_campaign
from lrpilot.config import AgentConfig
from lrpilot.importer import import_published
from lrpilot.llm.base import LLMBackend, Reply
from lrpilot.memory.evidence import build_evidence, evidence_table, history, plateau_rule, render_table
from lrpilot.memory.llm_memory import EMPTY_BRIEF, LLMMemory, clean_reply, limit_words

SEED = Path(__file__).parent / "data" / "seed-experiments"


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> CampaignLogs:
    dest = tmp_path_factory.mktemp("published")
    import_published(SEED, dest)
    return load_campaign(dest)


class Scripted(LLMBackend):
    """Canned replies for unit tests of the brief's length limit and fallbacks."""

    model = "scripted"

    def __init__(self, text: str = "", error: str | None = None, raise_: bool = False) -> None:
        self.text, self.error, self.raise_ = text, error, raise_
        self.calls: list[list[dict]] = []

    def generate(self, messages, schema=None):
        self.calls.append(messages)
        if self.raise_:
            raise ConnectionError("endpoint gone")
        return Reply(self.text, None, {}, 0.1, self.model, self.error)

    def ping(self):
        pass


# ------------------------------------------------------------------------------------ evidence table


def test_band_table_counts(logs):
    assert len(logs.rounds) == 40
    t = evidence_table(logs.rounds)
    got = {r.band: r.rounds for r in t.rows}
    assert got == {
        "1e-4..3e-4": (2, 17),  # peaks 2.8e-4 and 2.5e-4
        "3e-4..1e-3": (1, 3, 4, 5, 6),  # peak exactly 3e-4 (the band's lower edge)
        "1e-3..3e-3": tuple(range(7, 17)) + tuple(range(18, 39)),  # 31 rounds, 28 (peak 2.5e-3) among them
        "1e-2..3e-2": (39, 40),  # peak 1e-2: the best round (31.18) and the diverged one (309.08)
    }
    assert sum(r.n for r in t.rows) == 40
    mid = t.row("1e-3..3e-3")
    assert mid.n == 31 and mid.best_round == 34 and mid.best_ppl == pytest.approx(32.0, abs=0.01)
    assert mid.failures == 0 and mid.crashed == 3  # rounds 13 (7 crashes), 19 and 30 (1 each)
    assert mid.median_ppl == pytest.approx(33.40, abs=0.01)  # median of 31 values = round 15's 33.40
    hi = t.row("1e-2..3e-2")
    assert hi.failures == 1 and hi.best_round == 39 and hi.best_ppl == pytest.approx(31.18, abs=0.01)
    low = t.row("1e-4..3e-4")
    assert low.best_round == 2 and low.median_ppl == pytest.approx((50.0895 + 54.9913) / 2, abs=0.01)
    # the region above round 28's peak was never tried: it cannot be "closed" by one round
    assert t.untried == ("3e-3..1e-2",)
    text = render_table(t)
    assert "never tried in 1e-4..3e-2: 3e-3..1e-2" in text
    assert "1e-3..3e-3 | 7-16,18-38 (31) | 32.00 (r34) | 33.40 | 0 | 3" in text


def test_untried_bands_of_the_first_rounds(logs):
    t = evidence_table(logs.rounds[:10])  # rounds 1-10: peaks 3e-4 (x5), 2.8e-4, 1e-3 (x3), 1.2e-3
    assert [r.band for r in t.rows] == ["1e-4..3e-4", "3e-4..1e-3", "1e-3..3e-3"]
    assert t.untried == ("3e-3..1e-2", "1e-2..3e-2")
    only_once = evidence_table([r for r in logs.rounds if r.round in (2, 28, 40)])
    assert "1 round only: not conclusive" in render_table(only_once)
    assert only_once.row("1e-2..3e-2").failures == 1 and math.isnan(only_once.row("1e-2..3e-2").best_ppl)


# ------------------------------------------------------------------------------------ plateau rule


def test_plateau_rule_on_the_published_rounds(logs):
    rs = logs.rounds
    # rounds 18-27: peaks 1e-3 (x9) and 1.2e-3 -> ratio 1.2; ppl 32.20..34.61 within 3.6% of the median
    p = plateau_rule(rs[17:27])
    assert p.fired and p.rounds == tuple(range(18, 28))
    assert p.peak_ratio == pytest.approx(1.2) and p.ppl_max_dev < 0.04
    assert [f"{c:.3g}" for c in p.candidates] == ["0.0102", "0.000102"]  # 10x up and down from ~1.02e-3
    assert "order of magnitude" in p.sentence and "3e-3..1e-2" not in p.sentence
    # rounds 27-36: peaks 1.2e-3..2.5e-3 are 2.08x apart (round 28), just over 2x; ppl is within 1.8%
    p = plateau_rule(rs[26:36])
    assert not p.fired and p.peak_ratio == pytest.approx(2.5e-3 / 1.2e-3) and p.ppl_max_dev < 0.02
    assert "2.08x" in p.sentence
    assert plateau_rule(rs[26:36], max_peak_ratio=2.1).fired  # only the 2x bound keeps it from firing
    # rounds 1-10: peaks 2.8e-4..1.2e-3 (4.3x), ppl 34.4..56.8
    p = plateau_rule(rs[:10])
    assert not p.fired and p.peak_ratio == pytest.approx(1.2e-3 / 2.8e-4)
    # scanning the campaign, the rule fires exactly once: after round 27
    fired_after = [n for n in range(10, 41) if plateau_rule(rs[:n]).fired]
    assert fired_after == [27]
    assert not plateau_rule(rs[:5]).fired  # too few rounds


# ------------------------------------------------------------------------------------ history


def test_history_milestones_and_best(logs):
    h = history(logs.rounds, last=10)
    assert [e.round for e in h] == list(range(31, 41)) and [e.round for e in h if e.best] == [39]
    h = history(logs.rounds[:37], last=3)  # best of rounds 1-37 is round 34 (32.00), older than 35-37
    assert [e.round for e in h] == [34, 35, 36, 37] and h[0].best
    h28 = history(logs.rounds[:28], last=1)  # round 28, with the best so far (27, 32.20) before it
    assert [e.round for e in h28] == [27, 28] and h28[0].best
    r28 = h28[1]
    assert r28.round == 28 and r28.peak_lr == 2.5e-3 and r28.band == "1e-3..3e-3"
    # LR in force at 1000, 2000, ..., 9000, 9999 of the 10000 steps, from round 28's decisions
    assert r28.lr_at_milestones == pytest.approx(
        (6e-4, 2.4e-3, 2.4e-3, 2.4e-3, 2.4e-3, 2.4e-3, 2.5e-3, 2.5e-3, 1.25e-3, 2e-3)
    )
    ev = build_evidence(logs)
    text = ev.render()
    assert "Rounds finished: 40. Best: round 39, ppl 31.18." in text
    assert "39 (best) | 1e-2 | 5e-4 |" in text
    assert "cosine" not in text.lower()  # the campaign's own results only (no baselines)


# ------------------------------------------------------------------------------------ the brief


def test_brief_is_capped_at_150_words(logs, caplog):
    long_reply = " ".join(f"word{i}" for i in range(400))
    mem = LLMMemory(Scripted(long_reply), AgentConfig())
    with caplog.at_level(logging.WARNING, logger="lrpilot.memory.llm_memory"):
        b = mem.brief(logs, 41)
    assert b.words == 150 and len(b.text.split()) == 150 and b.truncated and not b.fallback
    assert b.text.split() == long_reply.split()[:150] and b.raw == long_reply
    assert "truncated to 150" in caplog.text
    short = LLMMemory(Scripted("```\nKeep peak near 1e-3; try 3e-3..1e-2 once.\n```"), AgentConfig(brief_words=20))
    b = short.brief(logs, 41)
    assert b.text == "Keep peak near 1e-3; try 3e-3..1e-2 once." and b.words == 7 and not b.truncated


def test_brief_prompt_uses_rounds_before_this_one(logs):
    be = Scripted("A brief with enough words to count.")
    LLMMemory(be, AgentConfig()).brief(logs, 11)
    system, user = be.calls[0]
    assert "at most 150 words" in system["content"] and "Before round 11" in system["content"]
    assert "Rounds finished: 10." in user["content"] and "3e-3..1e-2, 1e-2..3e-2" in user["content"]


@pytest.mark.parametrize(
    "backend", [Scripted(error="HTTP 503 after 4 attempts"), Scripted(raise_=True), Scripted("ok")]
)
def test_fallback_brief_when_the_llm_fails(logs, backend):
    b = LLMMemory(backend, AgentConfig()).brief(logs, 41)
    assert b.fallback and 0 < b.words <= 150
    assert "Never tried: 3e-3..1e-2." in b.text and "Best: round 39, ppl 31.18" in b.text
    assert "1e-2..3e-2: 2 rounds, best 31.18, 1 failed" in b.text


def test_fallback_brief_respects_a_small_limit(logs):
    b = LLMMemory(Scripted(error="down"), AgentConfig(brief_words=12)).brief(logs, 41)
    assert b.fallback and b.words == 12


def test_empty_campaign_gets_a_fixed_brief_without_a_call(tmp_path):
    be = Scripted("should not be used")
    b = LLMMemory(be, AgentConfig()).brief(load_campaign(tmp_path), 1)
    assert b.text == EMPTY_BRIEF and not b.fallback and b.raw is None and be.calls == []


def test_limit_words_and_clean_reply():
    assert limit_words("a b\nc d", 3) == ("a b\nc", True)
    assert limit_words("  a b  ", 3) == ("a b", False)
    assert clean_reply('"Brief: keep going"') == "keep going"
    assert clean_reply("<think>what did round 2 do? {x}</think>\nBrief: climb to 3e-3") == "climb to 3e-3"
    assert clean_reply("**Brief:** x y") == "x y"
    assert clean_reply("**Brief**: x y") == "x y"
    assert clean_reply("Briefly, x y") == "Briefly, x y"


@pytest.mark.slow
@pytest.mark.llm
@pytest.mark.skipif(llama_cpp_missing() is not None, reason=llama_cpp_missing() or "")
def test_local_llm_brief(logs, tmp_path):
    from lrpilot.llm.base import make_backend
    from lrpilot.logs import read_jsonl

    agent = AgentConfig(backend="local", max_tokens=220, timeout_s=120)
    backend = make_backend(agent, "memory", tmp_path / "llm_calls.jsonl")
    b = LLMMemory(backend, agent).brief(logs, 41)
    print(f"\nlocal memory brief ({b.words} words, fallback={b.fallback}): {b.text[:200]!r}")
    assert 0 < b.words <= 150
    rec = read_jsonl(tmp_path / "llm_calls.jsonl")
    assert len(rec) == 1 and rec[0]["role"] == "memory" and rec[0]["usage"]["prompt_tokens"] > 300
    assert rec[0]["error"] is None, rec[0]["error"]  # the prompt fits SmolLM2's 2048-token context


def test_brief_with_rounds_still_running_names_them_and_uses_only_finished_ones(logs, tmp_path):
    """campaign --parallel: the brief for round 41 while rounds 39 and 40 still run is written from rounds
    1-38 (39 and 40 are not in its evidence) and says which rounds are still running, in the prompt, in the
    LLM's brief's stead when the LLM fails, within the word limit."""
    be = Scripted("A brief with enough words to count.")
    LLMMemory(be, AgentConfig()).brief(logs, 41, running=(40, 39))
    user = be.calls[0][1]["content"]
    assert "Rounds finished: 38." in user and "Still running, results not in yet: rounds 39, 40." in user
    assert "round 39" not in user.split("Still running")[0]  # its result is not in the evidence
    fb = LLMMemory(Scripted(error="down"), AgentConfig(brief_words=30)).brief(logs, 41, running=(39, 40))
    assert fb.fallback and fb.text.endswith("Still running, results not in yet: rounds 39, 40.") and fb.words <= 30
    first = LLMMemory(be, AgentConfig()).brief(load_campaign(tmp_path), 2, running=(1,))
    assert first.text.startswith(EMPTY_BRIEF) and "round 1." in first.text
