"""Append-only jsonl logs, flushed per line, and a tolerant reader.

Every log in lrpilot (telemetry, control, decisions, rollbacks, final results, LLM calls) goes through
`JsonlLog.append`. A crash can leave a torn last line; the writer starts a fresh line after it and
readers skip it with a warning, so nothing already written is lost. Non-finite floats are written as the
strings "nan", "inf", "-inf" (strict JSON has no NaN) and read back as floats by `as_float`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import math
import os
import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lrpilot.errors import DiskWriteError, writing
from lrpilot.lr import is_positive_finite  # noqa: F401 - re-exported: its home is lrpilot.lr

#: TESTING HOOK: LRPILOT_INJECT_WRITE_ERROR=ERRNO:BYTES (e.g. ENOSPC:800000 or EROFS:0) makes lrpilot's writers in
#: every process that sees it fail with that errno once BYTES bytes have been written in that process (a disk
#: that fills, or is read-only, where mounting a small filesystem is not allowed)
INJECT_WRITE_ERROR_ENV = "LRPILOT_INJECT_WRITE_ERROR"
_inject_lock = threading.Lock()
_inject_left: list[Any] = []  # [errno, bytes left] once parsed; [] = not parsed yet


def charge_write(nbytes: int, path: str | Path) -> None:
    """Count `nbytes` about to be written to `path` against the LRPILOT_INJECT_WRITE_ERROR budget; raises
    DiskWriteError when it is spent. A no-op unless the testing hook is set."""
    with _inject_lock:
        if not _inject_left:
            spec = os.environ.get(INJECT_WRITE_ERROR_ENV, "").strip()
            code: int | None = None
            left = 0
            if spec:
                name, _, amount = spec.partition(":")
                code = getattr(errno, name.strip().upper(), None)
                left = int(amount or 0)
            _inject_left[:] = [code, left]
        code, left = _inject_left
        if code is None:
            return
        _inject_left[1] = left - nbytes
        if left - nbytes < 0:
            raise DiskWriteError(path, OSError(code, os.strerror(code)))


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (tests swap it), one line per record."""

    def emit(self, record: logging.LogRecord) -> None:
        import sys

        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _LevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.level = record.levelname.lower()
        return super().format(record)


def _format_warning(message: Any, category: type, filename: str, lineno: int, line: str | None = None) -> str:
    """lrpilot's own warnings are messages for a user (they name the file and the fix): one line, no source
    location and no echo of the source line; anyone else's keep Python's format."""
    if os.path.abspath(filename).startswith(_PACKAGE_DIR) or category is UserWarning:
        return " ".join(str(message).split())
    return _default_formatwarning(message, category, filename, lineno, line)


_default_formatwarning = warnings.formatwarning


def setup_cli_logging(prog: str = "lrpilot") -> None:
    """Log records and warnings go to stderr as one line each, `lrpilot: warning: ...` (the CLI and the trainer
    call this once at start). Warnings are routed through logging (`logging.captureWarnings`)."""
    handler = _StderrHandler()
    handler.setFormatter(_LevelFormatter(f"{prog}: %(level)s: %(message)s"))
    root = logging.getLogger()
    if not any(getattr(h, "_lrpilot", False) for h in root.handlers):
        handler._lrpilot = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    warnings.formatwarning = _format_warning  # type: ignore[assignment]
    logging.captureWarnings(True)


