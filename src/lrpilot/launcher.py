"""Trainer launches as process groups: the command line (plain python for one process, torchrun for several),
starting one, finding every process of it (torchrun's workers live in sessions of their own) and killing it.
The supervisor (lrpilot.supervisor) decides when; this module only knows processes.

    python -m pytest -q tests/test_supervisor.py -k "trainer_command or torchrun"
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from lrpilot.config import RunConfig


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trainer_command(
    cfg: RunConfig,
    run_dir: Path,
    *,
    resume: Path | None = None,
    lr: float | None = None,
    min_seq: int | None = None,
    wait_for_decisions: bool = False,
    extra_args: Sequence[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """The trainer's command line and environment: plain python for one process, torchrun for several."""
    args = ["-m", "lrpilot.trainer", "--run-dir", str(run_dir)]
    if resume is not None:
        args += ["--resume", str(resume)]
    if lr is not None:
        args += ["--lr", repr(float(lr))]
    if min_seq is not None:
        args += ["--min-seq", str(int(min_seq))]
    if wait_for_decisions:
        args.append("--wait-for-decisions")
    args += [str(a) for a in extra_args]
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if cfg.train.num_threads > 0:
        env.setdefault("OMP_NUM_THREADS", str(cfg.train.num_threads))
    devices = cfg.launch.devices.strip()
    if devices not in ("cpu", "cuda") and not devices.startswith("cpu:"):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(x.strip() for x in devices.split(","))
    nproc = cfg.launch.nproc
    if nproc == 1:
        return [sys.executable, *args], env
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
    ]
    return [*torchrun, *args], env


def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


#: loaded in the parent: the child between fork and exec must not import anything
_LIBC = _load_libc()


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the supervisor dies, so a trainer never outlives it
    (torchrun forwards SIGTERM to its workers)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


#: environment variable that marks every process of one trainer launch (inherited by torchrun's workers)
LAUNCH_ENV = "LRPILOT_LAUNCH"


def launch_processes(token: str) -> list[int]:
    """Live processes of the launch marked `token` (they inherit LRPILOT_LAUNCH=token). torchrun starts each
    worker in a session of its own, so the launcher's process group does not hold them; their environment
    does, even after the launcher died and they were orphaned. Linux (/proc) only; elsewhere []."""
    proc_dir = Path("/proc")
    if not token or not proc_dir.is_dir():
        return []
    needle = f"{LAUNCH_ENV}={token}".encode()
    me = os.getpid()
    out = []
    for d in proc_dir.iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if needle in env.split(b"\0"):
            out.append(int(d.name))
    return out


def kill_launch(proc: subprocess.Popen, token: str, timeout: float = 30.0) -> None:
    """SIGKILL every process of a trainer launch (its process group and, by token, torchrun's workers) and
    wait until they are gone. SIGKILL also ends a stopped (SIGSTOP) process."""
    deadline = time.monotonic() + timeout
    while True:
        pids = launch_processes(token)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the launcher leads its own group
            group_alive = True
        except (ProcessLookupError, PermissionError):
            group_alive = False
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.05)
        if (proc.poll() is not None and not group_alive and not pids) or time.monotonic() > deadline:
            return


def start_launch(cmd: list[str], env: dict[str, str], token: str, log: IO[bytes]) -> subprocess.Popen:
    """Start one trainer launch: its own session and process group, marked with LAUNCH_ENV=token, stdout and
    stderr to `log`, and (on Linux) SIGTERM to it when the calling process dies."""
    return subprocess.Popen(
        cmd,
        env={**env, LAUNCH_ENV: token},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent if _LIBC is not None else None,
    )


__all__ = ["LAUNCH_ENV", "kill_launch", "launch_processes", "start_launch", "trainer_command"]
