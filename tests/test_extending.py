"""CONTRIBUTING.md's "Extending" recipes, each proven on a toy written in one file (tests/toy_components/).

    python -m pytest -q tests/test_extending.py

A controller: `toy-halfway` runs a real one-round campaign on cpu-smoke through `lrpilot campaign --controller
toy-halfway` (in-process `lrpilot.cli.main`, so the toy's module is imported). An LLM backend: `toy-fixed`
answers the LLM controller by its registry name (agent.backend) and is accepted as `--backend toy-fixed`. A
schedule: `toy-step` runs a one-peak `lrpilot baseline --schedule toy-step` and its LR steps down at mid-run.
Nothing outside the toy's file is edited: the CLI's choices, help and errors come from the registries.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from toy_components import toy_backend, toy_controller, toy_schedule  # noqa: F401 - each registers its toy

from lrpilot.cli import build_parser, main
from lrpilot.config import AgentConfig, load_config
from lrpilot.controllers import CONTROLLERS
from lrpilot.controllers.base import ControllerContext, Observation
from lrpilot.logs import read_jsonl

SMOKE = ["--set", "train.total_steps=30", "--set", "schedule.warmup_steps=10", "--set", "schedule.decision_every=10"]


def _help(command: str) -> str:
    """`lrpilot COMMAND --help` without whitespace (argparse wraps lines at spaces and hyphens)."""
    return "".join(build_parser()._subparsers._group_actions[0].choices[command].format_help().split())


@pytest.mark.slow
def test_a_toy_controller_runs_a_campaign_round(tmp_path):
    d = tmp_path / "camp"
    rc = main(["campaign", "--preset", "cpu-smoke", *SMOKE, "--rounds", "1", "--controller", "toy-halfway",
               "--dir", str(d)])  # fmt: skip
    assert rc == 0
    (final,) = read_jsonl(d / "final_results.jsonl")
    assert final["status"] == "ok" and final["controller"] == "toy-halfway" and final["memory"] == "none"
    assert math.isfinite(final["final_eval_ppl"]) and final["backend"] == ""
    decisions = [x for x in read_jsonl(d / "decisions.jsonl") if x.get("kind", "decision") == "decision"]
    assert len(decisions) == 2 and all(x["reasoning"].startswith("toy:") for x in decisions)
    init = load_config("cpu-smoke").schedule.init_lr
    assert decisions[0]["new_lr"] == pytest.approx(init - 0.1 * (init - init / 2))  # 10% toward half the peak
    assert "toy-halfway:toy:glidetohalfthepeak" in _help("campaign")


def test_a_toy_llm_backend_answers_by_its_registry_name(tmp_path):
    cfg = dataclasses.replace(load_config("cpu-smoke"), agent=AgentConfig(backend="toy-fixed"))
    audit = tmp_path / "llm_calls.jsonl"
    ctrl = CONTROLLERS.get("llm").build(ControllerContext(cfg, audit_path=audit, audit_extra={"round": 1}))
    obs = Observation(step=20, total_steps=30, warmup_steps=10, decision_every=10, lr=1e-3, init_lr=1e-3,
                      recent_losses=(5.0, 4.9), loss_history=((10, 5.1),), lr_history=((10, 1e-3),))  # fmt: skip
    ctrl.start_round(1, "")
    d = ctrl.decide(obs)
    assert not d.fallback and d.lr == toy_backend.TOY_LR and "toy backend" in d.reason
    (call,) = read_jsonl(audit)
    assert call["role"] == "controller" and call["round"] == 1 and call["model"] == cfg.agent.model
    assert build_parser().parse_args(["campaign", "--dir", "x", "--rounds", "1", "--backend", "toy-fixed"]).backend
    assert "toy-fixed:toy:afixedJSONanswer" in _help("campaign")


@pytest.mark.slow
def test_a_toy_schedule_runs_a_baseline(tmp_path):
    out = tmp_path / "sweep"
    assert main(["baseline", "--preset", "cpu-smoke", *SMOKE, "--schedule", "toy-step", "--peaks", "3e-3",
                 "--out", str(out)]) == 0  # fmt: skip
    (path,) = out.glob("*.json")
    rec = json.loads(path.read_text())
    assert rec["schedule"] == "toy-step" and math.isfinite(rec["final_eval_ppl"])
    lrs = dict((int(s), lr) for s, lr in rec["lr_trajectory"])
    assert lrs[10] == pytest.approx(3e-3) and lrs[29] == pytest.approx(1e-3)  # the peak, then a third of it
    assert "toy-step" in _help("baseline")


def test_unknown_names_fail_in_one_line_with_the_registry_choices(capsys):
    for argv, words in (
        (["campaign", "--dir", "x", "--rounds", "1", "--controller", "toy-halfwy"], "unknown controller"),
        (["campaign", "--dir", "x", "--rounds", "1", "--memory", "optna"], "unknown memory"),
        (["campaign", "--dir", "x", "--rounds", "1", "--backend", "opnai"], "unknown LLM backend"),
        (["baseline", "--out", "x", "--peaks", "1e-3", "--schedule", "toy-stp"], "unknown schedule"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("lrpilot ") and ": error: argument --" in err, err
        assert words in err and "choose one of:" in err and err.count("\n") == 1, err


def test_a_registered_toy_controller_steers_a_pilot_loop_by_name(tmp_path):
    """The Pilot finds controllers in the same registry as `lrpilot campaign` (it used to know only its own
    names and refused 'toy-halfway')."""
    import torch

    from lrpilot.pilot import Pilot, PilotError

    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1e-3)
    pilot = Pilot(opt, controller="toy-halfway", total_steps=30, warmup_steps=2, decision_every=5, init_lr=1e-3)
    for step in range(30):
        pilot.step(3.0 - 0.01 * step)
        opt.step()
    assert pilot.lr < 1e-3 * 0.9  # the toy glides toward half the peak
    with pytest.raises(PilotError, match="toy-halfway"):  # the unknown-name error lists the registry
        Pilot(opt, controller="nope", total_steps=30, warmup_steps=2, decision_every=5, init_lr=1e-3)
