"""The controller contract (lrpilot.controllers.base), checked on every controller with generated observations.

    python -m pytest -q tests/test_controllers_contract.py

Every controller must, for any observation (NaN/Inf losses, empty histories, LR at the guard's floor or
ceiling, the first or the last decision point, rollbacks present):
  * return a Decision with a positive finite lr, and never raise;
  * give plan knots (if any) inside [obs.step, obs.step + decision_every), finite and >= 0;
  * be deterministic when `blocking` (the same observation gives the same decision);
  * reset in start_round(): reused for a second round it decides like a fresh controller;
  * describe() itself as a JSON-serialisable dict with "controller".

Besides the hand-made factories below, every controller in the CONTROLLERS registry is built the way a
campaign builds it (its ControllerSpec.build on a ControllerContext) and checked as `registry:NAME`, so a
controller registered in its own file (tests/toy_components/toy_controller.py) is covered with no edit here.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toy_components import toy_controller  # noqa: F401 - registers toy-halfway, covered as registry:toy-halfway

from lrpilot.config import RunConfig, ScheduleConfig, TrainConfig
from lrpilot.controllers import CONTROLLERS
from lrpilot.controllers.base import (
    BaseController,
    ControllerContext,
    Decision,
    DecisionRecord,
    Observation,
    ProbeResult,
    RollbackRecord,
)
from lrpilot.controllers.replay import ReplayController
from lrpilot.controllers.rules import RuleController, RuleParams
from lrpilot.controllers.schedules import make_schedule
from lrpilot.llm.base import LLMBackend, Reply
from lrpilot.logs import append_jsonl, dumps


@dataclass(frozen=True)
class Shape:
    """The run a controller is built for; observations are generated for the same run."""

    total: int
    warmup: int
    every: int
    init_lr: float

    @property
    def decision_points(self) -> list[int]:
        return list(range(self.warmup, self.total, self.every))


def _config(s: Shape) -> RunConfig:
    return RunConfig(
        train=TrainConfig(total_steps=s.total),
        schedule=ScheduleConfig(init_lr=s.init_lr, warmup_steps=s.warmup, decision_every=s.every),
    )


def _schedule(name: str) -> Callable[[Shape], BaseController]:
    def build(s: Shape) -> BaseController:
        return make_schedule(name, s.init_lr, _config(s))

    return build


@functools.cache
def _optuna_params() -> tuple[RuleParams, ...]:
    """Rule parameters as --memory optuna proposes them (rounds 2 and 6 of a short seeded study)."""
    from lrpilot.memory.optuna_memory import OptunaMemory

    with tempfile.TemporaryDirectory() as d:
        mem = OptunaMemory(Path(d), seed=0, n_startup_trials=3)
        out = []
        for r in range(1, 7):
            p = mem.propose(r)
            out.append(p)
            mem.record(r, 20.0 + abs(math.log(p.ceiling / 2e-3)) + p.cut_factor, failed=(r == 3))
    return out[1], out[5]


def _replay(s: Shape) -> BaseController:
    return ReplayController(_replay_records(s), source="generated")


def _replay_records(s: Shape) -> list[dict]:
    """A logged round: a record at most decision points, some with an async delay, a guard record that is
    not replayed, and a second visit of a step after a rollback."""
    recs = []
    for i, step in enumerate(s.decision_points):
        if i % 4 == 3:
            continue  # no record: hold
        rec = {"step": step, "new_lr": s.init_lr * (0.5 + (i % 5) / 2), "reasoning": f"logged {i}"}
        if i % 3 == 1:
            rec["effective_step"] = step + (i * 7) % (2 * s.every)  # sometimes past the interval
        recs.append(rec)
        if i % 5 == 2:
            recs.append({"step": step, "new_lr": s.init_lr * 0.3, "kind": "emergency"})
    if recs:
        recs.append({**recs[0], "new_lr": s.init_lr * 0.25, "kind": "decision"})  # revisit after a rollback
    return recs


class _CannedLLM(LLMBackend):
    """Scripted backend for the LLM controller: a good, a fenced, a garbage, a negative and a NaN reply in turn."""

    model = "canned"
    replies = (
        '{"reason": "hold", "lr": 0.0005}',
        '```json\n{"reason": "up", "lr": "2e-3"}\n```',
        "not json",
        '{"lr": -1}',
        '{"lr": NaN}',
    )

    def __init__(self) -> None:
        self.n = 0

    def generate(self, messages, schema=None):
        self.n += 1
        return Reply(self.replies[(self.n - 1) % len(self.replies)], None, {"total_tokens": 1}, 0.0, self.model)

    def ping(self):
        pass


def _llm(s: Shape) -> BaseController:
    from lrpilot.controllers.llm import LLMController

    return LLMController(_CannedLLM())


_LOGS = tempfile.TemporaryDirectory(prefix="lrpilot-contract-")


def _registered(name: str) -> Callable[[Shape], BaseController]:
    """CONTROLLERS[name] built as a campaign's round 1 builds it: the shape's config, the LLM on canned replies,
    a replay of a generated decisions.jsonl (round 1) in a campaign directory."""

    def build(s: Shape) -> BaseController:
        ctx = ControllerContext(_config(s), round_index=1, backend=_CannedLLM())
        if name == "replay":
            d = Path(tempfile.mkdtemp(dir=_LOGS.name))
            for rec in _replay_records(s):
                append_jsonl(d / "decisions.jsonl", {**rec, "round": 1})
            ctx = replace(ctx, replay_from=str(d))
        return CONTROLLERS.get(name).build(ctx)

    return build


# To put another controller under this contract, register it (CONTRIBUTING.md, Extending): the registry
# entries are appended below. A factory here is for a variant the registry does not build. The LLM
# controller (lrpilot.controllers.llm, blocking=False) joins with a factory that builds it on a backend
# (its determinism checks are skipped because it is not blocking).
FACTORIES: list[tuple[str, Callable[[Shape], BaseController]]] = [
    ("cosine", _schedule("cosine")),
    ("d2z", _schedule("d2z")),
    ("wsd", _schedule("wsd")),
    ("constant", _schedule("constant")),
    ("rules-default", lambda s: RuleController()),
    ("rules-scaled", lambda s: RuleController(RuleParams.for_init_lr(s.init_lr))),
    ("rules-optuna-a", lambda s: RuleController(_optuna_params()[0])),
    ("rules-optuna-b", lambda s: RuleController(_optuna_params()[1])),
    ("rules-probes", lambda s: RuleController(RuleParams.for_init_lr(s.init_lr, probe_steps=3, probe_every=1))),
    ("rules-linear", lambda s: RuleController(RuleParams(decay_shape="linear", decay_start=0.5))),
    ("rules-range", lambda s: RuleController(RuleParams.for_init_lr(s.init_lr, range_steps=10))),
    ("replay", _replay),
    ("llm-scripted", _llm),
]
FACTORIES += [(f"registry:{name}", _registered(name)) for name in CONTROLLERS.names()]

# ------------------------------------------------------------------------------------ observations

odd_floats = st.one_of(
    st.floats(0.5, 12.0),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1e6, -1.0]),
)
lrs = st.floats(1e-7, 1e-1)


@st.composite
def shapes(draw) -> Shape:
    total = draw(st.integers(2, 3000))
    warmup = draw(st.integers(0, total - 1))
    every = draw(st.integers(1, 400))
    return Shape(total, warmup, every, draw(st.sampled_from([3e-4, 1e-3, 3e-3])))


@st.composite
def observations(draw, s: Shape) -> Observation:
    points = s.decision_points
    step = draw(
        st.one_of(st.just(s.warmup), st.just(points[-1]), st.sampled_from(points), st.integers(0, s.total + s.every))
    )
    floor = draw(st.sampled_from([1e-7, 1e-6, 1e-5]))
    ceiling = draw(st.sampled_from([1e-2, 5e-2, 1e-1]))
    lr = draw(st.one_of(st.just(floor), st.just(ceiling), st.just(s.init_lr), lrs))
    n_hist = draw(st.integers(0, 6))
    hist_steps = [max(0, step - (n_hist - i) * s.every) for i in range(n_hist)]
    rollbacks = draw(
        st.lists(
            st.builds(
                RollbackRecord,
                crash_step=st.integers(0, s.total),
                lr_at_crash=st.one_of(lrs, st.just(math.nan)),
                rolled_back_to_step=st.integers(0, s.total),
                new_lr=lrs,
                crash_reason=st.sampled_from(["nan", "loss 60"]),
            ),
            max_size=2,
        )
    )
    decisions = draw(
        st.lists(
            st.builds(
                DecisionRecord,
                step=st.integers(0, s.total),
                old_lr=lrs,
                new_lr=lrs,
                loss=odd_floats,
                effective_step=st.one_of(st.none(), st.integers(0, s.total)),
                kind=st.sampled_from(["decision", "emergency", "fallback", "rollback"]),
                reason=st.text(max_size=20),
                # an earlier range test's ceiling (rules rule 5a), odd values included
                extra=st.one_of(
                    st.just({}),
                    st.fixed_dictionaries(
                        {
                            "meta": st.fixed_dictionaries(
                                {
                                    "range_ceiling": st.one_of(
                                        lrs, st.none(), st.sampled_from([math.nan, -1.0, 0.0, "x"])
                                    )
                                }
                            )
                        }
                    ),
                ),  # fmt: skip
            ),
            max_size=3,
        )
    )
    # results of a probe (fixed-LR branches) or of a range test (one branch with per-update LRs)
    probe_losses = st.lists(odd_floats, max_size=12).map(tuple)
    probes = draw(
        st.one_of(
            st.just(()),
            st.lists(st.builds(ProbeResult, lr=lrs, losses=probe_losses, after=odd_floats), min_size=1, max_size=3),
            st.integers(0, 12).flatmap(
                lambda n: st.builds(
                    ProbeResult,
                    lr=lrs,
                    losses=st.lists(odd_floats, min_size=n, max_size=n).map(tuple),
                    lrs=st.lists(st.one_of(lrs, st.sampled_from([math.nan, -1.0])), min_size=n, max_size=n).map(tuple),
                ).map(lambda r: [r])
            ),
        )
    )
    return Observation(
        step=step,
        total_steps=s.total,
        warmup_steps=s.warmup,
        decision_every=s.every,
        lr=lr,
        init_lr=s.init_lr,
        recent_losses=tuple(draw(st.lists(odd_floats, max_size=min(s.every, 40)))),
        loss_history=tuple(zip(hist_steps, draw(st.lists(odd_floats, min_size=n_hist, max_size=n_hist)), strict=True)),
        lr_history=tuple(zip(hist_steps, draw(st.lists(lrs, min_size=n_hist, max_size=n_hist)), strict=True)),
        grad_norm=draw(odd_floats),
        tokens_per_s=draw(odd_floats),
        decisions=tuple(decisions),
        rollbacks=tuple(rollbacks),
        memory_brief=draw(st.sampled_from(["", "climb to 1e-3 then decay"])),
        floor=floor,
        ceiling=ceiling,
        round_index=draw(st.integers(0, 5)),
        probes=tuple(probes),
    )


@st.composite
def cases(draw) -> tuple[Shape, list[Observation]]:
    s = draw(shapes())
    return s, draw(st.lists(observations(s), min_size=3, max_size=3))


def key(d: Decision) -> str:
    """A decision as comparable text (meta may hold NaN, which never equals itself)."""
    return dumps({"lr": d.lr, "plan": d.plan, "reason": d.reason, "raw": d.raw, "fallback": d.fallback, "meta": d.meta})


def check_decision(d: Decision, o: Observation) -> None:
    assert isinstance(d, Decision)
    assert math.isfinite(d.lr) and d.lr > 0
    assert isinstance(d.reason, str)
    if d.plan is not None:
        for step, lr in d.plan:
            assert o.step <= step < o.step + o.decision_every, (step, o.step, o.decision_every)
            assert math.isfinite(lr) and lr >= 0


# --------------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name,factory", FACTORIES, ids=[f[0] for f in FACTORIES])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_contract(name, factory, case):
    s, (o1, o2, o3) = case
    ctrl = factory(s)
    ctrl.start_round(1, o1.memory_brief)
    first = [ctrl.decide(o) for o in (o1, o2, o3)]
    for d, o in zip(first, (o1, o2, o3), strict=True):
        check_decision(d, o)
    desc = ctrl.describe()
    assert isinstance(desc, dict) and isinstance(desc.get("controller"), str) and desc["controller"]
    json.dumps(desc, allow_nan=False)
    if not ctrl.blocking:
        return  # an asynchronous (LLM) controller need not answer the same twice
    # deterministic: the same observation again, on the same and on a fresh controller
    assert key(ctrl.decide(o1)) == key(first[0])
    fresh = factory(s)
    fresh.start_round(1, o1.memory_brief)
    assert [key(fresh.decide(o)) for o in (o1, o2, o3)] == [key(d) for d in first]
    # start_round resets: reused for round 2 it decides like a new controller in round 2
    ctrl.start_round(2, "")
    again = factory(s)
    again.start_round(2, "")
    assert key(ctrl.decide(o3)) == key(again.decide(o3))


@pytest.mark.parametrize("name,factory", FACTORIES, ids=[f[0] for f in FACTORIES])
def test_contract_on_a_whole_clean_round(name, factory):
    """Every decision point of a plain run, losses falling: decisions valid and plans inside the interval."""
    s = Shape(total=1500, warmup=150, every=50, init_lr=1e-3)
    ctrl = factory(s)
    ctrl.start_round(0, "")
    lr, history, lr_history = s.init_lr, [], []
    for step in s.decision_points:
        loss = 5.0 / (1 + 0.01 * step)
        history.append((step, loss))
        o = Observation(
            step=step,
            total_steps=s.total,
            warmup_steps=s.warmup,
            decision_every=s.every,
            lr=lr,
            init_lr=s.init_lr,
            recent_losses=tuple(loss + 0.01 * ((j * 7) % 5 - 2) for j in range(50)),
            loss_history=tuple(history),
            lr_history=tuple(lr_history),
            round_index=0,
        )
        d = ctrl.decide(o)
        check_decision(d, o)
        lr = d.lr
        lr_history.append((step, lr))
    assert 0 < lr < 1


@pytest.mark.parametrize("name,factory", FACTORIES, ids=[f[0] for f in FACTORIES])
def test_contract_warmup_end_is_a_positive_lr_and_a_pure_function(name, factory):
    """BaseController.warmup_to: a positive, finite LR, the same for a fresh build (a resumed run asks again),
    and what the hosts start from (decision.warmup_end_lr) inside the guard's bounds or equal to init_lr."""
    from lrpilot.config import GuardConfig
    from lrpilot.decision import warmup_end_lr

    s = Shape(total=1500, warmup=150, every=50, init_lr=1e-3)
    a, b = factory(s), factory(s)
    lr = a.warmup_to(s.init_lr)
    assert isinstance(lr, float) and math.isfinite(lr) and lr > 0 and lr == b.warmup_to(s.init_lr)
    g = GuardConfig()
    start = warmup_end_lr(a, s.init_lr, g)
    assert start == s.init_lr or g.floor <= start <= g.ceiling
