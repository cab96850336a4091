"""Replay of a logged LR trajectory: the same LRs at the same steps, delays included, from decisions.jsonl.

python -m pytest -q tests/test_replay.py
"""

from __future__ import annotations

import json
import math
import sys

import pytest
from toy_loop import toy_loop

from lrpilot.controllers.base import Observation, RollbackRecord
from lrpilot.controllers.replay import ReplayController, ReplayError
from lrpilot.controllers.rules import RuleController
from lrpilot.logs import JsonlLog

TOTAL, WARMUP, EVERY = 2000, 200, 100


def obs(step: int, lr: float = 1e-3, rollbacks=()) -> Observation:
    return Observation(
        step=step,
        total_steps=TOTAL,
        warmup_steps=WARMUP,
        decision_every=EVERY,
        lr=lr,
        init_lr=1e-3,
        recent_losses=(3.0,),
        loss_history=(),
        lr_history=(),
        rollbacks=rollbacks,
    )


def plan_lr(plan, step):
    if step <= plan[0][0]:
        return plan[0][1]
    for (s0, v0), (s1, v1) in zip(plan, plan[1:], strict=False):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return plan[-1][1]


def write_log(path, records):
    with JsonlLog(path, fsync=False) as log:
        for r in records:
            log.append(r)


def test_recorded_lr_at_recorded_steps_and_hold_elsewhere():
    c = ReplayController([{"step": 200, "new_lr": 1.5e-3}, {"step": 400, "new_lr": 9e-4, "reasoning": "cool down"}])
    d = c.decide(obs(200))
    assert d.lr == 1.5e-3 and d.plan is None and d.meta["replayed"]
    d = c.decide(obs(300, lr=1.5e-3))
    assert d.lr == 1.5e-3 and not d.meta["replayed"] and "no record at step 300" in d.reason
    d = c.decide(obs(400, lr=1.5e-3))
    assert d.lr == 9e-4 and "cool down" in d.reason
    assert c.describe() == {"controller": "replay", "source": "", "records": 2, "steps": 2, "rerun_raw": False}


def test_effective_step_reproduces_the_async_delay():
    c = ReplayController(
        [
            {"step": 300, "new_lr": 2e-3, "effective_step": 337},
            {"step": 400, "new_lr": 1e-3, "effective_step": 401},
            {"step": 500, "new_lr": 5e-4, "effective_step": 777},
        ]
    )  # later than the interval
    d = c.decide(obs(300, lr=1e-3))
    assert d.lr == 2e-3 and d.plan == ((300, 1e-3), (336, 1e-3), (337, 2e-3))
    assert [plan_lr(d.plan, s) for s in (300, 320, 336, 337, 399)] == [1e-3] * 3 + [2e-3] * 2
    d = c.decide(obs(400, lr=2e-3))
    assert d.plan == ((400, 2e-3), (401, 1e-3)) and plan_lr(d.plan, 400) == 2e-3 and plan_lr(d.plan, 401) == 1e-3
    # an answer that came after the next decision points (skipped by the logged run): held, switched at 777
    for step in (500, 600):
        d = c.decide(obs(step, lr=1e-3))
        assert d.lr == 1e-3 and d.plan is None and d.meta["effective_step"] == 777
    assert d.meta["pending_from_step"] == 500
    d = c.decide(obs(700, lr=1e-3))
    assert d.lr == 5e-4 and d.plan == ((700, 1e-3), (776, 1e-3), (777, 5e-4))
    assert [plan_lr(d.plan, s) for s in (700, 776, 777)] == [1e-3, 1e-3, 5e-4]
    assert c.decide(obs(800, lr=5e-4)).plan is None  # past it: nothing pending


