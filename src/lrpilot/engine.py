"""Execution engines for rounds and runs: where a campaign round, a sweep run or a bench run executes.

    lrpilot campaign --preset cpu-smoke --rounds 4 --parallel 2 --engine ray --dir runs/par
    lrpilot campaign ... --engine ray --ray-address auto --resources num_cpus=4,num_gpus=1

`Engine.submit(fn, *args) -> concurrent.futures.Future` runs `fn(*args)` somewhere and hands back its result:

  * `LocalEngine(1)` runs it in the calling thread, at submit time: exactly what lrpilot did before engines.
  * `LocalEngine(K>1)` runs each call in a child process of its own (spawn), K at most at once. A process, not
    a thread: cancelling it (Ctrl-C of the driver, `cancel_all`) sends it SIGTERM, which the round supervisor
    turns into SystemExit and kills its trainer's process group; a thread cannot be stopped from outside.
  * `RayEngine` makes each call a Ray task with `Resources` (`--resources num_cpus=1,num_gpus=0`). The supervisor
    runs inside the task, so rollback, hang detection and kill-on-cancel come along; the run directory must be on
    storage that every node sees (the --dir / --out given). Cancelling first interrupts the task
    (KeyboardInterrupt in the worker: the supervisor kills its trainer's group), then force-kills a worker that
    is still alive after `cancel_grace_s`; a trainer whose supervisor dies gets SIGTERM from the kernel
    (PR_SET_PDEATHSIG, lrpilot.launcher), so nothing is orphaned. A worker that dies mid-task (OOM, a node
    lost, `kill -9`) is retried by Ray (`max_retries`), and the retried round resumes from its checkpoint.

Ray is an extra: `pip install 'lrpilot[ray]'`; without it `--engine ray` fails in one line naming the extra.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as _wait
from dataclasses import dataclass
from typing import Any

from lrpilot.config import ConfigError

ENGINES = ("local", "ray")
#: how long a cancelled task gets to kill its trainer before its process is killed (s)
CANCEL_GRACE_S = 30.0


@dataclass(frozen=True)
class Resources:
    """What one round or run asks of the engine: CPU cores and GPUs (fractions allowed, as Ray's num_cpus and
    num_gpus). Only the Ray engine schedules by them; the local engine ignores them."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_cpus", "num_gpus"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"--resources {name}={v!r}: expected a number >= 0, e.g. --resources {name}=1")

    @classmethod
    def parse(cls, text: str) -> Resources:
        """'num_cpus=2,num_gpus=1' -> Resources; ConfigError (one line naming the field) on a bad one."""
        values: dict[str, float] = {}
        for part in (p.strip() for p in (text or "").split(",")):
            if not part:
                continue
            name, eq, raw = part.partition("=")
            name = name.strip()
            if not eq or name not in ("num_cpus", "num_gpus"):
                raise ConfigError(f"--resources {part!r}: expected NAME=NUMBER with NAME num_cpus or num_gpus")
            try:
                values[name] = float(raw)
            except ValueError:
                raise ConfigError(f"--resources {name}={raw!r}: expected a number, e.g. {name}=1") from None
        return cls(**values)


