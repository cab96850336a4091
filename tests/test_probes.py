"""Lookahead probes (Decision.probe_lrs) with real trainer runs on cpu-smoke: the trainer trains each branch
in-process and restores its state exactly, the guard clamps every branch LR, the extra updates are logged.

    python -m pytest -q tests/test_probes.py
"""

from __future__ import annotations

import math
from pathlib import Path

from lrpilot.channel import TELEMETRY_FILE
from lrpilot.config import load_config
from lrpilot.controllers.base import Decision, Observation
from lrpilot.controllers.rules import RuleController, RuleParams
from lrpilot.controllers.schedules import ConstantController
from lrpilot.logs import read_jsonl
from lrpilot.supervisor import RoundLogs, run_round

PROBE_AT, PROBE_STEPS = 20, 5


class ProbingConstant(ConstantController):
    """A constant LR that, if `probe`, asks for a probe at step PROBE_AT (one LR far above the guard's limits)
    and keeps every Observation."""

    name = "probing-constant"

    def __init__(self, cfg, probe: bool) -> None:
        super().__init__(cfg.schedule.init_lr, cfg.train.total_steps, cfg.schedule.warmup_steps)
        self.probe = probe
        self.observations: list[Observation] = []

    def decide(self, obs: Observation) -> Decision:
        self.observations.append(obs)
        d = super().decide(obs)
        if self.probe and obs.step == PROBE_AT and not obs.probes:
            lr = self.peak_lr
            return Decision(lr=d.lr, plan=d.plan, probe_lrs=(lr / 2, lr, 1.0), probe_steps=PROBE_STEPS)
        return d


def _round(tmp_path: Path, name: str, controller, *overrides: str):
    cfg = load_config("cpu-smoke", ["train.total_steps=40", *overrides])
    logs = RoundLogs(decisions=tmp_path / f"{name}_decisions.jsonl", rollbacks=tmp_path / f"{name}_rollbacks.jsonl")
    res = run_round(cfg, tmp_path / name, controller, logs)
    telemetry = read_jsonl(tmp_path / name / TELEMETRY_FILE)
    return cfg, res, telemetry, read_jsonl(logs.decisions)


def _step_losses(telemetry: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in telemetry if e["event"] == "step"}


def test_probe_branches_restore_the_run_exactly_guard_clamps_and_steps_are_counted(tmp_path):
    cfg, plain, t_plain, _ = _round(tmp_path, "plain", ProbingConstant(load_config("cpu-smoke"), probe=False))
    ctrl = ProbingConstant(cfg, probe=True)
    _, probed, t_probed, decisions = _round(tmp_path, "probed", ctrl)
    assert plain.status == probed.status == "ok"

    # restored exactly: every training loss and the final eval are those of the run without the probe
    assert _step_losses(t_probed) == _step_losses(t_plain)
    assert probed.final_eval_loss == plain.final_eval_loss

    # the trainer ran three branches of PROBE_STEPS updates; 1.0 was clamped by the guard (x2 the LR in force)
    lr = cfg.schedule.init_lr
    (ev,) = [e for e in t_probed if e["event"] == "probe"]
    assert ev["step"] == PROBE_AT and ev["probe_steps"] == 3 * PROBE_STEPS
    assert [b["lr"] for b in ev["branches"]] == [lr / 2, lr, cfg.guard.max_ratio * lr]
    # the branch at the LR in force trained on the run's own next batches from the same state: same losses
    same = next(b for b in ev["branches"] if b["lr"] == lr)
    main = _step_losses(t_probed)
    assert same["losses"] == [main[s] for s in range(PROBE_AT + 1, PROBE_AT + PROBE_STEPS + 1)]
    assert all(b["after_batches"] == 4 and b["after"] > 0 for b in ev["branches"])

    # the controller was asked again with the results; the decision record carries the probe; compute counted
    again = [o for o in ctrl.observations if o.step == PROBE_AT]
    assert [len(o.probes) for o in again] == [0, 3]
    assert [len(r.losses) for r in again[1].probes] == [PROBE_STEPS] * 3
    (rec,) = [d for d in decisions if d.get("probe")]
    assert rec["step"] == PROBE_AT and rec["probe"]["probe_steps"] == 3 * PROBE_STEPS
    assert len(rec["probe"]["clamp_reasons"]) == 1 and rec["probe"]["clamp_reasons"][0].startswith("probe lr 1: ")
    assert probed.probe_steps == 3 * PROBE_STEPS and plain.probe_steps == 0
    assert probed.update_step == plain.update_step == 40


def test_rules_with_probes_pick_a_branch_and_without_them_never_probe(tmp_path):
    params = RuleParams.for_init_lr(3e-3, probe_steps=3, probe_every=2)
    _, res, telemetry, decisions = _round(tmp_path, "rules", RuleController(params))
    probes = [e for e in telemetry if e["event"] == "probe"]
    # decision points 10, 20, 30 (cpu-smoke, 40 steps): every 2nd from the end of warmup, but 30 starts the cool-down
    assert [e["step"] for e in probes] == [d["step"] for d in decisions if d.get("probe")] == [10]
    chosen = [d for d in decisions if d.get("probe")]
    assert all("probe branches" in d["reasoning"] and d["new_lr"] in d["probe"]["lrs"] for d in chosen)
    assert all(d["new_lr"] >= d["old_lr"] for d in chosen)  # a probe never lowers the LR
    assert res.probe_steps == sum(e["probe_steps"] for e in probes) > 0
    # the default rules ask for none
    _, res0, telemetry0, _ = _round(tmp_path, "rules0", RuleController(RuleParams.for_init_lr(3e-3)))
    assert res0.probe_steps == 0 and not [e for e in telemetry0 if e["event"] == "probe"]


class DivergingProbe(ProbingConstant):
    """Asks, at step PROBE_AT, for a probe whose second branch trains at an LR that blows the model up."""

    def decide(self, obs: Observation) -> Decision:
        self.observations.append(obs)
        d = ConstantController.decide(self, obs)
        if self.probe and obs.step == PROBE_AT and not obs.probes:
            return Decision(lr=d.lr, plan=d.plan, probe_lrs=(self.peak_lr, 1e4), probe_steps=PROBE_STEPS)
        return d


def test_a_branch_that_diverges_leaves_the_run_untouched(tmp_path):
    """A real blow-up inside a probe branch (LR 1e4, allowed by a wide guard) poisons nothing: the run goes on
    with the losses of the run without the probe, and the controller sees the branch's non-finite or huge loss."""
    wide = ("guard.max_ratio=1e7", "guard.ceiling=1e5")
    cfg, plain, t_plain, _ = _round(tmp_path, "plain", DivergingProbe(load_config("cpu-smoke"), probe=False), *wide)
    ctrl = DivergingProbe(cfg, probe=True)
    _, probed, t_probed, _ = _round(tmp_path, "probed", ctrl, *wide)
    assert plain.status == probed.status == "ok" and probed.crash_count == 0
    assert _step_losses(t_probed) == _step_losses(t_plain) and probed.final_eval_loss == plain.final_eval_loss
    (ev,) = [e for e in t_probed if e["event"] == "probe"]
    calm, wild = ev["branches"]
    assert wild["lr"] == 1e4
    bad = [x for x in wild["losses"] if not (isinstance(x, float) and math.isfinite(x))]
    assert bad or max(wild["losses"]) > 2 * max(calm["losses"])
    (again,) = [o for o in ctrl.observations if o.step == PROBE_AT and o.probes]
    assert again.probes[0].end_loss < again.probes[1].end_loss or not math.isfinite(again.probes[1].end_loss)