def test_a_pending_answer_that_lands_inside_the_next_points_interval_switches_there_first():
    """The logged run asked at 300; the answer came while it was asking at 400 (so 400 was not skipped) and took
    effect at 401; 400's own answer took effect at 512 (past its interval). The replay must switch to 300's LR
    at 401, not hold 400's old LR until 512 (a CI run of test_replay_of_a_non_blocking_round_... caught it)."""
    c = ReplayController(
        [
            {"step": 300, "new_lr": 2e-3, "effective_step": 401},
            {"step": 400, "new_lr": 1.5e-3, "effective_step": 512},
            {"step": 500, "new_lr": 8e-4, "effective_step": 530},
        ]
    )
    d = c.decide(obs(300, lr=1e-3))
    assert d.lr == 1e-3 and d.plan is None and d.meta["effective_step"] == 401  # past 300's interval: hold
    d = c.decide(obs(400, lr=1e-3))
    assert d.lr == 2e-3 and d.plan == ((400, 1e-3), (401, 2e-3))
    assert [plan_lr(d.plan, s) for s in (400, 401, 499)] == [1e-3, 2e-3, 2e-3]
    assert d.meta["pending_from_step"] == 300 and d.meta["effective_step"] == 512
    d = c.decide(obs(500, lr=2e-3))  # 400's answer lands at 512, then 500's own at 530
    assert d.lr == 8e-4 and d.plan == ((500, 2e-3), (511, 2e-3), (512, 1.5e-3), (529, 1.5e-3), (530, 8e-4))
    assert [plan_lr(d.plan, s) for s in (500, 511, 512, 529, 530, 599)] == [2e-3] * 2 + [1.5e-3] * 2 + [8e-4] * 2


def test_a_pending_answer_that_lands_right_at_the_next_point_switches_before_its_first_update():
    """Seen in a real run: the answer asked at 300 was applied at step 400 (the trainer's `applied` event at
    400: update 401 on uses it), and 400 was asked too; its own answer came at 455."""
    c = ReplayController(
        [
            {"step": 300, "new_lr": 2e-3, "effective_step": 400},
            {"step": 400, "new_lr": 1.5e-3, "effective_step": 455},
        ]
    )
    d = c.decide(obs(300, lr=1e-3))
    assert d.lr == 1e-3 and d.plan is None  # 400 is the next point's: hold here
    d = c.decide(obs(400, lr=1e-3))
    assert d.lr == 1.5e-3 and d.plan == ((400, 2e-3), (454, 2e-3), (455, 1.5e-3))
    c = ReplayController([{"step": 300, "new_lr": 2e-3, "effective_step": 400}, {"step": 400, "new_lr": 9e-4,
                          "effective_step": None}])  # fmt: skip
    d = c.decide(obs(400, lr=1e-3))  # 400's own answer never took effect: 300's switches at once
    assert d.lr == 2e-3 and d.plan is None


def test_a_pending_answer_still_switches_where_this_points_own_answer_was_discarded():
    c = ReplayController(
        [
            {"step": 300, "new_lr": 2e-3, "effective_step": 420},
            {"step": 400, "new_lr": 5e-4, "kind": "superseded"},
        ]
    )
    d = c.decide(obs(400, lr=1e-3))
    assert d.lr == 2e-3 and d.plan == ((400, 1e-3), (419, 1e-3), (420, 2e-3))


def test_a_record_with_all_its_plan_knots_replays_that_plan():
    """A baseline schedule's plan has a knot per step; its record's summary holds only the first and last, so
    without `plan_knots` the replay held the headline LR for the whole interval (a staircase)."""
    knots = [[300 + i, 1e-3 * (1 - i / 200)] for i in range(100)]
    rec = {"step": 300, "new_lr": 1e-3, "plan": {"knots": 100, "first": knots[0], "last": knots[-1]}}
    d = ReplayController([{**rec, "plan_knots": knots}]).decide(obs(300))
    assert d.plan == tuple((s, v) for s, v in knots)
    assert ReplayController([rec]).decide(obs(300)).plan is None  # an older log: the headline LR, as before
    for bad in ([[301, 1e-3]], [[300, 1e-3], [300, 9e-4]], [[300, -1.0]], [[300]], "x"):  # not a plan from step 300
        assert ReplayController([{**rec, "plan_knots": bad}]).decide(obs(300)).plan is None


def test_guard_records_are_not_replayed_and_rollback_revisits_pick_the_next_record():
    recs = [
        {"step": 300, "new_lr": 2e-3, "kind": "decision"},
        {"step": 300, "new_lr": 3e-4, "kind": "emergency"},  # the guard's cut: the guard redoes it itself
        {"step": 500, "new_lr": 4e-3},
        {"step": 300, "new_lr": 1e-3, "kind": "fallback"},  # after the crash at 600 and rollback to 200
    ]
    c = ReplayController(recs)
    assert c.decide(obs(300)).lr == 2e-3
    rb = RollbackRecord(crash_step=600, lr_at_crash=4e-3, rolled_back_to_step=200, new_lr=2e-3, crash_reason="nan")
    assert c.decide(obs(300, rollbacks=(rb,))).lr == 1e-3
    assert c.decide(obs(300, rollbacks=(rb, rb))).lr == 1e-3  # more visits than records: the last one
    assert c.describe()["records"] == 3


