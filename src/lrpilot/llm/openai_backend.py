"""Any OpenAI-compatible chat endpoint through the official `openai` client (DashScope by default).

    DASHSCOPE_API_KEY=... python -c "from lrpilot.llm.openai_backend import OpenAIBackend; \
OpenAIBackend().ping()"

Defaults reproduce the published setup: DashScope's compatible-mode endpoint, Qwen 3.6 Plus, the key from
DASHSCOPE_API_KEY (or OPENAI_API_KEY). A local endpoint (127.0.0.1 / localhost, e.g. `python -m
llama_cpp.server`) works without a key.

Failures: timeouts, connection errors, HTTP 429 and 5xx are retried with exponential backoff (at least the
server's Retry-After, at most max_backoff_s = 30 s; a longer Retry-After is capped, and the warning and the
final error say so); 4xx are not (a rejected key stays rejected). JSON output: we ask for OpenAI's `json_schema` response format and, when an
endpoint answers that it does not support it (llama_cpp.server: HTTP 500 naming response_format), fall
back to `json_object` with the schema (llama.cpp's extension), then plain `json_object`, then no
response_format at all (the prompt still asks for JSON); the first one that works is remembered.
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import random
import time
from typing import Any
from urllib.parse import urlparse

from lrpilot.config import AgentConfig
from lrpilot.llm.base import (
    LLMBackend,
    LLMError,
    Reply,
    answer_only_error,
    get_secret,
    max_tokens_for_role,
    model_field,
    model_for_role,
    split_reasoning,
    truncation_error,
    try_parse,
)

log = logging.getLogger(__name__)

#: the published setup, as AgentConfig's defaults say
DEFAULT_BASE_URL = AgentConfig.base_url
DEFAULT_MODEL = AgentConfig.model
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
#: response_format variants, most to least strict
JSON_MODES = ("json_schema", "json_object_schema", "json_object", "none")
_UNSUPPORTED_HINTS = ("response_format", "json_schema", "json_object", "schema", "not support", "unsupported")


def _import_openai() -> Any:
    try:
        import openai
    except ImportError as e:
        raise LLMError("the openai backend needs the openai package: pip install 'lrpilot[openai]'") from e
    return openai


def is_local_url(base_url: str) -> bool:
    return (urlparse(base_url).hostname or "") in LOCAL_HOSTS


def _status_message(e: Any) -> str:
    """A short, header-free description of an HTTP error from the openai client."""
    msg = ""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        msg = str(inner.get("message") or inner.get("detail") or "") if isinstance(inner, dict) else str(inner)
    if not msg:
        msg = str(getattr(e, "message", "") or e)
    return " ".join(msg.split())[:300]


def _retry_after(e: Any) -> float | None:
    """Seconds a rate-limited or overloaded server asks us to wait (its Retry-After header, in seconds or an
    HTTP date, RFC 9110 10.2.3); None if absent or unreadable."""
    try:
        value = str(e.response.headers.get("retry-after", "") or "").strip()
    except AttributeError:
        return None
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


class OpenAIBackend(LLMBackend):
    """Chat completions against an OpenAI-compatible endpoint; retries transient failures, never raises
    from generate()."""

    @classmethod
    def from_agent(cls, agent: AgentConfig, role: str) -> OpenAIBackend:
        """`agent.backend = "openai"`: agent's endpoint, key variable, timeout, retries and temperature, with
        `role`'s model and reply budget (lrpilot.llm.base.model_for_role, max_tokens_for_role)."""
        return cls(
            base_url=agent.base_url,
            model=model_for_role(agent, role),
            api_key_env=agent.api_key_env,
            timeout_s=agent.timeout_s,
            retries=agent.retries,
            temperature=agent.temperature,
            max_tokens=max_tokens_for_role(agent, role),
            model_field=model_field(agent, role),
        )

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        model: str = DEFAULT_MODEL,
        api_key_env: str = "DASHSCOPE_API_KEY",
        timeout_s: float = 60.0,
        retries: int = 3,
        temperature: float = 0.3,
        max_tokens: int = 512,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        json_mode: str | None = None,
        extra_body: dict | None = None,
        model_field: str = "agent.model",
    ) -> None:
        openai = _import_openai()
        #: the setting that names this backend's model, for ping's messages (agent.memory_model for the Memory agent)
        self.model_field = model_field
        self._openai = openai
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        if json_mode is not None and json_mode not in JSON_MODES:
            raise LLMError(f"json_mode {json_mode!r}: use one of {', '.join(JSON_MODES)}")
        self._mode = JSON_MODES.index(json_mode) if json_mode else 0
        names = tuple(dict.fromkeys(n for n in (api_key_env, "OPENAI_API_KEY") if n))
        found = get_secret(*names)
        if found is None:
            if not is_local_url(self.base_url):
                raise LLMError(
                    f"agent.api_key_env: no API key for {self.base_url}: set {' or '.join(names)} in the "
                    "environment or in ./.env"
                )
            self.key_name, self._key = "(none: local endpoint)", "sk-local-no-key"
        else:
            self.key_name, self._key = found
        # DashScope's Qwen3 models may think before answering; non-streaming calls must turn that off
        if extra_body is None and "dashscope" in (urlparse(self.base_url).hostname or ""):
            extra_body = {"enable_thinking": False}
        self.extra_body = extra_body
        # our own retry loop (so we can tell auth errors from transient ones and back off as we choose)
        self._client = openai.OpenAI(api_key=self._key, base_url=self.base_url, timeout=self.timeout_s, max_retries=0)

    # ------------------------------------------------------------------------------------ helpers

    @property
    def json_mode(self) -> str:
        """The response_format variant in use (json_schema until an endpoint refuses it)."""
        return JSON_MODES[self._mode]

    def secret_values(self) -> tuple[str, ...]:
        return (self._key,)

    def describe(self) -> dict[str, Any]:
        return {"backend": "openai", "base_url": self.base_url, "model": self.model, "json_mode": self.json_mode}

    def _response_format(self, schema: dict | None) -> dict | None:
        if schema is None:
            return None
        mode = self.json_mode
        if mode == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
        if mode == "json_object_schema":
            return {"type": "json_object", "schema": schema}
        if mode == "json_object":
            return {"type": "json_object"}
        return None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        if retry_after is not None and retry_after > 0:
            delay = min(self.max_backoff_s, max(delay, retry_after))
        return delay * (1.0 + 0.1 * random.random())  # jitter: retries from parallel rounds do not line up

    def _capped_note(self, retry_after: float | None) -> str:
        """' (the server asked Retry-After N s; waited at most max_backoff_s)' when the server asked for
        more than this backend waits, else ''."""
        if retry_after is None or retry_after <= self.max_backoff_s:
            return ""
        return f" (the server asked Retry-After {retry_after:g}s; capped at max_backoff_s={self.max_backoff_s:g}s)"

    # ---------------------------------------------------------------------------------- generate

    def generate(self, messages: list[dict], schema: dict | None = None) -> Reply:
        oa = self._openai
        t0 = time.monotonic()
        attempt = 0
        while True:
            kwargs: dict[str, Any] = {
                "model": self.model,
                "messages": messages,
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
            rf = self._response_format(schema)
            if rf is not None:
                kwargs["response_format"] = rf
            if self.extra_body:
                kwargs["extra_body"] = self.extra_body
            error: str
            retry_after: float | None = None
            try:
                resp = self._client.chat.completions.create(**kwargs)
                return self._reply(resp, schema, time.monotonic() - t0)
            except oa.APIStatusError as e:
                status = int(e.status_code)
                msg = _status_message(e)
                if (
                    rf is not None
                    and status in (400, 415, 422, 500, 501)
                    and any(h in msg.lower() for h in _UNSUPPORTED_HINTS)
                ):
                    # the endpoint refuses this response_format: step down and remember (not a retry)
                    log.info(
                        "%s: response_format %s refused (HTTP %d); trying the next",
                        self.base_url,
                        self.json_mode,
                        status,
                    )
                    self._mode += 1
                    continue
                error = f"HTTP {status} from {self.base_url}: {msg}"
                if status in (401, 403):
                    error = f"HTTP {status}: API key rejected by {self.base_url} (key from {self.key_name}): {msg}"
                    return self._failed(error, t0)
                if not (status == 429 or status == 408 or status >= 500):
                    return self._failed(error, t0)
                retry_after = _retry_after(e)
            except oa.APITimeoutError:
                error = f"timeout: no answer from {self.base_url} within {self.timeout_s:g}s"
            except oa.APIConnectionError as e:
                cause = e.__cause__ or e
                error = f"connection error to {self.base_url}: {type(cause).__name__}: {str(cause)[:200]}"
            except Exception as e:  # a malformed response body, an SDK surprise: a failed call, not a crash
                return self._failed(f"unexpected {type(e).__name__}: {str(e)[:300]}", t0)
            if attempt >= self.retries:
                suffix = f" (after {attempt + 1} attempts)" if attempt else ""
                return self._failed(error + suffix + self._capped_note(retry_after), t0)
            delay = self._backoff(attempt, retry_after)
            log.warning(
                "%s; retry %d/%d in %.2fs%s", error, attempt + 1, self.retries, delay, self._capped_note(retry_after)
            )
            time.sleep(delay)
            attempt += 1

    def _failed(self, error: str, t0: float) -> Reply:
        return Reply.failed(error, time.monotonic() - t0, self.model)

    def _reply(self, resp: Any, schema: dict | None, latency: float) -> Reply:
        choices = getattr(resp, "choices", None)
        if not choices:
            return Reply.failed(f"no choices in the response from {self.base_url}", latency, self.model)
        message = choices[0].message
        # reasoning models: `<think>...</think>` ahead of the answer, and/or a separate field (vLLM, DeepSeek,
        # llama.cpp --reasoning-format: reasoning_content; Ollama, OpenRouter: reasoning); only the answer is read
        text, think = split_reasoning(getattr(message, "content", None) or "")
        fields = [getattr(message, k, None) for k in ("reasoning_content", "reasoning")]
        reasoning = "\n".join(x.strip() for x in [*fields, think] if isinstance(x, str) and x.strip())
        usage: dict[str, int] = {}
        u = getattr(resp, "usage", None)
        if u is not None:
            for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
                v = getattr(u, k, None)
                if isinstance(v, int):
                    usage[k] = v
        parsed = try_parse(text) if schema is not None else None
        finish = getattr(choices[0], "finish_reason", None)
        error = answer_only_error(text, reasoning) or truncation_error(finish, schema, parsed, self.max_tokens)
        model = getattr(resp, "model", None) or self.model
        return Reply(
            text, parsed, usage, latency, model, error,
            reasoning=reasoning, finish_reason=finish if isinstance(finish, str) else None,
        )  # fmt: skip

    # -------------------------------------------------------------------------------------- ping

    def _key_rejected(self, status: int) -> LLMError:
        return LLMError(
            f"API key rejected by {self.base_url} (HTTP {status}, key from "
            f"{self.key_name}); set a valid key in the environment or ./.env"
        )

    def ping(self) -> None:
        oa = self._openai
        client = self._client.with_options(timeout=min(self.timeout_s, 10.0), max_retries=0)
        try:
            page = client.models.list()
            ids = [m.id for m in page.data]
        except oa.APITimeoutError as e:
            raise LLMError(
                f"endpoint {self.base_url} did not answer within {min(self.timeout_s, 10.0):g}s; "
                "check agent.base_url and that the server is up"
            ) from e
        except oa.APIConnectionError as e:
            cause = e.__cause__ or e
            raise LLMError(
                f"endpoint unreachable: {self.base_url} ({type(cause).__name__}); start the server "
                "or fix agent.base_url"
            ) from e
        except oa.APIStatusError as e:
            if e.status_code in (401, 403):
                raise self._key_rejected(e.status_code) from e
            if e.status_code in (404, 405, 501):
                # no /models route: try a 1-token completion instead
                return self._ping_by_chat(models_status=e.status_code)
            raise LLMError(
                f"endpoint {self.base_url} answered HTTP {e.status_code} to /models: {_status_message(e)}"
            ) from e
        except Exception as e:
            raise LLMError(
                f"endpoint {self.base_url} gave an unreadable /models answer ({type(e).__name__}); "
                "is agent.base_url an OpenAI-compatible /v1 URL?"
            ) from e
        if ids and self.model not in ids:
            shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
            unknown = f"model {self.model!r} unknown at {self.base_url}; it serves: {shown}; fix {self.model_field}"
            if is_local_url(self.base_url):
                # a local server's list is complete, and llama_cpp.server would silently answer with its own model
                raise LLMError(unknown)
            # hosted APIs may list only part of what they serve (dated snapshots): ask the model itself
            try:
                self._ping_by_chat()
            except LLMError as e:
                raise LLMError(f"{unknown} ({e})") from e
            log.warning("%s: model %r is not in /models but answers; going on", self.base_url, self.model)

    def _no_api_here(self, models_status: int) -> LLMError:
        """Both /models and /chat/completions are missing: the URL, not the model, is wrong."""
        path = urlparse(self.base_url).path.rstrip("/")
        hint = (
            f"should agent.base_url end in /v1 (e.g. {self.base_url}/v1)?"
            if not path.endswith("/v1")
            else "check agent.base_url (the path before /chat/completions)"
        )
        return LLMError(
            f"endpoint {self.base_url} has no OpenAI-compatible API: {self.base_url}/models answered HTTP "
            f"{models_status} and {self.base_url}/chat/completions HTTP 404; {hint}"
        )

    def _ping_by_chat(self, models_status: int | None = None) -> None:
        """A 1-token completion. models_status: the HTTP status /models answered when it had no list (then a
        404 here too that does not name the model means the URL is wrong, not the model)."""
        oa = self._openai
        client = self._client.with_options(timeout=min(self.timeout_s, 30.0), max_retries=0)
        try:
            client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": "ok"}], max_tokens=1)
        except oa.APIStatusError as e:
            msg = _status_message(e)
            if e.status_code in (401, 403):
                raise self._key_rejected(e.status_code) from e
            if e.status_code == 404 and models_status is not None and self.model not in msg:
                raise self._no_api_here(models_status) from e
            if e.status_code == 404 or "model" in msg.lower():
                raise LLMError(
                    f"model {self.model!r} unknown at {self.base_url} ({msg}); fix {self.model_field}"
                ) from e
            raise LLMError(f"endpoint {self.base_url} answered HTTP {e.status_code}: {msg}") from e
        except oa.APIConnectionError as e:
            raise LLMError(f"endpoint unreachable: {self.base_url}; start the server or fix agent.base_url") from e
