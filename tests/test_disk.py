"""A full or read-only disk: one line (`lrpilot: error: cannot write FILE (No space left on device); free space and
run the same command again`), exit 2, for every command that writes; a failed write in the trainer is never a
training crash (no rollback, no LR change); no temporary file is left behind; nothing already written is lost;
and the same command, once there is room again, resumes to the result of an undisturbed run.

Where this machine lets root mount a small tmpfs, the disk is a real one (size-limited, or remounted read-only);
the same checks also always run with the fault-injection hook LRPILOT_INJECT_WRITE_ERROR=ERRNO:BYTES.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lrpilot import logs
from lrpilot.checkpoint import list_checkpoints, save_checkpoint
from lrpilot.errors import DiskWriteError
from lrpilot.logs import JsonlLog, read_jsonl, write_atomic

SEED = Path(__file__).parent / "data" / "seed-experiments"
SMOKE = ["--set", "train.total_steps=40"]
RUN = ["baseline", "--preset", "cpu-smoke", *SMOKE, "--peaks", "3e-3"]
ENOSPC_LINE = "(No space left on device); free space and run the same command again"
EROFS_LINE = "(Read-only file system); make it writable (or choose another directory) and run the same command again"


def _lrpilot(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrpilot", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})  # fmt: skip


def _one_line_error(r: subprocess.CompletedProcess, where: Path, tail: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip()
    assert line.startswith(f"lrpilot: error: cannot write {where}") and line.endswith(tail), line
    return line


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name or ".write-probe" in p.name]


def _inject(monkeypatch, spec: str) -> None:
    monkeypatch.setenv(logs.INJECT_WRITE_ERROR_ENV, spec)
    monkeypatch.setattr(logs, "_inject_left", [])  # parse the hook again in this process


# ------------------------------------------------------------------------------------ a real small disk


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(size) -> a fresh tmpfs of that size (skipped where mounting is not permitted)."""
    mounted: list[Path] = []

    def mount(size: str, name: str = "disk") -> Path:
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a tmpfs needs root")
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here ({r.stderr.decode().strip()[:100]})")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _remount_ro(d: Path) -> None:
    r = subprocess.run(["mount", "-o", "remount,ro", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"remounting read-only is not permitted here ({r.stderr.decode().strip()[:100]})")


def _fill(d: Path, leave: int) -> Path:
    """A file that leaves `leave` bytes free on d's filesystem."""
    st = os.statvfs(d)
    free = st.f_bavail * st.f_frsize
    filler = d / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave))
    return filler


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The undisturbed run's result (cpu-smoke is deterministic on CPU)."""
    out = tmp_path_factory.mktemp("reference")
    r = _lrpilot(*RUN, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((out / "cosine_lr3e-3.json").read_text())


def _check_stopped_cleanly(out: Path) -> list[str]:
    """After the disk refused a write mid-run: no result, no rollback or relaunch (so no LR change), no torn
    log line, no temporary file. Returns the telemetry lines written so far."""
    run_dir = out / "runs" / "cosine_lr3e-3"
    assert not (out / "cosine_lr3e-3.json").exists() and not (run_dir / "result.json").exists()
    assert not (run_dir / "rollbacks.jsonl").exists() or not read_jsonl(run_dir / "rollbacks.jsonl", strict=True)
    for log in run_dir.glob("*.jsonl"):
        read_jsonl(log, strict=True)  # every line whole
    tele = read_jsonl(run_dir / "telemetry.jsonl", strict=True)
    assert [e["event"] for e in tele].count("start") == 1  # never relaunched at half the LR
    assert any(e["event"] == "checkpoint" for e in tele)  # it did get some way
    assert not _temp_files(out), _temp_files(out)
    return (run_dir / "telemetry.jsonl").read_text().splitlines()


def _check_resumed(out: Path, before: list[str], reference: dict, r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out / "cosine_lr3e-3.json").read_text())
    assert rec["status"] == "ok" and rec["crash_count"] == 0
    assert rec["final_eval_loss"] == pytest.approx(reference["final_eval_loss"], rel=1e-6, abs=1e-9)
    after = (out / "runs" / "cosine_lr3e-3" / "telemetry.jsonl").read_text().splitlines()
    assert after[: len(before)] == before  # nothing already written was lost
    assert not _temp_files(out)


@pytest.mark.slow
def test_disk_full_mid_run_stops_in_one_line_and_resumes_to_the_same_result(mount_tmpfs, reference):
    disk = mount_tmpfs("16m")
    out = disk / "sweep"
    filler = _fill(disk, leave=1_250_000)  # two 0.49 MB checkpoints fit, the third does not
    r = _lrpilot(*RUN, "--out", str(out))
    _one_line_error(r, out, ENOSPC_LINE)
    before = _check_stopped_cleanly(out)
    filler.unlink()  # free space, run the same command again
    _check_resumed(out, before, reference, _lrpilot(*RUN, "--out", str(out)))


@pytest.mark.slow
def test_injected_write_failure_mid_run_stops_in_one_line_and_resumes(tmp_path, reference):
    out = tmp_path / "sweep"
    # each process may write 1.2 MB: the trainer's third checkpoint is refused (the supervisor writes far less)
    r = _lrpilot(*RUN, "--out", str(out), env={logs.INJECT_WRITE_ERROR_ENV: "ENOSPC:1200000"})
    line = _one_line_error(r, out / "runs" / "cosine_lr3e-3" / "checkpoints" / "step_000030.pt", ENOSPC_LINE)
    assert "step_000030.pt" in line
    before = _check_stopped_cleanly(out)
    _check_resumed(out, before, reference, _lrpilot(*RUN, "--out", str(out)))


