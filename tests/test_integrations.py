"""The HF Trainer and Lightning callbacks with the real Trainers on a tiny model on CPU: the LR the pilot set is the
LR the optimizer used (read back before every optimizer step), a NaN gives one rollback and a finite loss, and a
SIGKILL then a resume from the framework's own checkpoint gives the uninterrupted run's LRs."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lrpilot.logs import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _load_common():
    """examples/_common.py (not by sys.path: examples/lightning.py would shadow the lightning package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lrpilot_examples_common", ROOT / "examples" / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


Windows = _load_common().Windows

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _steps(run_dir: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for ev in read_jsonl(run_dir / "telemetry.jsonl"):
        if ev.get("event") == "step":
            out[int(ev["step"])] = ev
    return out


def _example(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], env=_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_hf_trainer_uses_the_lr_the_pilot_set_with_grad_accumulation(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from lrpilot.integrations.transformers import LRPilotCallback

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))  # fmt: skip
    cb = LRPilotCallback(controller="rules", total_steps=24, warmup_steps=4, decision_every=4, run_dir=tmp_path)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    used: list[float] = []

    class ReadBack(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            used.append(optimizer.param_groups[0]["lr"])

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=24, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_steps=100, seed=0)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=Windows(24 * 8), optimizers=(opt, cb.scheduler_for(opt, model)),
            callbacks=[cb, ReadBack()]).train()  # fmt: skip
    cb.finish(1.0)
    tel = _steps(tmp_path)
    assert len(used) == 24 and sorted(tel) == list(range(1, 25))
    assert [tel[t + 1]["lr"] for t in range(24)] == used
    # the warmup ends at the rules' ceiling: 10/3 x the optimizer's 3e-3 (RuleParams.start_ratio 1)
    assert used[:4] == pytest.approx([1e-2 * (t + 1) / 4 for t in range(4)])
    assert [d["step"] for d in read_jsonl(tmp_path / "decisions.jsonl")] == [4, 8, 12, 16, 20]
    assert all(math.isfinite(e["loss"]) for e in tel.values())


def test_lightning_uses_the_lr_the_pilot_set_with_grad_accumulation(tmp_path):
    L = pytest.importorskip("lightning")

    from lrpilot.config import load_config
    from lrpilot.integrations.lightning import LRPilotCallback
    from lrpilot.model import LLaMA

    cb = LRPilotCallback(controller="cosine", total_steps=20, warmup_steps=4, decision_every=4, run_dir=tmp_path)
    used: list[float] = []
    micro: list[float] = []

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = LLaMA(load_config("cpu-smoke").model)

        def training_step(self, batch, batch_idx):
            ids = batch["input_ids"]
            loss = self.model(ids[:, :-1], ids[:, 1:])[1]
            micro.append(loss.item())
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=2e-3)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": cb.scheduler_for(opt, self), "interval": "step"}}

    class ReadBack(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            used.append(optimizer.param_groups[0]["lr"])

    loader = torch.utils.data.DataLoader(Windows(20 * 8), batch_size=4)
    L.Trainer(max_steps=20, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_checkpointing=False, enable_model_summary=False, accumulate_grad_batches=2,
              callbacks=[cb, ReadBack()]).fit(Lit(), loader)  # fmt: skip
    cb.finish(1.0)
    tel = _steps(tmp_path)
    assert len(used) == 20 and sorted(tel) == list(range(1, 21))
    assert [tel[t + 1]["lr"] for t in range(20)] == used
    # the pilot saw the mean of each update's two micro-batch losses (Lightning's output is divided by 2)
    assert [tel[t + 1]["loss"] for t in range(20)] == pytest.approx(
        [(micro[2 * t] + micro[2 * t + 1]) / 2 for t in range(20)], rel=1e-6
    )


@pytest.mark.slow
@pytest.mark.parametrize("example", ["hf_trainer.py", "lightning.py"])
def test_nan_gives_one_rollback_and_a_finite_loss(tmp_path, example):
    if example == "lightning.py":
        pytest.importorskip("lightning")
    p = _example(example, "--steps", "40", "--dir", str(tmp_path), "--inject-nan-at-step", "25", "--grad-accum", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    assert last.endswith("rollbacks 1"), last
    assert math.isfinite(float(last.split("eval_loss ")[1].split()[0]))
    (rb,) = read_jsonl(tmp_path / "rollbacks.jsonl")
    assert rb["crash_step"] == 25 and rb["crash_reason"] == "nan_loss" and rb["new_lr"] == rb["lr_at_crash"] / 2
    res = read_jsonl(tmp_path / "final_results.jsonl")[0]
    assert res["crash_count"] == 1 and math.isfinite(res["final_eval_loss"])
    # the framework's step count goes on after the rollback: the pilot's steps are the framework's, each logged
    # once, and the record names the undone updates (it used to end at update_step 40 - the undone steps)
    assert rb["step_numbering"] == "continue" and rb["next_step"] == 26
    assert rb["undone_steps"] == [rb["rolled_back_to_step"] + 1, 25] and res["update_step"] == 40
    steps = [e["step"] for e in read_jsonl(tmp_path / "telemetry.jsonl") if e["event"] == "step"]
    assert steps == list(range(1, 41))


@pytest.mark.slow
@pytest.mark.parametrize(
    "example, ckpt", [("hf_trainer.py", "hf/checkpoint-20"), ("lightning.py", "ckpt/step=20.ckpt")]
)
def test_sigkill_and_resume_from_the_frameworks_checkpoint(tmp_path, example, ckpt):
    if example == "lightning.py":
        pytest.importorskip("lightning")
    common = ["--steps", "40", "--checkpoint-every", "20"]
    full = tmp_path / "full"
    p = _example(example, *common, "--dir", str(full))
    assert p.returncode == 0, p.stderr[-2000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / example), *common, "--dir", str(run),
                             "--pause-at-step", "30"], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (run / "paused").exists():
        assert proc.poll() is None, f"{example} exited {proc.returncode} before step 30"
        assert time.monotonic() < deadline, "never reached step 30"
        time.sleep(0.05)  # polling a file with a deadline
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert max(_steps(run)) == 30
    r = _example(example, *common, "--dir", str(run), "--resume", str(run / ckpt))
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _steps(full), _steps(run)
    assert sorted(b) == sorted(a) == list(range(1, 41))
    assert [b[s]["lr"] for s in range(1, 41)] == [a[s]["lr"] for s in range(1, 41)]
    assert [b[s]["loss"] for s in range(1, 41)] == pytest.approx([a[s]["loss"] for s in range(1, 41)], rel=1e-5)
    da, db = read_jsonl(full / "decisions.jsonl"), read_jsonl(run / "decisions.jsonl")
    assert [(d["step"], d["new_lr"]) for d in db] == [(d["step"], d["new_lr"]) for d in da]
