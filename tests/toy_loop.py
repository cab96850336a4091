"""A closed loop without a trainer, for controller tests: the loss falls with the LR summed over the steps so
far ("work"), loss = 3 + 3 / (1 + work / scale) + noise, so a higher LR lowers it faster. Deterministic
for a seed."""

from __future__ import annotations

import random
from collections.abc import Callable

from lrpilot.controllers.base import BaseController, Decision, Observation


def toy_loop(
    controller: BaseController,
    *,
    total: int,
    warmup: int,
    every: int,
    init_lr: float,
    scale: float,
    seed: int,
    on_decision: Callable[[int, float, Decision], None] | None = None,
) -> tuple[list[float], list[tuple[int, float]]]:
    """(LR of every step, (step, new LR) of every decision). Warmup ramps linearly to init_lr, then the
    controller decides every `every` steps from the mean loss of the interval; on_decision(step, old_lr,
    decision) sees each answer."""
    lr, work, rng = init_lr, 0.0, random.Random(seed)
    losses: list[float] = []
    history: list[tuple[int, float]] = []
    decisions: list[tuple[int, float]] = []
    per_step: list[float] = []
    for step in range(total):
        if step >= warmup and (step - warmup) % every == 0:
            recent = tuple(losses[-every:])
            history.append((step, sum(recent) / len(recent)))
            d = controller.decide(
                Observation(
                    step=step,
                    total_steps=total,
                    warmup_steps=warmup,
                    decision_every=every,
                    lr=lr,
                    init_lr=init_lr,
                    recent_losses=recent,
                    loss_history=tuple(history),
                    lr_history=tuple(decisions),
                )
            )
            if on_decision is not None:
                on_decision(step, lr, d)
            lr = d.lr
            decisions.append((step, lr))
        cur = lr if step >= warmup else init_lr * (step + 1) / warmup
        per_step.append(cur)
        work += cur
        losses.append(3.0 + 3.0 / (1.0 + work / scale) + rng.gauss(0, 0.01))
    return per_step, decisions
