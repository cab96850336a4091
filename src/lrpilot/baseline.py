"""Baseline sweeps: a fixed schedule at several peak LRs, one result json per peak.

    lrpilot baseline --preset cpu-small --schedule cosine --peaks 1e-3 3e-3 1e-2 --out runs/sweep

A schedule is just another controller, so each baseline run goes through the same round supervisor, guard
and logs as an agent round. Results are written as `OUT/{schedule}_lr{peak}.json` with the published
study's fields (`final_eval_loss`, `final_eval_ppl`, `final_eval_tokens`, `update_step`, `seed`) plus the
LR and loss trajectories; each run's own directory is `OUT/runs/{schedule}_lr{peak}/`. Re-running the same
command skips peaks whose result already exists and resumes an interrupted one. Each run holds
`OUT/runs/{schedule}_lr{peak}/run.lock` while it runs: a second process on the same peak and --out is refused
in one line naming the first; other peaks are independent.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lrpilot.campaign_logs import fmt_lr
from lrpilot.config import RunConfig, check_same_config
from lrpilot.errors import writing
from lrpilot.locks import DirLock
from lrpilot.logs import write_json_atomic
from lrpilot.records import BaselineResult


def format_lr(lr: float) -> str:
    """Compact LR for file names, as the published logs spell them: 0.001 -> 1e-3, 0.0035 -> 3.5e-3
    (lrpilot.campaign_logs.fmt_lr with 6 significant digits at most, so that nearby peaks get their own file)."""
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"peak LR must be a positive number, got {lr!r}")
    return fmt_lr(float(lr), digits=6)


def result_path(out_dir: Path, schedule: str, peak: float) -> Path:
    return out_dir / f"{schedule}_lr{format_lr(peak)}.json"


def run_one(cfg: RunConfig, schedule: str, peak: float, out_dir: Path, preset: str = "") -> dict[str, Any]:
    """Run (or resume, or skip if done) one baseline run and write its result json. A peak outside the guard's
    [floor, ceiling], or a directory whose run was made with other settings, is refused (ConfigError)
    before anything is written or a stored result is returned. The run holds OUT/runs/NAME/run.lock
    (lrpilot.locks.DirLock): a second process on the same run is refused with DirInUseError naming the
    holder; runs of other peaks are independent."""
    from lrpilot.controllers.schedules import baseline_config

    out_dir = Path(out_dir)
    path = result_path(out_dir, schedule, peak)
    bcfg = baseline_config(cfg, schedule, peak)
    run_dir = out_dir / "runs" / path.stem
    check_same_config(run_dir / "config.json", bcfg)
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass  # renamed (kept for inspection) and run again, under the run's lock
    # one writer per run: a second process on the same peak (and --out) is refused, naming this one
    with DirLock(run_dir, what="another run", hint="wait for it to finish or use another --out/--dir"):
        return _run_locked(cfg, schedule, peak, path, run_dir, preset)


def _run_locked(cfg: RunConfig, schedule: str, peak: float, path: Path, run_dir: Path, preset: str) -> dict[str, Any]:
    from lrpilot.controllers.schedules import baseline_config, make_schedule
    from lrpilot.supervisor import RoundLogs, run_round

    if path.exists():  # finished by another process while this one was starting
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            with writing(path):
                path.rename(path.with_suffix(".json.corrupt"))  # keep it for inspection; run again
    bcfg = baseline_config(cfg, schedule, peak)
    controller = make_schedule(schedule, peak, bcfg)
    logs = RoundLogs(
        decisions=run_dir / "decisions.jsonl",
        rollbacks=run_dir / "rollbacks.jsonl",
        extra={"schedule": schedule, "peak_lr": peak},
    )
    res = run_round(bcfg, run_dir, controller, logs, resume=True)  # a used run dir is resumed
    record = {
        "final_eval_loss": res.final_eval_loss,
        "final_eval_ppl": res.final_eval_ppl,
        "final_eval_tokens": res.final_eval_tokens,
        "update_step": res.update_step,
        "seed": bcfg.train.seed,
        "schedule": schedule,
        "peak_lr": peak,
        "peak_lr_seen": res.peak_lr_seen,
        "min_lr_seen": res.min_lr_seen,
        "preset": preset or cfg.name,
        "status": res.status,
        "diverged": res.status != "ok" or not math.isfinite(res.final_eval_ppl),
        "crash_count": res.crash_count,
        "wall_time_s": res.wall_time_s,
        "total_steps": bcfg.train.total_steps,
        "warmup_steps": bcfg.schedule.warmup_steps,
        "run_start_iso": res.run_start_iso,
        "lr_trajectory": [list(p) for p in res.lr_trajectory],
        "loss_trajectory": [list(p) for p in res.loss_trajectory],
    }
    record = BaselineResult.from_dict(record).to_dict()  # the schema's types checked before it is written
    write_json_atomic(path, record)
    return record


def run_sweep(
    cfg: RunConfig,
    schedule: str,
    peaks: list[float],
    out_dir: Path,
    jobs: int = 1,
    preset: str = "",
    engine: Any = None,
) -> list[dict[str, Any]]:
    """Run a sweep over peaks; `jobs` runs execute at once (each trainer uses train.num_threads). engine
    (lrpilot.engine, e.g. RayEngine): each peak a task there, engine.slots at once, instead of this process's
    threads; results in the order of `peaks`."""
    from lrpilot.controllers.schedules import baseline_config, make_schedule

    make_schedule(schedule, peaks[0], cfg)  # fail fast on an unknown schedule name
    for p in peaks:  # and on a peak the guard would not allow, before any run starts
        baseline_config(cfg, schedule, p)
    out_dir = Path(out_dir)
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    if engine is not None:
        from lrpilot.engine import run_each

        by_peak = {
            p: fut.result() for p, fut in run_each(engine, _run_peak, list(peaks), cfg, schedule, out_dir, preset)
        }
        return [by_peak[p] for p in peaks]
    if jobs <= 1:
        return [run_one(cfg, schedule, p, out_dir, preset) for p in peaks]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda p: run_one(cfg, schedule, p, out_dir, preset), peaks))


def _run_peak(peak: float, cfg: RunConfig, schedule: str, out_dir: Path, preset: str) -> dict[str, Any]:
    """run_one with the peak first (lrpilot.engine.run_each's calling convention)."""
    return run_one(cfg, schedule, peak, out_dir, preset)


def sweep_table(records: list[dict[str, Any]]) -> str:
    """A plain-text table of a sweep, best first marked."""
    ok = [r for r in records if math.isfinite(float(r.get("final_eval_ppl", math.nan)))]
    best = min(ok, key=lambda r: r["final_eval_ppl"]) if ok else None
    lines = [f"{'schedule':<9} {'peak_lr':>9} {'eval_loss':>9} {'eval_ppl':>9} {'crashes':>7} {'wall_s':>7}  note"]
    for r in sorted(records, key=lambda r: r["peak_lr"]):
        note = "best" if r is best else ("diverged" if r.get("diverged") else "")
        lines.append(
            f"{r['schedule']:<9} {r['peak_lr']:>9.2e} {float(r['final_eval_loss']):>9.4f} "
            f"{float(r['final_eval_ppl']):>9.3f} {r.get('crash_count', 0):>7} {float(r.get('wall_time_s', 0)):>7.0f}  {note}"
        )
    return "\n".join(lines)