def test_decisions_that_never_took_effect_hold():
    c = ReplayController(
        [
            {"step": 300, "new_lr": 2e-3, "effective_step": None, "kind": "decision"},  # crashed before applied
            {"step": 400, "new_lr": 1e-3, "kind": "superseded", "reasoning": "discarded: rolled back"},
            {"step": 500, "new_lr": 4e-3, "effective_step": 530},
        ]
    )
    for step in (300, 400):
        d = c.decide(obs(step, lr=1e-3))
        assert d.lr == 1e-3 and d.plan is None and "never took effect" in d.reason
    assert c.decide(obs(500, lr=1e-3)).lr == 4e-3


def test_rerun_raw_with_the_llm_controllers_parser():
    recs = [
        {"step": 300, "new_lr": 1e-3, "raw_reply": '{"lr": 0.0015, "reason": "loss falls fast"}'},
        {"step": 400, "new_lr": 1e-3, "raw_reply": "I would raise it a lot"},  # no JSON: the parser rejects it
        # the published study's format, in `reasoning`: free text, then the tag
        {"step": 500, "new_lr": 1e-3, "reasoning": "Loss still falls; climb.\n[FINAL_LR] 2.0e-3 [/FINAL_LR]"},
    ]
    c = ReplayController(recs, rerun_raw=True)
    d = c.decide(obs(300, lr=1e-3))
    assert d.lr == 1.5e-3 and not d.fallback and "loss falls fast" in d.reason
    d = c.decide(obs(400, lr=1.5e-3))
    assert d.fallback and d.lr == 1.5e-3 and d.meta["parse_error"]
    d = c.decide(obs(500, lr=1.5e-3))
    assert d.lr == 2e-3 and not d.fallback and "climb" in d.reason and d.meta["logged_lr"] == 1e-3


def test_from_log_picks_one_round(tmp_path):
    path = tmp_path / "decisions.jsonl"
    write_log(
        path,
        [
            {"round": 1, "run_start_iso": "2026-01-01T00:00:00", "step": 200, "new_lr": 1e-3, "old_lr": 3e-4},
            {"round": 1, "run_start_iso": "2026-01-01T00:00:00", "step": 300, "new_lr": 2e-3},
            {"round": 2, "run_start_iso": "2026-01-02T00:00:00", "step": 200, "new_lr": 5e-4},
        ],
    )
    c = ReplayController.from_log(path, round=2)
    assert c.decide(obs(200)).lr == 5e-4 and c.describe()["source"] == str(path)
    assert ReplayController.from_log(path, run_start_iso="2026-01-01T00:00:00").decide(obs(300)).lr == 2e-3
    with pytest.raises(ReplayError, match="holds 2 rounds; pick one"):
        ReplayController.from_log(path)
    with pytest.raises(ReplayError, match=r"rounds in the log: \[1, 2\]"):
        ReplayController.from_log(path, round=7)
    with pytest.raises(ReplayError, match="not found"):
        ReplayController.from_log(tmp_path / "nope.jsonl")


def test_bad_records_are_one_line_errors_naming_the_field(tmp_path):
    with pytest.raises(ReplayError, match="record 1 .*'new_lr'"):
        ReplayController([{"step": 200, "new_lr": 1e-3}, {"step": 300, "new_lr": "nan"}])
    with pytest.raises(ReplayError, match="record 0: lacks 'step'"):
        ReplayController([{"new_lr": 1e-3}])
    with pytest.raises(ReplayError, match="'effective_step'"):
        ReplayController([{"step": 200, "new_lr": 1e-3, "effective_step": 2.5}])
    path = tmp_path / "decisions.jsonl"
    path.write_text('{"step": 200, "new_lr": 0.001}\n{"step": 300, "new_l')  # torn last line: skipped
    with pytest.warns(UserWarning, match="corrupt jsonl line"):
        c = ReplayController.from_log(path)
    assert c.describe()["records"] == 1


