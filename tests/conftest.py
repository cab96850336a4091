"""Shared fixtures: the cpu-smoke config is the tests' model (seconds per run)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def smoke_config():
    """The cpu-smoke preset (a 2-layer d32 byte-level LLaMA, 60 steps)."""
    from lrpilot.config import load_config

    return load_config("cpu-smoke")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tokenized corpora are cached once per test session, not in the user's ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "lrpilot-cache"
    monkeypatch.setenv("LRPILOT_CACHE", str(cache))
