"""The Memory agent: before each round an LLM distils the campaign's past rounds into a short brief.

    python -c "from lrpilot.campaign_logs import load_campaign; from lrpilot.config import AgentConfig; \
from lrpilot.llm.base import make_backend; from lrpilot.memory.llm_memory import LLMMemory; \
a = AgentConfig(backend='local'); print(LLMMemory(make_backend(a, 'memory', None), a).brief(load_campaign('runs/x'), 5))"

The prompt holds only the campaign's own results, prepared by `lrpilot.memory.evidence`: recent rounds'
LR trajectories and outcomes, the plateau rule and the evidence table by peak-LR band (with the bands never
tried). The brief's length limit (AgentConfig.brief_words, 150) is enforced here, whatever the model
writes. A round never starts without a brief: an empty campaign gets a fixed one (no LLM call) and a failed
call gets a deterministic brief built from the evidence table.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrpilot.campaign_logs import CampaignLogs, fmt_lr
from lrpilot.llm.base import LLMBackend, make_backend, split_reasoning, strip_code_fence
from lrpilot.memory.base import Memory, MemoryContext, RoundBrief
from lrpilot.memory.evidence import Evidence, build_evidence

log = logging.getLogger(__name__)

EMPTY_BRIEF = "First round of the campaign: no earlier results. Decide from this run's own telemetry."


@dataclass(frozen=True)
class Brief:
    """The brief for one round: text (<= brief_words words), its word count, the raw LLM reply (None when
    no call was made) and whether it is the deterministic fallback."""

    text: str
    words: int
    raw: str | None
    fallback: bool
    #: cut to brief_words words here
    truncated: bool = False
    #: the reply was cut by the endpoint at agent.memory_max_tokens (finish_reason "length")
    cut_at_max_tokens: bool = False

    @property
    def truncated_by(self) -> list[str]:
        """What cut the brief: "max_tokens" (the endpoint), "brief_words" (here); empty when nothing did."""
        return ["max_tokens"] * self.cut_at_max_tokens + ["brief_words"] * self.truncated


def count_words(text: str) -> int:
    return len(text.split())


def limit_words(text: str, max_words: int) -> tuple[str, bool]:
    """`text` cut after its `max_words`-th word (line breaks before the cut kept); (text, was_cut)."""
    matches = list(re.finditer(r"\S+", text))
    if len(matches) <= max_words:
        return text.strip(), False
    return text[: matches[max_words - 1].end()].strip(), True


def clean_reply(text: str) -> str:
    """The brief inside a reply: reasoning blocks (`<think>...</think>`), code fence, surrounding quotes and a
    leading "Brief:" label removed."""
    s = strip_code_fence(split_reasoning(text or "")[0])
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        s = s[1:-1].strip()
    s = re.sub(r"^\**\s*brief\s*(?::\s*\**|\**\s*:)\s*", "", s, flags=re.IGNORECASE)
    return s


def fallback_brief(ev: Evidence, max_words: int) -> str:
    """A brief written by code from the evidence (used when the LLM fails)."""
    parts = [f"{ev.n_rounds} rounds so far."]
    if ev.best_round is not None:
        best = next((h for h in ev.history if h.round == ev.best_round), None)
        peak = f", peak LR {fmt_lr(best.peak_lr)}" if best else ""
        parts.append(f"Best: round {ev.best_round}, ppl {ev.best_ppl:.2f}{peak}.")
    rows = []
    for r in ev.table.rows:
        best = f"best {r.best_ppl:.2f}" if math.isfinite(r.best_ppl) else "no result"
        fail = f", {r.failures} failed" if r.failures else ""
        rows.append(f"{r.band}: {r.n} rounds, {best}{fail}")
    if rows:
        parts.append("Peak-LR bands: " + "; ".join(rows) + ".")
    if ev.table.untried:
        parts.append("Never tried: " + ", ".join(ev.table.untried) + ".")
    single = [r.band for r in ev.table.rows if r.n == 1]
    if single:
        parts.append("Tried only once (not conclusive): " + ", ".join(single) + ".")
    if ev.plateau.fired:
        parts.append(ev.plateau.sentence)
    return limit_words(" ".join(parts), max_words)[0]


def _running_note(running: Sequence[int]) -> str:
    """' Still running, results not in yet: rounds 3, 4.' ('' when none runs)."""
    if not running:
        return ""
    return f" Still running, results not in yet: round{'s' * (len(running) > 1)} {', '.join(map(str, running))}."


class LLMMemory:
    """Writes the brief for a round from the campaign's own logs; never leaves a round without one."""

    def __init__(self, backend: LLMBackend, agent_cfg: Any) -> None:
        self.backend = backend
        self.max_words = int(getattr(agent_cfg, "brief_words", 150))
        self.max_history = int(getattr(agent_cfg, "max_cross_run_history", 10))

    def build_prompt(self, ev: Evidence, round_index: int, running: Sequence[int] = ()) -> list[dict]:
        system = (
            "You are the Memory agent of a campaign of language-model pre-training runs. In each run a "
            "Controller agent sets the learning rate every few hundred steps from the run's telemetry. Before "
            f"round {round_index} you write the Controller a brief of at most {self.max_words} words: which peak "
            "learning rates and LR trajectories gave the lowest final perplexity (lower is better), what failed "
            "and how, which peak-LR bands are untested or tested too little to judge, and what to try next. "
            "Use only the campaign's results below. One failed round does not prove a whole band is bad. "
            "Write plain text, no preamble."
        )
        user = ev.render() + ("\n\n" + _running_note(running).strip() if running else "")
        user += f"\n\nWrite the brief for round {round_index} (at most {self.max_words} words)."
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def brief(self, logs: CampaignLogs, round_index: int, running: Sequence[int] = ()) -> Brief:
        """The brief for round `round_index` from the rounds finished so far (earlier round numbers).
        running: rounds started but not finished (`campaign --parallel`): the brief says so, since their
        results are not in it yet."""
        running = sorted(int(r) for r in running)
        rounds = [r for r in logs.rounds if (round_index <= 0 or r.round < round_index) and r.round not in running]
        if not rounds:
            text = EMPTY_BRIEF + _running_note(running)
            return Brief(text, count_words(text), None, fallback=False)
        ev = build_evidence(rounds, self.max_history)
        error: str | None = None
        raw: str | None = None
        cut_at_max = False
        try:
            reply = self.backend.generate(self.build_prompt(ev, round_index, running))
            raw = reply.text
            error = reply.error
            cut_at_max = reply.finish_reason == "length"
        except Exception as e:  # a backend should not raise; the round still gets a brief
            error = f"{type(e).__name__}: {e}"
        text = clean_reply(raw or "") if error is None else ""
        if error is None and count_words(text) < 3:
            error = f"reply too short for a brief ({count_words(text)} words)"
        if error is not None:
            log.warning(
                "memory brief for round %d: LLM failed (%s); using the evidence-table brief", round_index, error[:200]
            )
            note = _running_note(running)
            fb = fallback_brief(ev, max(1, self.max_words - count_words(note))) + note
            return Brief(fb, count_words(fb), raw, fallback=True)
        text, cut = limit_words(text, self.max_words)
        if cut:
            log.warning(
                "memory brief for round %d: reply had %d words, truncated to %d",
                round_index,
                count_words(raw or ""),
                self.max_words,
            )
        if cut_at_max:
            log.warning("memory brief for round %d: the reply was cut at agent.memory_max_tokens", round_index)
        return Brief(text, count_words(text), raw, fallback=False, truncated=cut, cut_at_max_tokens=cut_at_max)


