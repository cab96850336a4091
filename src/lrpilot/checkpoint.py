"""Checkpoints for exact resume and rollback: an atomically written .pt plus a sha256 sidecar.

    python -m pytest -q tests/test_checkpoint.py

Layout: RUN/checkpoints/step_000300.pt and step_000300.json. The .pt is written to a temporary file of its
own (removed if the save fails; a disk that refuses it raises DiskWriteError) and renamed into place; the
sidecar (sha256, bytes, step, lr, time, fingerprint) is written the same way *after* it, so a checkpoint
without a valid sidecar is incomplete (a save that died half-way) and is never resumed from. Listing reads only sidecars and file sizes, so the supervisor and the guard can list
checkpoints without importing torch; `verify_checkpoint` hashes the file; `load_checkpoint` verifies,
loads (weights_only) and checks the config fingerprint, raising `CheckpointError` with a one-line
message that names the file and the problem.

A checkpoint is only worth resuming from if its state is finite: `save_checkpoint` refuses a state whose
weights or optimizer moments hold a NaN/Inf (CheckpointError, nothing written), the sidecar records
`"finite": true`, a sidecar saying `"finite": false` makes the checkpoint unusable for listing and
verification, and `load_checkpoint` refuses a loaded state with non-finite tensors (a file written by an
older version or by hand). So no rollback or resume can land on a poisoned state.

Pruning keeps the newest `keep` complete checkpoints and, with `retain_back_steps` (the trainer passes
guard.rollback_back_steps), also every one newer than newest - retain_back_steps and the newest one at or
before it, so a rollback that far back always finds a target when one ever existed. Presets set
keep >= rollback_back_steps / checkpoint_every + 2, so that extra rule never keeps more than `keep`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrpilot.errors import DiskWriteError, LrpilotError, is_disk_error, writing
from lrpilot.logs import charge_write, temp_name, write_atomic

#: stored in every checkpoint's state under "format"
FORMAT = "lrpilot-checkpoint-v1"
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(LrpilotError):
    """A checkpoint cannot be used. The message is one line naming the file and the problem."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint on disk: its step, path, whether its sidecar vouches for it, and its LR."""

    step: int
    path: Path
    complete: bool
    lr: float | None = None
    #: why it is incomplete ("" when complete)
    reason: str = ""


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{int(step):06d}.pt"


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (the trainer passes the model and data config)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def nonfinite_tensors(state: Any, prefix: str = "", limit: int = 3) -> list[str]:
    """Names (dotted paths) of up to `limit` floating-point tensors in `state` (nested dicts/lists, e.g. a
    model or optimizer state dict) holding a NaN or Inf; [] when every tensor is finite. RNG states are
    skipped (byte tensors)."""
    import torch

    found: list[str] = []

    def walk(obj: Any, path: str) -> None:
        if len(found) >= limit:
            return
        if isinstance(obj, torch.Tensor):
            if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
                found.append(path or "<tensor>")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}.{i}" if path else str(i))

    walk(state, prefix)
    return found


def _trainable_state(state: dict[str, Any]) -> dict[str, Any]:
    """The parts of a checkpoint state that must be finite: weights and optimizer state."""
    return {k: state[k] for k in ("model", "optimizer") if k in state}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_sidecar(pt: Path) -> tuple[dict[str, Any] | None, str]:
    side = sidecar_path(pt)
    if not side.exists():
        return None, f"no sidecar {side.name} (the save did not finish)"
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return None, f"sidecar {side.name} is unreadable ({e.__class__.__name__})"
    if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str):
        return None, f"sidecar {side.name} lacks bytes/sha256"
    if meta.get("finite") is False:
        return None, f"sidecar {side.name} says the state holds non-finite values (NaN/Inf)"
    return meta, ""


