"""A toy baseline schedule in one file: the peak for the first half after warmup, then a third of it.

The whole recipe (CONTRIBUTING.md, Extending: a schedule): a ScheduleController subclass that implements
`_after_warmup(step)` (warmup, plans, guard and logs come from the base) and one registry line.
`lrpilot baseline --schedule toy-step` and `lrpilot train --schedule toy-step` then run it.
"""

from __future__ import annotations

from lrpilot.controllers.schedules import SCHEDULES, ScheduleController


class StepController(ScheduleController):
    """peak_lr until half of the post-warmup steps, then peak_lr / 3 (a one-step decay)."""

    name = "toy-step"

    def _after_warmup(self, step: int) -> float:
        done = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)  # 0 at warmup, 1 at the end
        return self.peak_lr if done < 0.5 else self.peak_lr / 3


SCHEDULES.add("toy-step", StepController, help="toy: the peak, then a third of it")