class LLMCampaignMemory(Memory):
    """`--memory llm` (lrpilot.memory.base.MEMORIES): the Memory agent's brief before each round, on the
    backend cfg.agent describes for the "memory" role, each call audited to DIR/llm_calls.jsonl. A resumed
    round keeps the brief it started with (no second call)."""

    uses_llm = True

    def __init__(self, ctx: MemoryContext) -> None:
        self.ctx = ctx

    def brief(
        self,
        round_index: int,
        *,
        prior: dict[str, Any] | None = None,
        running: tuple[int, ...] = (),
        run_start_iso: str = "",
    ) -> RoundBrief:
        if prior is not None:
            return RoundBrief(str(prior.get("brief", "")))
        from lrpilot.campaign_logs import load_campaign

        agent, directory = self.ctx.cfg.agent, Path(self.ctx.directory)
        # each llm_calls.jsonl line joins its round as decisions do (campaign._call_fields)
        extra = {"round": round_index, "run_start_iso": run_start_iso}
        backend = make_backend(agent, "memory", directory / "llm_calls.jsonl", extra)
        brief = LLMMemory(backend, agent).brief(load_campaign(directory), round_index, running=running)
        marks = {"truncated": bool(brief.truncated_by), "truncated_by": brief.truncated_by}
        more = {"running": list(running)} if running else {}
        return RoundBrief(brief.text, None, {"fallback": brief.fallback, "words": brief.words, **marks, **more})
