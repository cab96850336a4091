"""The campaign memory contract: before each round `brief(...)`, after it `record(...)`; memories by name.

    lrpilot campaign --preset cpu-small --rounds 8 --controller rules --memory optuna --dir runs/rules

A memory carries what a campaign learned from its earlier rounds into the next one: a brief (text the
round's controller reads; the LLM Memory agent writes one) and/or the round's rule parameters (Optuna's
proposal). `MEMORIES` maps `--memory NAME` to a class built from a `MemoryContext`; a new memory is one file
with a `Memory` subclass and one `MEMORIES.add_lazy(...)` line below (CONTRIBUTING.md, Extending). The base
is small on purpose, after Optuna's `BasePruner`: one abstract method and one optional hook.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrpilot.registry import Registry


@dataclass(frozen=True)
class MemoryContext:
    """What a memory is built from, once per campaign process: cfg (RunConfig), directory (the campaign's
    DIR, where a memory may keep its own state, e.g. Optuna's journal), settings (campaign.CampaignSettings:
    optuna_seed, rule_params, rules_for) and parallel (rounds are briefed while others still run)."""

    cfg: Any
    directory: Path
    settings: Any
    parallel: bool = False


@dataclass(frozen=True)
class RoundBrief:
    """A memory's answer for one round: `text` for the controller (Observation.memory_brief; "" = none),
    `params` (rule parameters for the round's controller, or None for its defaults) and `extra`, the fields
    the round's line in DIR/briefs.jsonl carries besides round, timestamp, memory and brief."""

    text: str = ""
    params: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class Memory(ABC):
    """A campaign's cross-round memory. `brief` is asked before each round (also when a killed round is
    resumed: `prior` is then the briefs.jsonl line written when it first started); `record` is told each
    finished round, and again for every finished round when a campaign resumes (so it must ignore repeats)."""

    #: it calls cfg.agent's LLM backend (the "memory" role): the campaign pings that backend before round 1
    uses_llm: bool = False

    @abstractmethod
    def brief(
        self,
        round_index: int,
        *,
        prior: dict[str, Any] | None = None,
        running: tuple[int, ...] = (),
        run_start_iso: str = "",
    ) -> RoundBrief:
        """The brief for round `round_index` (1-based). running: rounds started and not finished yet
        (`--parallel`); run_start_iso: the round's id in the logs. Should not raise for a backend failure:
        a round always gets a brief (a fallback text, logged)."""

    def record(self, round_index: int, final_ppl: float, failed: bool) -> None:  # noqa: B027
        """Round `round_index` ended with final eval ppl `final_ppl` (NaN if none); failed: status != ok.
        Default: nothing (the campaign's logs hold the results)."""


class NoMemory(Memory):
    """`--memory none`: every round starts from the same prior (an empty brief, the controller's defaults)."""

    def __init__(self, ctx: MemoryContext | None = None) -> None:
        self.ctx = ctx

    def brief(
        self,
        round_index: int,
        *,
        prior: dict[str, Any] | None = None,
        running: tuple[int, ...] = (),
        run_start_iso: str = "",
    ) -> RoundBrief:
        return RoundBrief()


MEMORIES: Registry[Callable[[MemoryContext], Memory]] = Registry("memory", field="--memory")
MEMORIES.add_lazy(
    "llm", "lrpilot.memory.llm_memory:LLMCampaignMemory", help="the Memory agent's brief (for --controller llm)"
)
MEMORIES.add_lazy(
    "optuna",
    "lrpilot.memory.optuna_memory:OptunaCampaignMemory",
    help="TPE over the rule parameters (for --controller rules)",
)
MEMORIES.add("none", NoMemory, help="every round from the same prior")
