"""The `lrpilot` command line end to end on cpu-smoke: help, train, baseline sweep, demo."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from lrpilot.argtypes import output_dir, output_file
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


def test_rule_help_names_every_rule_parameter():
    """`campaign --help` lists the names --rule takes; start_ratio was missing from it."""
    from lrpilot.controllers.rules import RuleParams

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    (rule,) = [a for a in sub.choices["campaign"]._actions if "--rule" in a.option_strings]
    missing = [n for n in RuleParams.names() if n not in rule.help.split("Names:")[1]]
    assert not missing, missing


def test_a_rule_given_twice_is_one_line(tmp_path):
    """--rule ceiling=1e-2 --rule ceiling=2e-2 silently kept the last one."""
    r = _lrpilot("campaign", "--preset", "cpu-smoke", "--rounds", "1", "--dir", str(tmp_path / "d"),
                 "--rule", "ceiling=1e-2", "--rule", "ceiling=2e-2")  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--rule ceiling: given more than once" in r.stderr
    assert not (tmp_path / "d").exists()


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


# ------------------------------------------------------------------------------------------ issue 9


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("lrpilot: error: ") and r.stderr.count("\n") == 1, r.stderr[-2000:]
    for n in needles:
        assert n in r.stderr, r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--schedule", "constant", "--peak", "0.2"],
        ["train", "--set", "schedule.init_lr=0.2"],
        ["baseline", "--peaks", "1e-3", "0.2"],
        ["campaign", "--rounds", "1", "--controller", "rules", "--set", "schedule.init_lr=0.2"],
    ],
    ids=["train-peak", "train-init-lr", "baseline", "campaign"],
)
def test_an_lr_above_the_guard_ceiling_is_refused_before_anything_runs(tmp_path, args):
    """Issue 9.5: the warmup used to train at 0.2 unguarded (ceiling 0.05) and the result recorded it wrongly."""
    cmd, *rest = args
    where = "--out" if cmd == "baseline" else "--dir"
    r = _lrpilot(cmd, "--preset", "cpu-smoke", *rest, where, str(tmp_path / "d"))
    _one_line_error(r, "0.2", "guard.ceiling (0.05)")
    assert not (tmp_path / "d" / "runs").exists() and not (tmp_path / "d" / "rounds").exists()


@pytest.mark.slow
def test_nan_env_with_checkpoint_every_5_never_rolls_back_to_the_nan_step(tmp_path):
    """Issue 9.1: `LRPILOT_INJECT_NAN_AT_STEP=5 lrpilot train --preset cpu-smoke --set checkpoint.every=5`:
    every launch NaNs at step 5, so the round fails cleanly after max_fast_crash quick crashes, but no
    rollback ever lands on step 5 (whose state is the NaN'd one) and no checkpoint at or after 5 exists."""
    import os

    env = {**os.environ, "LRPILOT_INJECT_NAN_AT_STEP": "5"}
    d = tmp_path / "d"
    r = subprocess.run([sys.executable, "-m", "lrpilot", "train", "--preset", "cpu-smoke", "--set",
                        "checkpoint.every=5", "--dir", str(d)], capture_output=True, text=True, timeout=600,
                       env=env)  # fmt: skip
    assert r.returncode == 1, r.stderr[-2000:]
    run_dir = d / "runs" / "cosine_lr3e-3"
    rbs = [json.loads(x) for x in (run_dir / "rollbacks.jsonl").read_text().splitlines()]
    assert [rb["crash_step"] for rb in rbs] == [5] * 5
    assert [rb["rolled_back_to_step"] for rb in rbs] == [0, 0, 0, 0, None]
    assert not list((run_dir / "checkpoints").glob("step_*.pt"))
    assert json.loads((d / "cosine_lr3e-3.json").read_text())["diverged"] is True


def _wait_for_step(telemetry, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll the telemetry file until a step event >= `step` (a condition with a deadline)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        if telemetry.exists():
            for line in telemetry.read_text().splitlines():
                if '"event":"step"' in line and json.loads(line)["step"] >= step:
                    return
        assert proc.poll() is None, "lrpilot train ended before the step"
        assert time.monotonic() < deadline, f"no step {step} in {telemetry}"
        time.sleep(0.02)


@pytest.mark.slow
def test_rerunning_a_directory_with_other_settings_is_refused_not_crashed(tmp_path):
    """Issue 9.6: `lrpilot train --preset cpu-smoke --dir D` killed at step ~35, re-run with
    --set model.hidden_size=64. It used to overwrite config.json, count the trainer's fingerprint refusal
    (exit 2) as five crashes with halved LRs and store the run as diverged; re-running the original command
    then printed that stored result. Now: one line naming the field, nothing written, and the original
    command resumes the run."""
    import signal

    d = tmp_path / "d"
    run_dir = d / "runs" / "cosine_lr3e-3"
    base = [sys.executable, "-m", "lrpilot", "train", "--preset", "cpu-smoke", "--dir", str(d)]
    proc = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_step(run_dir / "telemetry.jsonl", 35, proc)
        proc.send_signal(signal.SIGTERM)  # the supervisor kills its trainer and exits
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    config_before = (run_dir / "config.json").read_text()
    r = _lrpilot("train", "--preset", "cpu-smoke", "--set", "model.hidden_size=64", "--dir", str(d))
    _one_line_error(r, "model.hidden_size", "model.hidden_size=32", "64")
    assert (run_dir / "config.json").read_text() == config_before
    assert not (run_dir / "rollbacks.jsonl").exists() and not (d / "cosine_lr3e-3.json").exists()
    # the original command resumes it and finishes without a crash
    r = _lrpilot("train", "--preset", "cpu-smoke", "--dir", str(d))
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((d / "cosine_lr3e-3.json").read_text())
    assert rec["status"] == "ok" and rec["crash_count"] == 0 and math.isfinite(rec["final_eval_ppl"])
    # a finished directory too: other settings are refused, not answered with the stored result
    r = _lrpilot("train", "--preset", "cpu-smoke", "--set", "train.seed=1", "--dir", str(d))
    _one_line_error(r, "train.seed")
    r = _lrpilot("baseline", "--preset", "cpu-smoke", "--set", "train.seed=1", "--peaks", "3e-3", "--out", str(d))
    _one_line_error(r, "train.seed")


@pytest.mark.parametrize("command", ["campaign", "bench"])
def test_agent_flags_are_aliases_of_set(command):
    """--backend/--base-url/--model/--memory-model give the same overrides (after every --set, in that order) and
    the same config as the --set they stand for, and their help names it."""
    from lrpilot import cli

    rest = {"campaign": ["--rounds", "1", "--dir", "d"], "bench": ["--methods", "llm", "--out", "d"]}[command]
    parser = build_parser()
    old = parser.parse_args([command, "--preset", "cpu-smoke", *rest, "--model", "m1", "--base-url", "http://h/v1",
                             "--backend", "openai", "--memory-model", "m2", "--set", "train.seed=3"])  # fmt: skip
    new = parser.parse_args([command, "--preset", "cpu-smoke", *rest, "--set", "train.seed=3",
                             "--set", "agent.backend=openai", "--set", "agent.base_url=http://h/v1",
                             "--set", "agent.model=m1", "--set", "agent.memory_model=m2"])  # fmt: skip
    assert cli._overrides(old) == cli._overrides(new) == [
        "train.seed=3", "agent.backend=openai", "agent.base_url=http://h/v1", "agent.model=m1", "agent.memory_model=m2"
    ]  # fmt: skip
    cfg = cli._config(old)
    assert cfg == cli._config(new) and cfg.agent.model == "m1" and cfg.agent.memory_model == "m2"
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    helps = {a.dest: a.help for a in sub._actions}
    assert "same as --set agent.model=VALUE" in helps["model"] and "same as --set agent.backend" in helps["backend"]


def test_every_config_command_takes_set_and_a_bad_field_is_one_line(tmp_path):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    takes_set = sorted(n for n, p in sub.choices.items() if any("--set" in a.option_strings for a in p._actions))
    assert takes_set == ["baseline", "bench", "campaign", "demo", "info", "train"]
    assert "--set SECTION.KEY=VALUE" in sub.choices["campaign"].format_help()
    r = _lrpilot("campaign", "--preset", "cpu-smoke", "--rounds", "1", "--dir", str(tmp_path / "c"),
                 "--set", "bad.field=1")  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("lrpilot: error: --set bad.field: unknown section 'bad'")
    assert not (tmp_path / "c").exists()  # refused before anything is written


def _path_actions():
    """(command, option, action) for every argument of every subcommand that names a directory or file to write."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if {"--dir", "--out"} & set(action.option_strings):
                yield name, action.option_strings[0], action


def test_every_output_path_flag_is_checked_before_anything_runs():
    seen = {(name, opt): action.type for name, opt, action in _path_actions()}
    assert len(seen) == 8, seen  # train, baseline, campaign, bench, report, export-schedule, import-logs, demo
    assert all(t in (output_dir, output_file) for t in seen.values()), seen
    assert seen[("export-schedule", "--out")] is output_file


@pytest.mark.parametrize(
    "args, message",
    [
        (["campaign", "--preset", "cpu-smoke", "--rounds", "1", "--dir", "{file}"], "is a file, not a directory"),
        (["train", "--preset", "cpu-smoke", "--dir", "{file}/run"], "which is a file, not a directory"),
        (["baseline", "--preset", "cpu-smoke", "--peaks", "1e-3", "--out", ""], "argument --out: empty"),
        (["report", "{tmp}", "--out", "{file}"], "is a file, not a directory"),
        (["export-schedule", "{tmp}", "--out", "{tmp}"], "is a directory; give a file name"),
        (["campaign", "--preset", "cpu-smoke", "--rounds", "-1", "--dir", "{tmp}/c"], "must be >= 1, got -1"),
    ],
)
def test_a_file_where_a_directory_goes_or_an_empty_path_is_one_line(tmp_path, args, message):
    """These gave FileExistsError / NotADirectoryError tracebacks, or (an empty --dir, as an unset shell variable
    gives) wrote a campaign into the current directory."""
    (tmp_path / "f").write_text("keep me\n")
    argv = [a.format(file=tmp_path / "f", tmp=tmp_path) for a in args]
    before = sorted(tmp_path.rglob("*"))
    r = subprocess.run(
        [sys.executable, "-m", "lrpilot", *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert sorted(tmp_path.rglob("*")) == before and (tmp_path / "f").read_text() == "keep me\n"


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`lrpilot info | head -1`: the reader closes the pipe before lrpilot writes; lrpilot must end quietly
    (Python docs, "Note on SIGPIPE"), not print a BrokenPipeError traceback."""
    p = subprocess.Popen(
        [sys.executable, "-m", "lrpilot", "info", "--preset", "cpu-smoke"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    p.stdout.close()  # the read end is gone before the child writes anything: its first write fails with EPIPE
    err = p.stderr.read()
    assert p.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_broken_pipe_that_is_not_stdouts_still_raises(monkeypatch):
    """Only a reader leaving stdout is quiet: a broken pipe to a subprocess or a socket is a real error."""
    from lrpilot import cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_info", broken)
    with pytest.raises(BrokenPipeError):
        cli.main(["info", "--preset", "cpu-smoke"])
