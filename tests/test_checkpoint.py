"""Checkpoints: atomic save with sidecar, corruption detection, fingerprints and pruning.

python -m pytest -q tests/test_checkpoint.py
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from lrpilot.checkpoint import (
    FORMAT,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    sidecar_path,
    verify_checkpoint,
)
from lrpilot.config import load_config


def _state(step: int, fp: str = "abc") -> dict:
    return {
        "format": FORMAT,
        "fingerprint": fp,
        "step": step,
        "lr": 1e-3 * step,
        "model": {"w": torch.arange(64, dtype=torch.float32) * step},
    }


def test_save_list_load_round_trip(tmp_path):
    p = save_checkpoint(tmp_path, 30, _state(30))
    assert p.name == "step_000030.pt" and sidecar_path(p).exists()
    assert not list(p.parent.glob("*.tmp*"))
    [info] = list_checkpoints(tmp_path)
    assert (info.step, info.complete, info.lr) == (30, True, pytest.approx(0.03))
    assert verify_checkpoint(p) is None
    state = load_checkpoint(p, fingerprint="abc")
    assert torch.equal(state["model"]["w"], torch.arange(64, dtype=torch.float32) * 30)


def test_truncated_file_is_detected(tmp_path):
    p = save_checkpoint(tmp_path, 10, _state(10))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert "truncated" in verify_checkpoint(p)
    assert not list_checkpoints(tmp_path)[0].complete
    with pytest.raises(CheckpointError, match=r"step_000010\.pt.*truncated"):
        load_checkpoint(p)


def test_bit_flip_is_detected(tmp_path):
    p = save_checkpoint(tmp_path, 10, _state(10))
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    assert list_checkpoints(tmp_path)[0].complete  # same size: only the hash can tell
    assert "checksum mismatch" in verify_checkpoint(p)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(p)


def test_missing_sidecar_means_incomplete(tmp_path):
    p = save_checkpoint(tmp_path, 10, _state(10))
    save_checkpoint(tmp_path, 20, _state(20))
    sidecar_path(p).unlink()
    infos = list_checkpoints(tmp_path)
    assert [(c.step, c.complete) for c in infos] == [(10, False), (20, True)]
    assert "no sidecar" in infos[0].reason
    assert latest_checkpoint(tmp_path).step == 20
    with pytest.raises(CheckpointError, match="no sidecar"):
        load_checkpoint(p)


def test_missing_file_and_non_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="file not found"):
        load_checkpoint(tmp_path / "checkpoints" / "step_000001.pt")
    p = save_checkpoint(tmp_path, 5, {"just": torch.zeros(2)})  # valid file, but not our format
    with pytest.raises(CheckpointError, match="not an lrpilot checkpoint"):
        load_checkpoint(p)


def test_garbage_with_a_matching_sidecar_is_not_a_checkpoint(tmp_path):
    p = save_checkpoint(tmp_path, 5, _state(5))
    p.write_bytes(b"x" * p.stat().st_size)
    sidecar = sidecar_path(p)
    import hashlib
    import json

    meta = json.loads(sidecar.read_text())
    meta["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(p)


def test_fingerprint_mismatch_is_refused(tmp_path):
    p = save_checkpoint(tmp_path, 5, _state(5, fp="model-a"))
    with pytest.raises(CheckpointError, match="different model/data config"):
        load_checkpoint(p, fingerprint="model-b")


def test_resave_of_a_step_replaces_the_pair(tmp_path):
    save_checkpoint(tmp_path, 5, _state(5))
    p = save_checkpoint(tmp_path, 5, _state(6))
    assert load_checkpoint(p)["step"] == 6


def test_pruning_keeps_newest_and_one_old_enough_for_rollback(tmp_path):
    for step in range(10, 110, 10):
        save_checkpoint(tmp_path, step, _state(step), keep=3, retain_back_steps=50)
    steps = [c.step for c in list_checkpoints(tmp_path)]
    # keep=3 is too small for a 50-step rollback: the window (50, 100] and the newest at or before 50 stay
    assert steps == [50, 60, 70, 80, 90, 100]
    for step in range(110, 130, 10):
        save_checkpoint(tmp_path, step, _state(step), keep=3, retain_back_steps=20)
    assert [c.step for c in list_checkpoints(tmp_path)] == [100, 110, 120]
    save_checkpoint(tmp_path, 130, _state(130), keep=3)
    assert [c.step for c in list_checkpoints(tmp_path)] == [110, 120, 130]


def test_pruning_removes_stale_incomplete_and_temp_files(tmp_path):
    old = save_checkpoint(tmp_path, 10, _state(10))
    sidecar_path(old).unlink()
    (old.parent / "step_000015.pt.tmp99999999").write_bytes(b"partial")
    save_checkpoint(tmp_path, 20, _state(20), keep=2)
    assert sorted(x.name for x in old.parent.iterdir()) == ["step_000020.json", "step_000020.pt"]


@pytest.mark.parametrize("preset", ["cpu-smoke", "cpu-small", "llama_60m"])
def test_presets_keep_enough_checkpoints_for_a_rollback(preset):
    cfg = load_config(preset)
    every = cfg.checkpoint_every
    needed = -(-cfg.guard.rollback_back_steps // every) + 2
    assert cfg.checkpoint.keep >= needed, f"{preset}: checkpoint.keep {cfg.checkpoint.keep} < {needed}"


def _write_unchecked(tmp_path, step: int, state: dict):
    """A checkpoint as an older lrpilot wrote it: no finiteness check, sidecar without `finite`."""
    p = save_checkpoint(tmp_path, step, _state(step))
    torch.save(state, p)
    meta = json.loads(sidecar_path(p).read_text())
    meta.pop("finite", None)
    meta.update(sha256=hashlib.sha256(p.read_bytes()).hexdigest(), bytes=p.stat().st_size)
    sidecar_path(p).write_text(json.dumps(meta))
    return p


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_non_finite_state_is_never_written_nor_loaded(tmp_path, where):
    """Issue 9.1: a state with a NaN/Inf in the weights or the optimizer moments is no checkpoint."""
    bad = _state(10)
    if where == "model":
        bad["model"]["w"][3] = float("nan")
    else:
        bad["optimizer"] = {"state": {0: {"exp_avg_sq": torch.tensor([1.0, float("inf")])}}, "param_groups": []}
    with pytest.raises(CheckpointError, match=f"step 10 not written: non-finite values in {where}"):
        save_checkpoint(tmp_path, 10, bad)
    assert list_checkpoints(tmp_path) == [] and not list((tmp_path / "checkpoints").glob("*"))
    good = save_checkpoint(tmp_path, 20, _state(20))
    assert json.loads(sidecar_path(good).read_text())["finite"] is True
    # written by an older version: the hash matches, but loading refuses it
    old = _write_unchecked(tmp_path, 30, bad)
    assert verify_checkpoint(old) is None
    with pytest.raises(CheckpointError, match="step_000030.pt: non-finite values in"):
        load_checkpoint(old, fingerprint="abc")


def test_sidecar_saying_non_finite_makes_the_checkpoint_unusable(tmp_path):
    p = save_checkpoint(tmp_path, 10, _state(10))
    meta = json.loads(sidecar_path(p).read_text())
    sidecar_path(p).write_text(json.dumps({**meta, "finite": False}))
    [info] = list_checkpoints(tmp_path)
    assert not info.complete and "non-finite" in info.reason
    assert "non-finite" in verify_checkpoint(p)