class Engine:
    """Runs calls somewhere and hands back futures. Subclasses: LocalEngine, RayEngine."""

    #: how many calls may run at once (the campaign's --parallel)
    slots: int = 1

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        raise NotImplementedError

    def cancel_all(self) -> None:
        """Stop every call still running; their trainers are killed (no orphans)."""

    def shutdown(self) -> None:
        """Release what the engine holds (processes, a Ray connection it made)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            if exc_type is not None:
                self.cancel_all()
        finally:
            self.shutdown()


def wait_first(futures: Iterable[Future]) -> set[Future]:
    """The futures among `futures` that are done, waiting until at least one is."""
    done, _ = _wait(list(futures), return_when=FIRST_COMPLETED)
    return done


def run_each(engine: Engine, fn: Callable[..., Any], items: list[Any], *args: Any) -> Iterator[tuple[Any, Future]]:
    """fn(item, *args) for every item on `engine`, at most engine.slots at once, in order of submission; yields
    (item, finished future) as each ends. Stopping the caller (Ctrl-C, an exception thrown into the generator,
    closing it early) cancels the calls still running."""
    todo = list(items)
    running: dict[Future, Any] = {}
    finished = False
    try:
        while todo or running:
            while todo and len(running) < engine.slots:
                item = todo.pop(0)
                running[engine.submit(fn, item, *args)] = item
            for fut in wait_first(running):
                yield running.pop(fut), fut
        finished = True
    finally:
        if not finished and running:
            engine.cancel_all()


# ------------------------------------------------------------------------------------------------ local


def _child_main(conn: Any, fn: Callable[..., Any], args: tuple) -> None:
    """Body of a LocalEngine child process: run fn(*args), send ("ok", result) or ("err", exception). The child
    gets SIGTERM when the driver dies (PR_SET_PDEATHSIG), so a killed driver leaves no round running."""
    from lrpilot.launcher import die_with_parent

    die_with_parent()
    try:
        out: tuple[str, Any] = ("ok", fn(*args))
    except BaseException as e:  # noqa: BLE001 - handed to the parent's future
        out = ("err", e)
    try:
        conn.send(out)
    except Exception as e:  # noqa: BLE001 - an unpicklable exception still reaches the parent as text
        conn.send(("err", RuntimeError(f"{type(out[1]).__name__}: {out[1]}; ({e})")))
    conn.close()


class LocalEngine(Engine):
    """This machine. slots=1: each call runs in the caller's thread when submitted (today's behaviour).
    slots>1: each call in a spawned child process; the caller keeps at most `slots` submitted at once."""

    def __init__(self, slots: int = 1, cancel_grace_s: float = CANCEL_GRACE_S) -> None:
        if slots < 1:
            raise ConfigError(f"--parallel {slots}: must be >= 1")
        self.slots = int(slots)
        self.cancel_grace_s = cancel_grace_s
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        if self.slots == 1:
            try:
                fut.set_result(fn(*args))
            except Exception as e:  # noqa: BLE001 - the caller reads it from the future
                fut.set_exception(e)
            return fut
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_main, args=(child, fn, args), daemon=False)
        proc.start()
        child.close()
        with self._lock:
            self._procs.append(proc)

        def collect() -> None:
            try:
                status, value = parent.recv()
            except (EOFError, OSError):
                proc.join()
                status, value = "err", RuntimeError(f"the round's process {proc.pid} died (exit {proc.exitcode})")
            proc.join()
            with self._lock, contextlib.suppress(ValueError):
                self._procs.remove(proc)
            if status == "ok":
                fut.set_result(value)
            else:
                fut.set_exception(value)

        threading.Thread(target=collect, name=f"lrpilot-local-{proc.pid}", daemon=True).start()
        return fut

    def cancel_all(self) -> None:
        with self._lock:
            procs = list(self._procs)
        for p in procs:  # SIGTERM: the supervisor in it kills its trainer's group and exits
            with contextlib.suppress(OSError, AttributeError):
                p.terminate()
        deadline = time.monotonic() + self.cancel_grace_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():  # PR_SET_PDEATHSIG takes its trainer down with it
                with contextlib.suppress(OSError, AttributeError):
                    p.kill()
                p.join(5.0)


# ------------------------------------------------------------------------------------------------ ray


def import_ray() -> Any:
    """The ray module, or ConfigError naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--engine ray needs Ray: pip install 'lrpilot[ray]' (or --engine local, the default)"
        ) from None
    return ray


