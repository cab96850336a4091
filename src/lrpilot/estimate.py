"""How long a run will take on this machine, measured before it starts (for `lrpilot demo`'s estimate).

    python -c "from lrpilot.config import load_config; from lrpilot.estimate import run_seconds; \
print(run_seconds(load_config('cpu-small')))"

`seconds_per_step` times a few real training steps of the config's model in this process (random tokens,
AdamW, train.num_threads threads, the first step not counted: it allocates), so the estimate reflects this
machine's CPU. `run_seconds` scales it to the run: total_steps updates, the evaluations (forward only, taken
as 1/3 of a training step per batch: backward costs about twice the forward pass) and STARTUP_S for the
trainer's launch. It is an estimate: runs beside each other share the cores.
"""

from __future__ import annotations

import math
import time

from lrpilot.config import RunConfig

#: seconds to launch a trainer (interpreter, torch import, data) -- measured ~3-6 s on the 2-core CI box
STARTUP_S = 5.0


def seconds_per_step(cfg: RunConfig, steps: int = 2) -> float:
    """Mean wall seconds of one optimizer update of cfg's model at train.batch_size, measured here over
    `steps` updates after a warm-up one."""
    import torch

    from lrpilot.model import LLaMA

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.train.num_threads))
    try:
        torch.manual_seed(0)
        model = LLaMA(cfg.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        seq = cfg.data.seq_len
        x = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, seq))
        times = []
        for _ in range(steps + 1):
            t = time.perf_counter()
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        return sum(times[1:]) / steps
    finally:
        torch.set_num_threads(threads)


def run_seconds(cfg: RunConfig, per_step: float | None = None) -> float:
    """Estimated wall seconds of one run of cfg (see the module docstring)."""
    sps = seconds_per_step(cfg) if per_step is None else per_step
    evals = 1 + (cfg.train.total_steps // cfg.eval.every if cfg.eval.every > 0 else 0)
    eval_batches = math.ceil(cfg.eval.tokens / (cfg.data.seq_len * cfg.train.batch_size))
    return STARTUP_S + cfg.train.total_steps * sps + evals * eval_batches * sps / 3
