"""A nanoGPT-style plain PyTorch loop steered by lrpilot.Pilot (cpu-smoke-sized: seconds on a CPU).

    python examples/plain_torch.py --steps 60 --dir runs/plain
    python examples/plain_torch.py --steps 60 --dir runs/plain_nan --inject-nan-at-step 30
    python examples/plain_torch.py --steps 60 --dir runs/plain_cos --controller cosine
    python examples/plain_torch.py --steps 60 --dir runs/replay --controller replay:plan.json
    lrpilot report runs/plain --out runs/plain/report

The model is lrpilot's LLaMA (lrpilot.model) on the embedded Shakespeare bytes; the optimizer is AdamW with two
param groups (embeddings at half the LR: the pilot keeps that ratio). Every --checkpoint-every steps the loop
saves model, optimizer, RNG, its batch counter and pilot.state_dict() to DIR/checkpoint.pt; --resume continues
from it exactly (on CPU the losses are bit for bit those of an uninterrupted run). The last line printed is
`final: step S eval_loss L lr X rollbacks R`.

Under `lrpilot campaign --script "python examples/plain_torch.py --checkpoint-every 10" ...` ($LRPILOT_PILOT
set) the pilot comes from Pilot.from_env(): the round's run directory, controller, memory brief and step counts
are the campaign's (--steps, --dir, --controller, --lr, --warmup and --decision-every are ignored), and
$LRPILOT_RESUME=1 (a relaunch after a crash, or a killed campaign run again) resumes from RUN/checkpoint.pt.

Several processes: `torchrun --nproc_per_node 2 examples/plain_torch.py --steps 60 --dir runs/ddp` trains with
DistributedDataParallel (gloo on CPU, NCCL on GPUs), each rank on its own batches; every rank builds the same Pilot
and calls pilot.step() with its own loss; the pilot averages the losses, rank 0 alone asks the controller and writes
the logs, and every rank sets the LR rank 0 broadcasts (and restores the same snapshot on a rollback). Only rank 0
saves DIR/checkpoint.pt; every rank resumes from it.

Testing hooks: --inject-nan-at-step N makes the loss of the update that completes step N NaN (once);
--pause-at-step N writes DIR/paused and blocks there (after the checkpoint of that step, if any) until killed
(under a campaign only in round --pause-round, if given); --inject-nan-rank R puts the NaN on rank R only;
--record-lrs makes each rank append {"step", "lrs"} (every group's LR read from the optimizer before its step)
to DIR/lrs_rank_R.jsonl.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import time
from pathlib import Path

import torch

from lrpilot.config import load_config
from lrpilot.data import build_data, evaluate
from lrpilot.logs import write_atomic
from lrpilot.model import LLaMA
from lrpilot.pilot import ENV_SETTINGS, Pilot
from lrpilot.trainer import rng_state, set_rng_state


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer updates")
    p.add_argument("--dir", default=None, help="run directory (logs, checkpoint); required outside a campaign")
    p.add_argument("--controller", default="rules", help="rules | cosine | d2z | wsd | constant | llm | replay:PLAN")
    p.add_argument("--preset", default="cpu-smoke", help="model and data of this lrpilot preset (cpu-smoke)")
    p.add_argument("--lr", type=float, default=None, help="peak LR (default: the preset's init_lr)")
    p.add_argument("--warmup", type=int, default=None, help="warmup updates (default: the preset's)")
    p.add_argument("--decision-every", type=int, default=None, help="updates between decisions (preset's)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save DIR/checkpoint.pt every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--skip-batches", type=int, default=0, help="batches to skip after a rollback (PaLM)")
    p.add_argument("--snapshot-to", default="memory", choices=("memory", "disk"))
    p.add_argument("--inject-nan-at-step", type=int, default=None, help="testing: NaN loss at this step (once)")
    p.add_argument("--inject-nan-rank", type=int, default=None, help="testing: the NaN on this rank only")
    p.add_argument("--record-lrs", action="store_true", help="testing: each rank logs the LRs it used")
    p.add_argument("--pause-at-step", type=int, default=None, help="testing: write DIR/paused and block here")
    p.add_argument("--pause-round", type=int, default=None, help="testing: under a campaign, pause in this round only")
    p.add_argument("--no-pilot", action="store_true", help="the same loop with a fixed LR (for the overhead bench)")
    args = p.parse_args(argv)
    if args.dir is None and not os.environ.get(ENV_SETTINGS):
        p.error("--dir is required (outside `lrpilot campaign --script`, which gives each round its directory)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    campaign = bool(os.environ.get(ENV_SETTINGS))  # a round of `lrpilot campaign --script`
    run_dir = Path(os.environ.get("LRPILOT_RUN_DIR") or args.dir) if campaign else Path(args.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:  # under torchrun
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    cfg = load_config(args.preset)
    lr = args.lr if args.lr is not None else cfg.schedule.init_lr
    warmup = args.warmup if args.warmup is not None else min(cfg.schedule.warmup_steps, args.steps - 1)
    every = args.decision_every or cfg.schedule.decision_every
    torch.manual_seed(cfg.train.seed)
    model = LLaMA(cfg.model)
    data = build_data(cfg.data, cfg.train.seed, rank=rank, world_size=world)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model  # the pilot restores `model`
    embed = [p for n, p in model.named_parameters() if "embed" in n]
    rest = [p for n, p in model.named_parameters() if "embed" not in n]
    opt = torch.optim.AdamW(
        [{"params": rest, "lr": lr}, {"params": embed, "lr": lr * 0.5}],
        betas=(cfg.train.beta1, cfg.train.beta2),
        weight_decay=cfg.train.weight_decay,
    )
    loop = {"batch": 0}  # the data position: batches are a pure function of this index

    def get_extra() -> dict:
        return {"batch": loop["batch"], "rng": rng_state()}

    def set_extra(state: dict) -> None:
        loop["batch"] = int(state["batch"])
        set_rng_state(state["rng"])

    pilot = None
    if campaign:
        pilot = Pilot.from_env(
            opt, model=model, extra_state=(get_extra, set_extra), skip_batches=args.skip_batches,
            snapshot_to=args.snapshot_to,
        )  # fmt: skip
        run_dir, args.steps = Path(pilot.run_dir or run_dir), pilot.total_steps
        args.resume = args.resume or os.environ.get("LRPILOT_RESUME") == "1"
        if args.pause_round is not None and args.pause_round != pilot.round_index:
            args.pause_at_step = None
    elif not args.no_pilot:
        pilot = Pilot(
            opt,
            controller=args.controller,
            total_steps=args.steps,
            warmup_steps=warmup,
            init_lr=lr,
            decision_every=every,
            guard=cfg.guard,
            run_dir=run_dir,
            model=model,
            extra_state=(get_extra, set_extra),
            skip_batches=args.skip_batches,
            snapshot_to=args.snapshot_to,
        )
    ckpt = run_dir / "checkpoint.pt"
    step = 0
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        set_extra(state["extra"])
        step = int(state["step"])
        if pilot is not None:
            pilot.load_state_dict(state["pilot"])
    injected = False
    lr_log = open(run_dir / f"lrs_rank_{rank}.jsonl", "a") if args.record_lrs else None  # noqa: SIM115
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while step < args.steps:
        if pilot is not None and pilot.skip_batch():
            loop["batch"] += 1
            continue
        x, y = data.train_batch(loop["batch"], 0, cfg.train.batch_size)
        loop["batch"] += 1
        _, loss = net(x, y)
        if args.inject_nan_at_step == step + 1 and not injected:
            injected = True
            if args.inject_nan_rank in (None, rank):
                loss = loss * math.nan
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        if lr_log is not None:
            lr_log.write(json.dumps({"step": step + 1, "lrs": [g["lr"] for g in opt.param_groups]}) + "\n")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if pilot is None:
            step += 1
            continue
        step = pilot.step(loss.item(), gn.item()).step
        if args.checkpoint_every and step % args.checkpoint_every == 0 and rank == 0:
            buf = io.BytesIO()
            torch.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "extra": get_extra(), "step": step,
                 "pilot": pilot.state_dict()},
                buf,
            )  # fmt: skip
            write_atomic(ckpt, buf.getvalue())
        if args.pause_at_step == step:
            (run_dir / "paused").write_text(str(os.getpid()))
            _block()
    if lr_log is not None:
        lr_log.close()
    if rank == 0:  # benchmarks/pilot_examples_overhead.py reads it
        print(f"train: {step} steps, {time.perf_counter() - wall0:.3f} s wall, {time.process_time() - cpu0:.3f} s CPU")
    ev = evaluate(model, data, cfg.eval.tokens, cfg.eval.batch_size, "cpu")
    if world > 1:
        torch.distributed.destroy_process_group()
    if pilot is None:
        print(f"final: step {step} eval_loss {ev['eval_loss']:.4f} lr {lr:.3e} rollbacks 0")
        return 0
    res = pilot.finish(final_eval_loss=ev["eval_loss"], final_eval_tokens=ev["eval_tokens"])
    if rank == 0:  # the other ranks' result is their own view; rank 0 wrote the run's
        print(f"final: step {step} eval_loss {ev['eval_loss']:.4f} lr {pilot.lr:.3e} rollbacks {res['crash_count']}")
    return 0


def _block() -> None:
    """Wait until killed (the test sends SIGKILL once it sees DIR/paused)."""
    import signal

    while True:
        signal.pause()


if __name__ == "__main__":
    raise SystemExit(main())
