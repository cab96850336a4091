"""The LLM backend contract, the audit log of every call, secrets from the environment or ./.env.

    python -c "from lrpilot.config import AgentConfig; from lrpilot.llm.base import make_backend; \
make_backend(AgentConfig(backend='local'), 'controller', None).ping()"

A backend turns chat messages into a `Reply`. `generate` never raises for a failed call (timeout, HTTP
error, bad model output): the failure is in `Reply.error`, so a controller can fall back and the round goes
on. Configuration problems (missing package, missing key, model file not found) raise `LLMError` with one
line that names the fix, at construction or in `ping()`, so a campaign fails before its first round.

Every call goes to `llm_calls.jsonl` through `AuditedBackend` (role, model, messages, reply, usage,
latency, error, time, reasoning, parse_error). API keys and HTTP headers are never written there, nor printed.
Reasoning models think before they answer: backends remove the reasoning (`<think>...</think>` ahead of the
answer, or a separate `reasoning_content` field) from `Reply.text` and keep it in `Reply.reasoning`, so that
only the answer is ever parsed and the reasoning is still audited.
"""

from __future__ import annotations

import json
import os
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lrpilot.errors import LrpilotError
from lrpilot.llm import LLM_BACKENDS
from lrpilot.logs import JsonlLog, now_iso
from lrpilot.records import LLMCallRecord

ROLES = ("controller", "memory")


class LLMError(LrpilotError, RuntimeError):
    """An LLM backend cannot work as configured; the one-line message names what is wrong and the fix."""


@dataclass(frozen=True)
class Reply:
    """One model answer. `parsed` is the JSON object in `text` when a schema was asked for and it parsed;
    `error` is set (and `text` may be partial or empty) when the call failed."""

    text: str
    parsed: dict | None
    usage: dict = field(default_factory=dict)
    latency_s: float = 0.0
    model: str = ""
    error: str | None = None
    #: the model's reasoning, removed from `text` before anything read it: `<think>...</think>` blocks ahead
    #: of the answer and a separate `reasoning_content` field; kept for the audit log only
    reasoning: str = ""
    #: why generation stopped as the endpoint said it ("stop", "length" = cut at max_tokens, ...); None if unknown
    finish_reason: str | None = None

    @classmethod
    def failed(cls, error: str, latency_s: float, model: str) -> Reply:
        """A failed call: no text, nothing parsed, no usage, `error` saying why."""
        return cls(text="", parsed=None, usage={}, latency_s=latency_s, model=model, error=error)


def truncation_error(finish_reason: Any, schema: dict | None, parsed: dict | None, max_tokens: int) -> str | None:
    """The error of a reply that a schema asked JSON of, cut at max_tokens (finish_reason "length") before
    its JSON object was complete; None for any other reply."""
    if finish_reason == "length" and schema is not None and parsed is None:
        return f"reply cut at max_tokens={max_tokens} before the JSON object was complete"
    return None


def answer_only_error(text: str, reasoning: str) -> str | None:
    """The error of a reply that holds reasoning and no answer after it (an unclosed `<think>`, or a reasoning
    model that spent max_tokens thinking); None otherwise."""
    if not text.strip() and reasoning.strip():
        return (
            f"reply holds only reasoning ({len(reasoning)} chars) and no answer after it; raise agent.max_tokens "
            "or turn the model's thinking off"
        )
    return None


class LLMBackend(ABC):
    """Turns chat messages into a Reply; never raises from generate(), raises LLMError from ping()."""

    #: the model name sent with each request (or the model file for a local backend)
    model: str = ""

    @abstractmethod
    def generate(self, messages: list[dict], schema: dict | None = None) -> Reply:
        """Answer `messages` ([{"role": ..., "content": ...}]); with `schema`, ask for a JSON object
        that follows it (as far as the backend can enforce it) and fill `Reply.parsed`."""

    @abstractmethod
    def ping(self) -> None:
        """Check quickly that the backend can answer (endpoint reachable, key accepted, model known);
        raise LLMError with a one-line reason otherwise."""

    def describe(self) -> dict[str, Any]:
        return {"backend": type(self).__name__, "model": self.model}

    @classmethod
    def from_agent(cls, agent: Any, role: str) -> LLMBackend:
        """This backend as AgentConfig `agent` describes it for `role` ("controller" | "memory"; see
        model_for_role and max_tokens_for_role). Each registered backend (lrpilot.llm.LLM_BACKENDS) overrides it."""
        raise NotImplementedError(
            f"{cls.__name__}.from_agent: a registered LLM backend must build itself from AgentConfig"
        )

    def secret_values(self) -> tuple[str, ...]:
        """Strings that must never reach a log (the API key); the audit wrapper masks them."""
        return ()


# ------------------------------------------------------------------------------------------- JSON


