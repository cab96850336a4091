"""The pilot's overhead in the three examples (plain_torch, hf_trainer, lightning) as a ratio to the same example
without it, measured in the same command.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pilot_examples_overhead.py --steps 100 --repeats 2

Each example runs as a subprocess (as a user runs it) with the pilot (the rules controller, decisions every 10
updates, telemetry / decision logs, in-memory snapshots of model + optimizer) and with `--no-pilot` (the same model,
data and optimizer at a constant LR: plain_torch.py sets nothing, hf_trainer.py gives HF a constant LambdaLR and no
callback, lightning.py returns the bare optimizer). Each prints `train: N steps, W s wall, C s CPU` for its training
phase only (imports, data and evaluation excluded; Lightning builds the Pilot in configure_optimizers, inside
fit, so its one-time construction, the first snapshot included, counts there); the arms alternate (pilot first in even repeats) so a drift of
a shared machine hits both alike. Printed per example: CPU ms/step of each arm (time.process_time of the training
phase, summed over the repeats), the CPU ratio and the wall ratio, and the range of the CPU ratios of the
repeats' pairs (pilot run i / no-pilot run i: the noise). On a loaded machine several % either way is noise; run
more --repeats or more --steps for a tighter number. The plain loop alone, with the time spent inside
pilot.step() measured directly, is benchmarks/pilot_overhead.py.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("plain_torch.py", "hf_trainer.py", "lightning.py")
TRAIN_LINE = re.compile(r"^train: (\d+) steps, ([\d.]+) s wall, ([\d.]+) s CPU$", re.M)


def run_example(example: str, steps: int, run_dir: Path, pilot: bool) -> tuple[int, float, float]:
    """(steps, wall s, CPU s) of one run's training phase. Raises RuntimeError with the run's stderr tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get(
        "PYTHONPATH", "")}  # fmt: skip
    cmd = [sys.executable, str(ROOT / "examples" / example), "--steps", str(steps), "--dir", str(run_dir)]
    if not pilot:
        cmd.append("--no-pilot")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    m = TRAIN_LINE.search(p.stdout)
    if p.returncode != 0 or m is None:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr[-1500:]}")
    return int(m.group(1)), float(m.group(2)), float(m.group(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="optimizer updates per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per arm and example, alternating")
    ap.add_argument("--examples", default=",".join(EXAMPLES), help="comma-separated subset of " + ", ".join(EXAMPLES))
    args = ap.parse_args()
    print(f"{args.steps} steps per run, {args.repeats} run(s) per arm, 1 torch thread; CPU of the training phase")
    print(f"{'example':<16} {'no pilot ms/step':>17} {'pilot ms/step':>14} {'CPU ratio':>10} {'wall ratio':>11}  "
          "pairs' CPU ratios")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for example in [e.strip() for e in args.examples.split(",") if e.strip()]:
            sums = {True: [0, 0.0, 0.0], False: [0, 0.0, 0.0]}
            pairs = []
            for rep in range(args.repeats):
                per_step = {}
                for pilot in (True, False) if rep % 2 == 0 else (False, True):
                    d = Path(tmp) / f"{example}_{'pilot' if pilot else 'plain'}_{rep}"
                    n, wall, cpu = run_example(example, args.steps, d, pilot)
                    s = sums[pilot]
                    s[0], s[1], s[2] = s[0] + n, s[1] + wall, s[2] + cpu
                    per_step[pilot] = cpu / n
                pairs.append(per_step[True] / per_step[False])
            (n0, w0, c0), (n1, w1, c1) = sums[False], sums[True]
            print(f"{example:<16} {c0 / n0 * 1e3:>17.2f} {c1 / n1 * 1e3:>14.2f} {(c1 / n1) / (c0 / n0):>10.4f} "
                  f"{(w1 / n1) / (w0 / n0):>11.4f}  {min(pairs):.3f} .. {max(pairs):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
