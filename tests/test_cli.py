"""The `lrpilot` command line end to end on cpu-smoke: help, train, baseline sweep, demo."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from lrpilot.cli import build_parser

SMOKE = ["--set", "train.total_steps=30", "--set", "schedule.warmup_steps=10", "--set", "schedule.decision_every=10"]
SEED_FIELDS = {"final_eval_loss", "final_eval_ppl", "final_eval_tokens", "update_step", "seed"}


def _lrpilot(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrpilot", *args], capture_output=True, text=True, timeout=timeout)


def test_every_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"lrpilot {name} {action.option_strings or action.dest} has no help"


def test_bad_flag_value_is_one_line():
    r = _lrpilot("baseline", "--preset", "cpu-smoke", "--peaks", "-1", "--out", "x")
    assert r.returncode == 2 and "positive number" in r.stderr


@pytest.mark.slow
def test_baseline_sweep_writes_one_result_per_peak(tmp_path):
    out = tmp_path / "sweep"
    r = _lrpilot("baseline", "--preset", "cpu-smoke", *SMOKE, "--schedule", "cosine", "--peaks", "1e-3", "3e-3",
                 "--out", str(out), "--jobs", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    files = sorted(p.name for p in out.glob("*.json"))
    assert files == ["cosine_lr1e-3.json", "cosine_lr3e-3.json"]
    for f in files:
        rec = json.loads((out / f).read_text())
        assert rec.keys() >= SEED_FIELDS | {"lr_trajectory", "loss_trajectory", "peak_lr"}
        assert rec["update_step"] == 30 and rec["status"] == "ok"
        # the cosine plan reached the trainer: the LR of the last update (number 29, logged at step 30) is the formula's
        p = rec["peak_lr"]
        assert rec["lr_trajectory"][-1] == [
            30,
            pytest.approx(0.1 * p + 0.9 * p * 0.5 * (1 + math.cos(math.pi * 19 / 20))),
        ]
    assert "cosine" in r.stdout and "best" in r.stdout
    # re-running the same command skips finished peaks
    again = _lrpilot("baseline", "--preset", "cpu-smoke", *SMOKE, "--peaks", "1e-3", "--out", str(out))
    assert again.returncode == 0 and len(list((out / "runs").iterdir())) == 2


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    r = _lrpilot("demo", "--preset", "cpu-smoke", *SMOKE, "--rounds", "2", "--peaks", "3e-3", "3e-2",
                 "--dir", str(tmp_path / "demo"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    report = tmp_path / "demo" / "report"
    assert (report / "report.html").stat().st_size > 10_000 and (report / "report.md").exists()
    assert "data:image/png;base64," in (report / "report.html").read_text()
    assert "cosine sweep" in r.stdout and "round   2" in r.stdout


def test_trainer_config_error_is_not_retried(tmp_path):
    # a data path that does not exist is the user's error: one line, no rollbacks at half the LR; since issue 16
    # the CLI finds it before launching anything (no run directory at all)
    r = _lrpilot("train", "--preset", "cpu-smoke", "--set", "data.source=files", "--set", "data.path=/nonexistent",
                 "--dir", str(tmp_path / "bad"))  # fmt: skip
    assert r.returncode == 2
    assert "data.path" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_trainer_refusal_through_the_supervisor_is_one_line_and_not_retried(tmp_path, smoke_config):
    # the library path (no CLI pre-check): the trainer refuses at launch, the supervisor says so once
    import dataclasses

    from lrpilot.baseline import run_one
    from lrpilot.errors import LrpilotError

    cfg = dataclasses.replace(
        smoke_config, data=dataclasses.replace(smoke_config.data, source="files", path="/nonexistent")
    )
    with pytest.raises(LrpilotError) as e:
        run_one(cfg, "cosine", 3e-3, tmp_path / "bad")
    assert "trainer refused to start" in str(e.value) and "data.path" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "bad" / "runs" / "cosine_lr3e-3" / "rollbacks.jsonl").exists()
