"""Lookahead probes (Decision.probe_lrs) with real trainer runs on cpu-smoke: the trainer trains each branch
in-process and restores its state exactly, the guard clamps every branch LR, the extra updates are logged.

    python -m pytest -q tests/test_probes.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lrpilot.channel import TELEMETRY_FILE
from lrpilot.config import load_config
from lrpilot.controllers.base import Decision, Observation
from lrpilot.controllers.rules import RuleController, RuleParams
from lrpilot.controllers.schedules import ConstantController
from lrpilot.logs import read_jsonl
from lrpilot.lr import SWEEP_DIVERGED, sweep_lrs
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


# ------------------------------------------------------------------------------------------- LR range test

SWEEP_STEPS = 8


class SweepingConstant(ProbingConstant):
    """A constant LR that, if `probe`, asks at step PROBE_AT for an LR range test from the LR in force to `top`
    and then ignores its result (so the run must equal the run without the test)."""

    def __init__(self, cfg, probe: bool, top: float, steps: int = SWEEP_STEPS) -> None:
        super().__init__(cfg, probe)
        self.top, self.steps = top, steps

    def decide(self, obs: Observation) -> Decision:
        self.observations.append(obs)
        d = ConstantController.decide(self, obs)
        if self.probe and obs.step == PROBE_AT and not obs.probes:
            lrs = (self.peak_lr, self.top)
            return Decision(lr=d.lr, plan=d.plan, probe_lrs=lrs, probe_steps=self.steps, probe_sweep=True)
        return d


def test_a_range_test_restores_the_run_the_guard_bounds_its_ends_and_its_updates_are_counted(tmp_path):
    """One branch whose LR rises geometrically (lrpilot.lr.sweep_lrs) from the LR in force to the requested top,
    which the guard's ceiling bounds (not its x2 ratio band: the run's LR does not change); the run goes on
    exactly as without the test; the curve is in the decision log and its updates are counted as compute."""
    cfg = load_config("cpu-smoke", ["train.total_steps=40"])
    lr0 = cfg.schedule.init_lr
    _, plain, t_plain, _ = _round(tmp_path, "plain", SweepingConstant(cfg, probe=False, top=1.0))
    ctrl = SweepingConstant(cfg, probe=True, top=1.0)
    _, swept, t_swept, decisions = _round(tmp_path, "swept", ctrl)
    assert plain.status == swept.status == "ok"
    assert _step_losses(t_swept) == _step_losses(t_plain) and swept.final_eval_loss == plain.final_eval_loss

    (ev,) = [e for e in t_swept if e["event"] == "probe"]
    assert ev["step"] == PROBE_AT and ev["sweep"] is True
    (branch,) = ev["branches"]
    n = len(branch["losses"])
    assert 2 <= n <= SWEEP_STEPS and branch["lrs"] == sweep_lrs(lr0, cfg.guard.ceiling, SWEEP_STEPS)[:n]
    assert ev["probe_steps"] == n == swept.probe_steps and plain.probe_steps == 0
    # the test's first update is the run's own next update (same state, batch and LR): the same loss
    assert branch["losses"][0] == _step_losses(t_plain)[PROBE_AT + 1]

    (again,) = [o for o in ctrl.observations if o.step == PROBE_AT and o.probes]
    assert again.probes[0].lrs == tuple(branch["lrs"]) and again.probes[0].losses == tuple(branch["losses"])
    (rec,) = [d for d in decisions if d.get("probe")]
    assert rec["probe"]["lrs"] == [lr0, cfg.guard.ceiling]  # 1.0 is above guard.ceiling: clamped to it
    assert len(rec["probe"]["clamp_reasons"]) == 1 and "ceiling" in rec["probe"]["clamp_reasons"][0]
    assert rec["probe"]["sweep"] == [{"lrs": branch["lrs"], "losses": branch["losses"]}]


def test_a_range_test_that_diverges_stops_early_and_leaves_the_run_untouched(tmp_path):
    """A sweep into LRs that blow the model up (a wide guard) stops once the loss passes SWEEP_DIVERGED x its
    best or turns non-finite: fewer updates, all counted, and the run's losses are those without the test."""
    wide = ["train.total_steps=40", "guard.ceiling=1e5"]
    cfg = load_config("cpu-smoke", wide)
    steps = 40
    _, plain, t_plain, _ = _round(tmp_path, "plain", SweepingConstant(cfg, False, 1e5, steps), *wide)
    _, swept, t_swept, _ = _round(tmp_path, "swept", SweepingConstant(cfg, True, 1e5, steps), *wide)
    assert plain.status == swept.status == "ok" and swept.crash_count == 0
    assert _step_losses(t_swept) == _step_losses(t_plain) and swept.final_eval_loss == plain.final_eval_loss
    (ev,) = [e for e in t_swept if e["event"] == "probe"]
    losses = ev["branches"][0]["losses"]
    assert len(losses) < steps and swept.probe_steps == len(losses)
    last, best = losses[-1], min(losses[:-1])
    assert not (isinstance(last, float) and math.isfinite(last) and last <= SWEEP_DIVERGED * best)


