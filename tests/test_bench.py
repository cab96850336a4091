"""`lrpilot bench`: the statistics by known answers, method parsing, settings checks, and a cpu-smoke bench end to end.

python -m pytest -q tests/test_bench.py            (add -m "not slow" for the quick ones)
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lrpilot.bench import (
    BenchError,
    BenchSettings,
    SeedResult,
    check_settings,
    paired_difference,
    parse_method,
    run_bench,
    steps_to_within,
    survival,
    t_interval,
)
from lrpilot.config import ConfigError

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------- known answers


def test_t_interval_known_answer():
    """1..5: mean 3, sd sqrt(2.5) = 1.58114, t(0.975, 4) = 2.7764 (a printed t table), so the half-width is
    2.7764 x 1.58114 / sqrt(5) = 1.96324."""
    r = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert r["n"] == 5 and r["mean"] == 3.0
    assert r["std"] == pytest.approx(1.58114, abs=1e-5)
    assert r["lo"] == pytest.approx(3 - 1.96324, abs=2e-4) and r["hi"] == pytest.approx(3 + 1.96324, abs=2e-4)
    one = t_interval([4.7])
    assert one["mean"] == 4.7 and math.isnan(one["std"]) and math.isnan(one["lo"])


def test_paired_difference_known_answer():
    """Seeds 1-4 in both (seed 5 only in b is ignored): a - b = -1, +1, -1, 0. Mean -0.25; deviations -0.75,
    1.25, -0.75, 0.25 give sd sqrt(2.75 / 3) = 0.957427; t(0.975, 3) = 3.1824 so the half-width is
    3.1824 x 0.957427 / 2 = 1.52348. Wins: seeds 1 and 3, a tie on 4 counts half: 2.5 / 4 = 0.625.
    Relative: (-1/11 + 1/11 - 1/10 + 0/5) / 4 = -2.5%."""
    a = {1: 10.0, 2: 12.0, 3: 9.0, 4: 5.0}
    b = {1: 11.0, 2: 11.0, 3: 10.0, 4: 5.0, 5: 7.0}
    r = paired_difference(a, b)
    assert r["seeds"] == [1, 2, 3, 4] and r["n"] == 4
    assert r["mean"] == pytest.approx(-0.25)
    assert r["std"] == pytest.approx(0.957427, abs=1e-6)
    assert r["lo"] == pytest.approx(-0.25 - 1.52348, abs=2e-4) and r["hi"] == pytest.approx(-0.25 + 1.52348, abs=2e-4)
    assert r["win_rate"] == 0.625
    assert r["mean_pct"] == pytest.approx(-2.5)


def test_paired_difference_skips_failed_seeds():
    r = paired_difference({1: math.nan, 2: 4.0}, {1: 5.0, 2: 5.0})
    assert r["seeds"] == [2] and r["win_rate"] == 1.0 and math.isnan(r["lo"])


def test_steps_to_within_one_percent():
    curve = [(100, 5.0), (200, 4.9), (300, 4.84), (400, 4.7)]
    assert steps_to_within(curve, 4.8) == 300  # 4.84 <= 4.8 x 1.01 = 4.848
    assert steps_to_within(curve, 4.0) is None
    assert steps_to_within([(100, math.nan), (200, 4.0)], 4.0) == 200


def _run(label, ppl, peak=None, seen=math.nan, status="ok"):
    return {"label": label, "peak_lr": peak, "peak_lr_seen": seen, "ppl": ppl, "status": status, "wall_time_s": 1.0}


def test_survival_at_the_peak_where_cosine_collapses():
    """Best ppl of seed 1 is 4.0, so the threshold is 4.0 ** 1.3 = 6.063. Cosine survives 3e-3 (4.1), collapses
    at 1e-2 (9.0); wsd survives there (5.0); of the rule rounds only those that reached 1e-2 count."""
    results = {
        "cosine": [SeedResult(1, [_run("a", 4.1, 3e-3), _run("b", 9.0, 1e-2), _run("c", 20.0, 3e-2)])],
        "wsd": [SeedResult(1, [_run("a", 4.0, 3e-3), _run("b", 5.0, 1e-2)])],
        "rules+optuna:3": [
            SeedResult(1, [_run("r1", 4.2, seen=3e-3), _run("r2", 5.5, seen=1.2e-2), _run("r3", 7.0, seen=2e-2)])
        ],  # fmt: skip
        "schedulefree": [SeedResult(1, [_run("x", 4.5)])],
    }
    s = survival(results, None, 1.3)
    assert s["collapse_peak"]["1"]["peak"] == 1e-2
    assert s["collapse_peak"]["1"]["threshold_ppl"] == pytest.approx(4.0**1.3)
    assert s["methods"]["cosine"] == {"survived": 0, "runs": 1}
    assert s["methods"]["wsd"] == {"survived": 1, "runs": 1}
    assert s["methods"]["rules+optuna:3"] == {"survived": 1, "runs": 2}
    assert "schedulefree" not in s["methods"]


# ------------------------------------------------------------------------------- parsing, settings


@pytest.mark.parametrize(
    "spec, kind, extra",
    [
        ("cosine", "sweep", {"schedule": "cosine"}),
        ("schedulefree", "single", {"optimizer": "schedulefree_adamw", "lr": 2.5e-3}),
        ("prodigy", "single", {"optimizer": "prodigy", "lr": 1.0}),
        ("schedulefree:1e-3", "single", {"lr": 1e-3}),
        ("rules", "campaign", {"controller": "rules", "memory": "none", "rounds": 1}),
        ("rules+optuna:8", "campaign", {"controller": "rules", "memory": "optuna", "rounds": 8}),
        ("llm", "campaign", {"controller": "llm", "memory": "none", "rounds": 1}),
        ("llm+memory:4", "campaign", {"controller": "llm", "memory": "llm", "rounds": 4}),
        (
            "rules:probe_steps=20,ceiling=3e-3",
            "campaign",
            {"controller": "rules", "rounds": 1, "rule_params": (("probe_steps", "20"), ("ceiling", "3e-3"))},
        ),
    ],
)
def test_parse_method(spec, kind, extra):
    m = parse_method(spec)
    assert m.kind == kind and all(getattr(m, k) == v for k, v in extra.items())


@pytest.mark.parametrize(
    "spec, words", [("sgd", "unknown method"), ("rules+optuna:0", "positive number of rounds"),
                    ("rules+optuna:x", r"--methods rules\+optuna:x"), ("prodigy:-1", "positive LR"), ("replay:/nope", "replay"),
                    ("rules:probe_steps", "KEY=VALUE"), ("rules:ceiling=1e-2,ceiling=2e-2", "ceiling is given twice"), ("rules:bogus=1", "--methods rules:bogus=1: unknown rule parameter 'bogus'")]
)  # fmt: skip
def test_parse_method_errors_name_the_spec(spec, words):
    with pytest.raises(BenchError, match=words):
        parse_method(spec)


def test_replay_method_counts_the_source_rounds(tmp_path):
    (tmp_path / "decisions.jsonl").write_text("")
    (tmp_path / "final_results.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
    m = parse_method(f"replay:{tmp_path}")
    assert m.controller == "replay" and m.rounds == 2 and m.slug.startswith(f"replay_{tmp_path.name}_")


def test_a_replay_of_other_decision_steps_is_refused_before_any_run(tmp_path):
    """As `campaign --replay-from` does (tests/test_replay.py): a log whose steps are none of this run's decision
    points would hold the LR at every step and score as a real method."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "final_results.jsonl").write_text('{"round": 1}\n')
    (src / "decisions.jsonl").write_text(
        "".join(json.dumps({"round": 1, "step": s, "new_lr": 1e-3, "run_start_iso": "x"}) + "\n" for s in (100, 200))
    )
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"--methods replay:.*decided at steps 100, 200, none of this run's"):
        run_bench(_settings(methods=("cosine", f"replay:{src}")), out, echo=lambda _: None)
    assert not (out / "runs").exists()


