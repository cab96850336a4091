"""`LRPilotCallback` for the Hugging Face `Trainer`.

    cb = LRPilotCallback(controller="rules", total_steps=200, warmup_steps=20, decision_every=20, run_dir="runs/hf")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    trainer = Trainer(model=model, args=TrainingArguments(..., max_steps=200), train_dataset=ds,
                      optimizers=(opt, cb.scheduler_for(opt, model)), callbacks=[cb])
    trainer.train()                          # resume_from_checkpoint=... restores the pilot with the scheduler
    cb.finish(trainer.evaluate()["eval_loss"])

The scheduler replaces HF's (`lr_scheduler_type` is ignored when `optimizers` carries one), so nothing else moves
the LR; HF saves `scheduler.state_dict()` (the pilot's state) in every checkpoint and loads it after the
optimizer's on `resume_from_checkpoint`, so the steered LR is what a resume continues with. The loss of each
micro-batch is read by a forward hook on the model (the model's output `loss` in training mode), so gradient
accumulation is handled: the pilot sees the mean over the update's micro-batches. On a rollback the pilot restores
the model and optimizer in place; HF's own step counter and data loader go on (the batches since the snapshot
are not repeated, as PaLM's skip): the pilot is built with rewind=False, so its steps stay HF's and the rollback
record's undone_steps / next_step say what was undone. Several processes (torchrun): every rank builds the callback
and steps its pilot; the pilot averages the ranks' losses, rank 0 alone decides and writes the logs, and every rank
sets the LR (and restores the snapshot) rank 0 broadcasts, so all ranks train at the same LR at every step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import TrainerCallback

from lrpilot.integrations import _PilotCallbackCore
from lrpilot.scheduler import PilotScheduler


class LRPilotCallback(TrainerCallback, _PilotCallbackCore):
    """HF TrainerCallback driving a lrpilot.Pilot; keyword arguments are the Pilot's (all but the optimizer)."""

    def __init__(self, **pilot_kwargs: Any) -> None:
        _PilotCallbackCore.__init__(self, **pilot_kwargs)
        self._hook: Any = None

    def scheduler_for(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None) -> PilotScheduler:
        sched = super().scheduler_for(optimizer, model)
        if model is not None and self._hook is None:
            self._hook = model.register_forward_hook(self._on_forward)
        return sched

    def _on_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._report(loss.detach().float().item())

    def finish(self, final_eval_loss: float = math.nan, final_eval_tokens: int = 0) -> dict:
        """Write the run's result (RUN/result.json, final_results.jsonl); returns it."""
        assert self.pilot is not None, "scheduler_for(optimizer, model) was never called"
        return self.pilot.finish(final_eval_loss=final_eval_loss, final_eval_tokens=final_eval_tokens)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
