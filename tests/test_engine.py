"""Execution engines (lrpilot.engine): parallel campaign rounds on a real local Ray cluster and on local processes.

    python -m pytest -q tests/test_engine.py

Ray tests start one real Ray instance (2 CPUs, 127.0.0.1, no dashboard) for the module; rounds are real cpu-smoke
trainer subprocesses under the real supervisor inside Ray tasks, and the kills are real SIGKILL / SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from waiting import wait_until

from lrpilot.campaign import CampaignSettings, run_campaign
from lrpilot.config import ConfigError, apply_overrides, load_config
from lrpilot.engine import LocalEngine, Resources, make_engine
from lrpilot.launcher import LAUNCH_ENV
from lrpilot.logs import read_jsonl

SMOKE = ["train.total_steps=40", "schedule.warmup_steps=10", "schedule.decision_every=10"]


def _cfg():
    return apply_overrides(load_config("cpu-smoke"), SMOKE)


def _check_logs(d: Path, rounds: int) -> list[dict]:
    """Every round's final line exactly once, strict jsonl everywhere, each round's decisions once per step."""
    finals = read_jsonl(d / "final_results.jsonl", strict=True)
    assert sorted(r["round"] for r in finals) == list(range(1, rounds + 1)), [r["round"] for r in finals]
    assert all(r["status"] == "ok" and r["update_step"] == 40 for r in finals)
    assert len({r["run_start_iso"] for r in finals}) == rounds
    briefs = read_jsonl(d / "briefs.jsonl", strict=True)
    assert sorted(b["round"] for b in briefs) == list(range(1, rounds + 1))
    decisions = read_jsonl(d / "decisions.jsonl", strict=True)
    for r in range(1, rounds + 1):
        mine = [x for x in decisions if x["round"] == r]
        assert len({x["step"] for x in mine}) == 3, (r, mine)
        seqs = [x["seq"] for x in mine]
        assert len(seqs) == len(set(seqs)), (r, seqs)
        assert {x["run_start_iso"] for x in mine} == {next(f["run_start_iso"] for f in finals if f["round"] == r)}
    return sorted(finals, key=lambda f: f["round"])


def _interrupted(d: Path, rerun_at: float) -> list[int]:
    """Rounds 1-2 of campaign d that the kill stopped mid-run: their result.json was written by the re-run that
    started at `rerun_at`. Under load a round can still end while the kill or cancel takes effect (its result.json
    written, maybe without its final_results line); the re-run returns its stored result and does not resume it."""
    return [r for r in (1, 2) if (d / f"rounds/round_{r:03d}/result.json").stat().st_mtime > rerun_at]


def _launches(run_dir: Path) -> dict[int, tuple[int, str]]:
    """Live trainer processes of run_dir: pid -> (parent pid, launch token), from /proc."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
            env = (p / "environ").read_bytes().split(b"\0")
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        token = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(LAUNCH_ENV.encode() + b"=")), None)
        if token and str(run_dir).encode() in cmd:
            out[int(p.name)] = (ppid, token)
    return out


# ----------------------------------------------------------------------------------------------- fast


def test_resources_and_engine_names_are_checked_in_one_line():
    assert Resources.parse("num_cpus=2,num_gpus=0.5") == Resources(2.0, 0.5)
    for bad, field in (("cpus=1", "cpus"), ("num_cpus=x", "num_cpus"), ("num_gpus=-1", "num_gpus")):
        with pytest.raises(ConfigError, match=field):
            Resources.parse(bad)
    with pytest.raises(ConfigError, match="--engine 'spark'"):
        make_engine("spark")
    with pytest.raises(ConfigError, match="--ray-address needs --engine ray"):
        make_engine("local", address="auto")
    assert isinstance(make_engine("local", 2), LocalEngine)


