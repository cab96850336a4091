"""Every argument and setting is checked before any training starts: one line, exit 2, nothing written.

    .venv/bin/python -m pytest -q tests/test_validation.py

Before: `lrpilot demo --rounds 0` ran the whole cosine sweep and only then said `--rounds: must be >= 1`;
`--peaks -1e-3` gave argparse's "expected at least one argument"; a data path that does not exist or a batch
that does not split over launch.devices was found by the trainer after the run directory was created;
`checkpoint.keep=1` and `agent.max_tokens=0` were accepted although the docs need more.
"""

from __future__ import annotations

import pytest

from lrpilot.cli import main

SMOKE = ("--preset", "cpu-smoke")


def _run(argv: list[str], tmp_path, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


BAD = {
    "demo --rounds 0": ["demo", *SMOKE, "--rounds", "0", "--peaks", "3e-3", "--dir", "d"],
    "campaign --rounds 0": ["campaign", *SMOKE, "--rounds", "0", "--dir", "d"],
    "campaign --rounds -2": ["campaign", *SMOKE, "--rounds", "-2", "--dir", "d"],
    "baseline --jobs 0": ["baseline", *SMOKE, "--peaks", "3e-3", "--jobs", "0", "--out", "d"],
    "baseline --peaks -1e-3": ["baseline", *SMOKE, "--peaks", "-1e-3", "--out", "d"],
    "baseline --peaks 3e-3 -1e-3": ["baseline", *SMOKE, "--peaks", "3e-3", "-1e-3", "--out", "d"],
    "demo --peaks -3e-2": ["demo", *SMOKE, "--rounds", "1", "--peaks", "-3e-2", "--dir", "d"],
    "train --peak -3E-3": ["train", *SMOKE, "--peak", "-3E-3", "--dir", "d"],
    "campaign --optuna-seed -1": ["campaign", *SMOKE, "--rounds", "1", "--optuna-seed", "-1", "--dir", "d"],
    "campaign --optuna-seed 2**32": ["campaign", *SMOKE, "--rounds", "1", "--optuna-seed", "4294967296", "--dir", "d"],
    "train data.path missing": [
        "train",
        *SMOKE,
        "--set",
        "data.source=files",
        "--set",
        "data.path=nope/x.txt",
        "--dir",
        "d",
    ],  # fmt: skip
    "demo data.path missing": [
        "demo",
        *SMOKE,
        "--rounds",
        "1",
        "--peaks",
        "3e-3",
        "--set",
        "data.source=files",
        "--set",
        "data.path=nope/x.txt",
        "--dir",
        "d",
    ],  # fmt: skip
    "baseline batch over 2 ranks": [
        "baseline",
        *SMOKE,
        "--peaks",
        "3e-3",
        "--set",
        "train.batch_size=7",
        "--set",
        "launch.devices=cpu:2",
        "--out",
        "d",
    ],  # fmt: skip
    "campaign vocab too small": ["campaign", *SMOKE, "--rounds", "1", "--set", "model.vocab_size=100", "--dir", "d"],
    "campaign checkpoint.keep=1": ["campaign", *SMOKE, "--rounds", "1", "--set", "checkpoint.keep=1", "--dir", "d"],
    "train agent.max_tokens=0": ["train", *SMOKE, "--set", "agent.max_tokens=0", "--dir", "d"],
    "campaign memory_max_tokens": [
        "campaign",
        *SMOKE,
        "--rounds",
        "1",
        "--set",
        "agent.memory_max_tokens=20",
        "--dir",
        "d",
    ],  # fmt: skip
    "campaign replay log missing": [
        "campaign",
        *SMOKE,
        "--rounds",
        "1",
        "--controller",
        "replay",
        "--replay-from",
        "elsewhere",
        "--dir",
        "d",
    ],  # fmt: skip
    "campaign bad --rule": ["campaign", *SMOKE, "--rounds", "1", "--rule", "ceiling=-1", "--dir", "d"],
    "demo train.device=cuda": [
        "demo",
        *SMOKE,
        "--rounds",
        "1",
        "--peaks",
        "3e-3",
        "--set",
        "train.device=cuda",
        "--dir",
        "d",
    ],  # fmt: skip
}
NEEDLE = {
    "demo --rounds 0": "--rounds: must be >= 1",
    "campaign --rounds -2": "--rounds",
    "baseline --peaks -1e-3": "expected a positive number, got '-1e-3'",
    "baseline --peaks 3e-3 -1e-3": "got '-1e-3'",
    "demo --peaks -3e-2": "got '-3e-2'",
    "train --peak -3E-3": "got '-3E-3'",
    "campaign --optuna-seed 2**32": "--optuna-seed",
    "train data.path missing": "data.path='nope/x.txt'",
    "demo data.path missing": "data.path='nope/x.txt'",
    "baseline batch over 2 ranks": "train.batch_size (7)",
    "campaign vocab too small": "model.vocab_size=100",
    "campaign checkpoint.keep=1": "checkpoint.keep: must be >= ",
    "train agent.max_tokens=0": "agent.max_tokens: must be >= 64",
    "campaign memory_max_tokens": "agent.memory_max_tokens",
    "campaign replay log missing": "--replay-from elsewhere",
    "campaign bad --rule": "ceiling",
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_argument_or_setting_fails_at_once_writing_nothing(name, tmp_path, monkeypatch, capsys):
    import torch

    if name == "demo train.device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, err = _run(BAD[name], tmp_path, monkeypatch, capsys)
    assert rc == 2, err
    assert err.count("\n") == 1 and "error: " in err and "Traceback" not in err, err
    assert NEEDLE.get(name, "") in err, err
    assert not any(tmp_path.iterdir()), sorted(p.name for p in tmp_path.rglob("*"))  # no run dir, no lock


def test_preset_defaults_pass_the_new_checks():
    from lrpilot.config import PRESETS
    from lrpilot.preflight import check_run

    for name, make in PRESETS.items():
        cfg = make()
        if name != "llama_60m":  # t5-base and C4 are checked by the trainer (they need the hub)
            check_run(cfg)
