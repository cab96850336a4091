"""Trainer throughput: lrpilot's LLaMA against HF transformers' LlamaForCausalLM on the cpu-small preset, eager and
under torch.compile.

    python benchmarks/throughput.py [--steps 8] [--reps 5] [--warmup 2] [--no-compile] [--preset cpu-small]

Both models get the same config (dims, untied embeddings, vocab), the same initial weights, the same batches
(build_data from the preset's data config), the same optimizer (AdamW lr 3e-4, weight decay 0.01, the preset's
betas/eps) with grad-norm clipping at 1.0, fp32 on CPU with one torch thread. Each is trained the way its users
train it: lrpilot as `model(x, y)` (loss over all seq_len targets), HF as `model(input_ids=x, labels=x).loss`
(its own shifted loss, as GaLore/CoLA do).

Four variants, each its own copy of the same starting weights: both models eager, and both wrapped in
`torch.compile(model)` with default options, as the trainer does with `train.compile=true` (the optimizer and
clipping stay eager there too). Three ratios: eager / eager, lrpilot compiled / HF eager (the trainer's compile
switch against HF as usually run), and compiled / compiled, the fair one. The first step of a compiled variant
compiles its forward and backward: its time is printed and left out of the throughput, like the other warm-up
steps. Timing blocks alternate A B C D A B C D ... so that drifting load on a shared machine hits all alike.
Reports tokens/s (batch x seq_len per optimizer step) by wall clock and by the process's CPU time; ratios use the
CPU-time medians: with one thread, CPU time is what the model costs, while wall time also counts neighbours.
`--micro-batch M` makes all accumulate gradients over batch / M micro-batches.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: the OpenMP pool is sized at import
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from lrpilot.argtypes import non_negative_int, positive_int  # noqa: E402
from lrpilot.config import load_config  # noqa: E402
from lrpilot.data import build_data, check_vocab  # noqa: E402
from lrpilot.model import LLaMA, hf_config, hf_state_dict  # noqa: E402

GOAL = 1.2
OURS, HF = "lrpilot", "HF"


def make_step(model: torch.nn.Module, loss_fn: Callable, data, train, batch: int, micro: int) -> Callable[[int], float]:
    """One optimizer update on batch `step` (same data for every variant): forward and backward over the batch
    (in batch / micro accumulation steps), grad clipping, AdamW."""
    opt = torch.optim.AdamW(
        model.parameters(), lr=3e-4, weight_decay=0.01, betas=(train.beta1, train.beta2), eps=train.eps
    )

    def step(i: int) -> float:
        x, y = data.train_batch(i, 0, batch)
        total = 0.0
        for xs, ys in zip(x.split(micro), y.split(micro), strict=True):
            loss = loss_fn(model, xs, ys) * (len(xs) / batch)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    return step


def children_cpu_s() -> float:
    """CPU seconds of this process's children: those already reaped (a C++ compiler run from this process) and
    the live ones (inductor's compile workers, with the compilers they reaped); live ones are read from /proc
    (Linux) and missed elsewhere. Only differences of this are meaningful."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total, ticks, todo = usage.ru_utime + usage.ru_stime, os.sysconf("SC_CLK_TCK"), [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                kids = [int(k) for k in (task / "children").read_text().split()]
                todo += kids
                for kid in kids:
                    fields = Path(f"/proc/{kid}/stat").read_text().rsplit(")", 1)[1].split()
                    total += sum(int(f) for f in fields[11:15]) / ticks  # utime stime cutime cstime
        except (OSError, ValueError):
            continue  # a worker that just exited, or no /proc
    return total


def compile_counters() -> tuple[int, int]:
    """(hits, misses) of inductor's on-disk FX graph cache so far: all hits = a warm cache, a fast compile."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--steps", type=positive_int, default=8, help="optimizer steps per timed block")
    ap.add_argument("--reps", type=positive_int, default=5, help="timed blocks per variant (interleaved A B C D ...)")
    ap.add_argument("--warmup", type=positive_int, default=2, help="untimed steps per variant (the first one compiles)")
    ap.add_argument(
        "--micro-batch", type=non_negative_int, default=0, help="sequences per forward for all (0 = whole batch)"
    )
    ap.add_argument("--no-compile", action="store_true", help="eager variants only (no C++ compiler needed)")
    ap.add_argument(
        "--check", action="store_true", help=f"exit 1 when a like-for-like ratio (eager, compiled) is below {GOAL}"
    )
    args = ap.parse_args(argv)
    if args.steps < 1 or args.reps < 1 or args.warmup < 1:
        ap.error("--steps, --reps and --warmup must be >= 1 (the first warm-up step compiles)")

    torch.set_num_threads(1)
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        print("the baseline needs transformers: pip install 'lrpilot[dev]'", file=sys.stderr)
        return 2
    cfg = load_config(args.preset, args.overrides)
    data = build_data(cfg.data, cfg.train.seed)
    check_vocab(data.vocab_size, cfg.model.vocab_size)
    batch, seq = cfg.train.batch_size, cfg.data.seq_len
    micro = args.micro_batch or batch

    torch.manual_seed(cfg.train.seed)
    ours = LLaMA(cfg.model)
    hf = LlamaForCausalLM(hf_config(cfg.model))
    hf.load_state_dict(hf_state_dict(ours), strict=True)  # the same starting weights
    ours.train()
    hf.train()
    loss_fns = {OURS: lambda m, x, y: m(x, y)[1], HF: lambda m, x, y: m(input_ids=x, labels=x).loss}
    # (model, mode) -> step function; compiled variants train their own copies, from the same weights
    variants: dict[tuple[str, str], Callable[[int], float]] = {}
    for mode in ("eager",) if args.no_compile else ("eager", "compiled"):
        for name, model in ((OURS, ours), (HF, hf)):
            if mode == "compiled":
                model = torch.compile(copy.deepcopy(model))  # as the trainer: torch.compile(raw_model)
            variants[name, mode] = make_step(model, loss_fns[name], data, cfg.train, batch, micro)
    print(
        f"{args.preset}: {ours.num_parameters():,} params, batch {batch} x seq {seq} = {batch * seq} tokens/step "
        f"(micro-batch {micro}), fp32, {torch.get_num_threads()} thread, torch {torch.__version__}, transformers "
        f"{sys.modules['transformers'].__version__}, HF attention {hf.config._attn_implementation}, "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )

    next_step = dict.fromkeys(variants, 0)
    last_loss: dict[tuple[str, str], float] = {}
    for key, step in list(variants.items()):
        for i in range(args.warmup):
            w0, c0, d0, (h0, m0) = time.perf_counter(), time.process_time(), children_cpu_s(), compile_counters()
            try:
                last_loss[key] = step(next_step[key])
            except Exception as e:  # noqa: BLE001 - a model that does not compile is reported, not fatal
                if key[1] != "compiled":
                    raise
                print(f"{key[0]} compiled: torch.compile failed, left out: {type(e).__name__}: {str(e)[:300]}")
                del variants[key]
                break
            next_step[key] += 1
            if key[1] == "compiled" and i == 0:
                h1, m1 = compile_counters()
                print(
                    f"{key[0]} compile warm-up (first step: trace, compile forward and backward, one update): "
                    f"{time.perf_counter() - w0:.1f} s wall, {time.process_time() - c0:.1f} s CPU in this process "
                    f"+ {children_cpu_s() - d0:.1f} s in compilers and compile workers; inductor cache {h1 - h0} hits, "
                    f"{m1 - m0} misses"
                )
    cache_before = compile_counters()

    wall: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
    tokens = args.steps * batch * seq
    for _ in range(args.reps):
        for key, step in variants.items():  # A B C D ...: all see the same machine conditions
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                last_loss[key] = step(next_step[key])
                next_step[key] += 1
            wall[key].append(tokens / (time.perf_counter() - w0))
            cpu[key].append(tokens / (time.process_time() - c0))
    if compile_counters() != cache_before:
        print("warning: a compiled model recompiled during timing; raise --warmup")

    med = {key: statistics.median(cpu[key]) for key in variants}
    print(
        f"\n{'variant':<20}{'tokens/s (CPU time)':>21}{'min':>9}{'max':>9}{'ms/step':>9}{'tokens/s (wall)':>17}"
        f"{'last loss':>11}"
    )
    for key in variants:
        print(
            f"{' '.join(key):<20}{med[key]:>21,.0f}{min(cpu[key]):>9,.0f}{max(cpu[key]):>9,.0f}"
            f"{1000 * batch * seq / med[key]:>9.1f}{statistics.median(wall[key]):>17,.0f}{last_loss[key]:>11.4f}"
        )

    print(f"\nratios of CPU-time medians (goal >= {GOAL}x like for like); in brackets: per interleaved block")
    fair = []
    for a, b, note in (
        ((OURS, "eager"), (HF, "eager"), "like for like"),
        ((OURS, "compiled"), (HF, "eager"), "lrpilot's train.compile=true vs HF as usually run; not like for like"),
        ((OURS, "compiled"), (HF, "compiled"), "like for like: the fair comparison with compile"),
        ((OURS, "compiled"), (OURS, "eager"), "what compile gives lrpilot"),
        ((HF, "compiled"), (HF, "eager"), "what compile gives HF"),
    ):
        if a not in variants or b not in variants:
            continue
        ratio = med[a] / med[b]
        if note.startswith("like for like"):
            fair.append(ratio)
        paired = ", ".join(f"{x / y:.2f}" for x, y in zip(cpu[a], cpu[b], strict=True))
        print(f"  {' '.join(a):<17} / {' '.join(b):<12} {ratio:5.2f}x  ({note}) [{paired}]")
    return 1 if args.check and min(fair) < GOAL else 0


if __name__ == "__main__":
    sys.exit(main())