def test_replay_of_a_logged_rule_round_gives_the_same_lrs(tmp_path):
    """Run the rule controller on a synthetic loss, log its decisions, replay them: the same LR per step."""

    def run(controller, log=None):
        def record(step, old_lr, d):
            if log is not None:
                log.append({"round": 1, "step": step, "old_lr": old_lr, "new_lr": d.lr, "reasoning": d.reason})

        per_step, _ = toy_loop(controller, total=TOTAL, warmup=WARMUP, every=EVERY, init_lr=1e-3, scale=0.05, seed=1,
                               on_decision=record)  # fmt: skip
        return per_step

    with JsonlLog(tmp_path / "decisions.jsonl") as log:
        original = run(RuleController(), log)
    replayed = run(ReplayController.from_log(tmp_path / "decisions.jsonl", round=1))
    assert replayed == original and len(set(original[WARMUP:])) > 3


def test_rerun_raw_keeps_the_logged_effect_delay():
    recs = [
        {"step": 200, "new_lr": 1e-3, "raw_reply": '{"lr": 2e-3, "reason": "up"}', "effective_step": 210},
        {"step": 300, "new_lr": 1e-3, "reasoning": "I think we should hold"},
    ]
    c = ReplayController(recs, rerun_raw=True)
    d = c.decide(obs(200, lr=1e-3))
    assert d.lr == 2e-3 and d.plan[-1] == (210, 2e-3) and d.meta["logged_lr"] == 1e-3 and d.raw
    d = c.decide(obs(300, lr=2e-3))
    assert d.fallback and d.lr == 2e-3 and "not parsed" in d.reason
    with pytest.raises(ReplayError, match="raw_reply"):
        ReplayController([{"step": 200, "new_lr": 1e-3}], rerun_raw=True)


def test_rerun_raw_without_the_llm_parser_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lrpilot.controllers.llm", None)  # import fails
    with pytest.raises(ReplayError, match="parse_recorded_reply"):
        ReplayController([{"step": 200, "new_lr": 1e-3, "raw_reply": "x"}], rerun_raw=True)


def test_odd_observations_still_give_a_positive_lr():
    c = ReplayController([{"step": 200, "new_lr": 1e-3}])
    d = c.decide(obs(250, lr=float("nan")))
    assert d.lr == 1e-3 and d.fallback and math.isfinite(d.lr)


def test_replays_a_published_round():
    """The published agent log (tests/data): 40 rounds told apart by run_start_iso, LRs replayed exactly."""
    import json
    from pathlib import Path

    path = Path(__file__).parent / "data" / "seed-experiments" / "decisions_log_agent_60m.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    with pytest.raises(ReplayError, match="holds 40 rounds"):
        ReplayController.from_log(path)
    iso = max(recs, key=lambda r: r["new_lr"])["run_start_iso"]  # the round that climbed highest
    mine = [r for r in recs if r["run_start_iso"] == iso]
    c = ReplayController.from_log(path, run_start_iso=iso)
    assert c.describe()["records"] == len(mine)
    lr = 3e-4
    for r in mine:
        o = Observation(
            step=r["step"],
            total_steps=10_000,
            warmup_steps=1000,
            decision_every=300,
            lr=lr,
            init_lr=3e-4,
            recent_losses=(r["loss"],),
            loss_history=(),
            lr_history=(),
        )
        d = c.decide(o)
        assert d.lr == r["new_lr"] and d.plan is None
        lr = d.lr
    assert max(r["new_lr"] for r in mine) > 3e-4  # a trajectory that actually moves


