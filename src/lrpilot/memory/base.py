"""The campaign memory contract: before each round `brief(...)`, after it `record(...)`; memories by name.

    lrpilot campaign --preset cpu-small --rounds 8 --controller rules --memory optuna --dir runs/rules

A memory carries what a campaign learned from its earlier rounds into the next one: a brief (text the
round's controller reads; the LLM Memory agent writes one) and/or the round's rule parameters (Optuna's
proposal). `MEMORIES` maps `--memory NAME` to a class built from a `MemoryContext`; a new memory is one file
with a `Memory` subclass and one `MEMORIES.add_lazy(...)` line below (CONTRIBUTING.md, Extending). The base
is small on purpose, after Optuna's `BasePruner`: one abstract method and a few optional hooks (`record`, and
`prune` / `record_pruned` for `campaign --prune`, which a memory supports by overriding `prune`).
"""

from __future__ import annotations

import math
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

    def prune(self, round_index: int, step: int, eval_loss: float) -> bool:
        """`campaign --prune`: round `round_index` made an intermediate evaluation with loss `eval_loss` (nats)
        after update `step`; True stops the round now (status "pruned"). Called during the round, in the
        process that runs it (a fresh memory built from the same MemoryContext), so state must live in the
        campaign directory. Default: never prune (a memory that does not override this cannot take --prune)."""
        return False

    def record_pruned(self, round_index: int, step: int, eval_loss: float) -> None:
        """Round `round_index` was pruned after update `step` (its last eval loss `eval_loss`, NaN if none):
        like `record`, told again when a campaign resumes. Default: record it as failed with ppl NaN (a
        pruned round has no final result)."""
        self.record(round_index, math.nan, True)

    @classmethod
    def can_prune(cls) -> bool:
        """Whether this memory overrides `prune` (what `campaign --prune` needs)."""
        return cls.prune is not Memory.prune


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