def now_iso() -> str:
    """Local time in the published logs' format (ISO 8601, microseconds, no zone)."""
    return _dt.datetime.now().isoformat()


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON (non-finite floats as the strings "nan"/"inf"/"-inf"), UTF-8 kept readable: one line, or
    with `indent` a document indented that many spaces."""
    if indent is not None:
        return json.dumps(_clean(obj), ensure_ascii=False, allow_nan=False, indent=indent)
    return json.dumps(_clean(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def as_float(v: Any) -> float:
    """Read a number written by `dumps` (including "nan"/"inf"); None or garbage is NaN."""
    if isinstance(v, bool) or v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def perplexity(loss: float) -> float:
    """exp(loss) for a mean cross-entropy loss in nats; inf above 700 nats (exp overflows), NaN for NaN."""
    return math.nan if math.isnan(loss) else math.inf if loss > 700 else math.exp(loss)


def finite_mean(xs: Any) -> float:
    """Mean of the finite values of xs; NaN if there are none."""
    ys = [x for x in xs if math.isfinite(x)]
    return sum(ys) / len(ys) if ys else math.nan


class JsonlLog:
    """Append-only jsonl file: one object per line, written with one unbuffered write (and optionally fsynced)
    per line. A line the disk refuses (full, read-only) raises DiskWriteError and leaves no part of itself."""

    def __init__(self, path: str | Path, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # unbuffered: a failed write leaves nothing in a buffer that a later flush or close would retry
            self._f = open(self.path, "a+b", buffering=0)  # noqa: SIM115 - kept open for the log's lifetime
        self._f.seek(0, os.SEEK_END)
        if self._f.tell() > 0:
            self._f.seek(-1, os.SEEK_END)
            if self._f.read(1) != b"\n":
                # a writer died mid-line: keep its bytes, start ours on a fresh line
                self._write(b"\n")
        self._f.seek(0, os.SEEK_END)

    def _write(self, data: bytes) -> None:
        """Append data whole or not at all: after a failed (or partial) write the file is cut back to its
        old length, unless someone else appended meanwhile."""
        fd = self._f.fileno()
        start = os.fstat(fd).st_size
        done = 0
        try:
            charge_write(len(data), self.path)
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError as e:
            if done and os.fstat(fd).st_size == start + done:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
            with writing(self.path):
                raise e from None

    def append(self, record: dict[str, Any], fsync: bool | None = None) -> None:
        """Write one record as a line; fsync it too per `fsync` (None: the log's setting). Raises
        DiskWriteError when the disk refuses it (nothing of the line is left in the file)."""
        line = (dumps(record) + "\n").encode("utf-8")
        with self._lock:
            self._write(line)
            if self.fsync if fsync is None else fsync:
                with writing(self.path):
                    os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.close()

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def temp_name(path: str | Path) -> Path:
    """A temporary name next to `path` that no other process or thread uses: PATH.tmp<pid>.<random>."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}.{uuid.uuid4().hex[:8]}")


def write_atomic(path: str | Path, data: bytes, fsync: bool = False) -> None:
    """Replace `path` with `data` so that a reader sees the old file or the new one, never half of it
    (through a temp_name of its own); fsync=True also makes the bytes durable before the rename. A disk
    that refuses the write raises DiskWriteError naming `path`, leaves the old file and no temporary file."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with writing(path):
            charge_write(len(data), path)
            with open(tmp, "wb") as f:
                f.write(data)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """One json document (as `dumps`), written with `write_atomic`."""
    write_atomic(path, (dumps(obj) + "\n").encode("utf-8"))


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Open, append one record, close. For logs written rarely (results, rollbacks)."""
    with JsonlLog(path) as log:
        log.append(record)


def _parse_line(raw: bytes) -> dict[str, Any]:
    """One jsonl line as a dict; ValueError/UnicodeDecodeError when it is not a JSON object."""
    rec = json.loads(raw.decode("utf-8"))
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    return rec


def iter_jsonl(path: str | Path, strict: bool = False) -> Iterator[dict[str, Any]]:
    """Records of a jsonl file. Blank lines are skipped; a corrupt line is skipped with a warning that
    names file and line (or raises ValueError when strict)."""
    p = Path(path)
    if not p.exists():
        return
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = _parse_line(raw)
            except (ValueError, UnicodeDecodeError) as e:
                msg = f"{p}:{n}: corrupt jsonl line skipped ({e.__class__.__name__}: {str(e)[:80]})"
                if strict:
                    raise ValueError(msg) from e
                warnings.warn(msg, stacklevel=2)
                continue
            yield rec


def read_jsonl(path: str | Path, strict: bool = False) -> list[dict[str, Any]]:
    return list(iter_jsonl(path, strict=strict))


class JsonlFollower:
    """Reads the complete lines appended to a jsonl file since the last call (for tailing a log that
    another process writes). A partial last line is kept until its newline arrives."""

    def __init__(self, path: str | Path, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        self._buf = b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size <= self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        self.offset += len(data)
        data = self._buf + data
        lines = data.split(b"\n")
        self._buf = lines.pop()  # incomplete tail, if any
        out = []
        for raw in lines:
            if not raw.strip():
                continue
            try:
                out.append(_parse_line(raw))
            except (ValueError, UnicodeDecodeError):
                warnings.warn(f"{self.path}: corrupt jsonl line skipped while following", stacklevel=2)
        return out