def test_rules_with_a_range_test_climb_to_the_ceiling_it_found(tmp_path):
    """RuleParams.range_steps: the rules ask for the test at the end of warmup (once), set the round's ceiling
    from it (meta["range_ceiling"], in [floor, probe ceiling]) and later decisions climb to that ceiling."""
    cfg = load_config("cpu-smoke", ["train.total_steps=40"])
    lr0, warmup = cfg.schedule.init_lr, cfg.schedule.warmup_steps
    p = RuleParams.for_init_lr(lr0, decay_start=1.0, range_steps=SWEEP_STEPS)  # no cool-down: the ceiling shows
    _, res, telemetry, decisions = _round(tmp_path, "rules", RuleController(p))
    assert res.status == "ok"
    assert [e["step"] for e in telemetry if e["event"] == "probe"] == [warmup]
    (rec,) = [d for d in decisions if d.get("probe")]
    start = RuleController(p).warmup_to(lr0)  # the sweep starts at the LR in force: the warmup's end (the ceiling)
    assert rec["probe"]["lrs"] == [start, min(start * p.range_factor, cfg.guard.ceiling)]
    found = rec["meta"]["range_ceiling"]
    assert cfg.guard.floor <= found <= p.ceiling * p.probe_ceiling_factor and "range test" in rec["reasoning"]
    assert res.probe_steps == len(rec["probe"]["sweep"][0]["losses"]) > 0
    later = [d for d in decisions if d["step"] > rec["step"]]
    assert later and all("range test ceiling" in d["reasoning"] for d in later if "ceiling" in d["reasoning"])
    assert max(d["new_lr"] for d in decisions) <= found * (1 + 1e-12)


