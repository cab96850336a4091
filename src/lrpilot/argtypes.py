"""argparse value types shared by the `lrpilot` CLI and the trainer's command line."""

from __future__ import annotations

import argparse
import math

from lrpilot.lr import is_positive_finite


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 3e-3, got {text!r}") from None
    if not is_positive_finite(v):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def positive_int(text: str) -> int:
    v = non_negative_int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


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