def test_a_replay_whose_steps_are_none_of_this_runs_decision_points_is_refused(tmp_path, capsys):
    """Replaying the published 60M study (decisions every 100+ steps) into cpu-smoke (60 steps) held the LR at
    every step and reported the round "ok"."""
    from lrpilot.cli import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "decisions.jsonl").write_text(
        "".join(json.dumps({"round": 1, "step": s, "new_lr": 1e-3, "run_start_iso": "x"}) + "\n" for s in (100, 200))
    )
    args = ["campaign", "--preset", "cpu-smoke", "--rounds", "1", "--controller", "replay", "--replay-from", str(src)]
    assert main([*args, "--dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "decided at steps 100, 200, none of this run's decision points" in err
    assert not (tmp_path / "d").exists()
    # the same log on a run that reaches step 200 with decisions every 10 steps passes the check
    from lrpilot.campaign import CampaignSettings
    from lrpilot.config import load_config
    from lrpilot.preflight import check_campaign

    cfg = load_config("cpu-smoke", ["train.total_steps=201"])
    check_campaign(cfg, 1, CampaignSettings("cpu-smoke", (), "replay", "none", replay_from=str(src)))
    # decision points are warmup + k x decision_every (llama_60m: 1000, 1300, ...), not multiples of it
    (src / "decisions.jsonl").write_text(
        "".join(json.dumps({"round": 1, "step": s, "new_lr": 1e-3, "run_start_iso": "x"}) + "\n" for s in (15, 25))
    )
    cfg = load_config("cpu-smoke", ["schedule.warmup_steps=15"])
    check_campaign(cfg, 1, CampaignSettings("cpu-smoke", (), "replay", "none", replay_from=str(src)))


@pytest.mark.slow
def test_a_rule_round_warms_up_to_its_ceiling_and_its_replay_repeats_every_lr(tmp_path):
    """Real trainer runs (cpu-smoke): the rules' warmup ends at their ceiling (10/3 x init_lr, start_ratio 1),
    which the run's config.json carries as schedule.init_lr; a replay of its decision log warms up the same way
    (ReplayController.warmup_to) and trains with the same LR at every update."""
    from lrpilot.config import load_config
    from lrpilot.controllers.rules import RuleParams
    from lrpilot.supervisor import RoundLogs, run_round

    cfg = load_config("cpu-smoke")
    ceiling = RuleParams.for_init_lr(cfg.schedule.init_lr).ceiling
    assert ceiling == pytest.approx(1e-2) and ceiling < cfg.guard.ceiling

    def lrs(run_dir):
        return {e["step"]: e["lr"] for e in map(json.loads, (run_dir / "telemetry.jsonl").read_text().splitlines())
                if e["event"] == "step"}  # fmt: skip

    logs = RoundLogs(tmp_path / "decisions.jsonl", tmp_path / "rollbacks.jsonl", extra={"round": 1})
    rules = RuleController(RuleParams.for_init_lr(cfg.schedule.init_lr))
    assert run_round(cfg, tmp_path / "rules", rules, logs).status == "ok"
    w = cfg.schedule.warmup_steps
    original = lrs(tmp_path / "rules")
    assert original[w] == pytest.approx(ceiling)  # update w-1 (telemetry step w) ends the warmup
    assert json.loads((tmp_path / "rules" / "config.json").read_text())["schedule"]["init_lr"] == pytest.approx(ceiling)
    first = json.loads((tmp_path / "decisions.jsonl").read_text().splitlines()[0])
    assert first["step"] == w and first["old_lr"] == pytest.approx(ceiling)

    replay = ReplayController.from_log(tmp_path / "decisions.jsonl", round=1)
    logs2 = RoundLogs(tmp_path / "replay.jsonl", tmp_path / "rollbacks2.jsonl", extra={"round": 1})
    assert run_round(cfg, tmp_path / "replay", replay, logs2).status == "ok"
    assert lrs(tmp_path / "replay") == original


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_replayed_schedule_round_trains_with_its_lr_at_every_step(tmp_path, schedule):
    """Real trainer runs (cpu-smoke): a baseline schedule's round (a plan with a knot per step at each decision
    point) replayed from its decisions.jsonl, and exported as a plan, keeps every knot; the replay was a
    staircase of each interval's first LR (46 of 60 steps off for cosine)."""
    from lrpilot.cli import main
    from lrpilot.logs import read_jsonl
    from lrpilot.schedule_export import export_schedule

    base = ["campaign", "--preset", "cpu-smoke", "--rounds", "1", "--set", "train.total_steps=40"]
    src, rep = tmp_path / "src", tmp_path / "rep"
    assert main([*base, "--controller", schedule, "--dir", str(src)]) == 0
    assert main([*base, "--controller", "replay", "--replay-from", str(src), "--dir", str(rep)]) == 0

    def lrs(d):
        tel = read_jsonl(d / "rounds" / "round_001" / "telemetry.jsonl")
        return {e["step"]: e["lr"] for e in tel if e["event"] == "step"}

    a, b = lrs(src), lrs(rep)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    diff = [(n, a[n], b[n]) for n in a if b[n] != pytest.approx(a[n], rel=1e-12)]
    assert not diff, diff[:5]
    assert len({round(v, 12) for v in a.values()}) > 10  # the LR changed within intervals, not only at decisions
    plan = export_schedule(src, 1, tmp_path / "plan.json")
    assert all(len(d["plan_knots"]) == d["plan"]["knots"] > 2 for d in plan["decisions"] if d.get("plan"))