def save_checkpoint(
    run_dir: str | Path, step: int, state: dict[str, Any], keep: int | None = None, retain_back_steps: int = 0
) -> Path:
    """Write `state` as RUN/checkpoints/step_{step:06d}.pt (+ sidecar), then prune to `keep` (None: no pruning).

    `state["lr"]` and `state["fingerprint"]`, if present, are copied into the sidecar. Raises CheckpointError
    (and writes nothing) if the weights or optimizer state (`state["model"]`, `state["optimizer"]`) hold a
    NaN or Inf: such a state is never a healthy rollback target."""
    import torch

    bad = nonfinite_tensors(_trainable_state(state))
    if bad:
        raise CheckpointError(
            f"checkpoint step {int(step)} not written: non-finite values in {', '.join(bad)} (the run diverged)"
        )
    pt = checkpoint_path(run_dir, step)
    side = sidecar_path(pt)
    tmp = temp_name(pt)
    try:
        with writing(pt):
            pt.parent.mkdir(parents=True, exist_ok=True)
            # re-saving a step (after a resume): drop the old sidecar first so the pair is never stale-but-"complete"
            side.unlink(missing_ok=True)
            with open(tmp, "wb") as f:
                try:
                    torch.save(state, f)
                except RuntimeError as e:
                    # torch wraps the file's OSError (e.g. "file write failed"): a disk that refuses bytes is
                    # a DiskWriteError, not a crash
                    _raise_if_disk_full(pt, e)
                    raise
                f.flush()
                charge_write(f.tell(), pt)
                os.fsync(f.fileno())
            meta = {
                "format": FORMAT,
                "step": int(step),
                "lr": state.get("lr"),
                "sha256": _sha256(tmp),
                "bytes": tmp.stat().st_size,
                "time": time.time(),
                "fingerprint": state.get("fingerprint"),
                "finite": True,
            }
            os.replace(tmp, pt)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a save that failed leaves no temporary file behind
    _fsync_dir(pt.parent)
    try:
        write_atomic(side, (json.dumps(meta, indent=1) + "\n").encode(), fsync=True)
    except OSError:
        with contextlib.suppress(OSError):
            pt.unlink()  # without its sidecar it is never used: give its room back
        raise
    _fsync_dir(side.parent)
    if keep is not None:
        prune_checkpoints(run_dir, keep, retain_back_steps)
    return pt


