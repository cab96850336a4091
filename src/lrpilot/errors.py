"""One base class for every error lrpilot reports to a user as a single line (not a traceback), and the one
error for a disk that refuses a write (full, read-only, no permission), raised by every lrpilot writer."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

#: errno values that mean "this disk will not take the write" (not a bug, not a training crash)
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})


class LrpilotError(Exception):
    """Bad input or an unusable environment; the message names the field or file and the fix."""


class DiskWriteError(LrpilotError, OSError):
    """A write to FILE failed because the disk is full, read-only or not ours (an OSError with one of
    DISK_ERRNOS). Its message is one line: `cannot write FILE (No space left on device); free space and run the
    same command again`. It is an OSError too (errno and filename kept), so cleanup code that tolerates
    OSError tolerates it."""

    def __init__(self, path: str | Path | None, err: OSError) -> None:
        code = err.errno if err.errno is not None else errno.EIO
        OSError.__init__(self, code, err.strerror or os.strerror(code), str(path) if path else None)
        what = str(path) if path else "to disk"
        if code in (errno.ENOSPC, errno.EDQUOT):
            fix = "free space and run the same command again"
        else:
            fix = "make it writable (or choose another directory) and run the same command again"
        self.message = f"cannot write {what} ({os.strerror(code)}); {fix}"

    def __str__(self) -> str:
        return self.message


def is_disk_error(e: BaseException) -> bool:
    """An OSError that means the disk refused a write (DISK_ERRNOS)."""
    return isinstance(e, OSError) and e.errno in DISK_ERRNOS


def disk_error(path: str | Path | None, e: OSError) -> OSError:
    """`e` as a DiskWriteError naming `path` (its own filename when it has one) if it is a disk error, else e."""
    if isinstance(e, DiskWriteError) or not is_disk_error(e):
        return e
    return DiskWriteError(e.filename or path, e)


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Writes inside the block that fail because of the disk raise DiskWriteError naming `path`."""
    try:
        yield
    except OSError as e:
        err = disk_error(path, e)
        if err is e:
            raise
        raise err from e


class OutputPathError(LrpilotError, OSError):
    """An output path (a command's --out) the system will not create or write for a reason that is not the
    disk's (a folder such as /proc that takes no new files: ENOENT, ENOTDIR, EINVAL, ...). One line naming the
    flag and the path."""


@contextlib.contextmanager
def writing_output(flag: str, path: str | Path) -> Iterator[None]:
    """As `writing(path)`, and any other OSError inside the block raises OutputPathError: `--out /proc/x.json:
    cannot write there (No such file or directory); give a path in a directory you can write to`."""
    try:
        with writing(path):
            yield
    except LrpilotError:
        raise
    except OSError as e:
        reason = e.strerror or e.__class__.__name__
        raise OutputPathError(
            f"{flag} {path}: cannot write there ({reason}); give a path in a directory you can write to"
        ) from e
