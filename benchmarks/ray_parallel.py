"""Wall time of a campaign with parallel rounds against sequential, and the Ray engine's per-round overhead.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_parallel.py                 # 4 cpu-smoke rounds, 2 CPUs
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_parallel.py --rounds 4 --parallel 2 --reps 2

Runs the same campaign (rules controller, no memory, so every variant trains the same rounds) in fresh
directories, in this order per repetition:

  * `local x1`: the local engine, one round after another (lrpilot's default, `--parallel 1`);
  * `ray x1`:   the Ray engine, one round at a time (each round a Ray task): the engine's own cost per round;
  * `ray xK`:   the Ray engine, K rounds at once (`--parallel K`);
  * `local xK`: the local engine, K rounds at once (one child process per round).

Ray starts once (`ray.init(num_cpus=K)`, no dashboard), timed on its own line and left out of the variants' wall
times. Prints each variant's wall time, the speed-up of each xK against `local x1` (a ratio measured in the same
command: the only kind of speed number this repository asserts or reports), and the per-round overhead
(ray x1 - local x1) / rounds. A speed-up needs K free cores: on a machine shared with other jobs the ratio
drops towards 1 (say so when quoting it). Needs `lrpilot[ray]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from lrpilot.campaign import CampaignSettings, run_campaign
from lrpilot.config import load_config
from lrpilot.engine import LocalEngine, RayEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-smoke")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = load_config(args.preset, args.overrides)
    settings = CampaignSettings(preset=args.preset, overrides=tuple(args.overrides), controller="rules", memory="none")
    t = time.perf_counter()
    ray.init(num_cpus=args.parallel, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    print(f"ray.init(num_cpus={args.parallel}): {time.perf_counter() - t:.1f} s (once, not in the times below)")
    k = args.parallel
    variants = {
        "local x1": lambda: None,
        "ray x1": lambda: RayEngine(1),
        f"ray x{k}": lambda: RayEngine(k),
        f"local x{k}": lambda: LocalEngine(k),
    }
    walls: dict[str, list[float]] = {name: [] for name in variants}
    ppls: dict[str, list[float]] = {}
    root = Path(tempfile.mkdtemp(prefix="lrpilot_ray_bench_"))
    try:
        for rep in range(args.reps):
            for name, make in variants.items():
                d = root / f"{name.replace(' ', '_')}_{rep}"
                engine = make()
                t = time.perf_counter()
                recs = run_campaign(cfg, d, args.rounds, settings, echo=lambda s: None, engine=engine)
                walls[name].append(time.perf_counter() - t)
                ppls[name] = [round(float(r["final_eval_ppl"]), 4) for r in recs]
                print(f"  rep {rep + 1} {name:<9} {walls[name][-1]:6.1f} s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    med = {name: statistics.median(w) for name, w in walls.items()}
    base = med["local x1"]
    print(f"\n{args.rounds} rounds of {args.preset} ({cfg.train.total_steps} steps), {os.cpu_count()} CPUs here")
    print(f"{'variant':<9} {'wall s':>7} {'speed-up vs local x1':>21}")
    for name, w in med.items():
        print(f"{name:<9} {w:7.1f} {base / w:21.2f}")
    print(
        f"Ray engine overhead per round (ray x1 - local x1) / {args.rounds}: {(med['ray x1'] - base) / args.rounds:+.2f} s"
    )
    same = all(v == ppls["local x1"] for v in ppls.values())
    print(f"per-round final ppl identical across variants: {same} {ppls['local x1']}")


if __name__ == "__main__":
    main()
