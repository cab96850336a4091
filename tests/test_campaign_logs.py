"""The torch-free campaign reader: joins, ordering, LR trajectories across rollbacks, bands, phases.

.venv/bin/python -m pytest -q tests/test_campaign_logs.py
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from lrpilot.campaign_logs import (
    CampaignLogsError,
    bands_between,
    fmt_lr,
    load_baselines,
    load_campaign,
    peak_band,
    peak_from_filename,
    phase_stats,
)
from lrpilot.logs import JsonlLog


def _final(iso, ppl, **kw):
    rec = {
        "timestamp": "2026-05-30T15:30:00",
        "run_start_iso": iso,
        "final_eval_ppl": ppl,
        "final_eval_loss": math.log(ppl) if math.isfinite(ppl) else ppl,
        "total_decisions": 3,
        "crash_count": 0,
        "peak_lr_seen": 1e-3,
        "min_lr_seen": 1e-4,
        "warmup_steps": 100,
        "decision_every": 50,
        "init_lr": 3e-4,
    }
    rec.update(kw)
    return rec


def _dec(iso, ts, step, new_lr, loss=4.0, **kw):
    return {"timestamp": ts, "run_start_iso": iso, "step": step, "loss": loss, "old_lr": 0, "new_lr": new_lr, **kw}


def _write(path, records, torn_tail=False):
    with JsonlLog(path, fsync=False) as log:
        for r in records:
            log.append(r)
    if torn_tail:
        with open(path, "ab") as f:
            f.write(b'{"run_start_iso": "x", "step"')


@pytest.fixture
def campaign(tmp_path):
    a, b, c = "2026-05-30T14:00:00", "2026-05-30T15:00:00", "2026-05-30T16:00:00"
    # final_results out of round order on purpose: the reader orders by `round`
    _write(
        tmp_path / "final_results.jsonl",
        [
            _final(b, 40.0, round=2, controller="llm", timestamp="2026-05-30T15:30:00"),
            _final(a, 50.0, round=1, controller="llm", timestamp="2026-05-30T14:20:00"),
            _final(c, float("nan"), round=3, status="failed", crash_count=2),
        ],
    )
    _write(
        tmp_path / "decisions.jsonl",
        [
            _dec(a, "2026-05-30T14:01:00", 100, 6e-4, loss=5.0),
            _dec(a, "2026-05-30T14:02:00", 150, 1e-3, loss=4.5, effective_step=152),
            _dec(a, "2026-05-30T14:03:00", 200, 5e-4, loss=4.2),
            _dec(a, "2026-05-30T14:04:00", 250, 9e-4, loss=4.1, effective_step=None),  # never applied
            # round 2: decides at 100, 150, 200; crashes; rolled back to 120; decides again at 150
            _dec(b, "2026-05-30T15:01:00", 100, 1e-3, loss=5.1),
            _dec(b, "2026-05-30T15:02:00", 150, 2e-3, loss=4.6),
            _dec(b, "2026-05-30T15:03:00", 200, 4e-3, loss=9.9),
            _dec(b, "2026-05-30T15:05:00", 150, 1e-3, loss=4.55),
            # a decision of an abandoned attempt (no final result)
            _dec("2026-05-30T13:00:00", "2026-05-30T13:01:00", 100, 1e-3),
        ],
        torn_tail=True,
    )
    _write(
        tmp_path / "rollbacks.jsonl",
        [
            {
                "timestamp": "2026-05-30T15:04:00",
                "run_start_iso": b,
                "crash_step": 210,
                "lr_at_crash": 4e-3,
                "rolled_back_to_step": 120,
                "new_lr": 5e-4,
                "crash_reason": "nan_loss",
                "crash_count_in_run": 1,
            }
        ],
    )
    base = tmp_path / "baselines"
    base.mkdir()
    (base / "cosine_lr3.5e-3_60m_final.json").write_text(
        json.dumps(
            {"final_eval_loss": 3.4, "final_eval_ppl": 30.0, "final_eval_tokens": 10, "update_step": 301, "seed": 1}
        )
    )
    (base / "cosine_lr1e-2.json").write_text(
        json.dumps(
            {
                "schedule": "cosine",
                "peak_lr": 0.01,
                "final_eval_ppl": "nan",
                "final_eval_loss": "nan",
                "lr_trajectory": [[0, 1e-5], [100, 1e-2]],
                "diverged": True,
            }
        )
    )
    (base / "broken.json").write_text("{not json")
    (base / "runs").mkdir()  # a baseline run directory is not a result
    return tmp_path


def test_rounds_are_ordered_and_joined(campaign):
    with pytest.warns(UserWarning) as caught:
        logs = load_campaign(campaign)
    msgs = " ".join(str(w.message) for w in caught)
    assert "corrupt jsonl line" in msgs and "broken.json" in msgs
    assert [r.round for r in logs.rounds] == [1, 2, 3]
    r1, r2, r3 = logs.rounds
    assert [d["step"] for d in r1.decisions] == [100, 150, 200, 250]
    assert [d["step"] for d in r2.decisions] == [100, 150, 200, 150]  # time order, superseded ones kept
    assert len(r2.rollbacks) == 1 and r3.decisions == () and r3.rollbacks == ()
    assert logs.unjoined_decisions == 1 and logs.unjoined_rollbacks == 0
    assert r1.controller == "llm" and r3.controller == ""
    assert (r1.status, r3.status) == ("ok", "failed") and not r3.ok
    assert r1.wall_time_s == pytest.approx(20 * 60)
    assert logs.best_round().round == 2
    assert r1.peak_lr == 1e-3 and r1.band == "1e-3..3e-3"


def test_lr_trajectory_prefers_effective_step_and_follows_rollbacks(campaign):
    with pytest.warns(UserWarning):
        logs = load_campaign(campaign)
    r1, r2 = logs.rounds[0], logs.rounds[1]
    assert r1.lr_trajectory() == [(100, 6e-4), (152, 1e-3), (200, 5e-4)]
    assert r1.lr_at(0) == pytest.approx(3e-4 / 100)  # warmup ramp, update 0
    assert r1.lr_at(99) == pytest.approx(3e-4)
    assert r1.lr_at(151) == 6e-4 and r1.lr_at(152) == 1e-3 and r1.lr_at(10_000) == 5e-4
    # round 2: the decision at 200 (4e-3) was lost to the rollback to 120; the guard set 5e-4 at 120
    assert r2.lr_trajectory() == [(100, 1e-3), (120, 5e-4), (150, 1e-3)]
    assert r2.lr_trajectory(include_rollbacks=False) == [(100, 1e-3), (150, 1e-3)]
    assert r2.loss_trajectory() == [(100, 5.1), (150, 4.55)]
    assert r2.steps_trained() == 200 + 50 + (210 - 120)  # estimated total + redone steps


def test_baselines_from_fields_and_file_names(campaign):
    with pytest.warns(UserWarning, match="broken.json"):
        bs = load_baselines(campaign)  # a campaign dir: reads its baselines/ folder
    assert [(b.schedule, b.peak_lr) for b in bs] == [("cosine", 0.0035), ("cosine", 0.01)]
    assert bs[0].final_eval_ppl == 30.0 and bs[0].update_step == 301 and bs[0].lr_trajectory == []
    assert bs[1].diverged and math.isnan(bs[1].final_eval_ppl) and bs[1].lr_trajectory[1] == (100, 0.01)
    assert peak_from_filename("cosine_lr1e-2_60m_final.json") == 0.01
    assert peak_from_filename("wsd_lr1.2e-3.json") == 0.0012
    assert math.isnan(peak_from_filename("summary.json"))
    with pytest.raises(CampaignLogsError, match="no such file"):
        load_baselines(campaign / "nope")


def test_published_layout_is_refused_with_the_fix(tmp_path):
    (tmp_path / "final_results_log_agent_60m.jsonl").write_text("")
    with pytest.raises(CampaignLogsError, match="import-logs"):
        load_campaign(tmp_path)
    with pytest.raises(CampaignLogsError, match="no such directory"):
        load_campaign(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert load_campaign(tmp_path / "empty").rounds == []  # an empty campaign reads as empty


@pytest.mark.parametrize(
    "lr,band",
    [
        (1e-4, "1e-4..3e-4"),
        (2.8e-4, "1e-4..3e-4"),
        (3e-4, "3e-4..1e-3"),
        (1e-3, "1e-3..3e-3"),
        (0.0012, "1e-3..3e-3"),
        (2.5e-3, "1e-3..3e-3"),
        (3e-3, "3e-3..1e-2"),
        (4.5e-3, "3e-3..1e-2"),
        (0.01, "1e-2..3e-2"),
        (0.029999, "1e-2..3e-2"),
        (0.0, "n/a"),
        (float("nan"), "n/a"),
    ],
)
def test_peak_band_edges(lr, band):
    assert peak_band(lr) == band


def test_bands_between_and_fmt_lr():
    assert [b[0] for b in bands_between(2e-4, 1e-2)] == [
        "1e-4..3e-4",
        "3e-4..1e-3",
        "1e-3..3e-3",
        "3e-3..1e-2",
        "1e-2..3e-2",
    ]
    assert (fmt_lr(0.0035), fmt_lr(1e-2), fmt_lr(1.5625e-05), fmt_lr(-1)) == ("3.5e-3", "1e-2", "1.56e-5", "n/a")


def test_phase_stats_names_outliers_and_failures(campaign):
    with pytest.warns(UserWarning):
        logs = load_campaign(campaign)
    from lrpilot.campaign_logs import round_from_records

    rounds = [
        round_from_records({"final_eval_ppl": p, "run_start_iso": str(i)}, i, [], [])
        for i, p in enumerate([50, 40, 30, 300, float("nan")], 1)
    ]
    ph = phase_stats(rounds, size=2)
    assert [p.rounds for p in ph] == [(1, 2), (3, 4), (5,)]
    assert ph[0].mean == 45 and ph[0].median == 45 and ph[0].outliers == ()
    assert ph[1].mean == 165 and ph[1].outliers == (4,) and ph[1].mean_without_outliers == 30  # 300 > 3 x 45
    assert ph[2].failed == (5,) and math.isnan(ph[2].mean)
    assert [p.mean for p in phase_stats(logs.rounds, size=10)] == [45.0]
    with pytest.raises(ValueError):
        phase_stats(rounds, size=0)


def test_reader_never_imports_torch():
    code = (
        "import sys, lrpilot.campaign_logs; assert 'torch' not in sys.modules; assert 'matplotlib' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
