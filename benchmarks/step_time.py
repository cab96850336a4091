"""Time per training step of a preset on one torch thread, to size a bench (docs/bench/README.md).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_time.py --preset cpu-bpe --steps 100

Builds the preset's data, model and AdamW exactly as the trainer does (1 thread, fp32 on CPU), runs `--steps`
updates after 5 warm-up updates, and prints the CPU seconds (time.process_time: this process only, so other
jobs on a shared machine inflate it far less than wall time) and wall seconds per step, the final eval's
seconds, and the extrapolation to the preset's train.total_steps. The trainer's own overhead (process start,
telemetry, checkpoints every decision_every steps) is not included: add ~10-20 s per run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lrpilot.config import load_config
from lrpilot.data import build_data, evaluate
from lrpilot.model import LLaMA
from lrpilot.trainer import make_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-bpe")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    cfg = load_config(args.preset, args.overrides)
    torch.set_num_threads(1)
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg.data, cfg.train.seed)
    model = LLaMA(cfg.model)
    params = list(model.parameters())
    opt = make_optimizer(cfg, params)
    bs = cfg.train.batch_size

    def step(s: int) -> None:
        x, y = data.train_batch(s, 0, bs)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for s in range(5):
        step(s)
    c0, w0 = time.process_time(), time.perf_counter()
    for s in range(5, 5 + args.steps):
        step(s)
    cpu, wall = (time.process_time() - c0) / args.steps, (time.perf_counter() - w0) / args.steps
    c1 = time.process_time()
    evaluate(model, data, cfg.eval.tokens, cfg.eval.batch_size, torch.device("cpu"))
    ev = time.process_time() - c1
    total = cfg.train.total_steps
    print(
        json.dumps(
            {
                "preset": args.preset,
                "params": model.num_parameters(),
                "steps_timed": args.steps,
                "cpu_s_per_step": round(cpu, 4),
                "wall_s_per_step": round(wall, 4),
                "eval_cpu_s": round(ev, 1),
                "total_steps": total,
                "run_cpu_min_estimate": round((total * cpu + ev) / 60, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