@pytest.mark.llm
def test_an_llm_controller_sees_the_range_test_in_its_prompt(tmp_path, monkeypatch):
    """agent.range_steps: the LLM Controller (behind a real OpenAI-compatible server on 127.0.0.1) asks for the
    range test at the end of warmup without calling the model, and its first prompt carries the curve and the
    rules' pick (rules.range_suggestion): the LLM and the rules see the same evidence."""
    pytest.importorskip("openai", reason="needs the `openai` extra")
    from llm_servers import ScriptedServer, chat_body

    from lrpilot.campaign import CampaignSettings, run_campaign
    from lrpilot.config import apply_overrides

    for name in ("DASHSCOPE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    srv = ScriptedServer(script=[(200, chat_body('{"reason": "hold", "lr": 0.003}'), {})])
    smoke = ["train.total_steps=40"]
    try:
        agent = [f"agent.base_url={srv.base_url}", "agent.model=scripted", "agent.wait_for_decisions=true",
                 "agent.retries=0", f"agent.range_steps={SWEEP_STEPS}"]  # fmt: skip
        cfg = apply_overrides(load_config("cpu-smoke", smoke), agent)
        settings = CampaignSettings(preset="cpu-smoke", overrides=(*smoke, *agent), controller="llm",
                                    memory="none", backend="openai", model="scripted")  # fmt: skip
        run_campaign(cfg, tmp_path / "camp", 1, settings, echo=lambda _: None)
    finally:
        srv.stop()
    warmup = cfg.schedule.warmup_steps
    decisions = read_jsonl(tmp_path / "camp" / "decisions.jsonl", strict=True)
    (rec,) = [d for d in decisions if d.get("probe")]
    assert rec["step"] == warmup and rec["probe"]["sweep"] and rec["probe"]["probe_steps"] >= 5
    # one model call per decision point: the range test itself asked the model nothing
    prompts = [r["json"]["messages"][-1]["content"] for r in srv.requests if r["path"].endswith("/chat/completions")]
    assert len(prompts) == len(decisions)
    assert (
        "LR range test at this step" in prompts[0]
        and "the rule controller would take that as its ceiling" in prompts[0]
    )
    assert not any("LR range test" in p for p in prompts[1:])


def test_range_steps_for_the_llm_needs_wait_for_decisions():
    from lrpilot.config import ConfigError

    with pytest.raises(ConfigError, match=r"agent\.range_steps.*wait_for_decisions=true"):
        load_config("cpu-smoke", ["agent.range_steps=20"])
    with pytest.raises(ConfigError, match=r"agent\.range_steps"):
        load_config("cpu-smoke", ["agent.range_steps=3", "agent.wait_for_decisions=true"])


def test_the_report_draws_a_campaigns_range_tests_and_reads_odd_records_safely(tmp_path):
    """A real 1-round rules campaign with a range test: the report (which reads only the logs) gets section (g)
    with the curve and the ceiling; a campaign without one has no such section; garbage in a sweep record is
    skipped, not fatal."""
    from lrpilot.campaign import CampaignSettings, run_campaign
    from lrpilot.campaign_logs import load_campaign
    from lrpilot.report.report import build_report

    smoke = ["train.total_steps=40"]
    cfg = load_config("cpu-smoke", smoke)
    for name, rule in (("ranged", {"range_steps": float(SWEEP_STEPS)}), ("plain", {})):
        settings = CampaignSettings(preset="cpu-smoke", overrides=tuple(smoke), controller="rules", memory="none",
                                    rule_params=rule)  # fmt: skip
        run_campaign(cfg, tmp_path / name, 1, settings, echo=lambda _: None)
    (rnd,) = load_campaign(tmp_path / "ranged").rounds
    (test,) = rnd.range_tests()
    assert test.step == cfg.schedule.warmup_steps and len(test.lrs) == len(test.losses) >= 2
    assert test.ceiling > 0 and test.lrs[0] < test.lrs[-1]
    md = build_report(tmp_path / "ranged", [], tmp_path / "rep1").md_path.read_text()
    assert "(g) LR range tests" in md and (tmp_path / "rep1" / "range_tests.png").stat().st_size > 0
    md0 = build_report(tmp_path / "plain", [], tmp_path / "rep0").md_path.read_text()
    assert "range test" not in md0 and not (tmp_path / "rep0" / "range_tests.png").exists()

    # odd records: not a list, a list of garbage, mismatched lengths, too few points
    import dataclasses

    odd = [{"probe": {"sweep": "x"}}, {"probe": {"sweep": [{"lrs": "a", "losses": None}]}},
           {"probe": {"sweep": [{"lrs": [1e-3, "b", 3e-3], "losses": [2.0, 1.0]}]}, "meta": "m"},
           {"probe": {"sweep": [{"lrs": 5, "losses": [1.0]}]}}, {"probe": {"sweep": [{"lrs": [1e-3], "losses": True}]}},
           {"step": 7, "probe": {"sweep": [{"lrs": [1e-3, 2e-3, -1], "losses": [2.0, "nan", 1.0]}]}}]  # fmt: skip
    (kept,) = dataclasses.replace(rnd, decisions=tuple(odd)).range_tests()
    assert kept.step == 7 and kept.lrs == (1e-3, 2e-3) and math.isnan(kept.losses[1]) and math.isnan(kept.ceiling)


def test_review_fixes_range_ceiling_is_enforced_tested_once_and_odd_events_are_safe():
    """After a range test lowered the ceiling below the LR in force, later decisions cut down to it
    (over-ceiling); a round asks for one test only, also when it comes back to the end of warmup after a
    rollback; a malformed probe event's lists and counts read as empty/zero; a bad sweep record is skipped."""
    from lrpilot.records import DecisionRecord
    from lrpilot.supervisor import _count, _floats

    p = RuleParams(range_steps=20)
    rec = DecisionRecord(step=100, old_lr=3e-4, new_lr=1.5e-4, loss=3.0, extra={"meta": {"range_ceiling": 1e-4}})
    base = dict(total_steps=1000, warmup_steps=100, decision_every=50, init_lr=3e-4, loss_history=(),
                lr_history=(), decisions=(rec,))  # fmt: skip
    later = RuleController(p).decide(Observation(step=150, lr=1.5e-4, recent_losses=(3.0,) * 50, **base))
    assert later.lr == pytest.approx(1e-4) and later.meta["rule"] == "over-ceiling"
    again = RuleController(p).decide(Observation(step=100, lr=3e-4, recent_losses=(3.0, 2.9, 2.8), **base))
    assert again.probe_lrs is None  # tested once per round
    assert _floats(5) == () and _floats(None) == () and _floats([1, "x"])[0] == 1.0 and math.isnan(_floats([1, "x"])[1])
    assert _count("7") == 7 and _count(-1) == 0 and _count(2.5) == 0 and _count(None) == 0 and _count(True) == 0


def test_an_llm_whose_range_test_was_refused_asks_the_model(tmp_path):
    """The LLM Controller (real HTTP on 127.0.0.1) asks for the range test once per round; if it comes back
    without results (the trainer refused it), the re-ask goes to the model instead of holding the LR."""
    pytest.importorskip("openai", reason="needs the `openai` extra")
    from llm_servers import ScriptedServer, chat_body

    from lrpilot.config import AgentConfig
    from lrpilot.controllers.llm import LLMController
    from lrpilot.llm.base import make_backend

    srv = ScriptedServer(script=[(200, chat_body('{"reason": "up", "lr": 0.0006}'), {})])
    try:
        agent = AgentConfig(base_url=srv.base_url, model="scripted", retries=0, wait_for_decisions=True,
                            range_steps=20)  # fmt: skip
        ctrl = LLMController(make_backend(agent, "controller", tmp_path / "calls.jsonl"), blocking=True,
                             range_steps=agent.range_steps)  # fmt: skip
        ctrl.start_round()
        o = Observation(step=100, total_steps=1000, warmup_steps=100, decision_every=50, lr=3e-4, init_lr=3e-4,
                        recent_losses=(3.0, 2.9, 2.8), loss_history=(), lr_history=())  # fmt: skip
        first = ctrl.decide(o)
        assert first.probe_sweep and not srv.requests
        refused = ctrl.decide(o)  # asked again with no probe results
        assert refused.probe_lrs is None and refused.lr == pytest.approx(6e-4) and len(srv.requests) == 1
    finally:
        srv.stop()


def test_range_steps_for_the_llm_needs_one_process():
    from lrpilot.config import ConfigError

    with pytest.raises(ConfigError, match=r"agent\.range_steps.*one trainer process"):
        load_config("cpu-smoke", ["agent.range_steps=20", "agent.wait_for_decisions=true", "launch.devices=cpu:2"])
