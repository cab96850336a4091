"""lrpilot.Pilot on several processes: real torchrun (gloo, 2 CPU processes) running examples/plain_torch.py,
examples/hf_trainer.py (HF Trainer's DDP) and examples/lightning.py (Lightning's DDP). Rank 0 alone decides and writes the logs; every rank uses the LR rank 0 broadcasts at every
update, and a NaN on rank 1 only rolls every rank back to the same snapshot.

    python -m pytest -q tests/test_pilot_distributed.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrpilot.logs import read_jsonl
from lrpilot.pilot import Pilot, PilotError

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LRPILOT_PILOT"):
        env.pop(k, None)
    return env


def _torchrun(example: str, *args: str) -> subprocess.CompletedProcess:
    from llm_servers import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "examples" / example), *args]  # fmt: skip
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)


def _one_set_of_logs(run: Path) -> list[dict]:
    """The run directory holds the logs of one writer (rank 0): one pid in the telemetry, one result line, no
    per-rank files but the test's LR records. Returns the telemetry's step events."""
    tel = read_jsonl(run / "telemetry.jsonl")
    assert len({e["launch"] for e in tel}) == 1, "more than one process wrote telemetry"
    assert len(read_jsonl(run / "final_results.jsonl")) == 1 and (run / "result.json").is_file()
    assert not (run / "snapshots").exists()
    return [e for e in tel if e["event"] == "step"]


def _lrs(run: Path) -> tuple[list[dict], list[dict]]:
    return read_jsonl(run / "lrs_rank_0.jsonl"), read_jsonl(run / "lrs_rank_1.jsonl")


@pytest.mark.slow
def test_torchrun_plain_loop_every_rank_uses_rank_0s_lr_and_rolls_back_with_it(tmp_path):
    run = tmp_path / "ddp"
    p = _torchrun("plain_torch.py", "--steps", "30", "--warmup", "5", "--decision-every", "5", "--dir", str(run),
                  "--inject-nan-at-step", "18", "--inject-nan-rank", "1", "--record-lrs")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    finals = [ln for ln in p.stdout.splitlines() if ln.startswith("final:")]
    assert len(finals) == 1 and finals[0].endswith("rollbacks 1"), p.stdout[-2000:]
    r0, r1 = _lrs(run)
    # the NaN was on rank 1 only; both ranks rolled back to the same snapshot (rewind: steps 11..18 again)
    assert [r["step"] for r in r0] == list(range(1, 19)) + list(range(11, 31))
    assert r0 == r1, "the ranks used different LRs"
    steps = _one_set_of_logs(run)
    assert [e["step"] for e in steps] == [r["step"] for r in r0]
    assert [e["lr"] for e in steps] == [r["lrs"][0] for r in r0]  # the LR the pilot set is the one used
    assert all(r["lrs"][1] == pytest.approx(r["lrs"][0] / 2, rel=1e-12) for r in r0)  # the groups' ratio
    (rb,) = read_jsonl(run / "rollbacks.jsonl")
    assert (rb["crash_step"], rb["crash_reason"], rb["rolled_back_to_step"]) == (18, "nan_loss", 10)
    assert (rb["undone_steps"], rb["next_step"], rb["step_numbering"]) == ([11, 18], 11, "rewind")
    assert [d["step"] for d in read_jsonl(run / "decisions.jsonl")] == [5, 10, 15, 15, 20, 25]


@pytest.mark.slow
@pytest.mark.parametrize("example", ["hf_trainer.py", "lightning.py"])
def test_torchrun_framework_every_rank_uses_rank_0s_lr(tmp_path, example):
    if example == "hf_trainer.py":
        pytest.importorskip("transformers")
        pytest.importorskip("accelerate")
    else:
        pytest.importorskip("lightning")
    run = tmp_path / "run"
    p = _torchrun(example, "--steps", "20", "--warmup", "4", "--decision-every", "4", "--dir", str(run),
                  "--inject-nan-at-step", "13", "--inject-nan-rank", "1", "--record-lrs")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert len([ln for ln in p.stdout.splitlines() if ln.startswith("final:")]) == 1
    r0, r1 = _lrs(run)
    # the framework's step counter goes on after the rollback: the pilot's steps are its (rewind=False)
    assert [r["step"] for r in r0] == list(range(1, 21))
    assert r0 == r1, "the ranks used different LRs"
    steps = _one_set_of_logs(run)
    assert [e["step"] for e in steps] == list(range(1, 21))
    assert [e["lr"] for e in steps] == [r["lrs"][0] for r in r0]
    (rb,) = read_jsonl(run / "rollbacks.jsonl")
    assert (rb["crash_step"], rb["rolled_back_to_step"]) == (13, 8)
    assert (rb["undone_steps"], rb["next_step"], rb["step_numbering"]) == ([9, 13], 14, "continue")
    assert r0[13]["lrs"][0] == pytest.approx(rb["new_lr"])  # update 14 used the halved LR on both ranks
    assert read_jsonl(run / "final_results.jsonl")[0]["update_step"] == 20


def test_distributed_settings_are_checked_in_one_line(monkeypatch):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(PilotError, match="distributed=True: torch.distributed is not initialised"):
        Pilot(opt, total_steps=10, controller="constant", distributed=True)
    assert Pilot(opt, total_steps=10, controller="constant").world == 1
    # launched by torchrun (its environment) but the process group never initialised: the first step says so
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    pilot = Pilot(opt, total_steps=10, controller="constant")
    assert (pilot.rank, pilot.world, pilot.writer) == (1, 2, False)
    with pytest.raises(PilotError, match="init_process_group"):
        pilot.step(1.0)
    assert Pilot(opt, total_steps=10, controller="constant", distributed=False).world == 1
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(PilotError, match=r"\$RANK=5"):
        Pilot(opt, total_steps=10, controller="constant")
