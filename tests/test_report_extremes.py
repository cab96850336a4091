"""The report, the Memory agent's evidence table and the campaign summary render any value a log can hold.

    .venv/bin/python -m pytest -q tests/test_report_extremes.py

The trainer writes `final_eval_ppl` 1e250 whenever the eval loss lands between about 545 and 709 (exp of it
is finite); a hand-edited or foreign log can hold inf, nan, 1.7e308, negative or zero values, strings, or
nothing. Every one of them must render (as a number or a dash), never crash the report.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lrpilot.campaign import campaign_table
from lrpilot.campaign_logs import load_campaign, phase_stats
from lrpilot.memory.evidence import build_evidence
from lrpilot.report import main_report

#: every kind of value a numeric log field can hold (the trainer's own 1e250 / 575.6 first)
VALUES = [1e250, 575.6, 1.7e308, "inf", "-inf", "nan", None, 0, -3.0, 5e-324, 1e-300, "garbage", True, 4.5, 2.0]


def _line(rec: dict) -> str:
    return json.dumps(rec, allow_nan=True)  # a foreign writer may even write bare NaN/Infinity


def _campaign(root: Path) -> Path:
    camp = root / "camp"
    camp.mkdir(parents=True)
    finals, decisions, rollbacks = [], [], []
    cyc = itertools.cycle(VALUES)
    for n in range(1, 2 * len(VALUES) + 1):
        iso = f"2026-01-01T00:{n:02d}:00"
        v = VALUES[(n - 1) % len(VALUES)]
        rec = {
            "round": n,
            "run_start_iso": iso,
            "timestamp": f"2026-01-01T01:{n:02d}:00",
            "final_eval_ppl": v if n <= len(VALUES) else 1e250,
            "final_eval_loss": 575.6 if n > len(VALUES) else next(cyc),
            "status": "ok",
            "controller": "rules",
            "init_lr": next(cyc),
            "peak_lr_seen": next(cyc),
            "min_lr_seen": next(cyc),
            "warmup_steps": next(cyc),
            "decision_every": next(cyc),
            "wall_time_s": next(cyc),
            "update_step": next(cyc),
            "crash_count": next(cyc),
            "total_decisions": next(cyc),
            "settings": {"total_steps": next(cyc)},
        }
        finals.append(rec)
        for k in range(3):
            decisions.append(
                {
                    "round": n,
                    "run_start_iso": iso,
                    "timestamp": f"2026-01-01T00:{n:02d}:{10 + k}",
                    "step": next(cyc),
                    "effective_step": next(cyc),
                    "loss": next(cyc),
                    "old_lr": next(cyc),
                    "new_lr": next(cyc),
                }
            )
        rollbacks.append(
            {
                "round": n,
                "run_start_iso": iso,
                "timestamp": f"2026-01-01T00:{n:02d}:30",
                "crash_step": next(cyc),
                "rolled_back_to_step": next(cyc),
                "lr_at_crash": next(cyc),
                "new_lr": next(cyc),
            }
        )
    for name, recs in (("final_results", finals), ("decisions", decisions), ("rollbacks", rollbacks)):
        (camp / f"{name}.jsonl").write_text("".join(_line(r) + "\n" for r in recs))
    base = camp / "baselines"
    base.mkdir()
    for i, v in enumerate(VALUES):
        rec = {
            "schedule": "cosine",
            "peak_lr": [1e-3, 3e-3, 1e-2, v][i % 4],
            "final_eval_ppl": v,
            "final_eval_loss": next(cyc),
            "update_step": next(cyc),
            "total_steps": next(cyc),
            "wall_time_s": next(cyc),
            "lr_trajectory": [[next(cyc), next(cyc)] for _ in range(4)],
            "loss_trajectory": [[next(cyc), next(cyc)] for _ in range(4)],
        }
        (base / f"cosine_lr{i}e-3.json").write_text(_line(rec))
    return camp


def _ppl_campaign(root: Path) -> Path:
    """Sane LRs and steps; every round's final ppl/loss (and decision losses) one of the extreme values."""
    camp = root / "ppl"
    camp.mkdir(parents=True)
    ppls = [1e250, 1.7e308, 1.7e308, "inf", "nan", None, 30.5, 1e250, 31.0, "inf"]
    losses = [575.6, 709.7, 709.7, "inf", "nan", None, 3.418, 575.6, 3.434, 1e300]
    finals, decisions = [], []
    for n, (ppl, loss) in enumerate(zip(ppls, losses, strict=True), 1):
        iso = f"2026-01-01T00:{n:02d}:00"
        finals.append(
            {
                "round": n,
                "run_start_iso": iso,
                "final_eval_ppl": ppl,
                "final_eval_loss": loss,
                "peak_lr_seen": [1e-3, 3e-3, 1e-2][n % 3],
                "init_lr": 1e-3,
                "warmup_steps": 10,
                "decision_every": 10,
                "wall_time_s": 60.0,
                "settings": {"total_steps": 40},
                "update_step": 40,
            }
        )
        decisions += [{"round": n, "run_start_iso": iso, "step": s, "loss": loss, "new_lr": 1e-3} for s in (10, 20, 30)]
    (camp / "final_results.jsonl").write_text("".join(_line(r) + "\n" for r in finals))
    (camp / "decisions.jsonl").write_text("".join(_line(r) + "\n" for r in decisions))
    (camp / "baselines").mkdir()
    for peak, ppl, loss in [(1e-3, 1e250, 575.6), (3e-3, 30.4, 3.414), (1e-2, 1.7e308, 709.7), (3e-2, "inf", "inf")]:
        rec = {"schedule": "cosine", "peak_lr": peak, "final_eval_ppl": ppl, "final_eval_loss": loss,
               "update_step": 40, "total_steps": 40, "loss_trajectory": [[10, loss], [20, 1e300]]}  # fmt: skip
        (camp / "baselines" / f"cosine_lr{peak:g}.json").write_text(_line(rec))
    return camp