def test_engine_ray_without_ray_names_the_extra(tmp_path):
    """Ray not importable: `--engine ray` fails before anything is written, in one line naming lrpilot[ray]."""
    code = (
        "import sys; sys.modules['ray'] = None; from lrpilot.cli import main; "
        f"sys.exit(main(['campaign', '--preset', 'cpu-smoke', '--rounds', '1', '--dir', {str(tmp_path / 'c')!r}, "
        "'--engine', 'ray', '--parallel', '2']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "lrpilot[ray]" in r.stderr and r.stderr.startswith("lrpilot: error:")
    assert not (tmp_path / "c").exists()


def test_a_ray_address_where_nothing_listens_is_one_line_not_minutes(tmp_path):
    """Ray waits minutes for a cluster that is not there; lrpilot says so in one line within seconds."""
    pytest.importorskip("ray")
    port = _free_port()  # closed again: nothing listens on it
    cmd = [sys.executable, "-m", "lrpilot", "campaign", "--preset", "cpu-smoke", "--rounds", "1", "--dir",
           str(tmp_path / "c"), "--engine", "ray", "--ray-address", f"127.0.0.1:{port}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"--ray-address 127.0.0.1:{port}: nothing answers there" in r.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_local_parallel_driver_killed_then_rerun_resumes_exactly(tmp_path):
    """--parallel 2 on the local engine; the driver is SIGKILLed while both rounds run: their processes and
    trainers die with it (PDEATHSIG), and the same command resumes both from their checkpoints, no round twice."""
    d = tmp_path / "camp"
    cmd = [sys.executable, "-m", "lrpilot", "campaign", "--preset", "cpu-smoke", "--rounds", "3", "--dir", str(d),
           "--controller", "rules", "--memory", "optuna", "--parallel", "2",
           *[a for o in SMOKE for a in ("--set", o)]]  # fmt: skip
    drv = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for r in (1, 2):
            wait_until(lambda r=r: (d / f"rounds/round_{r:03d}/checkpoints/step_000010.pt").exists(), 300, f"round {r}")
        drv.kill()
        drv.wait(30)
        for r in (1, 2):
            wait_until(lambda r=r: not _launches(d / f"rounds/round_{r:03d}"), 60, f"round {r}'s trainer to die")
    finally:
        drv.kill()
    rerun_at = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    finals = _check_logs(d, 3)
    assert finals[0]["rule_params"] != finals[2]["rule_params"]
    killed = _interrupted(d, rerun_at)
    assert killed
    for r in killed:
        assert json.loads((d / f"rounds/round_{r:03d}/round.json").read_text())["resumed"] is True


# ----------------------------------------------------------------------------------------------- ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_parallel_campaign_gives_distinct_rounds_with_strict_logs(ray_cluster, tmp_path):
    """4 cpu-smoke rounds, --parallel 2, rules + Optuna memory: 4 distinct rounds, each logged once, strict
    jsonl; Optuna holds 4 trials, one per round, asked while the other slot's round was still running."""
    import optuna

    d = tmp_path / "camp"
    settings = CampaignSettings(preset="cpu-smoke", overrides=tuple(SMOKE), controller="rules", memory="optuna")
    lines: list[str] = []
    with make_engine("ray", 2) as engine:
        recs = run_campaign(_cfg(), d, 4, settings, echo=lines.append, engine=engine)
    assert [r["round"] for r in recs] == [1, 2, 3, 4]
    finals = _check_logs(d, 4)
    assert len({str(f["rule_params"]) for f in finals}) == 4  # four different proposals
    assert sum(line.startswith("round ") for line in lines) == 4
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(d / "optuna_journal.log")))
    trials = optuna.load_study(study_name="lrpilot_rules", storage=storage).trials
    assert sorted(t.user_attrs["round_index"] for t in trials) == [1, 2, 3, 4]
    assert all(t.state.name == "COMPLETE" for t in trials)
    briefs = {b["round"]: b["brief"] for b in read_jsonl(d / "briefs.jsonl")}
    assert "2 running" in briefs[2]  # round 2 was asked while round 1 ran (and counts its own trial)


@pytest.mark.slow
def test_ray_rounds_match_the_local_engine_for_a_deterministic_controller(ray_cluster, tmp_path):
    """rules with fixed parameters and no memory: per-round results on Ray (2 at once) equal the local ones."""
    settings = CampaignSettings(preset="cpu-smoke", overrides=tuple(SMOKE), controller="rules", memory="none")
    local = run_campaign(_cfg(), tmp_path / "local", 2, settings, echo=lambda s: None)
    with make_engine("ray", 2) as engine:
        on_ray = run_campaign(_cfg(), tmp_path / "ray", 2, settings, echo=lambda s: None, engine=engine)
    keys = ("final_eval_ppl", "final_eval_loss", "peak_lr_seen", "min_lr_seen", "total_decisions", "update_step")
    assert [{k: r[k] for k in keys} for r in on_ray] == [{k: r[k] for k in keys} for r in local]
    dec = {
        name: [(x["round"], x["step"], x["new_lr"]) for x in read_jsonl(tmp_path / name / "decisions.jsonl")]
        for name in ("local", "ray")
    }
    assert sorted(dec["ray"]) == sorted(dec["local"])


