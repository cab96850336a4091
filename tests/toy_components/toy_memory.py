"""A toy memory in one file: Optuna's memory (pruning included) whose rounds after the first are hopeless.

The whole recipe (CONTRIBUTING.md, Extending: a memory): a Memory subclass built from a MemoryContext and one
registry line. Round 1 runs the Optuna memory's proposal (the default rule parameters); every later round gets
a ceiling of HOPELESS_CEILING, so the rules cut the LR to the floor after warmup and its evals fall behind
round 1's: what `campaign --prune` exists to stop (tests/test_prune.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lrpilot.memory.base import MEMORIES, RoundBrief
from lrpilot.memory.optuna_memory import OptunaCampaignMemory

#: the rule ceiling of every round after the first (the cpu-smoke warmup ends at 3e-3)
HOPELESS_CEILING = 1e-5


class HopelessAfterFirstMemory(OptunaCampaignMemory):
    """`--memory toy-hopeless`: OptunaCampaignMemory, with rounds >= 2 steered to a hopeless ceiling."""

    def brief(
        self,
        round_index: int,
        *,
        prior: dict[str, Any] | None = None,
        running: tuple[int, ...] = (),
        run_start_iso: str = "",
    ) -> RoundBrief:
        b = super().brief(round_index, prior=prior, running=running, run_start_iso=run_start_iso)
        if round_index < 2:
            return b
        return RoundBrief(b.text, replace(b.params, ceiling=HOPELESS_CEILING), b.extra)


MEMORIES.add("toy-hopeless", HopelessAfterFirstMemory, help="toy: Optuna's memory, hopeless after round 1")
