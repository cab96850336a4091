"""The trainer as a real subprocess: exact resume, torchrun on CPU, the control channel, errors, NaN hook.

    python -m pytest -q tests/test_trainer.py            (add -m "not slow" for the quick ones)
    python tests/test_trainer.py --write-golden           (deliberately regenerate the golden losses)

Each run uses the cpu-smoke preset (a 2-layer d32 byte-level LLaMA) shrunk to a few dozen steps. A tiny
in-test controller answers `observe` events through ControlWriter where a run needs one.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lrpilot.channel import ControlWriter, TelemetryReader
from lrpilot.checkpoint import list_checkpoints, sidecar_path
from lrpilot.config import RunConfig, apply_overrides, load_config
from lrpilot.logs import as_float, read_jsonl

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "data" / "golden_cpu_smoke_losses.json"
GOLDEN_STEPS = 20
TIMEOUT_S = 300


# ------------------------------------------------------------------------------------------ helpers


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


def make_run(root: Path, cfg: RunConfig, name: str = "run") -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg.save(run_dir / "config.json")
    return run_dir


def trainer_cmd(run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lrpilot.trainer", "--run-dir", str(run_dir), *args]


def run_trainer(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        trainer_cmd(run_dir, *args), capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(env), cwd=REPO
    )


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    evs = read_jsonl(run_dir / "telemetry.jsonl")
    return [e for e in evs if kind is None or e["event"] == kind]


def step_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged by several launches keeps the last launch's value."""
    return {e["step"]: as_float(e["loss"]) for e in events(run_dir, "step")}


def step_lrs(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["lr"] for e in events(run_dir, "step")}


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"trainer exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def small(cfg: RunConfig, *overrides: str) -> RunConfig:
    return apply_overrides(cfg, ["eval.tokens=2048", *overrides])


def test_a_finished_launch_frees_its_trainer_before_it_returns(tmp_path, smoke_config, monkeypatch):
    """The Trainer sits in reference cycles; freed only by the cyclic GC at interpreter exit, its model and process
    group were torn down with the interpreter, and a torchrun rank died with SIGABRT after "done" (CI).
    train() must free it before it returns, whatever the GC's own schedule (disabled here)."""
    import gc
    import weakref

    import lrpilot.trainer as trainer_module

    run_dir = make_run(tmp_path, small(smoke_config, "train.total_steps=12"))
    made = []
    init = trainer_module.Trainer.__init__

    def remember(self, *a, **k):
        made.append(weakref.ref(self))
        init(self, *a, **k)

    monkeypatch.setattr(trainer_module.Trainer, "__init__", remember)
    gc.disable()
    try:
        assert trainer_module.main(["--run-dir", str(run_dir)]) == 0
        assert made and made[0]() is None, "the Trainer outlived train()"
    finally:
        gc.enable()