@pytest.mark.slow
def test_injected_write_failure_mid_round_of_a_campaign_is_not_a_crash(tmp_path):
    d = tmp_path / "camp"
    cmd = ["campaign", "--preset", "cpu-smoke", *SMOKE, "--rounds", "1", "--controller", "rules", "--dir", str(d)]
    r = _lrpilot(*cmd, env={logs.INJECT_WRITE_ERROR_ENV: "ENOSPC:1200000"})
    _one_line_error(r, d / "rounds" / "round_001" / "checkpoints" / "step_000030.pt", ENOSPC_LINE)
    assert not (d / "rollbacks.jsonl").exists() and not (d / "final_results.jsonl").exists()
    assert not _temp_files(d)
    again = _lrpilot(*cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    (rec,) = read_jsonl(d / "final_results.jsonl", strict=True)
    assert rec["status"] == "ok" and rec["crash_count"] == 0 and rec["update_step"] == 40
    assert not (d / "rollbacks.jsonl").exists()


@pytest.mark.slow
def test_injected_write_failure_under_torchrun_is_not_a_crash(tmp_path):
    """torchrun hides the trainer's exit code (it exits 1): the supervisor still finds the trainer's own line."""
    out = tmp_path / "sweep"
    run = [*RUN, "--set", "launch.devices=cpu:2", "--out", str(out)]
    r = _lrpilot(*run, env={logs.INJECT_WRITE_ERROR_ENV: "ENOSPC:1200000"})
    _one_line_error(r, out / "runs" / "cosine_lr3e-3" / "checkpoints" / "step_000030.pt", ENOSPC_LINE)
    _check_stopped_cleanly(out)
    again = _lrpilot(*run)
    assert again.returncode == 0, again.stderr[-3000:]
    rec = json.loads((out / "cosine_lr3e-3.json").read_text())
    assert rec["status"] == "ok" and rec["crash_count"] == 0 and rec["update_step"] == 40


def _commands(target: Path, published: Path) -> dict[str, list[str]]:
    smoke = ["--preset", "cpu-smoke", *SMOKE]
    return {
        "campaign": ["campaign", *smoke, "--rounds", "1", "--controller", "rules", "--dir", str(target)],
        "baseline": ["baseline", *smoke, "--peaks", "3e-3", "--out", str(target)],
        "train": ["train", *smoke, "--dir", str(target)],
        "report": ["report", str(published), "--out", str(target)],
        "import-logs": ["import-logs", str(SEED), "--dir", str(target)],
    }


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("published") / "campaign"
    r = _lrpilot("import-logs", str(SEED), "--dir", str(d))
    assert r.returncode == 0, r.stderr
    return d


COMMANDS = ["campaign", "baseline", "train", "report", "import-logs"]


@pytest.mark.parametrize("command", COMMANDS)
def test_read_only_disk_is_one_line(mount_tmpfs, published, command):
    disk = mount_tmpfs("4m")
    (disk / "existing").mkdir()
    _remount_ro(disk)
    for target in (disk / "new", disk / "existing"):
        r = _lrpilot(*_commands(target, published)[command])
        _one_line_error(r, target, EROFS_LINE)


@pytest.mark.parametrize("command", COMMANDS)
def test_injected_read_only_disk_is_one_line(tmp_path, published, command):
    target = tmp_path / "out"
    r = _lrpilot(*_commands(target, published)[command], env={logs.INJECT_WRITE_ERROR_ENV: "EROFS:0"})
    _one_line_error(r, target, EROFS_LINE)
    assert not _temp_files(tmp_path)


# ------------------------------------------------------------------------------------ the writers themselves


def test_a_refused_log_line_leaves_nothing_and_the_log_goes_on(tmp_path, monkeypatch):
    log = JsonlLog(tmp_path / "x.jsonl")
    log.append({"a": 1})
    _inject(monkeypatch, "ENOSPC:40")
    with pytest.raises(DiskWriteError, match=r"cannot write .*x\.jsonl \(No space left on device\); free space"):
        log.append({"b": "y" * 100})
    assert (tmp_path / "x.jsonl").read_bytes() == b'{"a":1}\n'
    monkeypatch.setattr(logs, "_inject_left", [None, 0])  # room again
    log.append({"c": 3})
    log.close()
    assert read_jsonl(tmp_path / "x.jsonl", strict=True) == [{"a": 1}, {"c": 3}]


def test_a_refused_atomic_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    p = tmp_path / "r.json"
    write_atomic(p, b"old\n")
    _inject(monkeypatch, "ENOSPC:0")
    with pytest.raises(DiskWriteError, match="r.json"):
        write_atomic(p, b"new\n")
    assert p.read_bytes() == b"old\n" and sorted(x.name for x in tmp_path.iterdir()) == ["r.json"]


def test_a_checkpoint_on_a_full_disk_is_a_disk_error_without_temp_files(mount_tmpfs):
    torch = pytest.importorskip("torch")
    disk = mount_tmpfs("2m")
    state = {"w": torch.zeros(1 << 17), "lr": 1e-3}  # 0.5 MB each
    save_checkpoint(disk, 10, state)
    save_checkpoint(disk, 20, state)
    with pytest.raises(DiskWriteError, match=r"step_0000[3-9]0\.pt \(No space left on device\)") as e:
        for step in range(30, 100, 10):
            save_checkpoint(disk, step, state)
    failed = int(str(e.value).split("step_")[1][:6])
    assert [c.step for c in list_checkpoints(disk) if c.complete] == list(range(10, failed, 10))  # all intact
    assert not _temp_files(disk)


def test_the_temp_names_of_two_writers_differ(tmp_path):
    assert logs.temp_name(tmp_path / "a") != logs.temp_name(tmp_path / "a")
