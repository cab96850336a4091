"""The report reproduces the published study's numbers from its logs, and degrades gracefully.

    .venv/bin/python -m pytest -q tests/test_report.py

The published logs are copied into tests/data/seed-experiments so the test is hermetic in a fresh clone.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lrpilot.importer import import_published
from lrpilot.logs import JsonlLog
from lrpilot.report import build_report, main_report

SEED = Path(__file__).parent / "data" / "seed-experiments"
FIGURES = ("ppl_per_round.png", "lr_schedules.png", "landscape.png", "loss_curves.png")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    import_published(SEED, root / "campaign")
    return root


@pytest.fixture(scope="module")
def report(published):
    return build_report(published / "campaign", [], published / "out")


def test_report_reproduces_published_numbers(report):
    d = report
    assert [round(m, 2) for m in d.phase_means] == [45.97, 36.15, 33.01, 60.25]
    assert d.outliers == [40] and d.phases[3].outliers == (40,)
    assert round(d.phases[3].mean_without_outliers, 1) == 32.6
    assert d.phases[0].outliers == d.phases[1].outliers == d.phases[2].outliers == ()
    assert d.best_round.round == 39
    assert round(d.best_round.final_eval_ppl, 2) == 31.18 and d.best_round.peak_lr == 1e-2
    # the best cosine is 30.37: 4.5e-3 (30.3698) and 3e-3 (30.3707) tie within 0.01 ppl
    assert round(d.best_baseline.final_eval_ppl, 2) == 30.37
    assert 3e-3 in [b.peak_lr for b in d.near_best_baselines]
    assert round(d.baseline_at(3e-3).final_eval_ppl, 2) == 30.37
    assert d.baseline_at(1e-2).final_eval_ppl == pytest.approx(215.08, abs=0.01)  # 215.0855
    assert d.ratio_best == pytest.approx(31.1771 / 30.3698, rel=1e-4)
    # head-to-head at 1e-2: the agent survives where cosine collapses
    h = next(h for h in d.head_to_head if h.baseline is not None and h.baseline.peak_lr == 1e-2)
    assert (h.band, h.agent.round, h.winner) == ("1e-2..3e-2", 39, "agent")
    assert {h.winner for h in d.head_to_head if h.band == "3e-3..1e-2"} == {"no agent round"}
    s = {s.band: s for s in d.survival}
    assert (s["1e-2..3e-2"].agent_survived, len(s["1e-2..3e-2"].agent_rounds), s["1e-2..3e-2"].baseline_survived) == (
        1,
        2,
        0,
    )
    assert s["1e-3..3e-3"].agent_rate == 1.0
    assert d.campaign_wall_s == pytest.approx(26.8 * 3600, rel=0.01)
    assert d.sweep_steps == 8 * 10001 and d.sweep_wall_s is None


def test_report_files_are_self_contained(report):
    out = Path(report.out_dir)
    for name in FIGURES:
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(FIGURES)
    assert not re.search(r"src=['\"](?!data:)", html)  # no external image or script
    md = (out / "report.md").read_text()
    for name in FIGURES:
        assert f"]({name})" in md
    for text in ("45.97", "36.15", "33.01", "60.25", "32.61", "31.18", "30.37", "215.09", "round 40 (309.08)"):
        assert text in md and text in html
    assert "capped" in md  # the catastrophic round is off the y-axis and the caption says so


def test_report_never_imports_torch(published, tmp_path):
    code = (
        "import sys, lrpilot.report\n"
        "assert 'torch' not in sys.modules\n"
        f"lrpilot.report.build_report({str(published / 'campaign')!r}, [], {str(tmp_path / 'out')!r})\n"
        "assert 'torch' not in sys.modules, 'the report imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_main_report_prints_tables_and_errors_in_one_line(published, tmp_path, capsys):
    assert main_report(published / "campaign", [SEED / "cosine_baselines"], tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "Cross-round learning" in out and "Head-to-head" in out and "Survival per peak band" in out
    assert main_report(tmp_path / "missing", [], tmp_path / "o2") == 2
    assert main_report(SEED, [], tmp_path / "o3") == 2  # the published layout needs import-logs first
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "import-logs" in err


def _write(path, records):
    with JsonlLog(path, fsync=False) as log:
        for r in records:
            log.append(r)


def test_report_on_our_own_layout_with_failures_and_trajectories(tmp_path):
    """A small campaign as lrpilot writes it: a failed round, rollbacks, baselines with logged trajectories."""
    camp = tmp_path / "c"
    finals, decisions = [], []
    for n, (ppl, status) in enumerate([(40.0, "ok"), (float("nan"), "failed"), (35.0, "ok")], 1):
        iso = f"2026-01-01T0{n}:00:00"
        finals.append(
            {
                "round": n,
                "run_start_iso": iso,
                "final_eval_ppl": ppl,
                "final_eval_loss": math.log(ppl),
                "status": status,
                "controller": "rules",
                "init_lr": 1e-3,
                "warmup_steps": 10,
                "decision_every": 10,
                "wall_time_s": 60.0,
                "settings": {"total_steps": 60},
                "update_step": 25 if status == "failed" else 60,
                "crash_count": int(n == 2),
            }
        )
        for k, step in enumerate(range(10, 60, 10)):
            decisions.append(
                {
                    "round": n,
                    "run_start_iso": iso,
                    "timestamp": f"2026-01-01T0{n}:00:{10 + k}",
                    "step": step,
                    "effective_step": step + 1,
                    "loss": 3.0 - 0.1 * k,
                    "new_lr": 1e-3 * n,
                }
            )
    _write(camp / "final_results.jsonl", finals)
    _write(camp / "decisions.jsonl", decisions)
    _write(
        camp / "rollbacks.jsonl",
        [
            {
                "round": 2,
                "run_start_iso": "2026-01-01T02:00:00",
                "timestamp": "2026-01-01T02:00:12",
                "crash_step": 25,
                "rolled_back_to_step": 20,
                "new_lr": 1e-3,
            }
        ],
    )
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for peak, ppl in [(1e-3, 38.0), (3e-3, 36.0), (1e-2, float("nan"))]:
        rec = {
            "schedule": "cosine",
            "peak_lr": peak,
            "final_eval_ppl": ppl,
            "final_eval_loss": math.log(ppl),
            "update_step": 60,
            "seed": 0,
            "wall_time_s": 50.0,
            "diverged": not math.isfinite(ppl),
            "lr_trajectory": [[s, peak * min(1, (s + 1) / 10)] for s in range(0, 60, 5)],
            "loss_trajectory": [[s, 3.5 - s / 60] for s in range(0, 60, 5)],
        }
        (sweep / f"cosine_lr{peak:g}.json").write_text(
            json.dumps({k: (str(v) if v != v else v) for k, v in rec.items()})
        )
    (sweep / "runs").mkdir()
    d = build_report(camp, [sweep], tmp_path / "out")
    assert d.failed == [2] and d.best_round.round == 3 and d.best_baseline.peak_lr == 3e-3
    assert d.campaign_steps == 60 + (25 + 5) + 60 and not d.campaign_steps_estimated  # + steps redone
    assert d.campaign_wall_s == 180.0 and d.sweep_wall_s == 150.0 and d.sweep_steps == 180
    assert [f.name for f in d.figures if f.path is None] == []
    assert d.ratio_best == pytest.approx(35 / 36)
    assert "failed" in (tmp_path / "out" / "report.md").read_text()

    # baselines only (no finished round yet): the report still renders, with notes instead of round figures
    empty = tmp_path / "empty"
    empty.mkdir()
    d2 = build_report(empty, [sweep], tmp_path / "out2")
    assert d2.best_round is None and (tmp_path / "out2" / "report.html").exists()
    assert {f.name for f in d2.figures if f.path is None} >= {"ppl_per_round", "lr_schedules"}

    # nothing finished with a perplexity (every round failed, every baseline diverged): notes, no crash
    dead = tmp_path / "dead"
    _write(dead / "final_results.jsonl", [{**finals[1], "round": n} for n in (1, 2)])
    dead_sweep = tmp_path / "dead_sweep"
    dead_sweep.mkdir()
    (dead_sweep / "cosine_lr1e-2.json").write_text((sweep / "cosine_lr0.01.json").read_text())
    d3 = build_report(dead, [dead_sweep], tmp_path / "out3")
    assert d3.failed == [1, 2] and d3.best_round is None and d3.best_baseline is None
    assert {f.name for f in d3.figures if f.path is None} == {"ppl_per_round", "landscape", "loss_curves"}
    assert "No round finished with a perplexity" in (tmp_path / "out3" / "report.md").read_text()
