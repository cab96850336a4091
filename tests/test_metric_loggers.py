"""wandb and TensorBoard across a rollback: one wandb run per round (resumed by id), metrics at the training step.

    WANDB_MODE=offline python -m pytest -q tests/test_metric_loggers.py

A real trainer under the supervisor, a real NaN at step 35, a real relaunch from the checkpoint at step 20;
wandb runs offline (nothing leaves the machine) and its transaction log is read back here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from lrpilot.config import load_config
from lrpilot.controllers.schedules import ConstantController
from lrpilot.supervisor import RoundLogs, run_round

BLOCK = 32768  # wandb's .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) + payload


def wandb_records(path: Path):
    """The protobuf Records of an offline run's run-<id>.wandb file (7-byte ':W&B' header, then log records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4) and buf:  # FULL or LAST fragment: a whole record
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


@pytest.mark.slow
def test_wandb_and_tensorboard_keep_one_run_across_a_rollback(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="needs the `wandb` extra (pip install 'lrpilot[wandb]')")
    pytest.importorskip("tensorboard", reason="needs the `tensorboard` extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config("cpu-smoke", ["train.loggers=wandb,tensorboard"])
    run = tmp_path / "run"
    logs = RoundLogs(tmp_path / "decisions.jsonl", tmp_path / "rollbacks.jsonl")
    res = run_round(cfg, run, ConstantController(3e-3, 60, 10), logs,
                    trainer_args_first_launch=["--inject-nan-at-step", "35"])  # fmt: skip
    assert res.status == "ok" and res.crash_count == 1
    to = json.loads((tmp_path / "rollbacks.jsonl").read_text().splitlines()[0])["rolled_back_to_step"]
    assert 0 < to < 35
    run_id = (run / "wandb_id").read_text().strip()
    launches = sorted((run / "wandb").glob("offline-run-*"))
    assert len(launches) == 2 and all(d.name.endswith(f"-{run_id}") for d in launches)
    branches = []
    for d in launches:
        steps, ids = [], set()
        for rec in wandb_records(d / f"run-{run_id}.wandb"):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids.add(rec.run.run_id)
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                if "train/loss" in row:
                    steps.append(row["train/step"])
        # one wandb run, resumed; the killed first launch may have had nothing flushed yet (a loaded machine)
        assert ids == {run_id} or (d == launches[0] and not ids), ids
        branches.append(steps)
    first, second = branches
    assert second, "the relaunch logged nothing"
    # each launch logged the steps it trained, at the training step: from 1 until the NaN (what wandb had
    # written when the supervisor killed the launch's process group), then to+1..60 after the rollback
    assert first == list(range(1, len(first) + 1)) and len(first) <= 40, first
    assert second == list(range(to + 1, 61))
    tb = EventAccumulator(str(run / "tensorboard"))
    tb.Reload()
    tb_steps = [e.step for e in tb.Scalars("train/loss")]
    assert set(tb_steps) == set(range(1, 61)) and tb_steps.count(to + 1) == 2  # the redone branch is there too
