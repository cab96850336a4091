"""Shared by the examples: lrpilot's cpu-smoke data as (input_ids, labels) windows, and the common flags."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch

from lrpilot.config import load_config
from lrpilot.data import build_data


def common_args(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer updates")
    p.add_argument("--dir", required=True, help="run directory (the pilot's logs, the framework's checkpoints)")
    p.add_argument("--controller", default="rules", help="rules | cosine | d2z | wsd | constant | llm | replay:PLAN")
    p.add_argument("--lr", type=float, default=3e-3, help="peak LR (the warmup's target)")
    p.add_argument("--warmup", type=int, default=10, help="warmup updates")
    p.add_argument("--decision-every", type=int, default=10, help="updates between decisions")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--checkpoint-every", type=int, default=0, help="the framework's checkpoint every N steps (0: off)")
    p.add_argument("--resume", default=None, help="the framework's checkpoint to resume from")
    p.add_argument("--inject-nan-at-step", type=int, default=None, help="testing: NaN loss at this step (once)")
    p.add_argument("--pause-at-step", type=int, default=None, help="testing: write DIR/paused and block there")
    p.add_argument("--no-pilot", action="store_true", help="the same run at a constant LR (the overhead bench)")
    p.add_argument("--inject-nan-rank", type=int, default=None, help="testing: under torchrun, the NaN on this rank")
    p.add_argument("--record-lrs", action="store_true", help="testing: each rank logs its LRs to DIR/lrs_rank_R.jsonl")
    return p


class Timer:
    """CPU and wall seconds of the training phase (`with Timer() as t: train()`), printed by the examples as
    `train: N steps, W s wall, C s CPU` (benchmarks/pilot_examples_overhead.py reads it)."""

    def __enter__(self) -> Timer:
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu, self.wall = time.process_time() - self.cpu0, time.perf_counter() - self.wall0

    def line(self, steps: int) -> str:
        return f"train: {steps} steps, {self.wall:.3f} s wall, {self.cpu:.3f} s CPU"


def rank() -> int:
    """This process's rank under torchrun ($RANK), else 0."""
    return int(os.environ.get("RANK", "0"))


def leave_process_group() -> None:
    """After a run that ended well: destroy torch.distributed's default process group, if the framework made one.
    Left to interpreter exit, gloo's worker threads can outlive it and the rank dies with SIGABRT ("terminate
    called without an active exception"; pytorch/pytorch#190489, and the shutdown section of the
    torch.distributed docs). A barrier first: gloo's barrier waits for this rank's pending work, so no rank tears
    the group down while the other still has an operation in flight with it (seen once under load: the HF
    example under torchrun hung at its end for 400 s). Not on an error path, where the other ranks may never
    reach the barrier."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def record_lrs(run_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> None:
    """Testing hook (--record-lrs): append the LR of every param group, read from the optimizer before update
    number `step` (1-based), to RUN/lrs_rank_R.jsonl (R = this process's rank)."""
    line = json.dumps({"step": step, "lrs": [g["lr"] for g in optimizer.param_groups]})
    with open(run_dir / f"lrs_rank_{rank()}.jsonl", "a", encoding="utf-8") as f:
        f.write(line + "\n")


def pause_here(run_dir: Path) -> None:
    """Testing hook: write RUN/paused (our pid) and wait until killed (the test sends SIGKILL)."""
    (run_dir / "paused").write_text(str(os.getpid()))
    while True:
        signal.pause()


class Windows(torch.utils.data.Dataset):
    """Byte windows of the embedded Shakespeare (cpu-smoke's data): item i is a pure function of i."""

    def __init__(self, n: int, seed: int = 0) -> None:
        cfg = load_config("cpu-smoke")
        self.data = build_data(cfg.data, seed)
        self.n = n
        self.seq_len = cfg.data.seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data.train_batch(i, 0, 1)
        ids = torch.cat([x[0], y[0, -1:]])
        return {"input_ids": ids, "labels": ids.clone()}

    def eval_items(self, tokens: int = 4096) -> list[dict[str, torch.Tensor]]:
        out = []
        for x, y in self.data.eval_batches(tokens, 1):
            ids = torch.cat([x[0], y[0, -1:]])
            out.append({"input_ids": ids, "labels": ids.clone()})
        return out