def _raise_if_disk_full(pt: Path, e: RuntimeError) -> None:
    """torch.save's RuntimeError as the DiskWriteError it hides, when the cause is a disk error, or the
    directory is read-only or has no room left."""
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, OSError) and is_disk_error(cause):
            raise DiskWriteError(pt, cause) from e
        cause = cause.__cause__ or cause.__context__
    try:
        st = os.statvfs(pt.parent)
    except OSError:
        return
    if st.f_flag & os.ST_RDONLY:
        raise DiskWriteError(pt, OSError(errno.EROFS, os.strerror(errno.EROFS))) from e
    if st.f_bavail * st.f_frsize < (1 << 20):  # less than 1 MiB left: the failed write ran out of room
        raise DiskWriteError(pt, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from e


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """All checkpoints (complete or not) under RUN/checkpoints, oldest first. Cheap: no hashing, no torch.
    Complete = the sidecar parses and its byte count matches the file (use verify_checkpoint for the hash)."""
    d = Path(run_dir) / CHECKPOINT_DIR
    if not d.is_dir():
        return []
    out = []
    for pt in d.iterdir():
        m = _NAME.match(pt.name)
        if not m:
            continue
        meta, reason = _read_sidecar(pt)
        lr = None
        if meta is not None:
            lr = meta.get("lr") if isinstance(meta.get("lr"), (int, float)) else None
            try:
                size = pt.stat().st_size
            except OSError:
                size = -1
            if size != meta["bytes"]:
                reason = f"{size} bytes on disk, sidecar says {meta['bytes']} (truncated or replaced)"
        out.append(CheckpointInfo(step=int(m.group(1)), path=pt, complete=not reason, lr=lr, reason=reason))
    return sorted(out, key=lambda c: c.step)


def latest_checkpoint(run_dir: str | Path) -> CheckpointInfo | None:
    """The newest complete checkpoint, or None."""
    done = [c for c in list_checkpoints(run_dir) if c.complete]
    return done[-1] if done else None


def prune_checkpoints(run_dir: str | Path, keep: int, retain_back_steps: int = 0) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (plus, with retain_back_steps, every one newer
    than newest - retain_back_steps and the newest at or before that), incomplete ones older than the newest
    complete one, and leftover temporary files. Returns the deleted .pt paths."""
    infos = list_checkpoints(run_dir)
    done = [c for c in infos if c.complete]
    if not done:
        return []
    newest = done[-1].step
    keep_steps = {c.step for c in done[-max(1, keep) :]}
    if retain_back_steps > 0:
        # a crash comes after the newest checkpoint, so its rollback target (crash - retain_back_steps) is at
        # or after newest - retain_back_steps: keep everything in that window plus the newest one before it
        keep_steps |= {c.step for c in done if c.step > newest - retain_back_steps}
        old_enough = [c for c in done if c.step <= newest - retain_back_steps]
        if old_enough:
            keep_steps.add(old_enough[-1].step)
    deleted = []
    for c in infos:
        if c.step in keep_steps or (not c.complete and c.step >= newest):
            continue
        # sidecar first: a half-deleted checkpoint must read as incomplete, never as complete
        sidecar_path(c.path).unlink(missing_ok=True)
        c.path.unlink(missing_ok=True)
        deleted.append(c.path)
    for tmp in (Path(run_dir) / CHECKPOINT_DIR).glob("step_*.tmp*"):
        # never this process's own file in flight; other writers' are leftovers (one writer per run: run.lock)
        if f".tmp{os.getpid()}." not in tmp.name:
            tmp.unlink(missing_ok=True)
    return deleted


def verify_checkpoint(path: str | Path) -> str | None:
    """None if the checkpoint at `path` is complete and intact, else the reason (missing, no sidecar,
    truncated, checksum mismatch)."""
    pt = Path(path)
    if pt.suffix == ".json":
        pt = pt.with_suffix(".pt")
    if not pt.is_file():
        return "file not found"
    meta, reason = _read_sidecar(pt)
    if meta is None:
        return reason
    size = pt.stat().st_size
    if size != meta["bytes"]:
        return f"truncated or replaced: {size} bytes on disk, sidecar says {meta['bytes']}"
    if _sha256(pt) != meta["sha256"]:
        return "checksum mismatch: the file's sha256 differs from its sidecar (corrupted on disk)"
    return None


def load_checkpoint(path: str | Path, fingerprint: str | None = None, map_location: Any = "cpu") -> dict[str, Any]:
    """Verify and load a checkpoint's state dict. With `fingerprint`, a checkpoint written for another
    model/data config is refused; so is one whose weights or optimizer state hold a NaN/Inf. Raises
    CheckpointError (one line: file and problem)."""
    pt = Path(path)
    if pt.suffix == ".json":
        pt = pt.with_suffix(".pt")
    reason = verify_checkpoint(pt)
    if reason:
        raise CheckpointError(f"checkpoint {pt}: {reason}; choose another checkpoint")
    import pickle

    import torch

    try:
        state = torch.load(pt, map_location=map_location, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"checkpoint {pt}: not a loadable checkpoint ({first})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {pt}: not an lrpilot checkpoint (no format={FORMAT!r})")
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {pt}: written for a different model/data config (fingerprint {state.get('fingerprint')} "
            f"!= {fingerprint}); resume with the run's own config.json"
        )
    bad = nonfinite_tensors(_trainable_state(state))
    if bad:
        raise CheckpointError(
            f"checkpoint {pt}: non-finite values in {', '.join(bad)} (written after the run diverged); "
            "resume from an earlier checkpoint"
        )
    return state