def test_report_renders_any_ppl_or_loss_a_log_can_hold(tmp_path, capsys):
    # the exact line: a large finite ppl that overflowed best_ppl ** 1.3
    one = tmp_path / "one"
    one.mkdir()
    (one / "final_results.jsonl").write_text(
        json.dumps({"round": 1, "final_eval_ppl": 1e250, "final_eval_loss": 575.6, "peak_lr_seen": 3e-3}) + "\n"
    )
    assert main_report(one, [], tmp_path / "out1") == 0
    assert "1e+250" in capsys.readouterr().out
    camp = _ppl_campaign(tmp_path)
    assert main_report(camp, [], tmp_path / "out", [one]) == 0
    out = capsys.readouterr().out
    assert "1.7e+308" in out and "30.40" in out
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5, "every figure drawn (4 + side by side)"
    logs = load_campaign(camp)
    assert "round" in build_evidence(logs.rounds, 10).render()
    assert "1.7e+308" in campaign_table([r.raw for r in logs.rounds])
    means = [p.mean for p in phase_stats(logs.rounds)]
    assert means and means[0] > 1e300


def test_report_renders_garbage_in_every_numeric_field(tmp_path, capsys):
    camp = _campaign(tmp_path)
    assert main_report(camp, [camp / "baselines"], tmp_path / "out", [_ppl_campaign(tmp_path)]) == 0
    assert (tmp_path / "out" / "report.html").read_text().count("data:image/png;base64,") == 5
    logs = load_campaign(camp)
    build_evidence(logs.rounds, 10).render()
    campaign_table([r.raw for r in logs.rounds])


@pytest.mark.slow
def test_report_command_on_a_huge_ppl_exits_0(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "final_results.jsonl").write_text(
        json.dumps({"round": 1, "final_eval_ppl": 1e250, "final_eval_loss": 575.6, "peak_lr_seen": 1e-2}) + "\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "lrpilot", "report", str(one), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "1e+250" in r.stdout
