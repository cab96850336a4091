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
    # the under-trained first rounds (ppl 56.8 and 50.1 at low peaks) survived; only collapses did not
    assert d.survival_threshold == pytest.approx(30.3698**1.3, rel=1e-4)
    assert (s["1e-4..3e-4"].agent_rate, s["3e-4..1e-3"].agent_rate) == (1.0, 1.0)
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


def _campaign(path, controller, memory, ppls, total_steps=60, wall=100.0):
    """A small campaign as lrpilot writes it: campaign.json plus one final_results line per round (a NaN ppl is a
    failed round that stopped at step 25)."""
    path.mkdir(parents=True)
    settings = {"preset": "cpu-smoke", "overrides": [], "controller": controller, "memory": memory}
    (path / "campaign.json").write_text(json.dumps({"settings": settings, "created": "2026-01-01T00:00:00"}))
    finals = []
    for n, (ppl, peak) in enumerate(ppls, 1):
        failed = not math.isfinite(ppl)
        finals.append(
            {
                "round": n,
                "run_start_iso": f"2026-01-01T0{n}:00:00",
                "final_eval_ppl": ppl,
                "final_eval_loss": math.log(ppl),
                "final_eval_tokens": 4096,
                "status": "failed" if failed else "ok",
                "controller": controller,
                "memory": memory,
                "peak_lr_seen": peak,
                "init_lr": 1e-3,
                "warmup_steps": 10,
                "decision_every": 10,
                "seed": 0,
                "update_step": 25 if failed else total_steps,
                "wall_time_s": wall,
                "settings": {"total_steps": total_steps},
            }
        )
    _write(path / "final_results.jsonl", finals)
    return path


def _cosine_sweep(path, runs, total_steps=60):
    path.mkdir(parents=True)
    for peak, ppl in runs:
        rec = {
            "final_eval_ppl": ppl,
            "final_eval_loss": math.log(ppl),
            "final_eval_tokens": 4096,
            "update_step": total_steps,
            "total_steps": total_steps,
            "seed": 0,
            "schedule": "cosine",
            "peak_lr": peak,
            "wall_time_s": 50.0,
        }
        (path / f"cosine_lr{peak:g}.json").write_text(json.dumps(rec))
    return path


