"""Lightning steered by lrpilot: lrpilot's LLaMA (cpu-smoke size) in a LightningModule.

    python examples/lightning.py --steps 60 --dir runs/pl
    python examples/lightning.py --steps 60 --dir runs/pl_nan --inject-nan-at-step 30
    python examples/lightning.py --steps 60 --dir runs/pl --checkpoint-every 20 --resume runs/pl/ckpt/step=20.ckpt
    lrpilot report runs/pl --out runs/pl/report

Under torchrun (`torchrun --nproc_per_node 2 examples/lightning.py ...`) Lightning runs DDP (gloo on CPU) on the
processes torchrun started; rank 0 alone decides and writes the logs, every rank sets the LR it broadcasts. The
last line printed (by rank 0) is `final: step S eval_loss L lr X rollbacks R`.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

# this file is named like the package: take its folder off the path before importing lightning
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != HERE]
import lightning as L  # noqa: E402
import torch  # noqa: E402

sys.path.append(str(HERE))
from _common import Timer, Windows, common_args, leave_process_group, pause_here, rank, record_lrs  # noqa: E402

from lrpilot.config import load_config  # noqa: E402
from lrpilot.integrations.lightning import LRPilotCallback  # noqa: E402
from lrpilot.model import LLaMA  # noqa: E402


class Lit(L.LightningModule):
    def __init__(
        self, cb: LRPilotCallback | None, lr: float, nan_at: int | None, ds: Windows, bs: int, accum: int,
        nan_rank: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        torch.manual_seed(0)
        self.model = LLaMA(load_config("cpu-smoke").model)
        self.cb, self.lr, self.nan_at, self.injected = cb, lr, nan_at, False
        self.ds, self.bs, self.accum, self.nan_rank = ds, bs, accum, nan_rank

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # nanoGPT's get_batch: the batch is a function of (update, micro-batch), so a resume mid-epoch (Lightning
        # restarts a plain DataLoader's epoch) trains on the same batches; the loader only paces the loop
        k = (self.global_step * self.accum + batch_idx % self.accum) * self.bs
        ids = torch.stack([self.ds[i]["input_ids"] for i in range(k, k + self.bs)])
        _, loss = self.model(ids[:, :-1], ids[:, 1:])
        if self.nan_at is not None and self.global_step + 1 == self.nan_at and not self.injected:
            self.injected = True
            if self.nan_rank in (None, self.global_rank):
                loss = loss * math.nan
        return loss

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        if self.cb is None:  # --no-pilot: the overhead bench's baseline, a constant LR
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.cb.scheduler_for(opt, self), "interval": "step"}}


def main(argv: list[str] | None = None) -> int:
    args = common_args(__doc__).parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run_dir = Path(args.dir)
    cb = LRPilotCallback(
        controller=args.controller, total_steps=args.steps, warmup_steps=args.warmup, init_lr=args.lr,
        decision_every=args.decision_every, run_dir=run_dir,
    )  # fmt: skip
    ds = Windows(args.steps * args.batch_size * args.grad_accum)
    loader = torch.utils.data.DataLoader(range(args.steps * args.grad_accum), batch_size=1)
    callbacks: list = [] if args.no_pilot else [cb]
    if args.pause_at_step is not None:

        class Pause(L.Callback):
            def on_train_batch_end(self, trainer, *a):
                if trainer.global_step == args.pause_at_step:
                    pause_here(run_dir)

        callbacks.append(Pause())
    if args.record_lrs:

        class Record(L.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                record_lrs(run_dir, trainer.global_step + 1, optimizer)

        callbacks.append(Record())
    if args.checkpoint_every:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=run_dir / "ckpt", filename="{step}", every_n_train_steps=args.checkpoint_every,
                                         save_top_k=-1))  # fmt: skip
    module = Lit(None if args.no_pilot else cb, args.lr, args.inject_nan_at_step, ds, args.batch_size, args.grad_accum,
                 args.inject_nan_rank)  # fmt: skip
    devices = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this node
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(args.checkpoint_every), callbacks=callbacks,
        accumulate_grad_batches=args.grad_accum, gradient_clip_val=1.0, num_sanity_val_steps=0,
    )  # fmt: skip
    with Timer() as timer:
        trainer.fit(module, loader, ckpt_path=args.resume)
    if rank() == 0:
        print(timer.line(int(trainer.global_step)))
    module.eval()
    with torch.no_grad():
        losses = [module.model(b["input_ids"][None, :-1], b["input_ids"][None, 1:])[1].item() for b in ds.eval_items()]
    ev = sum(losses) / len(losses)
    if args.no_pilot:
        if rank() == 0:
            print(f"final: step {trainer.global_step} eval_loss {ev:.4f} lr {args.lr:.3e} rollbacks 0")
        return 0
    res = cb.finish(final_eval_loss=ev)
    if rank() == 0:  # under torchrun: rank 0 wrote the run's logs and result
        print(
            f"final: step {cb.pilot.step_count} eval_loss {ev:.4f} lr {cb.pilot.lr:.3e} rollbacks {res['crash_count']}"
        )
    leave_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
