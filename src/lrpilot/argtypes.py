"""argparse value types shared by the `lrpilot` CLI and the trainer's command line."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lrpilot.lr import is_positive_finite


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 3e-3, got {text!r}") from None
    if not is_positive_finite(v):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _int_at_least(text: str, low: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
    return v


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _blocking_file(path: Path) -> Path | None:
    """The first existing path among `path` and its parents that is not a directory (None: all are)."""
    for p in (path, *path.parents):
        try:
            if p.exists():
                return None if p.is_dir() else p
        except OSError:  # a folder this user may not search: let the command's own error name it
            return None
    return None


def output_dir(text: str) -> str:
    """A directory to create or reuse (--dir, --out). Refused: "" (it would mean the current directory, as
    an unset shell variable gives), and a path that is, or lies under, an existing file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give a directory, e.g. runs/mine")
    bad = _blocking_file(Path(text))
    if bad is not None:
        what = "is a file" if bad == Path(text) else f"lies under {str(bad)!r}, which is a file"
        raise argparse.ArgumentTypeError(f"{text!r} {what}, not a directory; give a new or existing directory")
    return text


def output_file(text: str) -> str:
    """A file to write (export-schedule --out): refused when "", an existing directory, or under a file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give a file name, e.g. plan.json")
    path = Path(text)
    try:
        is_dir = path.is_dir()
    except OSError:  # a name too long, ...: the write's own one-line error names it (errors.writing_output)
        is_dir = False
    if is_dir:
        raise argparse.ArgumentTypeError(
            f"{text!r} is a directory; give a file name, e.g. {text.rstrip('/')}/plan.json"
        )
    bad = _blocking_file(path.parent)
    if bad is not None:
        raise argparse.ArgumentTypeError(f"{text!r} lies under {str(bad)!r}, which is a file; give another path")
    return text


def rule_param(text: str) -> tuple[str, float]:
    """NAME=VALUE with a numeric value, e.g. "ceiling=3e-2", or decay_shape=WORD (the name is checked by the campaign)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE such as ceiling=3e-2, got {text!r}")
    if name.strip() == "decay_shape":  # the one word-valued parameter (checked by RuleParams)
        return name.strip(), value.strip()  # type: ignore[return-value]
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name.strip()}: expected a number, got {value!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{name.strip()}: expected a finite number, got {value!r}")
    return name.strip(), v
