"""`campaign --prune`: the campaign's memory stops a hopeless round from its intermediate evals (Optuna's
pruners), the trainer is told to stop, and the round is committed as "pruned" with the steps it saved.

Real parts: in-process `lrpilot.cli.main` campaigns on cpu-smoke (real trainer subprocesses, a real Optuna
journal); round 2 is made hopeless by the toy memory tests/toy_components/toy_memory.py (Optuna's memory
with a tiny rule ceiling after round 1)."""

from __future__ import annotations

import math

import optuna
import pytest
from toy_components import toy_memory  # noqa: F401 - registers --memory toy-hopeless

from lrpilot.campaign import CampaignSettings, summary_line, totals_line
from lrpilot.campaign_logs import load_campaign
from lrpilot.cli import main
from lrpilot.config import ConfigError
from lrpilot.logs import read_jsonl
from lrpilot.memory.optuna_memory import JOURNAL_FILE, STUDY_NAME, PruneSpec
from lrpilot.report.tables import analyse, summary_table

TOTAL = 60
SMOKE = ["--set", f"train.total_steps={TOTAL}", "--set", "schedule.warmup_steps=10", "--set",
         "schedule.decision_every=10", "--set", "eval.every=10", "--set", "guard.min_ratio=0.01"]  # fmt: skip


def _campaign(d, rounds: int, *extra: str) -> int:
    return main(["campaign", "--preset", "cpu-smoke", *SMOKE, "--rounds", str(rounds), "--controller", "rules",
                 "--memory", "toy-hopeless", "--dir", str(d), *extra])  # fmt: skip


def _steps(run_dir) -> list[int]:
    return [e["step"] for e in read_jsonl(run_dir / "telemetry.jsonl") if e.get("event") == "step"]


def _trials(d) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(d / JOURNAL_FILE)))
    return optuna.load_study(study_name=STUDY_NAME, storage=storage).get_trials(deepcopy=False)


@pytest.mark.slow
def test_a_hopeless_round_is_pruned_counted_and_kept_on_resume(tmp_path, capsys):
    d = tmp_path / "camp"
    assert _campaign(d, 2, "--prune", "median,startup=1") == 0
    cap = capsys.readouterr()
    out = cap.out
    r1, r2 = read_jsonl(d / "final_results.jsonl")
    assert r1["status"] == "ok" and "pruned_at_step" not in r1 and "steps_saved" not in r1
    assert r2["status"] == "pruned" and r2["failure_reason"] is None
    # stopped after the first eval past the warmup that was worse than round 1's (one more update at most)
    assert 10 < r2["pruned_at_step"] < TOTAL and r2["steps_saved"] == TOTAL - r2["pruned_at_step"] > 0
    steps1, steps2 = _steps(d / "rounds" / "round_001"), _steps(d / "rounds" / "round_002")
    assert max(steps1) == TOTAL and max(steps2) == r2["pruned_at_step"] < TOTAL and len(steps2) < len(steps1)
    # the trainer stopped on request (no done event, no crash), and the eval that pruned it is round 2's last
    tel2 = read_jsonl(d / "rounds" / "round_002" / "telemetry.jsonl")
    assert not any(e.get("event") == "done" for e in tel2) and r2["crash_count"] == 0
    assert "pruned at the eval of step" in (d / "rounds" / "round_002" / "trainer.log").read_text()
    # the study: round 1 COMPLETE with its ppl, round 2 PRUNED with its intermediate evals
    t1, t2 = _trials(d)
    assert t1.state == optuna.trial.TrialState.COMPLETE and t1.value == pytest.approx(r1["final_eval_ppl"])
    assert t2.state == optuna.trial.TrialState.PRUNED and t2.user_attrs["pruned_at_step"] == r2["pruned_at_step"]
    assert t2.intermediate_values and max(t2.intermediate_values) < TOTAL
    # the summary: "pruned at step S", kept out of the best, counted in the totals
    assert f"pruned at step {r2['pruned_at_step']}" in out and f"{r2['steps_saved']} steps saved" in out
    assert f"pruned 1 ({r2['steps_saved']} steps saved)" in out
    assert f"[round 2] pruned at step {r2['pruned_at_step']} ({r2['steps_saved']} steps saved)" in cap.out + cap.err
    assert f"best ppl {r1['final_eval_ppl']:.3f}" in totals_line([r1, r2])
    assert f"best so far {r1['final_eval_ppl']:.3f}" in summary_line(r2, r1["final_eval_ppl"])
    # the report: counted as pruned (not failed), never the best round, not a catastrophic outlier
    a = analyse(load_campaign(d))
    assert a.pruned == [2] and a.failed == [] and a.best_round.round == 1 and 2 not in a.outliers
    assert "1 pruned" in summary_table(a).rows[0][1]

    # resumed: nothing re-run, nothing told twice
    assert _campaign(d, 2, "--prune", "median,startup=1") == 0
    assert len(read_jsonl(d / "final_results.jsonl")) == 2 and _steps(d / "rounds" / "round_002") == steps2
    assert [t.state for t in _trials(d)] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert "pruned 1" in capsys.readouterr().out