class RayEngine(Engine):
    """Each call a Ray task with `resources`; connects to `address` (a running cluster: 'auto', 'ray://...', or
    host:port) or, when address is empty, starts a local Ray on this machine (num_cpus cores)."""

    def __init__(
        self,
        slots: int = 1,
        resources: Resources | None = None,
        address: str = "",
        *,
        num_cpus: int | None = None,
        max_retries: int = 3,
        cancel_grace_s: float = CANCEL_GRACE_S,
    ) -> None:
        if slots < 1:
            raise ConfigError(f"--parallel {slots}: must be >= 1")
        self.ray = import_ray()
        self.slots = int(slots)
        self.resources = resources or Resources()
        self.max_retries = int(max_retries)
        self.cancel_grace_s = cancel_grace_s
        self._refs: dict[Any, Future] = {}
        self._lock = threading.Lock()
        self._owns = False
        if address:
            _check_reachable(address)
        if not self.ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = num_cpus if num_cpus is not None else max(os.cpu_count() or 1, self.slots)
            try:
                self.ray.init(**{k: v for k, v in kwargs.items() if v is not None})
            except ConnectionError as e:
                raise ConfigError(f"--ray-address {address!r}: no Ray cluster answers there ({e})") from None
            self._owns = True

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        remote = self.ray.remote(fn).options(
            num_cpus=self.resources.num_cpus,
            num_gpus=self.resources.num_gpus,
            max_retries=self.max_retries,
            retry_exceptions=False,
        )
        ref = remote.remote(*args)
        fut: Future = Future()
        with self._lock:
            self._refs[ref] = fut

        def collect() -> None:
            try:
                value = self.ray.get(ref)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's future
                fut.set_exception(_unwrap(self.ray, e))
            else:
                fut.set_result(value)
            finally:
                with self._lock:
                    self._refs.pop(ref, None)

        threading.Thread(target=collect, name="lrpilot-ray-task", daemon=True).start()
        return fut

    def cancel_all(self) -> None:
        with self._lock:
            refs = dict(self._refs)
        for ref in refs:  # KeyboardInterrupt in the task: its supervisor kills the trainer's group
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=False)
        deadline = time.monotonic() + self.cancel_grace_s
        for fut in refs.values():
            with contextlib.suppress(Exception):
                _wait([fut], timeout=max(0.0, deadline - time.monotonic()))
        for ref, fut in refs.items():
            if not fut.done():  # still running: kill the worker (the kernel's PDEATHSIG ends its trainer)
                with contextlib.suppress(Exception):
                    self.ray.cancel(ref, force=True)

    def shutdown(self) -> None:
        if self._owns:
            with contextlib.suppress(Exception):
                self.ray.shutdown()
            self._owns = False


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address must accept a TCP connection within timeout_s, or ConfigError
    in one line: Ray itself waits minutes for a cluster that is not there. 'auto' and other forms are left to Ray."""
    import socket

    hostport = address.split("://", 1)[1] if address.startswith("ray://") else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(
            f"--ray-address {address}: nothing answers there ({e.strerror or e}); start the cluster "
            "(ray start --head) or give its address (ray status prints it)"
        ) from None


def _unwrap(ray: Any, e: BaseException) -> BaseException:
    """A task's own exception (Ray wraps it in RayTaskError) so callers see lrpilot's errors as they are."""
    cause = getattr(e, "cause", None)
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, BaseException):
        return cause
    return e


def make_engine(
    name: str = "local",
    slots: int = 1,
    *,
    address: str = "",
    resources: Resources | None = None,
    num_cpus: int | None = None,
) -> Engine:
    """The engine `--engine name` asks for; ConfigError (one line) for an unknown one or Ray missing."""
    if name == "local":
        if address:
            raise ConfigError("--ray-address needs --engine ray")
        return LocalEngine(slots)
    if name == "ray":
        return RayEngine(slots, resources, address, num_cpus=num_cpus)
    raise ConfigError(f"--engine {name!r}: choose one of {', '.join(ENGINES)}")


__all__ = [
    "ENGINES",
    "Engine",
    "LocalEngine",
    "RayEngine",
    "Resources",
    "import_ray",
    "make_engine",
    "run_each",
    "wait_first",
]