@pytest.mark.slow
def test_ray_worker_killed_mid_round_resumes_the_round(ray_cluster, tmp_path):
    """The Ray worker running round 1 is SIGKILLed after its step-20 checkpoint: its trainer dies with it
    (PDEATHSIG), Ray retries the task, the round resumes from its checkpoint; no line lost or doubled."""
    d = tmp_path / "camp"
    settings = CampaignSettings(preset="cpu-smoke", overrides=tuple(SMOKE), controller="rules", memory="optuna")
    out: dict = {}

    def drive() -> None:
        try:
            with make_engine("ray", 2) as engine:
                out["recs"] = run_campaign(_cfg(), d, 2, settings, echo=lambda s: None, engine=engine)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            out["error"] = e

    t = threading.Thread(target=drive)
    t.start()
    run1 = d / "rounds" / "round_001"
    wait_until(lambda: (run1 / "checkpoints" / "step_000020.pt").exists(), 300, "round 1's step-20 checkpoint")
    trainers = wait_until(lambda: _launches(run1), 60, "round 1's trainer")
    (ppid, token), *_ = trainers.values()
    assert ppid not in (os.getpid(), 1)
    os.kill(ppid, signal.SIGKILL)  # the Ray worker process that runs round 1's supervisor
    wait_until(lambda: not any(tok == token for _, tok in _launches(run1).values()), 60, "the old trainer to die")
    t.join(600)
    assert not t.is_alive() and "error" not in out, out.get("error")
    finals = _check_logs(d, 2)
    rj = json.loads((run1 / "round.json").read_text())
    assert rj["resumed"] is True and rj["launches"] >= 2, rj
    assert finals[0]["update_step"] == 40


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_on_a_ray_start_head_cluster_ctrl_c_then_resume(tmp_path):
    """`ray start --head` on 127.0.0.1, then `lrpilot campaign --engine ray --ray-address HOST:PORT --parallel 2`:
    Ctrl-C while two rounds run exits 130 and leaves no trainer behind; the same command resumes both rounds
    and finishes 3 distinct rounds with strict logs."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray_tmp = Path(tempfile.mkdtemp(prefix="lrpray", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    log = (tmp_path / "head.log").open("wb")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "false",
         "--node-ip-address", "127.0.0.1", "--port", str(port), "--temp-dir", str(ray_tmp)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # for its workers too (see below)
    )  # fmt: skip
    # `ray start --block` prints its --block notice once the head node is up
    wait_until(lambda: head.poll() is not None or b"--block" in (tmp_path / "head.log").read_bytes(), 120, "head")
    assert head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
    d = tmp_path / "camp"
    cmd = [sys.executable, "-m", "lrpilot", "campaign", "--preset", "cpu-smoke", "--rounds", "3", "--dir", str(d),
           "--controller", "rules", "--memory", "optuna", "--parallel", "2", "--engine", "ray",
           "--ray-address", f"127.0.0.1:{port}", *[a for o in SMOKE for a in ("--set", o)]]  # fmt: skip
    try:
        drv = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            # SIGINT at its default: a shell that started the tests in the background ignores it, and an ignored
            # signal is inherited (POSIX), so the Ctrl-C and the cancel of the rounds would be lost
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        try:
            for r in (1, 2):
                ckpt = d / f"rounds/round_{r:03d}/checkpoints/step_000010.pt"
                wait_until(lambda c=ckpt: drv.poll() is not None or c.exists(), 300, f"round {r}'s checkpoint")
                assert drv.poll() is None, drv.stderr.read()[-2000:]
            drv.send_signal(signal.SIGINT)
            assert drv.wait(120) == 130, drv.stderr.read()[-2000:]
        finally:
            drv.kill()
        for r in (1, 2):
            wait_until(lambda r=r: not _launches(d / f"rounds/round_{r:03d}"), 60, f"round {r}'s trainer to die")
        rerun_at = time.time()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    _check_logs(d, 3)
    killed = _interrupted(d, rerun_at)
    assert killed
    for r in killed:
        assert json.loads((d / f"rounds/round_{r:03d}/round.json").read_text())["resumed"] is True


def _append_lines(path: str, who: int, n: int, size: int) -> None:
    from lrpilot.logs import JsonlLog

    with JsonlLog(path, fsync=False) as log:
        for i in range(n):
            log.append({"who": who, "i": i, "pad": "x" * size})


def test_jsonl_appends_from_several_processes_never_interleave(tmp_path):
    """The shared campaign logs are appended to by several round processes at once: O_APPEND and one write per
    line keep every line whole (lines of 9 kB, over two pages each, from 4 processes)."""
    import multiprocessing

    path = tmp_path / "shared.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_lines, args=(str(path), w, 200, 9000)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    recs = read_jsonl(path, strict=True)
    assert sorted((r["who"], r["i"]) for r in recs) == [(w, i) for w in range(4) for i in range(200)]


def test_a_retried_round_task_past_its_commit_point_writes_no_second_line(tmp_path):
    """A Ray task whose worker died after the round's final_results line is retried: it returns that line and
    neither trains again nor appends a second one."""
    from lrpilot.campaign import execute_round
    from lrpilot.logs import append_jsonl

    d = tmp_path / "camp"
    settings = CampaignSettings(preset="cpu-smoke", overrides=tuple(SMOKE), controller="rules", memory="none")
    append_jsonl(d / "final_results.jsonl", {"round": 1, "final_eval_ppl": 26.7, "status": "ok"})
    rec = execute_round(_cfg(), d, 1, settings, "", None, "2026-01-01T00:00:00", time.time())
    assert rec["final_eval_ppl"] == 26.7
    assert len(read_jsonl(d / "final_results.jsonl", strict=True)) == 1 and not (d / "rounds").exists()
