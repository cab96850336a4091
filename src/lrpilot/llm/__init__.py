"""LLM backends by name: `agent.backend` (`--backend`) picks one from `LLM_BACKENDS`.

A backend is one file with an `LLMBackend` subclass (generate, ping, and a `from_agent(agent, role)` classmethod
that reads AgentConfig) and one line here. Entries are lazy ('module:Class'), so `openai` or `llama_cpp` is
imported only when that backend is chosen, and a missing package fails with the backend's own message naming
the extra to install. base.py reaches the backends only through this registry, so no module of lrpilot.llm
imports another in a cycle.
"""

from __future__ import annotations

from lrpilot.registry import Registry

#: subclasses of lrpilot.llm.base.LLMBackend by name (not imported here: base.py imports this module)
LLM_BACKENDS: Registry[type] = Registry("LLM backend", field="agent.backend")
LLM_BACKENDS.add_lazy("openai", "lrpilot.llm.openai_backend:OpenAIBackend", help="any OpenAI-compatible endpoint")
LLM_BACKENDS.add_lazy("local", "lrpilot.llm.local_backend:LocalBackend", help="llama-cpp-python")
