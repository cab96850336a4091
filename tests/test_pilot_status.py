"""`lrpilot status DIR` on what a lrpilot.Pilot writes (its round.json, telemetry, decisions.jsonl, rollbacks.jsonl)
and on a `campaign --script` round whose script has not built its Pilot yet (only pilot.json): the real CLI on the
logs of a real Pilot in a plain loop on the cpu-smoke model.

    python -m pytest -q tests/test_pilot_status.py
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from lrpilot.pilot import Pilot

ROOT = Path(__file__).resolve().parents[1]


def _status(d: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "lrpilot", "status", str(d)], env=env, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_status_reads_a_pilot_run_directory(smoke_config, tmp_path):
    from lrpilot.data import build_data
    from lrpilot.model import LLaMA

    torch.manual_seed(0)
    model = LLaMA(smoke_config.model)
    data = build_data(smoke_config.data, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    run = tmp_path / "mine"
    pilot = Pilot(opt, controller="rules", total_steps=20, warmup_steps=5, decision_every=5, run_dir=run, model=model,
                  guard=smoke_config.guard)  # fmt: skip
    nan_done = False

    def train_until(n: int) -> None:
        nonlocal nan_done
        while pilot.step_count < n:
            x, y = data.train_batch(pilot.step_count, 0, 4)
            _, loss = model(x, y)
            if pilot.step_count == 13 and not nan_done:
                loss, nan_done = loss * math.nan, True
            loss.backward()
            opt.step()
            opt.zero_grad()
            pilot.step(loss.item())

    train_until(10)
    line = _status(tmp_path).splitlines()[0]
    assert line.startswith("mine") and " running " in line and "step 10/20" in line, line
    assert "decision" in line and "@ 10" in line and "no decision yet" not in line, line
    train_until(20)
    pilot.finish(final_eval_loss=3.0)
    line = _status(tmp_path).splitlines()[0]
    assert " finished " in line and "step 20/20" in line and "@ 15" in line and "rollbacks 1" in line, line


def test_status_shows_a_script_round_before_its_pilot_starts(tmp_path):
    rnd = tmp_path / "camp" / "rounds" / "round_001"
    rnd.mkdir(parents=True)
    (rnd / "pilot.json").write_text(json.dumps({"run_dir": str(rnd), "total_steps": 40, "controller": "rules"}))
    out = _status(tmp_path / "camp")
    assert out.splitlines()[0].split() == ["round", "1", "pending", "step", "0/40", "no", "decision", "yet",
                                           "rollbacks", "0"], out  # fmt: skip