@pytest.mark.slow
def test_without_prune_the_hopeless_round_runs_to_the_end(tmp_path):
    d = tmp_path / "camp"
    assert _campaign(d, 2) == 0
    r1, r2 = read_jsonl(d / "final_results.jsonl")
    assert r1["status"] == r2["status"] == "ok" and "pruned_at_step" not in r2
    assert max(_steps(d / "rounds" / "round_002")) == TOTAL and math.isfinite(r2["final_eval_ppl"])
    assert r2["final_eval_ppl"] > r1["final_eval_ppl"]  # the round --prune stops really is the worse one
    assert [t.state for t in _trials(d)] == [optuna.trial.TrialState.COMPLETE] * 2


def test_prune_needs_a_memory_that_can_prune(tmp_path, capsys):
    rc = main(["campaign", "--preset", "cpu-smoke", "--rounds", "1", "--controller", "rules", "--memory", "none",
               "--prune", "median", "--dir", str(tmp_path / "c")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--prune" in err[0] and "--memory optuna" in err[0]
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "spec", ["mean", "percentile", "percentile:150", "median:3", "median,startup=x", "median,foo=1"]
)
def test_a_bad_prune_spec_is_a_one_line_error(tmp_path, capsys, spec):
    rc = main(["campaign", "--preset", "cpu-smoke", "--rounds", "1", "--controller", "rules", "--memory", "optuna",
               "--prune", spec, "--dir", str(tmp_path / "c")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("lrpilot: error: --prune") and "\n" not in err[0]


def test_prune_specs_and_their_optuna_pruners():
    assert PruneSpec.parse("median").pruner(10)._n_warmup_steps == 10  # default: no pruning during warmup
    p = PruneSpec.parse("percentile:75,startup=2,warmup=30").pruner(10)
    assert isinstance(p, optuna.pruners.PercentilePruner) and p._percentile == 75 and p._n_startup_trials == 2
    assert p._n_warmup_steps == 30
    assert PruneSpec.parse("median").startup == 5  # Optuna's default n_startup_trials
    assert isinstance(PruneSpec.parse("none").pruner(10), optuna.pruners.NopPruner)
    with pytest.raises(ConfigError, match="--script"):
        CampaignSettings("cpu-smoke", (), "rules", "optuna", script="python x.py", prune="median")


def test_optuna_memory_reports_prunes_and_records_a_pruned_round_once(tmp_path):
    """OptunaMemory.prune/record_pruned on a real study (journal in tmp_path), without training."""
    from lrpilot.memory.optuna_memory import OptunaMemory

    mem = OptunaMemory(tmp_path, pruner=PruneSpec.parse("median,startup=1,warmup=0").pruner(10))
    mem.propose(1)
    assert mem.prune(1, 10, 3.0) is False  # no completed round yet: nothing to compare with
    mem.record(1, 20.0, False)
    p2 = mem.propose(2)
    assert mem.prune(2, 10, math.nan) is False  # a non-finite loss is the guard's business
    assert mem.prune(2, 10, 3.5) is True  # worse than round 1's 3.0 at step 10
    mem.record_pruned(2, 11)
    mem.record_pruned(2, 99)  # a resumed campaign tells it again: the first stays
    assert mem.prune(2, 20, 9.0) is False  # no longer running
    hist = mem.history()
    assert [h["state"] for h in hist] == ["COMPLETE", "PRUNED"] and hist[1]["ppl"] is None
    assert _trials(tmp_path)[1].user_attrs["pruned_at_step"] == 11
    assert mem.propose(2) == p2 and len(mem.history()) == 2  # never proposed (re-run) again
    assert "1 pruned" in mem.brief() and "0 running" in mem.brief()


def test_prune_without_intermediate_evals_is_refused_in_one_line(tmp_path, capsys):
    """--prune with eval.every=0 (the presets' default) never pruned anything, and said nothing."""
    d = tmp_path / "c"
    args = [a.replace("eval.every=10", "eval.every=0") for a in SMOKE]
    rc = main(["campaign", "--preset", "cpu-smoke", *args, "--rounds", "2", "--controller", "rules",
               "--memory", "optuna", "--prune", "median", "--dir", str(d)])  # fmt: skip
    assert rc == 2 and not d.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--prune median:" in err and "--set eval.every=" in err