class FixedController:
    """Answers each observe event at step s with lr_at(s) and plan_at(s), through the real channel."""

    def __init__(self, run_dir: Path, lr_at, plan_at=lambda s: None) -> None:
        self.reader = TelemetryReader(run_dir)
        self.writer = ControlWriter(run_dir)
        self.lr_at, self.plan_at = lr_at, plan_at
        self.answered: list[int] = []

    def pump(self) -> None:
        for e in self.reader.poll():
            if e["event"] == "observe":
                self.writer.send(e["step"], self.lr_at(e["step"]), self.plan_at(e["step"]))
                self.answered.append(e["step"])

    def run(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run the trainer while answering its observe events (polls with a deadline, no fixed sleeps)."""
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(env), cwd=REPO
        ) as proc:
            deadline = time.monotonic() + TIMEOUT_S
            while proc.poll() is None:
                self.pump()
                if time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail("trainer did not finish in time")
                time.sleep(0.002)
            out, err = proc.communicate()
        self.pump()
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def decision_lr(step: int) -> float:
    return 2e-3 if (step // 10) % 2 else 1e-3


def decision_plan(step: int) -> list[tuple[int, float]]:
    return [(step, decision_lr(step)), (step + 10, 0.5 * decision_lr(step))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- in-process (quick) tests


def test_update_lr_warms_up_to_the_lr_in_force_then_follows_the_state(smoke_config):
    from lrpilot.channel import LRState
    from lrpilot.trainer import update_lr

    cfg = smoke_config  # init_lr 3e-3, warmup 10
    state = LRState(cfg.schedule.init_lr)
    assert [update_lr(t, cfg, state) for t in (0, 4, 9)] == pytest.approx([3e-4, 1.5e-3, 3e-3])
    assert update_lr(10, cfg, state) == 3e-3
    state.override(1e-3)  # --lr: the warmup ramps to the LR in force instead
    assert update_lr(4, cfg, state) == pytest.approx(5e-4) and update_lr(50, cfg, state) == 1e-3
    state.apply({"seq": 0, "lr": 2e-3, "plan": [[20, 2e-3], [30, 1e-3]]}, step=20)
    assert update_lr(25, cfg, state) == pytest.approx(1.5e-3)


def test_decision_points_follow_the_protocol(smoke_config):
    from lrpilot.trainer import is_decision_point

    cfg = apply_overrides(smoke_config, ["train.total_steps=45"])  # warmup 10, every 10
    assert [s for s in range(0, 60) if is_decision_point(s, cfg)] == [10, 20, 30, 40]
    no_warmup = apply_overrides(cfg, ["schedule.warmup_steps=0", "schedule.decision_every=20"])
    assert [s for s in range(0, 60) if is_decision_point(s, no_warmup)] == [0, 20, 40]


def test_batch_geometry(smoke_config):
    from lrpilot.trainer import TrainerError, batch_geometry

    assert batch_geometry(smoke_config, 1) == (8, 1)
    assert batch_geometry(apply_overrides(smoke_config, ["train.micro_batch_size=2"]), 2) == (2, 2)
    with pytest.raises(TrainerError, match="train.batch_size"):
        batch_geometry(smoke_config, 3)
    with pytest.raises(TrainerError, match="train.micro_batch_size"):
        batch_geometry(apply_overrides(smoke_config, ["train.micro_batch_size=3"]), 1)


@pytest.mark.parametrize("name", ["wandb", "tensorboard"])
def test_missing_logger_extra_names_the_install(name, smoke_config, tmp_path, monkeypatch):
    from lrpilot.trainer import MetricLoggers, TrainerError

    monkeypatch.setitem(sys.modules, "wandb" if name == "wandb" else "torch.utils.tensorboard", None)
    with pytest.raises(TrainerError, match=rf"pip install 'lrpilot\[{name}\]'"):
        MetricLoggers(name, smoke_config, tmp_path)


def test_tensorboard_logger_writes_events(smoke_config, tmp_path):
    pytest.importorskip("tensorboard")
    from lrpilot.trainer import MetricLoggers

    loggers = MetricLoggers("tensorboard", smoke_config, tmp_path)
    loggers.log(1, {"train/loss": 5.0})
    loggers.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_trainer_train_step_in_process_reproduces_the_golden_losses(tmp_path):
    """Trainer stepped by hand (control, then train_step, as run() does) on cpu-smoke gives the golden file's
    first losses bit for bit, in this process: the class is the trainer, not a wrapper around a subprocess."""
    import torch

    from lrpilot.trainer import StepResult, Trainer, TrainerOptions

    golden = json.loads(GOLDEN.read_text())["losses"]
    cfg = replace(load_config("cpu-smoke"), name="cpu-smoke")
    cfg = apply_overrides(cfg, [f"train.total_steps={GOLDEN_STEPS}", "eval.tokens=2048"])
    run_dir = make_run(tmp_path, cfg)
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(cfg, TrainerOptions(run_dir=run_dir))
        losses = []
        for step in range(5):
            assert trainer.step == step
            trainer.lr, trainer.stop = trainer.control(trainer.step, wait=False)
            result = trainer.train_step()
            assert isinstance(result, StepResult) and result.seconds > 0 and math.isfinite(result.grad_norm)
            losses.append(result.loss)
        assert trainer.step == 5
        assert trainer.finish() == 0  # stopped early: no final eval, telemetry closed
    finally:
        torch.set_num_threads(threads)
    assert losses == golden[:5]
    assert [e["event"] for e in events(run_dir)] == ["start"]  # train_step alone reports nothing


def test_trainer_options_from_the_command_line(tmp_path):
    from lrpilot.trainer import TrainerError, TrainerOptions, parse_args

    args = parse_args(["--run-dir", str(tmp_path), "--lr", "2e-3", "--wait-for-decisions", "--stop-at-step", "7"])
    opts = TrainerOptions.from_args(args)
    assert opts == TrainerOptions(run_dir=tmp_path, lr=2e-3, wait_for_decisions=True, stop_at_step=7)
    with pytest.raises(TrainerError, match="--min-seq -1"):
        TrainerOptions(run_dir=tmp_path, min_seq=-1)


# --------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """cpu-smoke for 30 steps without a controller (the LR stays at init_lr after warmup)."""
    cfg = small(load_config("cpu-smoke"), "train.total_steps=30")
    run_dir = make_run(tmp_path_factory.mktemp("ref"), cfg)
    proc = run_trainer(run_dir)
    assert_ok(proc)
    return run_dir, proc


@pytest.mark.slow
def test_uninterrupted_run_emits_the_protocol(reference_run):
    run_dir, proc = reference_run
    evs = events(run_dir)
    assert evs[0]["event"] == "start" and evs[0]["world_size"] == 1 and evs[0]["params"] > 0
    assert evs[-1]["event"] == "done" and evs[-2]["event"] == "eval"
    assert math.isfinite(evs[-1]["final_eval_loss"]) and evs[-1]["final_eval_tokens"] >= 2048
    steps = events(run_dir, "step")
    assert [e["step"] for e in steps] == list(range(1, 31))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "time", "launch"} <= e.keys() for e in steps)
    # warmup: update t uses init_lr * (t + 1) / warmup; then init_lr holds (no controller)
    init, warm = 3e-3, 10
    for e in steps:
        t = e["step"] - 1
        assert e["lr"] == pytest.approx(init * (t + 1) / warm if t < warm else init, rel=1e-12)
    # decision points at 10 and 20 (< total 30); each observe carries the losses since the previous one
    obs = events(run_dir, "observe")
    assert [o["step"] for o in obs] == [10, 20]
    losses = step_losses(run_dir)
    assert obs[0]["losses"] == [losses[s] for s in range(1, 11)]
    assert obs[1]["losses"] == [losses[s] for s in range(11, 21)]
    assert [c["step"] for c in events(run_dir, "checkpoint")] == [10, 20]
    assert [c.step for c in list_checkpoints(run_dir) if c.complete] == [10, 20]
    assert losses[30] < losses[1]  # it learns


@pytest.mark.slow
def test_golden_losses(reference_run):
    """The first 20 losses of cpu-smoke (seed 42, eval/total don't matter) match tests/data's golden file to
    1e-5, so silent changes to model init, data order or the optimizer are caught. After a DELIBERATE change,
    regenerate with `python tests/test_trainer.py --write-golden` and commit the new file with the change."""
    run_dir, _ = reference_run
    golden = json.loads(GOLDEN.read_text())
    assert golden["preset"] == "cpu-smoke" and golden["seed"] == load_config("cpu-smoke").train.seed
    losses = step_losses(run_dir)
    got = [losses[s] for s in range(1, GOLDEN_STEPS + 1)]
    assert got == pytest.approx(golden["losses"], abs=1e-5, rel=0)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, smoke_config):
    """With a controller steering LR and plans, stop at 15 and resume: bitwise-equal losses and final eval."""
    cfg = small(smoke_config, "train.total_steps=30")
    a = make_run(tmp_path, cfg, "a")
    assert_ok(FixedController(a, decision_lr, decision_plan).run(trainer_cmd(a, "--wait-for-decisions")))

    b = make_run(tmp_path, cfg, "b")
    ctl = FixedController(b, decision_lr, decision_plan)
    assert_ok(ctl.run(trainer_cmd(b, "--wait-for-decisions", "--stop-at-step", "15")))
    assert not events(b, "done") and events(b, "checkpoint")[-1]["step"] == 15
    ckpt = b / "checkpoints" / "step_000015.pt"
    assert_ok(ctl.run(trainer_cmd(b, "--wait-for-decisions", "--resume", str(ckpt))))
    assert ctl.answered == [10, 20]  # the resumed launch did not re-ask the decision at 10

    la, lb = step_losses(a), step_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 31))
    assert [la[s] for s in la] == [lb[s] for s in la]  # exact float equality, every step
    assert step_lrs(a) == step_lrs(b)
    assert [o["losses"] for o in events(a, "observe")] == [o["losses"] for o in events(b, "observe")]
    da, db = events(a, "done")[-1], events(b, "done")[-1]
    assert da["final_eval_loss"] == db["final_eval_loss"]
    starts = events(b, "start")
    assert starts[1]["resumed_from"] == str(ckpt) and starts[1]["step"] == 15


@pytest.mark.slow
def test_wait_for_decisions_applies_each_command_exactly_at_its_step(tmp_path, smoke_config):
    cfg = small(smoke_config, "train.total_steps=30")
    run_dir = make_run(tmp_path, cfg)
    ctl = FixedController(run_dir, decision_lr, decision_plan)
    proc = ctl.run(trainer_cmd(run_dir, "--wait-for-decisions"))
    assert_ok(proc)
    applied = events(run_dir, "applied")
    assert [(a["seq"], a["step"], a["decided_at_step"]) for a in applied] == [(0, 10, 10), (1, 20, 20)]
    lrs = step_lrs(run_dir)  # the step event of update t has step t + 1
    for s in (10, 20):
        a, b = decision_lr(s), 0.5 * decision_lr(s)
        for k in range(10):  # plan knots (s, a) and (s + 10, b) interpolate linearly
            assert lrs[s + k + 1] == pytest.approx(a + (b - a) * k / 10, rel=1e-12)
    assert events(run_dir, "observe")[0]["wait_s"] >= 0 and events(run_dir, "done")[0]["wait_s"] >= 0


@pytest.mark.slow
def test_commands_before_launch_and_min_seq(tmp_path, smoke_config):
    """Commands already in control.jsonl apply before the first update; those below --min-seq are ignored;
    a command during warmup makes the warmup ramp to its LR."""
    cfg = small(smoke_config, "train.total_steps=12")
    run_dir = make_run(tmp_path, cfg)
    w = ControlWriter(run_dir)
    w.send(0, 5e-2)  # seq 0: an earlier launch's, must be ignored
    w.send(0, 1e-3)  # seq 1
    proc = run_trainer(run_dir, "--min-seq", "1")
    assert_ok(proc)
    [applied] = events(run_dir, "applied")
    assert (applied["seq"], applied["step"], applied["lr"]) == (1, 0, 1e-3)
    lrs = step_lrs(run_dir)
    assert lrs[1] == pytest.approx(1e-3 / 10) and lrs[10] == pytest.approx(1e-3) and lrs[12] == 1e-3


def test_a_command_with_at_step_is_held_until_that_update(tmp_path, smoke_config):
    """Issue 9, item 4: a resumed run re-applies a logged decision where it took effect before (at_step);
    a later plain command still wins from its own update on."""
    cfg = small(smoke_config, "train.total_steps=30", "checkpoint.every=1000")
    run_dir = make_run(tmp_path, cfg)
    w = ControlWriter(run_dir)
    w.send(10, 1e-3, at_step=17, replays_seq=4)  # seq 0
    w.send(20, 2e-3, at_step=23)  # seq 1
    proc = run_trainer(run_dir)
    assert_ok(proc)
    applied = events(run_dir, "applied")
    assert [(a["seq"], a["step"], a.get("replays_seq")) for a in applied] == [(0, 17, 4), (1, 23, None)]
    lrs = step_lrs(run_dir)
    assert lrs[17] == lrs[11] and lrs[18] == 1e-3 and lrs[23] == 1e-3 and lrs[24] == 2e-3


@pytest.mark.slow
def test_live_command_without_waiting_takes_effect_at_the_recorded_step(tmp_path, smoke_config):
    cfg = small(smoke_config, "train.total_steps=150", "checkpoint.every=1000")
    run_dir = make_run(tmp_path, cfg)
    ctl = FixedController(run_dir, lambda s: 7e-4 if s == 10 else 3e-3)
    assert_ok(ctl.run(trainer_cmd(run_dir)))
    applied = {a["decided_at_step"]: a for a in events(run_dir, "applied")}
    k = applied[10]["step"]
    assert k >= 10
    lrs = step_lrs(run_dir)
    assert lrs[k] == 3e-3 and lrs[k + 1] == 7e-4  # update k (step event k + 1) is the first with the new LR


@pytest.mark.slow
def test_stop_command_checkpoints_and_exits_zero(tmp_path, smoke_config):
    cfg = small(smoke_config, "train.total_steps=40")
    run_dir = make_run(tmp_path, cfg)

    class Stopper(FixedController):
        def pump(self) -> None:
            for e in self.reader.poll():
                if e["event"] == "observe":
                    self.writer.stop()

    proc = Stopper(run_dir, decision_lr).run(trainer_cmd(run_dir, "--wait-for-decisions"))
    assert_ok(proc)
    assert not events(run_dir, "done")
    last = events(run_dir, "checkpoint")[-1]
    assert last["step"] == 10 and Path(last["path"]).exists()


@pytest.mark.slow
def test_inject_nan_makes_that_steps_loss_nan(tmp_path, smoke_config):
    cfg = small(smoke_config, "train.total_steps=20")
    run_dir = make_run(tmp_path, cfg)
    proc = run_trainer(run_dir, "--stop-at-step", "6", env={"LRPILOT_INJECT_NAN_AT_STEP": "5"})
    assert_ok(proc)
    raw = {e["step"]: e["loss"] for e in events(run_dir, "step")}
    assert all(isinstance(raw[s], float) and math.isfinite(raw[s]) for s in range(1, 5))
    assert raw[5] == "nan" and raw[6] == "nan"  # the NaN went through AdamW into the weights


@pytest.mark.slow
def test_inject_nan_flag(tmp_path, smoke_config):
    run_dir = make_run(tmp_path, small(smoke_config, "train.total_steps=20"))
    assert_ok(run_trainer(run_dir, "--stop-at-step", "2", "--inject-nan-at-step", "2"))
    assert [e["loss"] for e in events(run_dir, "step")][1] == "nan"


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 or lines[0].startswith("usage:"), proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


@pytest.mark.slow
def test_missing_and_corrupt_config_exit_2(tmp_path, smoke_config):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_line_error(run_trainer(empty), "config", "not found")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model": {"hidden_size": 3')
    _assert_one_line_error(run_trainer(bad), "not valid JSON")
    invalid = make_run(tmp_path, small(smoke_config), "invalid")
    d = json.loads((invalid / "config.json").read_text())
    d["train"]["total_steps"] = 0
    (invalid / "config.json").write_text(json.dumps(d))
    _assert_one_line_error(run_trainer(invalid), "train.total_steps")
    geometry = make_run(tmp_path, small(smoke_config, "train.micro_batch_size=3"), "geometry")
    _assert_one_line_error(run_trainer(geometry), "train.micro_batch_size")


def test_bad_flags_exit_2(tmp_path, smoke_config):
    run_dir = make_run(tmp_path, small(smoke_config))
    proc = run_trainer(run_dir, "--lr", "-1")
    assert proc.returncode == 2 and "--lr" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_missing_and_corrupt_checkpoint_exit_2(tmp_path, smoke_config):
    cfg = small(smoke_config, "train.total_steps=20")
    run_dir = make_run(tmp_path, cfg)
    assert_ok(run_trainer(run_dir, "--stop-at-step", "10"))
    ckpt = run_dir / "checkpoints" / "step_000010.pt"
    _assert_one_line_error(run_trainer(run_dir, "--resume", str(run_dir / "nope.pt")), "nope.pt", "not found")

    other = make_run(tmp_path, apply_overrides(cfg, ["model.hidden_size=64"]), "other")
    _assert_one_line_error(run_trainer(other, "--resume", str(ckpt)), "different model/data config")

    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) - 100])
    _assert_one_line_error(run_trainer(run_dir, "--resume", str(ckpt)), "step_000010.pt", "truncated")
    ckpt.write_bytes(data)
    sidecar_path(ckpt).unlink()
    _assert_one_line_error(run_trainer(run_dir, "--resume", str(ckpt)), "no sidecar")


@pytest.mark.slow
def test_torchrun_two_processes_match_the_single_process_curve(tmp_path, smoke_config):
    """DDP over gloo (2 ranks x 2 micro-batches of 2) vs one process (1 x 8): same global batch, different
    data per rank, so the curves agree statistically, not bitwise."""
    cfg = small(smoke_config, "train.total_steps=60")
    single = make_run(tmp_path, cfg, "single")
    assert_ok(run_trainer(single))
    ddp_cfg = apply_overrides(cfg, ["launch.devices=cpu:2", "train.micro_batch_size=2"])
    multi = make_run(tmp_path, ddp_cfg, "multi")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "lrpilot.trainer",
        "--run-dir",
        str(multi),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(), cwd=REPO)
    assert_ok(proc)
    assert events(multi, "start")[0]["world_size"] == 2
    assert len(events(multi, "start")) == 1  # only rank 0 speaks
    ls, lm = step_losses(single), step_losses(multi)
    assert sorted(lm) == list(range(1, 61))
    tail_s = sum(ls[s] for s in range(51, 61)) / 10
    tail_m = sum(lm[s] for s in range(51, 61)) / 10
    assert abs(tail_m - tail_s) / tail_s < 0.1, (tail_s, tail_m)
    es, em = events(single, "done")[0]["final_eval_loss"], events(multi, "done")[0]["final_eval_loss"]
    assert abs(em - es) / es < 0.1, (es, em)


def write_golden() -> None:
    """Run cpu-smoke for GOLDEN_STEPS steps and write tests/data/golden_cpu_smoke_losses.json."""
    import tempfile

    cfg = replace(load_config("cpu-smoke"), name="cpu-smoke")
    cfg = apply_overrides(cfg, [f"train.total_steps={GOLDEN_STEPS}", "eval.tokens=2048"])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_run(Path(tmp), cfg)
        assert_ok(run_trainer(run_dir))
        losses = step_losses(run_dir)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(
        json.dumps(
            {
                "preset": "cpu-smoke",
                "seed": cfg.train.seed,
                "steps": GOLDEN_STEPS,
                "command": "python tests/test_trainer.py --write-golden",
                "losses": [losses[s] for s in range(1, GOLDEN_STEPS + 1)],
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-golden"]:
        write_golden()
    else:
        print(__doc__)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["schedulefree_adamw", "prodigy"])
def test_resume_reproduces_the_uninterrupted_run_exactly_with_each_optimizer(tmp_path, smoke_config, optimizer):
    """As for AdamW above: stop at 15, resume, every loss and the final eval bitwise equal. Evaluations at 10
    and 20 (eval.every) and checkpoints switch schedule-free to its average and back."""
    pytest.importorskip("schedulefree" if optimizer == "schedulefree_adamw" else "prodigyopt")
    cfg = small(smoke_config, "train.total_steps=30", f"train.optimizer={optimizer}", "eval.every=10")
    a = make_run(tmp_path, cfg, "a")
    assert_ok(FixedController(a, decision_lr, decision_plan).run(trainer_cmd(a, "--wait-for-decisions")))
    b = make_run(tmp_path, cfg, "b")
    ctl = FixedController(b, decision_lr, decision_plan)
    assert_ok(ctl.run(trainer_cmd(b, "--wait-for-decisions", "--stop-at-step", "15")))
    ckpt = b / "checkpoints" / "step_000015.pt"
    assert_ok(ctl.run(trainer_cmd(b, "--wait-for-decisions", "--resume", str(ckpt))))

    la, lb = step_losses(a), step_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 31))
    assert [la[s] for s in la] == [lb[s] for s in la]
    evals_a = {e["step"]: e["eval_loss"] for e in events(a, "eval")}
    assert sorted(evals_a) == [10, 20, 30]
    assert evals_a == {e["step"]: e["eval_loss"] for e in events(b, "eval")}
    assert events(a, "done")[-1]["final_eval_loss"] == events(b, "done")[-1]["final_eval_loss"]


@pytest.mark.slow
def test_schedule_free_evaluates_its_average_and_evaluating_leaves_the_trajectory_alone(tmp_path, smoke_config):
    """Schedule-free: a run that evaluates every 5 steps trains exactly as one that never does (the training
    point is restored bit for bit), and its checkpoint holds the average x (the model) apart from y."""
    pytest.importorskip("schedulefree")
    import torch

    cfg = small(smoke_config, "train.total_steps=20", "train.optimizer=schedulefree_adamw")
    a = make_run(tmp_path, cfg, "a")
    assert_ok(run_trainer(a))
    b = make_run(tmp_path, apply_overrides(cfg, ["eval.every=5"]), "b")
    assert_ok(run_trainer(b))
    assert len(events(b, "eval")) == 4 and not events(a, "eval")[:-1]
    assert step_losses(a) == step_losses(b)
    state = torch.load(b / "checkpoints" / "step_000010.pt", weights_only=True)
    x = dict(state["model"])
    y = state["train_params"]
    assert state["optimizer"]["param_groups"][0]["train_mode"] is True
    first = next(iter(x))
    assert not torch.equal(x[first], y[0])  # x (the average) and y (the gradient point) differ
