"""Smaller faults of issue 16: each input gives one lrpilot line, never a Python warning dump or a silent import.

.venv/bin/python -m pytest -q tests/test_one_line_messages.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lrpilot.importer import main_import
from lrpilot.report import main_report

REPO = Path(__file__).resolve().parents[1]


def _lrpilot(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    return subprocess.run(
        [sys.executable, "-m", "lrpilot", *args], capture_output=True, text=True, timeout=600, env=env, cwd=cwd
    )


@pytest.mark.parametrize(
    "case",
    ["unrelated finals", "unrelated decisions", "corrupt finals line", "empty finals", "unrelated baseline"],
)
def test_import_of_files_named_like_the_published_layout_but_unrelated_is_refused(case, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    finals = [{"run_start_iso": "2026-01-01T00:00:00", "final_eval_ppl": 30.0, "final_eval_loss": 3.4}]
    decisions = [{"run_start_iso": "2026-01-01T00:00:00", "step": 1000, "new_lr": 3e-4}]
    if case == "unrelated finals":
        finals = [{"name": "something else", "value": 3}]
    if case == "unrelated decisions":
        decisions = [{"id": 7}]
    text = "".join(json.dumps(r) + "\n" for r in finals)
    if case == "corrupt finals line":
        text += '{"run_start_iso": "2026-01-\n'
    if case == "empty finals":
        text = ""
    (src / "final_results_log_x.jsonl").write_text(text)
    (src / "decisions_log_x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in decisions))
    if case == "unrelated baseline":
        (src / "cosine_baselines").mkdir()
        (src / "cosine_baselines" / "cosine_lr1e-3.json").write_text(json.dumps({"model": "gpt2"}))
    rc = main_import(src, tmp_path / "dest")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    expect = {
        "unrelated finals": ("final_results_log_x.jsonl record 1", "run_start_iso"),
        "unrelated decisions": ("decisions_log_x.jsonl record 1", "run_start_iso"),
        "corrupt finals line": ("final_results_log_x.jsonl:2", "corrupt"),
        "empty finals": ("final_results_log_x.jsonl", "no results"),
        "unrelated baseline": ("cosine_lr1e-3.json", "final_eval_ppl"),
    }[case]
    for needle in expect:
        assert needle in err, err
    assert not (tmp_path / "dest").exists()


def test_corrupt_jsonl_line_is_one_lrpilot_warning_line(tmp_path):
    camp = tmp_path / "camp"
    camp.mkdir()
    good = {"round": 1, "run_start_iso": "2026-01-01T00:00:00", "final_eval_ppl": 30.0, "peak_lr_seen": 3e-3}
    (camp / "final_results.jsonl").write_text(json.dumps(good) + '\n{"round": 2, "final_ev\n')
    r = _lrpilot("report", str(camp), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    corrupt = [x for x in lines if "corrupt" in x]
    assert len(corrupt) == 1 and corrupt[0].startswith("lrpilot: warning: "), r.stderr
    assert f"{camp / 'final_results.jsonl'}:2" in corrupt[0]
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr, r.stderr


def test_report_on_a_file_or_a_sweep_says_what_it_is(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    result = sweep / "cosine_lr3e-3.json"
    result.write_text(json.dumps({"schedule": "cosine", "peak_lr": 3e-3, "final_eval_ppl": 30.0}))
    assert main_report(result, [], tmp_path / "o1") == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and "no such directory" not in err, err
    assert main_report(sweep, [], tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--baselines {sweep}" in err and "baseline sweep" in err, err


@pytest.mark.slow
def test_torchrun_ranks_write_no_deprecation_warning_into_trainer_log(tmp_path):
    r = _lrpilot("train", "--preset", "cpu-smoke", "--set", "launch.devices=cpu:2", "--set", "train.total_steps=20",
                 "--dir", str(tmp_path / "t"), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    log = next((tmp_path / "t" / "runs").glob("*/trainer.log")).read_text()
    assert "done at step 20" in log
    assert "Warning" not in log and "deprecated" not in log, log
