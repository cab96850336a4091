"""Issue 9.1's race, run many times: a NaN at step 5 and a checkpoint due at step 5 (not a timed test).

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/nan_checkpoint_race.py [--runs 20] [--dir /tmp/race]

Each run is a real cpu-smoke round (`--set checkpoint.every=5`) under the supervisor with a NaN injected at
step 5 on the first launch only, as tests/test_supervisor.py injects. The trainer emits the NaN step event
and then reaches its step-5 checkpoint; the supervisor kills it when it reads the NaN. Before the fix,
whenever the trainer's write won (2 of 5 runs), the guard rolled back to the NaN'd step_000005.pt and the
round failed. A run fails here if the round did not end ok or any rollback landed at or after step 5.
Prints one line per run and a summary; exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from lrpilot.config import load_config
from lrpilot.controllers.schedules import ConstantController
from lrpilot.logs import read_jsonl
from lrpilot.supervisor import RoundLogs, run_round


def one_run(root: Path) -> tuple[bool, str]:
    cfg = load_config("cpu-smoke", ["checkpoint.every=5"])
    ctrl = ConstantController(cfg.schedule.init_lr, cfg.train.total_steps, cfg.schedule.warmup_steps)
    logs = RoundLogs(decisions=root / "decisions.jsonl", rollbacks=root / "rollbacks.jsonl")
    res = run_round(cfg, root / "run", ctrl, logs, trainer_args_first_launch=["--inject-nan-at-step", "5"])
    rbs = read_jsonl(root / "rollbacks.jsonl")
    targets = [rb.get("rolled_back_to_step") for rb in rbs]
    refused = [e["step"] for e in read_jsonl(root / "run" / "telemetry.jsonl") if e["event"] == "checkpoint_refused"]
    ok = res.status == "ok" and all(isinstance(t, int) and t < 5 for t in targets)
    return ok, (
        f"status {res.status}, crashes {res.crash_count}, rolled back to {targets}, "
        f"trainer refused checkpoints at {refused or 'none (killed first)'}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20, help="how many rounds to run (default 20)")
    p.add_argument("--dir", default=None, help="where the rounds go (default: a temporary directory)")
    args = p.parse_args(argv)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="nan-race-"))
    failures = 0
    for i in range(1, args.runs + 1):
        ok, text = one_run(base / f"run_{i:02d}")
        failures += not ok
        print(f"run {i:2d}: {'ok  ' if ok else 'FAIL'} {text}", flush=True)
    print(f"nan checkpoint race: {failures} failures in {args.runs} runs ({base})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
