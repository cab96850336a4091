"""Per-step overhead of lrpilot.Pilot in a plain PyTorch loop on cpu-small's model (goal: ratio <= 1.01).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pilot_overhead.py --steps 150 --blocks 4
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pilot_overhead.py --preset cpu-smoke --steps 200   # the examples' model

Two identical loops (same model, data and AdamW as cpu-small, one torch thread): one sets nothing, the other
calls `pilot.step(loss, grad_norm)` after every update with everything on (rules controller, decisions every
cpu-small's 50 steps, telemetry/decision logs in a temporary run directory, in-memory snapshots of model +
optimizer every 50 steps). They run in alternating blocks of --steps updates so drifts of a shared machine hit
both alike. Prints CPU seconds per step (time.process_time: this process only) of each, and the ratio of the
means (every snapshot, decision and log line counted) and of the medians (a typical step). On a loaded machine
the two arms differ by a few % either way from noise alone; the direct ratio (the CPU time spent inside
pilot.step, measured around the call, over the plain loop's step) is the pilot's own cost.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from lrpilot.config import load_config
from lrpilot.data import build_data
from lrpilot.model import LLaMA
from lrpilot.pilot import Pilot
from lrpilot.trainer import make_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150, help="updates per block")
    ap.add_argument("--blocks", type=int, default=4, help="blocks per arm, alternating")
    ap.add_argument("--preset", default="cpu-small", help="model, data and schedule of this preset (cpu-small)")
    args = ap.parse_args()
    cfg = load_config(args.preset)
    torch.set_num_threads(1)
    data = build_data(cfg.data, cfg.train.seed)
    bs = cfg.train.batch_size
    total = args.steps * args.blocks

    def arm(with_pilot: bool, run_dir: str):
        torch.manual_seed(cfg.train.seed)
        model = LLaMA(cfg.model)
        opt = make_optimizer(cfg, list(model.parameters()))
        pilot = None
        if with_pilot:
            s = cfg.schedule
            pilot = Pilot(opt, controller="rules", total_steps=total, warmup_steps=s.warmup_steps, init_lr=s.init_lr,
                          decision_every=s.decision_every, guard=cfg.guard, run_dir=run_dir, model=model)  # fmt: skip
        return model, opt, pilot, {"t": 0, "times": [], "in_pilot": []}

    def block(model, opt, pilot, st) -> None:
        for _ in range(args.steps):
            t0 = time.process_time()
            x, y = data.train_batch(st["t"], 0, bs)
            _, loss = model(x, y)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if pilot is not None:
                t1 = time.process_time()
                pilot.step(loss.item(), gn.item())
                st["in_pilot"].append(time.process_time() - t1)
            else:
                loss.item(), gn.item()  # the plain loop logs its loss too
            st["t"] += 1
            st["times"].append(time.process_time() - t0)

    with tempfile.TemporaryDirectory() as d:
        plain, piloted = arm(False, d), arm(True, d)
        for b in range(args.blocks):
            for a in (plain, piloted) if b % 2 == 0 else (piloted, plain):
                block(*a)
        piloted[2].finish()
    tp, tq = plain[3]["times"], piloted[3]["times"]
    mean_p, mean_q = statistics.fmean(tp), statistics.fmean(tq)
    med_p, med_q = statistics.median(tp), statistics.median(tq)
    print(f"steps per arm: {len(tp)} ({args.preset} model, batch {bs}, seq {cfg.data.seq_len}, 1 thread)")
    print(f"plain loop : mean {mean_p * 1e3:.2f} ms/step, median {med_p * 1e3:.2f} ms/step")
    print(f"with pilot : mean {mean_q * 1e3:.2f} ms/step, median {med_q * 1e3:.2f} ms/step")
    inside = statistics.fmean(piloted[3]["in_pilot"])
    print(f"ratio      : mean {mean_q / mean_p:.4f}, median {med_q / med_p:.4f}  (goal <= 1.01; both arms' noise)")
    print(
        f"in pilot.step: mean {inside * 1e3:.3f} ms/step (snapshots, decisions, logs) -> direct ratio "
        f"{(mean_p + inside) / mean_p:.4f} = 1 + time inside the pilot / the plain loop's step"
    )


if __name__ == "__main__":
    main()
