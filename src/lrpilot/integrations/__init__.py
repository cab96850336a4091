"""Framework callbacks: lrpilot.integrations.transformers (HF Trainer) and lrpilot.integrations.lightning.

Both build a `lrpilot.Pilot` around the optimizer you create and hand the framework a `lrpilot.PilotScheduler`
as its LR scheduler (so no other scheduler fights the pilot, and the framework's checkpoint saves and restores
the pilot's state with the scheduler's: a resume does not overwrite the steered LR). The callback reports each
micro-batch's loss; the scheduler's step (once per optimizer update, after gradient accumulation) gives the pilot
their mean. See examples/hf_trainer.py and examples/lightning.py.
"""

from __future__ import annotations

from typing import Any

import torch

from lrpilot.pilot import Pilot
from lrpilot.scheduler import PilotScheduler


class _PilotCallbackCore:
    """Holds the Pilot settings until the optimizer exists; `scheduler_for` builds the Pilot and its scheduler."""

    def __init__(self, **pilot_kwargs: Any) -> None:
        self.pilot_kwargs = pilot_kwargs
        self.pilot: Pilot | None = None
        self.scheduler: PilotScheduler | None = None

    #: whether the scheduler's step() steps the pilot (HF) or the callback does (Lightning)
    scheduler_drives = True

    def scheduler_for(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None) -> PilotScheduler:
        """The PilotScheduler for `optimizer` (a Pilot with this callback's settings; `model` is restored on a
        rollback). Give it to the framework as its LR scheduler."""
        kwargs = dict(self.pilot_kwargs)
        kwargs.setdefault("rewind", False)  # the framework's step counter goes on after a rollback
        if model is not None:
            kwargs.setdefault("model", model)
        self.pilot = Pilot(optimizer, **kwargs)
        self.scheduler = PilotScheduler(self.pilot, drive=self.scheduler_drives)
        return self.scheduler

    def _report(self, loss: Any) -> None:
        if self.scheduler is not None and loss is not None:
            self.scheduler.report(loss)
