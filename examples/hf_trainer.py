"""The Hugging Face Trainer steered by lrpilot: a tiny LlamaForCausalLM built from a config (no download).

    python examples/hf_trainer.py --steps 60 --dir runs/hf
    python examples/hf_trainer.py --steps 60 --dir runs/hf_nan --inject-nan-at-step 30
    python examples/hf_trainer.py --steps 60 --dir runs/hf --checkpoint-every 20 --resume runs/hf/hf/checkpoint-20
    lrpilot report runs/hf --out runs/hf/report

Under torchrun (`torchrun --nproc_per_node 2 examples/hf_trainer.py ...`, gloo on CPU) the Trainer runs DDP; rank 0
alone decides and writes the logs, every rank sets the LR it broadcasts. The last line printed (by rank 0) is `final: step S eval_loss L lr X rollbacks R`.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timer, Windows, common_args, leave_process_group, pause_here, rank, record_lrs  # noqa: E402

from lrpilot.integrations.transformers import LRPilotCallback  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = common_args(__doc__).parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run_dir = Path(args.dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    )  # fmt: skip
    ds = Windows(args.steps * args.batch_size * args.grad_accum)
    cb = LRPilotCallback(
        controller=args.controller, total_steps=args.steps, warmup_steps=args.warmup, init_lr=args.lr,
        decision_every=args.decision_every, run_dir=run_dir,
    )  # fmt: skip
    injected = {"armed": False, "done": False}
    if args.inject_nan_at_step is not None:  # before the pilot's hook, so the pilot sees the NaN loss

        def inject(module, inputs, output):
            if module.training and injected["armed"] and not injected["done"]:
                if args.inject_nan_rank in (None, rank()):
                    output["loss"] = output["loss"] * math.nan
                injected["done"] = True
            return output

        model.register_forward_hook(inject)

    class Arm(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            injected["armed"] = state.global_step + 1 == args.inject_nan_at_step

        def on_pre_optimizer_step(self, a, state, control, optimizer=None, **kw):
            if args.record_lrs:
                record_lrs(run_dir, state.global_step + 1, optimizer)

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == args.pause_at_step:
                pause_here(run_dir)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    # --no-pilot: the overhead bench's baseline, the same run at a constant LR and no callback
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0) if args.no_pilot else cb.scheduler_for(opt, model)
    targs = TrainingArguments(
        output_dir=str(run_dir / "hf"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_grad_norm=1.0, logging_steps=10, report_to=[],
        save_strategy="steps" if args.checkpoint_every else "no", save_steps=args.checkpoint_every or 500,
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0, data_seed=0,
    )  # fmt: skip
    callbacks = [Arm()] if args.no_pilot else [cb, Arm()]
    trainer = Trainer(model=model, args=targs, train_dataset=ds, optimizers=(opt, sched), callbacks=callbacks)
    with Timer() as timer:
        trainer.train(resume_from_checkpoint=args.resume)
    if rank() == 0:
        print(timer.line(trainer.state.global_step))
    ev = trainer.evaluate(ds.eval_items())
    if args.no_pilot:
        print(f"final: step {trainer.state.global_step} eval_loss {ev['eval_loss']:.4f} lr {args.lr:.3e} rollbacks 0")
        return 0
    res = cb.finish(final_eval_loss=ev["eval_loss"])
    if rank() == 0:  # under torchrun: rank 0 wrote the run's logs and result
        print(f"final: step {cb.pilot.step_count} eval_loss {ev['eval_loss']:.4f} lr {cb.pilot.lr:.3e} "
              f"rollbacks {res['crash_count']}")  # fmt: skip
    leave_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
