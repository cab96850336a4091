"""Decision latency of the in-process local LLM (SmolLM2-135M, llama.cpp, 1 thread), idle vs a busy core.

    .venv/bin/python benchmarks/llm_latency.py [--prompts 5] [--max-tokens 512]

Five realistic Controller prompts (decision points of the published round 28, from the seed logs) are
decided in order, as in a round, twice per condition: "cold" (KV cache cleared before each decision: every
prompt token evaluated) and "warm" (decisions in sequence: llama.cpp reuses the prompt prefix the previous
decision left in its cache). The second condition runs the same with a pure-Python busy loop pinned to
the other core (a trainer's stand-in). Prints mean / p50 / max per condition and the busy/idle ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

from lrpilot.argtypes import positive_int
from lrpilot.config import GuardConfig
from lrpilot.controllers.base import DecisionRecord, Observation
from lrpilot.controllers.llm import LLMController
from lrpilot.llm.local_backend import LocalBackend

SEED = Path(__file__).resolve().parents[1] / "tests" / "data" / "seed-experiments"
BRIEF = (
    "Rounds 1-27: peak LR 1e-3..1.2e-3 gave ppl 32-34; 3e-4 gave 50-57. Decaying to ~1e-4 in the last "
    "30% helped. Band 3e-3..1e-2 was never tried; one round at 2.5e-3 reached 32.85."
)


def round28_observations(steps: tuple[int, ...]) -> list[Observation]:
    recs = [json.loads(line) for line in (SEED / "decisions_log_agent_60m.jsonl").read_text().splitlines()]
    starts = [
        json.loads(line)["run_start_iso"]
        for line in (SEED / "final_results_log_agent_60m.jsonl").read_text().splitlines()
    ]
    dec = [r for r in recs if r["run_start_iso"] == starts[27]]
    out = []
    for step in steps:
        past = [r for r in dec if r["step"] <= step]
        hist = tuple((r["step"], r["loss"]) for r in past)
        lrs = tuple((r["step"], r["old_lr"]) for r in past)
        made = tuple(
            DecisionRecord(r["step"], r["old_lr"], r["new_lr"], r["loss"], effective_step=r["step"] + 2)
            for r in past[:-1]
        )
        last = past[-1]["loss"]
        dense = tuple(last + 0.04 - 0.08 * i / 299 + 0.03 * math.sin(0.7 * i) for i in range(300))
        out.append(
            Observation(
                step=step,
                total_steps=10000,
                warmup_steps=1000,
                decision_every=300,
                lr=past[-1]["old_lr"],
                init_lr=3e-4,
                recent_losses=dense,
                loss_history=hist,
                lr_history=lrs,
                grad_norm=0.3,
                decisions=made,
                memory_brief=BRIEF,
            )
        )
    return out


def _busy(stop: mp.Event, cpu: int | None) -> None:  # type: ignore[valid-type]
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def run(ctl: LLMController, backend: LocalBackend, obs: list[Observation], cold: bool) -> list[dict]:
    llm, _ = backend._model()
    llm.reset()
    rows = []
    for o in obs:
        if cold:
            llm.reset()
        t0 = time.monotonic()
        d = ctl.decide(o)
        print(f"  step {o.step}: {time.monotonic() - t0:.2f}s {d.meta.get('usage')}", file=sys.stderr, flush=True)
        rows.append(
            {
                "step": o.step,
                "s": time.monotonic() - t0,
                "fallback": d.fallback,
                "lr": d.lr,
                "usage": d.meta.get("usage", {}),
            }
        )
    return rows


def summary(rows: list[dict]) -> dict:
    xs = [r["s"] for r in rows]
    return {
        "mean_s": round(statistics.fmean(xs), 2),
        "p50_s": round(statistics.median(xs), 2),
        "max_s": round(max(xs), 2),
        "fallbacks": sum(r["fallback"] for r in rows),
        "prompt_tokens": [r["usage"].get("prompt_tokens") for r in rows],
        "completion_tokens": [r["usage"].get("completion_tokens") for r in rows],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=positive_int, default=5, help="prompts per mode (1..10)")
    ap.add_argument("--max-tokens", type=positive_int, default=512, help="reply budget")
    args = ap.parse_args()
    if args.prompts > 10:
        ap.error("--prompts: at most 10 (the observation steps of round 28)")
    steps = (1300, 3100, 5500, 7600, 9400, 2200, 4300, 6700, 8500, 9700)[: args.prompts]
    obs = round28_observations(steps)
    backend = LocalBackend(n_threads=1, max_tokens=args.max_tokens, timeout_s=300)
    backend.ping()
    ctl = LLMController(backend, guard=GuardConfig())
    here = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(here) >= 2 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {here[0]})  # the LLM on one core, the busy loop on another
    other = here[1] if len(here) >= 2 else None
    results: dict[str, dict] = {"load_avg_start": os.getloadavg()}
    for label, busy in (("idle", False), ("busy_other_core", True)):
        stop = mp.Event()
        proc = mp.Process(target=_busy, args=(stop, other), daemon=True) if busy else None
        if proc:
            proc.start()
        try:
            for mode in ("cold", "warm"):
                print(f"{label}/{mode}", file=sys.stderr, flush=True)
                results[f"{label}/{mode}"] = summary(run(ctl, backend, obs, cold=mode == "cold"))
        finally:
            if proc:
                stop.set()
                proc.join(timeout=10)
    for mode in ("cold", "warm"):
        results[f"ratio_busy_over_idle/{mode}"] = round(
            results[f"busy_other_core/{mode}"]["mean_s"] / results[f"idle/{mode}"]["mean_s"], 2
        )
    results["load_avg_end"] = os.getloadavg()
    json.dump(results, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
