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


def _two_round_campaign(d: Path, bad_round: object) -> Path:
    d.mkdir()
    finals = [{"round": r, "run_start_iso": f"2026-01-01T00:00:0{i}", "final_eval_ppl": 30.0 - i,
               "final_eval_loss": 3.4, "peak_lr_seen": 3e-3, "warmup_steps": 10, "decision_every": 10,
               "init_lr": 1e-3, "update_step": 40}
              for i, r in enumerate((1, bad_round, 2))]  # fmt: skip
    decisions = [{"round": f["round"], "run_start_iso": f["run_start_iso"], "step": 20, "new_lr": 2e-3} for f in finals]
    (d / "final_results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in finals))
    (d / "decisions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in decisions))
    return d


def test_export_schedule_and_report_to_an_out_the_system_will_not_create_are_one_line(tmp_path):
    """--out /proc/x.json (a folder that takes no new files) and a name too long for the file system ended in a
    FileNotFoundError / OSError traceback; now one line naming --out, exit 2, nothing written."""
    camp = _two_round_campaign(tmp_path / "camp", 3)
    before = sorted(p.name for p in camp.iterdir())
    long = tmp_path / ("x" * 300)
    outs = [("export-schedule", str(long / "plan.json")), ("report", str(long))]
    if Path("/proc/self").is_dir():  # Linux
        outs += [("export-schedule", "/proc/lrpilot-test-plan.json"), ("report", "/proc/lrpilot-test-report")]
    for cmd, out in outs:
        args = [cmd, str(camp), *(["--round", "2"] if cmd == "export-schedule" else []), "--out", out]
        r = _lrpilot(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"lrpilot: error: --out {out}: cannot write"), r.stderr
        assert "Traceback" not in r.stderr and not os.path.exists(out)
    assert sorted(p.name for p in camp.iterdir()) == before


def test_export_schedule_skips_a_record_whose_round_is_not_an_integer(tmp_path):
    """final_results.jsonl with `"round": "one"`: export-schedule --round 2 raised TypeError (sorting str and
    int); the report reads the same file. Now the record is skipped with one warning line, as a corrupt line."""
    camp = _two_round_campaign(tmp_path / "camp", "one")
    out = tmp_path / "plan.json"
    r = _lrpilot("export-schedule", str(camp), "--round", "2", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("lrpilot: warning: ") and "round 'one'" in lines[0], r.stderr
    plan = json.loads(out.read_text())
    assert plan["round"] == 2 and [d["new_lr"] for d in plan["decisions"]] == [2e-3]
    r = _lrpilot("export-schedule", str(camp), "--round", "3", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 2 and "no round 3; rounds in final_results.jsonl: [1, 2]" in r.stderr, r.stderr
    assert _lrpilot("report", str(camp), "--out", str(tmp_path / "rep"), cwd=tmp_path).returncode == 0