@pytest.mark.parametrize("spec, words", [("rules:start_ratio=0", r"rules\.start_ratio: must be in \(0, 1\]"),
                                         ("rules:decay_shape=bogus", "decay_shape")])  # fmt: skip
def test_a_bad_rule_value_is_refused_before_any_run(tmp_path, spec, words):
    """A value `campaign --rule` refuses up front was only refused when its run started, after bench.md was
    written, with "re-run to resume" (which cannot help)."""
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=rf"--methods {re.escape(spec)}: .*{words}"):
        run_bench(_settings(methods=("cosine", spec)), out, echo=lambda _: None)
    assert not (out / "runs").exists() and not (out / "bench.md").exists()


def _settings(**kw):
    base = dict(preset="cpu-smoke", overrides=("train.total_steps=20",), peaks=(3e-3,), methods=("cosine",), seeds=1)
    base.update(kw)
    return BenchSettings(**base)


def test_settings_validation():
    for kw, words in [({"seeds": 0}, "--seeds"), ({"jobs": 0}, "--jobs"), ({"methods": ()}, "--methods"),
                      ({"methods": ("cosine", "cosine")}, "twice")]:  # fmt: skip
        with pytest.raises(BenchError, match=words):
            _settings(**kw)


def test_reused_out_with_changed_settings_is_refused_naming_the_field(tmp_path):
    check_settings(tmp_path, _settings())
    check_settings(tmp_path, _settings(methods=("cosine", "rules"), seeds=3))  # methods and seeds may change
    for kw, field in [({"peaks": (1e-3,)}, "peaks"), ({"overrides": ("train.total_steps=30",)}, "overrides"),
                      ({"preset": "cpu-small"}, "preset"), ({"optuna_seed": 1}, "optuna_seed")]:  # fmt: skip
        with pytest.raises(BenchError, match=f"different {field}") as e:
            check_settings(tmp_path, _settings(**kw))
        assert "\n" not in str(e.value)