_FENCE = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*\n?(.*?)\n?```$", re.DOTALL)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


#: tags that reasoning models (Qwen3, DeepSeek-R1, QwQ, ... through Ollama, vLLM, llama.cpp) wrap their thinking in
REASONING_TAGS = ("think", "thinking", "reasoning")
_REASONING_OPEN = re.compile(r"\A\s*<(" + "|".join(REASONING_TAGS) + r")(?:\s[^>]*)?>", re.IGNORECASE)
_REASONING_CLOSE = re.compile(r"</(" + "|".join(REASONING_TAGS) + r")\s*>", re.IGNORECASE)


def split_reasoning(text: str) -> tuple[str, str]:
    """(answer, reasoning) of a reply: every reasoning block (`<think>`, `<thinking>` or `<reasoning>` ... its
    closing tag) ahead of the answer is removed and returned as `reasoning`. Blocks are matched by their
    tags, never by braces, so JSON inside the reasoning is not mistaken for the answer. An unclosed block
    (the reply was cut while thinking) is all reasoning: the answer is "". A closing tag with no opening one
    (DeepSeek-R1 templates put `<think>` in the prompt) ends the reasoning too. Text with no such tags is
    returned unchanged as the answer."""
    if not isinstance(text, str):
        return text, ""
    s, parts = text, []
    while True:
        m = _REASONING_OPEN.match(s)
        if m is None:
            break
        close = re.compile(rf"</{m.group(1)}\s*>", re.IGNORECASE).search(s, m.end())
        if close is None:  # cut off while thinking: no answer
            parts.append(s[m.end() :])
            return "", "\n".join(p.strip() for p in parts).strip()
        parts.append(s[m.end() : close.start()])
        s = s[close.end() :]
    orphan = _REASONING_CLOSE.search(s)
    if orphan is not None and not s[: orphan.start()].lstrip().startswith(("{", "`")):
        parts.append(s[: orphan.start()])
        s = s[orphan.end() :]
    if not parts:
        return text, ""
    return s.strip(), "\n".join(p.strip() for p in parts if p.strip())


def strip_code_fence(text: str) -> str:
    """`text` stripped, and without the ``` code fence (with an optional language tag) wrapping all of it."""
    s = text.strip()
    m = _FENCE.match(s)
    return m.group(1).strip() if m else s


