"""`lrpilot.PilotScheduler`: a torch LR scheduler whose LR is the Pilot's, for loops that already call
`scheduler.step()` after `optimizer.step()` and save `scheduler.state_dict()`.

    sched = PilotScheduler(Pilot(opt, controller="rules", total_steps=1000, warmup_steps=100, model=model))
    for batch in batches:
        loss = model(batch); loss.backward(); opt.step(); opt.zero_grad()
        sched.step(loss.item())             # or sched.report(loss, grad_norm) earlier, then sched.step()
    torch.save({"model": ..., "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path)

`get_lr()` returns the LRs the Pilot set on the param groups (the pilot keeps the groups' ratios), so
LRScheduler's own bookkeeping (`get_last_lr()`, `last_epoch`) follows the pilot; `state_dict()` carries the
pilot's state_dict, so `load_state_dict()` resumes the pilot exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from lrpilot.pilot import Pilot, PilotError, StepInfo


class PilotScheduler(LRScheduler):
    """An LRScheduler around `pilot` (its optimizer is the pilot's). step(loss, grad_norm) = pilot.step();
    a step() without a loss uses the mean of those given to report() since the last step (PilotError if none).
    With drive=False step() leaves the pilot alone (its owner calls pilot.step()) and only follows its LRs."""

    def __init__(self, pilot: Pilot, last_epoch: int = -1, drive: bool = True) -> None:
        if not isinstance(pilot, Pilot):
            raise PilotError(f"PilotScheduler: needs a lrpilot.Pilot, got {type(pilot).__name__}")
        self.pilot = pilot
        #: False: someone else calls pilot.step() (the Lightning callback); step() only keeps LRScheduler's books
        self.drive = bool(drive)
        self._losses: list[float] = []
        self._grad_norm: Any = None
        self._ready = False
        self.last_info: StepInfo | None = None
        super().__init__(pilot.optimizer, last_epoch)
        self._ready = True

    def report(self, loss: float | torch.Tensor, grad_norm: float | torch.Tensor | None = None) -> None:
        """The loss of a micro-batch of the update under way (and its grad norm); the next step() without a loss
        gives the pilot the mean of the losses reported since the previous step (gradient accumulation)."""
        self._losses.append(float(loss.detach().float().item()) if isinstance(loss, torch.Tensor) else float(loss))
        if grad_norm is not None:
            self._grad_norm = grad_norm

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def step(self, loss: float | torch.Tensor | None = None, grad_norm: float | torch.Tensor | None = None) -> None:  # type: ignore[override]
        if self._ready and self.drive:  # LRScheduler.__init__'s initial step reports nothing
            if loss is None:
                if not self._losses:
                    raise PilotError("PilotScheduler.step: no loss; call step(loss) or report(loss) first")
                loss = sum(self._losses) / len(self._losses)
                grad_norm = self._grad_norm if grad_norm is None else grad_norm
            self._losses, self._grad_norm = [], None
            self.last_info = self.pilot.step(loss, grad_norm)
        super().step()
        if self.last_info is not None and self.last_info.rolled_back:
            self.last_epoch = self.pilot.step_count

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count, "pilot": self.pilot.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pilot.load_state_dict(state_dict["pilot"])
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict["_step_count"])
        self._last_lr = self.get_lr()
