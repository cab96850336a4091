"""`LRPilotCallback` for Lightning (`lightning.pytorch`).

    class Lit(L.LightningModule):
        def __init__(self, cb): ...; self.cb = cb
        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
            return {"optimizer": opt,
                    "lr_scheduler": {"scheduler": self.cb.scheduler_for(opt, self), "interval": "step"}}

    cb = LRPilotCallback(controller="rules", total_steps=200, warmup_steps=20, decision_every=20, run_dir="runs/pl")
    L.Trainer(max_steps=200, callbacks=[cb]).fit(Lit(cb), loader)      # ckpt_path=... resumes the pilot too
    cb.finish(final_eval_loss)

`training_step` returns the loss (or {"loss": ...}); the callback reads it in on_train_batch_end (Lightning's
output is the loss divided by accumulate_grad_batches; the callback multiplies it back) and, on the batch whose
optimizer step completed an update (Lightning's global_step moved), steps the pilot with the mean over the
update's micro-batches. The pilot is stepped there, not in the scheduler's step(), because ModelCheckpoint saves in
on_train_batch_end (after this callback) and before Lightning steps the schedulers: so the checkpoint holds the
pilot's state after the update it holds the model of. Lightning saves the scheduler's state_dict (the pilot's
state) in its checkpoints and loads it after the optimizer's on `fit(ckpt_path=...)`, so a resume continues with
the steered LR. On a rollback the pilot
restores the module and optimizer in place; Lightning's global step and data loader go on (the pilot is built with
rewind=False: its steps stay Lightning's, and the rollback record says which updates were undone). Several
processes (DDP): rank 0 alone decides and writes the logs; every rank sets the LR rank 0 broadcasts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from lrpilot.integrations import _PilotCallbackCore


class LRPilotCallback(Callback, _PilotCallbackCore):
    """Lightning Callback driving a lrpilot.Pilot; keyword arguments are the Pilot's (all but the optimizer)."""

    def __init__(self, **pilot_kwargs: Any) -> None:
        Callback.__init__(self)
        _PilotCallbackCore.__init__(self, **pilot_kwargs)
        self._losses: list[float] = []
        self._seen_step: int | None = None

    scheduler_drives = False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._seen_step = int(trainer.global_step)
        self._losses = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach().float().item() * max(int(trainer.accumulate_grad_batches), 1))
        step = int(trainer.global_step)
        if self._seen_step is None:
            self._seen_step = step
        if step > self._seen_step and self.pilot is not None:  # an optimizer update completed on this batch
            self._seen_step = step
            mean = sum(self._losses) / len(self._losses) if self._losses else math.nan
            self._losses = []
            self.pilot.step(mean)

    def finish(self, final_eval_loss: float = math.nan, final_eval_tokens: int = 0) -> dict:
        """Write the run's result (RUN/result.json, final_results.jsonl); returns it."""
        assert self.pilot is not None, "scheduler_for(optimizer, module) was never called"
        return self.pilot.finish(final_eval_loss=final_eval_loss, final_eval_tokens=final_eval_tokens)