def test_everything_is_validated_before_any_training(tmp_path):
    """A bad method, a sweep without peaks or a bad override fails before OUT is even created."""
    cases = [
        _settings(methods=("cosine", "nonsense")),
        _settings(peaks=()),
        _settings(overrides=("train.total_steps=0",)),
        _settings(methods=("rules",), overrides=("guard.floor=-1",)),
    ]
    for i, s in enumerate(cases):
        out = tmp_path / f"b{i}"
        with pytest.raises(Exception) as e:  # noqa: PT011 - BenchError or ConfigError, both one line
            run_bench(s, out, echo=lambda _: None)
        assert "\n" not in str(e.value) and not out.exists(), str(e.value)


# ---------------------------------------------------------------------------------- end to end


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "lrpilot", *args], capture_output=True, text=True, timeout=900, env=env, cwd=REPO
    )


@pytest.mark.slow
def test_cpu_smoke_bench_end_to_end(tmp_path):
    """2 seeds x (cosine at 2 peaks, rules, schedule-free): results, seeds on record, figures, a re-run that
    trains nothing, and a changed setting refused in one line."""
    pytest.importorskip("schedulefree")
    out = tmp_path / "bench"
    args = ["bench", "--preset", "cpu-smoke", "--set", "train.total_steps=20", "--methods", "cosine", "rules",
            "schedulefree", "--seeds", "2", "--peaks", "3e-3", "3e-2", "--out", str(out), "--jobs", "2"]  # fmt: skip
    p = _cli(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "bench.json").read_text())
    assert s["seeds"] == [42, 43] and s["reference"] == "cosine"
    assert set(s["methods"]) == {"cosine", "rules", "schedulefree"}
    cos = s["methods"]["cosine"]
    assert cos["runs"] == 4 and cos["train_steps"] == 80 and cos["n"] == 2
    for seed in ("42", "43"):  # a sweep's score is its best peak
        peaks = [r["ppl"] for r in cos["runs_detail"] if r["seed"] == int(seed)]
        assert len(peaks) == 2 and cos["scores"][seed] == min(peaks)
    assert math.isfinite(s["methods"]["rules"]["lo"]) and s["paired"]["rules"]["n"] == 2
    for seed in (42, 43):  # every run records its seed, in its own directory
        rec = json.loads((out / "runs" / "cosine" / f"seed{seed}" / "cosine_lr3e-3.json").read_text())
        assert rec["seed"] == seed
        rounds = (out / "runs" / "rules" / f"seed{seed}" / "final_results.jsonl").read_text().splitlines()
        assert len(rounds) == 1 and json.loads(rounds[0])["seed"] == seed
        sf = json.loads((out / "runs" / "schedulefree" / f"seed{seed}" / "constant_lr2.5e-3.json").read_text())
        assert sf["seed"] == seed
        assert json.loads((out / "runs" / "schedulefree" / f"seed{seed}" / "runs" / "constant_lr2.5e-3" / "config.json")
                          .read_text())["train"]["optimizer"] == "schedulefree_adamw"  # fmt: skip
    md = (out / "bench.md").read_text()
    assert "lrpilot bench --preset cpu-smoke" in md and "Paired against the best fixed schedule (cosine" in md
    assert (out / "bench_ppl.png").stat().st_size > 0 and (out / "bench_best_so_far.png").stat().st_size > 0

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/*.json")}
    again = _cli(*args)
    assert again.returncode == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/*.json")} == stamps  # nothing re-ran
    assert json.loads((out / "bench.json").read_text())["methods"]["cosine"]["scores"] == cos["scores"]

    changed = _cli(*[a if a != "3e-2" else "1e-2" for a in args])
    assert changed.returncode == 2
    assert changed.stderr.strip().count("\n") == 0 and "different peaks" in changed.stderr


def test_results_cover_every_seed_on_disk_and_every_command(tmp_path):
    """One long method on 1 seed next to 3 seeds of a sweep: a second command on the same OUT with --seeds 1
    summarises the sweep's 3 seeds and the campaign's 1, pairs them on the seed they share, and bench.md
    lists both commands."""
    from lrpilot.bench import bench_commands, collect, parse_method, render_markdown, summarise
    from lrpilot.config import load_config

    out = tmp_path / "b"
    for seed, ppls in ((42, (5.0, 4.8)), (43, (5.1, 4.9)), (44, (5.2, 4.7))):
        d = out / "runs" / "cosine" / f"seed{seed}"
        d.mkdir(parents=True)
        for peak, ppl in zip(("1e-3", "3e-3"), ppls, strict=True):
            rec = {"final_eval_ppl": ppl, "final_eval_loss": math.log(ppl), "seed": seed, "status": "ok"}
            (d / f"cosine_lr{peak}.json").write_text(json.dumps(rec))
    d = out / "runs" / "rules_optuna_2" / "seed42"
    d.mkdir(parents=True)
    rounds = [{"round": r, "final_eval_ppl": p, "seed": 42, "status": "ok", "peak_lr_seen": 3e-3} for r, p in
              ((1, 4.9), (2, 4.75))]  # fmt: skip
    (d / "final_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    first = _settings(peaks=(1e-3, 3e-3), seeds=3, methods=("cosine",), overrides=(), command="lrpilot bench A")
    check_settings(out, first)
    second = _settings(peaks=(1e-3, 3e-3), seeds=1, methods=("cosine", "rules+optuna:2"), overrides=(),
                       command="lrpilot bench B")  # fmt: skip
    check_settings(out, second)
    check_settings(out, second)  # the same command again is not listed twice
    assert bench_commands(out) == ["lrpilot bench A", "lrpilot bench B"]
    base = load_config("cpu-smoke")
    methods = [parse_method(m) for m in second.methods]
    s = summarise(collect(base, second, methods, out), second, base, bench_commands(out))
    assert s["seeds"] == [42, 43, 44]
    assert s["methods"]["cosine"]["scores"] == {"42": 4.8, "43": 4.9, "44": 4.7}
    assert s["methods"]["rules+optuna:2"]["scores"] == {"42": 4.75} and s["methods"]["rules+optuna:2"]["n"] == 1
    p = s["paired"]["rules+optuna:2"]
    assert p["seeds"] == [42] and p["mean"] == pytest.approx(-0.05) and p["win_rate"] == 1.0
    assert s["within_1pct"]["rules+optuna:2"]["per_seed"] == {"42": 120}  # round 1: 4.9 > 4.8 x 1.01
    md = render_markdown(s)
    assert "    lrpilot bench A\n    lrpilot bench B" in md


def test_summarise_only_trains_nothing_and_summarises_what_finished(tmp_path):
    """`--summarise-only` on a bench cut short: the finished runs are summarised, the missing ones are left
    out (and counted), no run directory is created, and a changed setting is still refused."""
    out = tmp_path / "b"
    d = out / "runs" / "cosine" / "seed42"
    d.mkdir(parents=True)
    rec = {"final_eval_ppl": 5.0, "final_eval_loss": math.log(5.0), "seed": 42, "status": "ok"}
    (d / "cosine_lr1e-3.json").write_text(json.dumps(rec))
    args = ["bench", "--preset", "cpu-smoke", "--methods", "cosine", "wsd", "--seeds", "2", "--peaks", "1e-3", "3e-3",
            "--out", str(out), "--summarise-only"]  # fmt: skip
    p = _cli(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "summarised 1 finished runs of 8 planned (nothing trained)" in p.stdout
    s = json.loads((out / "bench.json").read_text())
    assert s["methods"]["cosine"]["scores"] == {"42": 5.0} and s["methods"]["wsd"]["runs"] == 0
    assert sorted(x.name for x in (out / "runs").iterdir()) == ["cosine"]  # nothing else started
    changed = _cli(*[a if a != "3e-3" else "1e-2" for a in args])
    assert changed.returncode == 2 and "different peaks" in changed.stderr


def test_summarise_only_on_a_directory_without_a_bench_is_refused_and_creates_nothing(tmp_path):
    """A mistyped --out with --summarise-only: one line naming --out, and no new directory (it used to write
    an empty bench.md there)."""
    out = tmp_path / "typo"
    p = _cli("bench", "--preset", "cpu-smoke", "--methods", "rules", "--out", str(out), "--summarise-only")
    assert p.returncode == 2 and "--out" in p.stderr and "no bench here" in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1 and not out.exists()


def test_rule_parameters_of_a_method_reach_the_campaign_and_are_checked(tmp_path):
    """`rules:KEY=V` fixes those rule parameters in the method's campaign (its directory named by the spec); an
    unknown parameter or a non-number is refused before anything trains."""
    from lrpilot.bench import Task, _campaign_settings
    from lrpilot.config import load_config

    cfg = load_config("cpu-smoke")
    m = parse_method("rules:probe_steps=20")
    settings = _settings(peaks=(), seeds=1, methods=(m.spec,), overrides=())
    cs = _campaign_settings(Task(m, 42, tmp_path, cfg, ()), settings)
    assert cs.rule_params == {"probe_steps": 20.0} and m.slug == "rules_probe_steps=20"
    with pytest.raises(BenchError, match="--methods rules:nope=1: unknown rule parameter 'nope'"):
        parse_method("rules:nope=1")
    with pytest.raises(BenchError, match="ceiling='high' is not a number"):
        _campaign_settings(Task(parse_method("rules:ceiling=high"), 42, tmp_path, cfg, ()), settings)


def test_probe_updates_count_as_training_steps():
    """A run's lookahead-probe updates are compute: they add to the method's training steps and to the x axis
    of its best-so-far curve."""
    from lrpilot.bench import SeedResult

    row = {"status": "ok", "ppl": 5.0, "probe_steps": 60}
    sr = SeedResult(42, runs=[dict(row), {**row, "ppl": 4.0}])
    assert sr.curve(1000) == [(1060, 5.0), (2120, 4.0)]


@pytest.mark.slow
def test_status_finds_every_run_of_a_real_bench_directory(tmp_path, capsys):
    """`lrpilot status OUT` on a bench: sweep runs (OUT/runs/<method>/seed<S>/runs/<run>), campaign rounds
    (OUT/runs/<method>/seed<S>/rounds/round_001) and a replay method's rounds (OUT/runs/replay_<name>_<hash>/...)
    sit 5 levels down; all are shown, none is 'no runs yet'."""
    from lrpilot.cli import main
    from lrpilot.progress import MAX_DEPTH, find_runs

    out = tmp_path / "bench"
    run_bench(_settings(methods=("rules", "wsd"), seeds=2), out, echo=lambda _: None)
    src = out / "runs" / "rules" / "seed42"
    run_bench(_settings(methods=("rules", "wsd", f"replay:{src}"), seeds=2), out, echo=lambda _: None)
    runs = [p.relative_to(out).as_posix() for p in find_runs(out)]
    assert len(runs) == 6 and any(r.startswith("runs/replay_seed42_") for r in runs), runs
    assert max(len(Path(r).parts) for r in runs) == MAX_DEPTH
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "no runs yet" not in shown and "6 finished" in shown, shown
    assert "runs/rules/seed42/round 1" in shown and "runs/rules/seed43/round 1" in shown, shown
