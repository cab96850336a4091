"""A toy LLM backend in one file: answers every request with the same JSON decision, no network.

The whole recipe (CONTRIBUTING.md, Extending: an LLM backend): an LLMBackend subclass with generate, ping and
a `from_agent(agent, role)` classmethod, and one registry line. `--backend toy-fixed` (agent.backend=toy-fixed)
then reaches it through lrpilot.llm.base.make_backend, audited to llm_calls.jsonl like the real ones.
"""

from __future__ import annotations

import json
from typing import Any

from lrpilot.llm import LLM_BACKENDS
from lrpilot.llm.base import LLMBackend, Reply, max_tokens_for_role, model_for_role

#: the LR every answer asks for
TOY_LR = 2e-3


class FixedBackend(LLMBackend):
    """Always answers {"reason": "toy backend", "lr": TOY_LR}; counts its calls."""

    def __init__(self, model: str, lr: float, max_tokens: int) -> None:
        self.model, self.lr, self.max_tokens, self.calls = model, lr, max_tokens, 0

    @classmethod
    def from_agent(cls, agent: Any, role: str) -> FixedBackend:
        return cls(model_for_role(agent, role), TOY_LR, max_tokens_for_role(agent, role))

    def generate(self, messages: list[dict], schema: dict | None = None) -> Reply:
        self.calls += 1
        text = json.dumps({"reason": "toy backend", "lr": self.lr})
        return Reply(text, json.loads(text), {"total_tokens": 1}, 0.0, self.model)

    def ping(self) -> None:
        pass


LLM_BACKENDS.add("toy-fixed", FixedBackend, help="toy: a fixed JSON answer")
