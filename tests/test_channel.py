"""The file channel: LRState interpolation and state, seq continuation across writers, readers.

python -m pytest -q tests/test_channel.py
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrpilot.channel import (
    ControlReader,
    ControlWriter,
    LRState,
    TelemetryReader,
    TelemetryWriter,
    max_seq,
)
from lrpilot.lr import warmup_lr

lrs = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False)
knots = st.lists(st.tuples(st.integers(0, 1000), st.floats(0.0, 1.0)), min_size=1, max_size=8)


def test_warmup_lr_matches_the_protocol():
    assert warmup_lr(0, 1e-3, 10) == pytest.approx(1e-4)
    assert warmup_lr(9, 1e-3, 10) == pytest.approx(1e-3)


def test_lr_state_without_plan_holds_the_lr():
    s = LRState(3e-4)
    assert s.lr_for(0) == s.lr_for(10_000) == 3e-4


def test_lr_state_interpolates_between_knots_and_holds_after():
    s = LRState(1.0)
    s.apply({"seq": 3, "decided_at_step": 10, "lr": 0.5, "plan": [[20, 0.2], [10, 0.4]]}, step=11)
    assert s.lr_for(5) == 0.5  # before the plan: the command's lr
    assert s.lr_for(10) == pytest.approx(0.4)
    assert s.lr_for(15) == pytest.approx(0.3)
    assert s.lr_for(20) == pytest.approx(0.2)
    assert s.lr_for(99) == pytest.approx(0.2)
    assert (s.seq, s.decided_at_step, s.applied_step) == (3, 10, 11)


@given(lr=lrs, plan=knots, step=st.integers(-10, 1100))
@settings(max_examples=200, deadline=None)
def test_lr_state_stays_within_the_knots(lr, plan, step):
    s = LRState(1.0)
    s.apply({"seq": 0, "lr": lr, "plan": [list(k) for k in plan]}, step=0)
    v = s.lr_for(step)
    first = min(k[0] for k in plan)
    if step < first:
        assert v == lr
    else:
        lo, hi = min(k[1] for k in plan), max(k[1] for k in plan)
        assert lo - 1e-12 <= v <= hi + 1e-12
    if step >= max(k[0] for k in plan):
        assert v == sorted(plan, key=lambda k: k[0])[-1][1]


@given(lr=lrs, plan=st.one_of(st.none(), knots), step=st.integers(0, 1000))
@settings(max_examples=100, deadline=None)
def test_lr_state_round_trips(lr, plan, step):
    s = LRState(2e-3)
    s.apply({"seq": 7, "decided_at_step": step, "lr": lr, "plan": plan}, step=step + 1)
    t = LRState(1.0)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    for k in (0, step, step + 5, 2000):
        assert t.lr_for(k) == s.lr_for(k)
    assert t.state_dict() == s.state_dict()


@pytest.mark.parametrize(
    "cmd",
    [
        {"seq": 1},
        {"seq": 1, "lr": -1.0},
        {"seq": 1, "lr": "nan"},
        {"seq": 1, "lr": 1e-3, "plan": [[1, math.inf]]},
        {"seq": 1, "lr": 1e-3, "plan": [[1.5, 1e-3]]},
        {"seq": 1, "lr": 1e-3, "plan": "soon"},
    ],
)
def test_lr_state_rejects_bad_commands_and_keeps_its_state(cmd):
    s = LRState(1e-3)
    with pytest.raises(ValueError):
        s.apply(cmd, step=5)
    assert s.lr_for(5) == 1e-3 and s.applied_step is None


def test_override_clears_the_plan():
    s = LRState(1.0)
    s.apply({"seq": 0, "lr": 0.5, "plan": [[0, 0.1], [10, 0.2]]}, step=0)
    s.override(0.05)
    assert s.plan is None and s.lr_for(5) == 0.05


def test_seq_continues_across_writers(tmp_path):
    w = ControlWriter(tmp_path)
    assert [w.send(10, 1e-3), w.send(20, 2e-3, plan=[(20, 2e-3), (30, 1e-3)]), w.stop()] == [0, 1, 2]
    w.close()
    w2 = ControlWriter(tmp_path)  # a relaunched supervisor never reuses a seq
    assert w2.send(40, 1e-3) == 3
    w2.close()
    assert max_seq(tmp_path) == 3
    lines = [json.loads(x) for x in (tmp_path / "control.jsonl").read_text().splitlines()]
    assert [x["seq"] for x in lines] == [0, 1, 2, 3]
    assert lines[1]["plan"] == [[20, 2e-3], [30, 1e-3]] and lines[2] == {"seq": 2, "stop": True}


def test_seq_continues_after_a_torn_line(tmp_path):
    (tmp_path / "control.jsonl").write_text('{"seq": 4, "decided_at_step": 1, "lr": 0.1}\n{"seq": 9, "lr"')
    with pytest.warns(UserWarning):
        w = ControlWriter(tmp_path)
    assert w.send(2, 0.1) == 5


def test_control_writer_refuses_a_bad_lr(tmp_path):
    w = ControlWriter(tmp_path)
    with pytest.raises(ValueError):
        w.send(1, math.nan)
    assert w.send(1, 1e-3) == 0


def test_control_reader_filters_min_seq_and_returns_each_command_once(tmp_path):
    w = ControlWriter(tmp_path)
    for step in range(3):
        w.send(step, 1e-3)
    r = ControlReader(tmp_path, min_seq=1)
    assert [c["seq"] for c in r.poll()] == [1, 2]
    assert r.poll() == []
    w.send(5, 2e-3)
    assert [(c["seq"], c["lr"]) for c in r.poll()] == [(3, 2e-3)]


def test_control_reader_before_the_file_exists(tmp_path):
    r = ControlReader(tmp_path)
    assert r.poll() == []
    ControlWriter(tmp_path).send(0, 1e-3)
    assert [c["seq"] for c in r.poll()] == [0]


def test_telemetry_round_trip_with_nan(tmp_path):
    tw = TelemetryWriter(tmp_path)
    reader = TelemetryReader(tmp_path)
    tw.emit("step", 1, loss=float("nan"), lr=1e-3)
    tw.emit("observe", 1, losses=[1.0, float("inf")])
    ev = reader.poll()
    assert [e["event"] for e in ev] == ["step", "observe"]
    assert ev[0]["loss"] == "nan" and ev[1]["losses"] == [1.0, "inf"]
    assert all({"event", "step", "time", "launch"} <= e.keys() for e in ev)
    assert reader.poll() == []
    tw.emit("done", 2)
    assert [e["event"] for e in reader.poll()] == ["done"]
    late = TelemetryReader(tmp_path, offset=reader.offset)
    assert late.poll() == []
