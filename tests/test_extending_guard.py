"""Extending > Guard rule: a new rule is one file (tests/toy_components/toy_guard_rule.py) and one registry line,
and it acts in a real cpu-smoke Pilot loop.

python -m pytest -q tests/test_extending_guard.py
"""

from __future__ import annotations

import pytest
import torch
from toy_components.toy_guard_rule import TOY_CAP

from lrpilot.decision import DEFAULT_GUARD_RULES, GUARD_RULES
from lrpilot.logs import read_jsonl
from lrpilot.pilot import Pilot, PilotError


def test_a_toy_guard_rule_is_registered_and_caps_the_lr_of_a_real_pilot_loop(smoke_config, tmp_path):
    from lrpilot.data import build_data
    from lrpilot.model import LLaMA

    assert "toy_cap" in GUARD_RULES
    torch.manual_seed(0)
    model = LLaMA(smoke_config.model)
    data = build_data(smoke_config.data, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    total = 20
    pilot = Pilot(
        opt, controller="constant", total_steps=total, warmup_steps=5, decision_every=5, run_dir=tmp_path,
        model=model, guard=smoke_config.guard, guard_rules=(*DEFAULT_GUARD_RULES, "toy_cap"),
    )  # fmt: skip
    for t in range(total):
        x, y = data.train_batch(t, 0, 4)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        info = pilot.step(loss.item())
        if info.step >= 5:  # from the first decision on, the optimizer never gets more than the cap
            assert opt.param_groups[0]["lr"] <= TOY_CAP
    pilot.finish(final_eval_loss=1.0)
    decisions = read_jsonl(tmp_path / "decisions.jsonl")
    assert decisions and all(d["new_lr"] <= TOY_CAP for d in decisions)
    assert any(r.startswith("toy cap") for d in decisions for r in d["clamp_reasons"])
    assert all(d["clamped"] for d in decisions)


def test_an_unknown_guard_rule_is_a_one_line_error_naming_the_choices(smoke_config):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(PilotError, match="guard_rules: .*choose from: emergency, clamp, lower_only"):
        Pilot(opt, total_steps=10, guard_rules=("emergency", "nope"))


SMOKE = ["--set", "train.total_steps=30", "--set", "schedule.warmup_steps=10", "--set", "schedule.decision_every=10"]


@pytest.mark.slow
def test_a_campaign_round_applies_the_guard_rules_its_config_names(tmp_path):
    """guard.rules (config) reaches the supervisor's decision core: a round of the constant schedule at
    3e-3 with the toy rule appended never sends more than TOY_CAP, and the records give the toy's reason."""
    from lrpilot.cli import main

    d = tmp_path / "camp"
    rules = ",".join((*DEFAULT_GUARD_RULES, "toy_cap"))
    rc = main(["campaign", "--preset", "cpu-smoke", *SMOKE, "--set", f"guard.rules={rules}", "--rounds", "1",
               "--controller", "constant", "--dir", str(d)])  # fmt: skip
    assert rc == 0
    decisions = [x for x in read_jsonl(d / "decisions.jsonl") if x.get("kind") == "decision"]
    assert len(decisions) == 2
    assert all(x["new_lr"] <= TOY_CAP and any("toy cap" in r for r in x["clamp_reasons"]) for x in decisions)


def test_a_campaign_naming_an_unknown_guard_rule_fails_in_one_line_and_writes_nothing(tmp_path, capsys):
    from lrpilot.cli import main

    d = tmp_path / "camp"
    rc = main(
        [
            "campaign",
            "--preset",
            "cpu-smoke",
            *SMOKE,
            "--set",
            "guard.rules=emergency,clmap",
            "--rounds",
            "1",
            "--dir",
            str(d),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not d.exists()
    assert err == "lrpilot: error: guard.rules 'clmap': unknown guard rule; choose one of: " + ", ".join(GUARD_RULES)