@pytest.mark.slow
def test_report_compares_campaigns_side_by_side(tmp_path):
    """`--compare`: LLM memory, Optuna memory and the cosine sweep in one table and one figure, same budget."""
    llm = _campaign(tmp_path / "llm-mem", "llm", "llm", [(40.0, 1e-3), (34.0, 3e-3), (36.0, 2e-3)])
    optuna = _campaign(
        tmp_path / "optuna-mem", "rules", "optuna", [(38.0, 2e-3), (float("nan"), 1e-2), (33.0, 4e-3)], wall=90.0
    )
    sweep = _cosine_sweep(tmp_path / "sweep", [(1e-3, 37.5), (3e-3, 35.0)])

    plain = build_report(llm, [sweep], tmp_path / "plain")
    assert plain.side_by_side is None and "side_by_side" not in plain.tables
    assert "Side by side" not in (tmp_path / "plain" / "report.md").read_text()

    d = build_report(llm, [sweep], tmp_path / "out", compare_dirs=[optuna])
    s = d.side_by_side
    assert [r.name for r in s.rows] == ["llm-mem", "optuna-mem", "cosine sweep"]
    a, b, c = s.rows
    assert (a.method, b.method, c.method) == ("llm / llm", "rules / optuna", "fixed cosine")
    assert (a.runs, b.runs, c.runs) == (3, 3, 2)
    assert (a.best_ppl, a.best_at, a.best_peak_lr) == (34.0, "round 2", 3e-3)
    assert (b.best_ppl, b.best_at, b.best_peak_lr) == (33.0, "round 3", 4e-3)
    assert (c.best_ppl, c.best_at, c.best_peak_lr) == (35.0, "cosine 3e-3", 3e-3)
    assert (a.median_ppl, b.median_ppl, c.median_ppl) == (36.0, 35.5, 36.25)
    assert (a.failed, b.failed, c.failed) == ((), ("round 2",), ())
    assert (a.steps, b.steps, c.steps) == (180, 60 + 25 + 60, 120)
    assert (a.wall_s, b.wall_s, c.wall_s) == (300.0, 270.0, 100.0)
    assert s.same_budget and s.budget == 60 and "Same budget" in s.budget_note
    # the failed round keeps the best so far; the line starts at the first finished round
    assert b.best_so_far == [(1, 38.0), (2, 38.0), (3, 33.0)]
    assert a.best_so_far == [(1, 40.0), (2, 34.0), (3, 34.0)]

    table = d.tables["side_by_side"]
    assert table.rows[1][:9] == [
        "optuna-mem",
        "rules / optuna",
        "3 rounds",
        "33.00",
        "round 3",
        "35.50",
        "1 (round 2)",
        "4e-3",
        "60",
    ]
    assert table.rows[1][9:] == ["145", "4.5 min"] and table.rows[2][:2] == ["cosine sweep", "fixed cosine"]

    png = tmp_path / "out" / "side_by_side.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(FIGURES) + 1 and "Side by side" in html
    assert "alt='Side by side: best-so-far perplexity per round'" in html
    md = (tmp_path / "out" / "report.md").read_text()
    assert "](side_by_side.png)" in md and "| optuna-mem | rules / optuna | 3 rounds | 33.00 |" in md

    # another budget is flagged, naming each row's steps per run
    long_sweep = _cosine_sweep(tmp_path / "long-sweep", [(3e-3, 30.0)], total_steps=120)
    d2 = build_report(llm, [sweep, long_sweep], tmp_path / "out2", compare_dirs=[optuna])
    assert [r.name for r in d2.side_by_side.rows][2:] == ["cosine sweep (sweep)", "cosine sweep (long-sweep)"]
    assert not d2.side_by_side.same_budget and d2.side_by_side.budget is None
    assert "Budget mismatch" in d2.side_by_side.budget_note
    assert "cosine sweep (long-sweep) 120" in d2.side_by_side.budget_note

    # the command line, end to end: the table is printed and the report embeds the figure
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "lrpilot", "report", str(llm), "--baselines", str(sweep), "--out", str(out)]
    proc = subprocess.run([*cmd, "--compare", str(optuna)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Side by side" in proc.stdout and "Same budget" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("optuna-mem"))
    assert line.split()[:4] == ["optuna-mem", "rules", "/", "optuna"] and "1 (round 2)" in line and "145" in line
    assert (out / "side_by_side.png").exists() and "side_by_side" not in proc.stderr
    assert "data:image/png;base64," in (out / "report.html").read_text()
    bad = subprocess.run([*cmd, "--compare", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing" in bad.stderr


def test_survival_is_a_loss_ratio_that_means_the_same_at_any_scale(tmp_path):
    """Survived = finished and ln(ppl) < 1.3 x ln(best ppl). On cpu-small's scale (best 4.70) the collapsed
    cosine at 3e-2 (9.24, 1.43x the loss) did not survive, a round at 5.95 (1.15x) did; a failed round never does.
    """
    from lrpilot.campaign_logs import load_baselines, load_campaign
    from lrpilot.report.tables import analyse

    camp = _campaign(tmp_path / "c", "rules", "optuna", [(4.70, 1e-3), (5.95, 2.2e-2), (float("nan"), 2.5e-2)])
    sweep = _cosine_sweep(tmp_path / "sweep", [(3e-3, 4.87), (1e-2, 5.39), (3e-2, 9.24)])
    a = analyse(load_campaign(camp), load_baselines([sweep]))
    assert a.survival_threshold == pytest.approx(4.70**1.3)
    s = {b.band: b for b in a.survival}
    assert (s["1e-3..3e-3"].agent_survived, s["3e-3..1e-2"].baseline_survived) == (1, 1)
    assert (s["1e-2..3e-2"].agent_survived, len(s["1e-2..3e-2"].agent_rounds), s["1e-2..3e-2"].baseline_survived) == (
        1,
        2,
        1,
    )
    assert (s["3e-2..1e-1"].baseline_runs, s["3e-2..1e-1"].baseline_survived) == (1, 0)


def test_figures_scale_to_what_they_draw_and_mark_what_is_off_scale(tmp_path, monkeypatch):
    """The rounds (4.69-4.75) fill the per-round axis although a round and a cosine run collapsed (9.5, 10.04):
    the axis stops below both, and each off-scale point is drawn at the top with its value."""
    from lrpilot.report import figures

    rounds = [(4.702, 3e-3), (4.754, 3e-3), (4.686, 1e-2), (9.5, 2e-2)]
    camp = _campaign(tmp_path / "camp", "rules", "optuna", rounds)
    sweep = _cosine_sweep(tmp_path / "sweep", [(1e-3, 4.92), (3e-3, 4.80), (3e-2, 10.04)])
    drawn: dict[str, object] = {}

    def keep(fig, path):  # written out as usual, and the real figure kept open for inspection
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        drawn[Path(path).stem] = fig
        return path

    monkeypatch.setattr(figures, "_save", keep)
    build_report(camp, [sweep], tmp_path / "out")
    ax = drawn["ppl_per_round"].axes[0]
    bottom, top = ax.get_ylim()
    assert bottom < 4.686 and 4.80 < top < 9.5  # the best cosine's line is on the axis, the collapses are not
    assert (4.754 - 4.686) / (top - bottom) > 0.3  # the rounds are not flattened to the floor
    texts = [t.get_text() for t in ax.texts]
    assert any(t.startswith("round 4: ppl 9.5") and "off scale" in t for t in texts), texts
    assert any(c.get_offsets().tolist() == [[4, top]] for c in ax.collections)  # the ▲ at the top
    ax = drawn["landscape"].axes[0]
    bottom, top = ax.get_ylim()
    assert bottom < 4.686 and 4.92 < top < 9.5
    texts = [t.get_text() for t in ax.texts]
    assert any(t.startswith("cosine 3e-2: ppl 10.0") and "off scale" in t for t in texts), texts
    assert any(t.startswith("round 4: ppl 9.5") and "off scale" in t for t in texts), texts


def test_ppl_limits_ignore_outliers_and_keep_a_readable_span():
    from lrpilot.report.figures import ppl_limits

    lo, hi = ppl_limits([4.70, 4.75, 4.69, 4.80, 10.04, math.nan])
    assert lo < 4.69 and 4.80 < hi < 10.04
    lo, hi = ppl_limits([30.4, 31.2, 45.9, 36.2, 33.0, 309.0, 215.1])  # the published study: the collapses are off
    assert 45.9 < hi < 215.1
    lo, hi = ppl_limits([5.0, 5.0])  # identical values still get a span
    assert lo < 5.0 < hi
    assert all(math.isnan(v) for v in ppl_limits([math.nan]))


def test_report_links_a_bench(published, tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench.json").write_text(
        json.dumps(
            {
                "seeds": [42, 43],
                "reference": "cosine",
                "methods": {"cosine": {"mean": 4.81}, "rules": {"mean": 4.72}, "llm": {"mean": None}},
            }
        )
    )
    d = build_report(published / "campaign", [], tmp_path / "out", bench_dirs=[bench])
    md, page = d.md_path.read_text(), d.html_path.read_text()
    assert "Bench: [../bench/bench.md](../bench/bench.md)" in md
    assert "best mean ppl 4.720 (rules); best fixed schedule cosine 4.810" in md
    assert "href='../bench/bench.md'" in page
    assert main_report(published / "campaign", [], tmp_path / "o2", bench_dirs=[tmp_path / "nobench"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no readable bench.json" in err