def parse_json_object(text: str) -> dict:
    """The single JSON object in `text`, which may follow reasoning blocks (`<think>...</think>`, removed by
    split_reasoning), may be wrapped in a ``` code fence and may hold raw newlines inside strings
    (llama.cpp's JSON grammar lets them through). Anything else (prose around the object, NaN/Infinity
    literals, duplicate keys, a list, reasoning with no answer after it) raises ValueError with the reason."""
    if not isinstance(text, str):
        raise ValueError(f"reply is {type(text).__name__}, not text")
    answer, reasoning = split_reasoning(text)
    s = strip_code_fence(answer)
    if not s:
        raise ValueError(answer_only_error(answer, reasoning) or "empty reply")
    if not s.startswith("{"):
        raise ValueError(f"reply is not a JSON object (starts with {s[:20]!r})")
    try:
        # strict=False: control characters (raw newlines, tabs) allowed inside strings
        obj = json.loads(s, strict=False, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"invalid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError("reply is not a JSON object")
    return obj


def try_parse(text: str) -> dict | None:
    try:
        return parse_json_object(text)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------- secrets


def read_dotenv(path: str | Path = ".env") -> dict[str, str]:
    """KEY=VALUE lines of a .env file (`export ` prefix, quotes and # comments allowed); {} if absent.
    Values are returned, never printed; os.environ is not modified."""
    p = Path(path)
    if not p.is_file():
        return {}
    out: dict[str, str] = {}
    for raw in p.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        if "=" not in line:
            continue
        key, value = line.split("=", 1)
        key, value = key.strip(), value.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()  # trailing comment on an unquoted value
        out[key] = value
    return out


def get_secret(*names: str, dotenv: str | Path | None = None) -> tuple[str, str] | None:
    """(name, value) of the first of `names` set (non-empty) in the environment, else in ./.env; None if
    none is. The environment wins over .env."""
    for name in names:
        v = os.environ.get(name, "").strip()
        if v:
            return name, v
    env = read_dotenv(dotenv if dotenv is not None else Path.cwd() / ".env")
    for name in names:
        v = env.get(name, "").strip()
        if v:
            return name, v
    return None


# ------------------------------------------------------------------------------------------ audit


def _mask(obj: Any, secrets: tuple[str, ...]) -> Any:
    if not secrets:
        return obj
    if isinstance(obj, str):
        for s in secrets:
            if s and s in obj:
                obj = obj.replace(s, "***")
        return obj
    if isinstance(obj, dict):
        return {k: _mask(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mask(v, secrets) for v in obj]
    return obj


class AuditedBackend(LLMBackend):
    """Wraps a backend; appends one line per generate() to llm_calls.jsonl (the key is never written)."""

    def __init__(self, inner: LLMBackend, role: str, audit_path: str | Path, extra: dict | None = None) -> None:
        self.inner = inner
        self.role = role
        self.audit_path = Path(audit_path)
        self.extra = dict(extra or {})
        self._log: JsonlLog | None = None

    @property
    def model(self) -> str:  # type: ignore[override]
        return self.inner.model

    def _append(self, record: dict) -> None:
        if self._log is None:
            self._log = JsonlLog(self.audit_path)
        self._log.append(_mask(record, tuple(s for s in self.inner.secret_values() if len(s) >= 4)))

    def generate(self, messages: list[dict], schema: dict | None = None) -> Reply:
        t0 = time.time()
        try:
            reply = self.inner.generate(messages, schema)
        except Exception as e:  # a backend broke its contract; still log and still return a Reply
            reply = Reply.failed(f"{type(e).__name__}: {e}", time.time() - t0, self.model)
        record = {
            "time": now_iso(),
            "role": self.role,
            "backend": type(self.inner).__name__,
            "model": reply.model or self.model,
            **self.extra,
            "messages": messages,
            "schema": schema is not None,
            "reply": reply.text,
            "parsed": reply.parsed,
            "usage": reply.usage,
            "latency_s": round(reply.latency_s, 4),
            "error": reply.error,
            "reasoning": reply.reasoning or None,
            "finish_reason": reply.finish_reason,
        }
        if schema is not None and reply.parsed is None and reply.error is None:
            try:  # the call worked but its answer is not the JSON asked for: say why here too
                parse_json_object(reply.text)
            except ValueError as e:
                record["parse_error"] = str(e)
        record = LLMCallRecord.from_dict(record).to_dict()  # lrpilot.records: the schema's types checked
        try:
            self._append(record)
        except OSError as e:  # a full disk must not stop training; say so on the reply instead
            reply = replace(reply, error=reply.error or f"audit log not written ({e})")
        return reply

    def ping(self) -> None:
        self.inner.ping()

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "role": self.role}

    def secret_values(self) -> tuple[str, ...]:
        return self.inner.secret_values()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


# ---------------------------------------------------------------------------------------- factory


def model_for_role(agent: Any, role: str) -> str:
    """Controller = fast tier (agent.model); Memory = strong tier (agent.memory_model, or agent.model)."""
    if role not in ROLES:
        raise LLMError(f"role {role!r}: must be one of {', '.join(ROLES)}")
    return (agent.memory_model or agent.model) if role == "memory" else agent.model


def model_field(agent: Any, role: str) -> str:
    """The setting that names `role`'s model, for messages that tell the user what to fix."""
    if role == "memory" and agent.memory_model:
        return "agent.memory_model (--memory-model)"
    if role == "memory":
        return "agent.model (--model; the Memory agent uses it while agent.memory_model is empty)"
    return "agent.model (--model)"


def ping_backends(agent: Any, roles: list[str]) -> None:
    """Ping every backend a campaign will use, once per distinct (backend, endpoint, model): the Controller's
    and the Memory agent's model may differ. Raises LLMError naming the role and the field to fix."""
    seen: set[tuple[str, str, str]] = set()
    for role in roles:
        key = (agent.backend, agent.base_url, model_for_role(agent, role))
        if key in seen:
            continue
        seen.add(key)
        try:
            make_backend(agent, role, None).ping()
        except LLMError as e:
            who = "Controller" if role == "controller" else "Memory agent"
            raise LLMError(f"{who}: {e}") from e


def max_tokens_for_role(agent: Any, role: str) -> int:
    """The reply budget of `role`: agent.memory_max_tokens for the Memory agent, agent.max_tokens otherwise."""
    return agent.memory_max_tokens if role == "memory" else agent.max_tokens


def make_backend(agent: Any, role: str, audit_path: str | Path | None = None, extra: dict | None = None) -> LLMBackend:
    """The backend that AgentConfig `agent` describes for `role` ("controller" | "memory"): the class that
    LLM_BACKENDS registers as `agent.backend` (lrpilot.llm), built by its `from_agent`; wrapped so that each call
    is appended to `audit_path` (llm_calls.jsonl) when given, with the fields of `extra` (a campaign passes
    `round` and `run_start_iso`, so calls join their round like every other log). Raises LLMError for an unknown
    role, ConfigError (one line, naming agent.backend and the choices) for an unknown backend."""
    model_for_role(agent, role)  # an unknown role fails first, whatever the backend
    backend = LLM_BACKENDS.get(agent.backend).from_agent(agent, role)
    if audit_path is None:
        return backend
    return AuditedBackend(backend, role, audit_path, extra)
