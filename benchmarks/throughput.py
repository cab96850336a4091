"""Trainer throughput: lrpilot's LLaMA against HF transformers' LlamaForCausalLM on the cpu-small preset.

    python benchmarks/throughput.py [--steps 10] [--reps 5] [--warmup 3] [--preset cpu-small] [--set k=v ...]

Both models get the same config (dims, untied embeddings, vocab), the same initial weights, the same batches
(build_data from the preset's data config), the same optimizer (AdamW lr 3e-4, weight decay 0.01, the preset's
betas/eps) with grad-norm clipping at 1.0, fp32 on CPU with one torch thread. Each is trained the way its users
train it: lrpilot as `model(x, y)` (loss over all seq_len targets), HF as `model(input_ids=x, labels=x).loss`
(its own shifted loss, as GaLore/CoLA do). Timing blocks alternate A B A B ... so that drifting load on a shared
machine hits both alike; warm-up steps are excluded. Reports tokens/s (batch x seq_len per optimizer step) by
wall clock and by the process's CPU time, and the ratio lrpilot / HF of the CPU-time medians (goal >= 1.2): with
one thread, CPU time is what the model costs, while wall time also counts neighbours on a shared machine.
`--micro-batch M` makes both accumulate gradients over batch / M micro-batches (a control for lrpilot's CPU
chunking: the HF baseline at small micro-batches gets the same cache benefit).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: the OpenMP pool is sized at import
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from lrpilot.config import load_config  # noqa: E402
from lrpilot.data import build_data, check_vocab  # noqa: E402
from lrpilot.model import LLaMA, hf_config, hf_state_dict  # noqa: E402

GOAL = 1.2


def make_step(model: torch.nn.Module, loss_fn: Callable, data, train, batch: int, micro: int) -> Callable[[int], float]:
    """One optimizer update on batch `step` (same data for both models): forward and backward over the batch
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per timed block")
    ap.add_argument("--reps", type=int, default=5, help="timed blocks per model (interleaved A B A B ...)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model before timing")
    ap.add_argument("--micro-batch", type=int, default=0, help="sequences per forward for both (0 = whole batch)")
    ap.add_argument("--check", action="store_true", help=f"exit 1 when the ratio is below {GOAL}")
    args = ap.parse_args(argv)

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
    models = {
        "lrpilot LLaMA": make_step(ours, lambda m, x, y: m(x, y)[1], data, cfg.train, batch, micro),
        "HF LlamaForCausalLM": make_step(
            hf, lambda m, x, y: m(input_ids=x, labels=x).loss, data, cfg.train, batch, micro
        ),
    }
    print(
        f"{args.preset}: {ours.num_parameters():,} params, batch {batch} x seq {seq} = {batch * seq} tokens/step "
        f"(micro-batch {micro}), "
        f"fp32, {torch.get_num_threads()} thread, torch {torch.__version__}, transformers "
        f"{sys.modules['transformers'].__version__}, attention {hf.config._attn_implementation}"
    )

    next_step = {name: 0 for name in models}
    last_loss = {}
    for name, step in models.items():
        for _ in range(args.warmup):
            last_loss[name] = step(next_step[name])
            next_step[name] += 1
    wall: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    tokens = args.steps * batch * seq
    for _ in range(args.reps):
        for name, step in models.items():  # A B A B ...: both see the same machine conditions
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                last_loss[name] = step(next_step[name])
                next_step[name] += 1
            wall[name].append(tokens / (time.perf_counter() - w0))
            cpu[name].append(tokens / (time.process_time() - c0))

    med = {name: statistics.median(cpu[name]) for name in models}
    print(
        f"\n{'model':<22}{'tokens/s (CPU time)':>21}{'min':>9}{'max':>9}{'ms/step':>9}{'tokens/s (wall)':>17}"
        f"{'last loss':>11}"
    )
    for name in models:
        print(
            f"{name:<22}{med[name]:>21,.0f}{min(cpu[name]):>9,.0f}{max(cpu[name]):>9,.0f}"
            f"{1000 * batch * seq / med[name]:>9.1f}{statistics.median(wall[name]):>17,.0f}{last_loss[name]:>11.4f}"
        )
    (a, b) = models
    ratio = med[a] / med[b]
    wall_ratio = statistics.median(wall[a]) / statistics.median(wall[b])
    paired = [x / y for x, y in zip(cpu[a], cpu[b], strict=True)]
    print(
        f"\nratio {a} / {b}: {ratio:.2f}x by CPU time (goal >= {GOAL}x), {wall_ratio:.2f}x by wall time; "
        f"per A/B pair: {', '.join(f'{p:.2f}' for p in paired)}"
    )
    return 1 if args.check and ratio < GOAL else 0


if __name__ == "__main__":
    sys.exit(main())
