"""lrpilot.records: one schema for every log line, read and written back byte for byte.

    .venv/bin/python -m pytest -q tests/test_records.py

Real lines only: the published study's logs (tests/data/seed-experiments), and (slow) the files a real cpu-smoke
LLM campaign and a real baseline run that crashes on an injected NaN write (trainer subprocesses, a stdlib HTTP
server on 127.0.0.1 for the LLM). For each line, to_dict(from_dict(line)) is the same JSON, keys in the same order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
from pathlib import Path

import pytest

from lrpilot import records
from lrpilot.logs import dumps
from lrpilot.records import (
    BaselineResult,
    BriefRecord,
    DecisionRecord,
    FinalResult,
    Kind,
    LLMCallRecord,
    RecordError,
    RollbackRecord,
    RoundResult,
)

SEED = Path(__file__).parent / "data" / "seed-experiments"
SRC = Path(__file__).parent.parent / "src" / "lrpilot"


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _assert_round_trip(cls: type, line: dict) -> object:
    """from_dict then to_dict gives the line back: the same JSON text (so the same keys, order and values)."""
    rec = cls.from_dict(line)
    assert dumps(rec.to_dict()) == dumps(line), (cls.__name__, line)
    assert dumps(cls.from_dict(rec.to_dict()).to_dict()) == dumps(line)  # and again
    return rec


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("decisions_log_agent_60m.jsonl", DecisionRecord),
        ("final_results_log_agent_60m.jsonl", FinalResult),
        ("rollback_log_agent_60m.jsonl", RollbackRecord),
    ],
)
def test_published_logs_round_trip_exactly(name, cls):
    lines = _lines(SEED / name)
    assert len(lines) >= 9
    for line in lines:
        rec = _assert_round_trip(cls, line)
        assert rec.to_dict() == line  # no NaN in the published logs: equal as dicts too
        assert list(rec.to_dict()) == list(line)
        assert not rec.extra  # every published field is a typed field


def test_published_baselines_round_trip_exactly():
    files = sorted((SEED / "cosine_baselines").glob("*.json"))
    assert len(files) == 8
    for f in files:
        line = json.loads(f.read_text())
        b = _assert_round_trip(BaselineResult, line)
        assert b.to_dict() == line and math.isfinite(b.final_eval_ppl)
        # the baseline writer writes the file with indent=2: the same text back
        assert json.dumps(b.to_dict(), indent=2) == json.dumps(line, indent=2)


def test_published_decision_is_the_prompt_twin():
    """A published line (no kind, no effective_step) reads as an applied decision, its reasoning as `reason`."""
    line = _lines(SEED / "decisions_log_agent_60m.jsonl")[0]
    d = DecisionRecord.from_log(line)
    assert d.kind is Kind.DECISION and d.effective_step is None and d.applied
    assert d.reason == line["reasoning"] and d.step == line["step"] and d.loss == line["loss"]
    assert "kind" not in d.to_dict() and "effective_step" not in d.to_dict()
    unapplied = DecisionRecord.from_dict({**line, "effective_step": None})
    assert not unapplied.applied and unapplied.to_dict()["effective_step"] is None


def test_unknown_keys_and_non_finite_values_survive():
    line = {
        "run_start_iso": "2026-01-01T00:00:00", "step": 30, "loss": "nan", "trend": "up +0.1", "old_lr": 1e-3,
        "new_lr": 5e-4, "raw_lr_request": None, "clamped": False, "reasoning": "guard", "timestamp": "t",
        "effective_step": 31, "kind": "emergency", "clamp_reasons": [], "latency_s": None, "wait_s": 0.0,
        "seq": 4, "plan": None, "launch": 1234, "probe": {"lrs": [1e-3]}, "round": 2, "controller": "rules",
    }  # fmt: skip
    rec = _assert_round_trip(DecisionRecord, line)
    assert math.isnan(rec.loss) and rec.kind is Kind.EMERGENCY
    assert rec.extra == {"probe": {"lrs": [1e-3]}, "round": 2, "controller": "rules"}
    assert rec.get("round") == 2 and rec.get("kind") == "emergency" and rec.get("nope", 7) == 7
    assert type(rec.to_dict()["kind"]) is str


def test_records_built_in_code_write_the_published_order():
    from lrpilot.supervisor import DECISION_FIELDS, ROLLBACK_FIELDS

    assert DecisionRecord.ORDER[: len(DECISION_FIELDS)] == DECISION_FIELDS
    assert RollbackRecord.ORDER[: len(ROLLBACK_FIELDS)] == ROLLBACK_FIELDS
    published_final = list(_lines(SEED / "final_results_log_agent_60m.jsonl")[0])
    assert [k for k in FinalResult.ORDER if k in published_final] == published_final
    published_base = list(json.loads(next((SEED / "cosine_baselines").glob("*.json")).read_text()))
    assert list(BaselineResult.ORDER[: len(published_base)]) == published_base
    # result.json: every field, in the dataclass's order, as dataclasses.asdict wrote it
    assert (
        tuple(f.name for f in dataclasses.fields(RoundResult) if f.name not in ("extra", "keys")) == RoundResult.ORDER
    )
    brief = BriefRecord(round=3, brief="try 3e-3", timestamp="t", memory="llm", extra={"fallback": False, "words": 2})
    assert list(brief.to_dict()) == ["round", "timestamp", "memory", "brief", "fallback", "words"]
    fin = FinalResult(run_start_iso="x", final_eval_ppl=math.nan, rule_params=None, script=None)
    assert "rule_params" not in fin.to_dict() and "script" not in fin.to_dict() and "status" in fin.to_dict()


def test_round_result_moved_and_still_importable_from_the_supervisor():
    from lrpilot import supervisor
    from lrpilot.controllers import base

    assert supervisor.RoundResult is RoundResult
    assert base.DecisionRecord is DecisionRecord and base.RollbackRecord is RollbackRecord
    partial = RoundResult.from_dict({"status": "failed", "run_start_iso": "x", "failure_reason": "gave up"})
    assert partial.update_step == 0 and math.isnan(partial.wall_time_s) and partial.lr_trajectory == []
    assert list(partial.to_dict()) == list(RoundResult.ORDER)  # a partial result.json is written whole


GOOD = {
    DecisionRecord: {"run_start_iso": "x", "step": 10, "loss": 4.2, "old_lr": 1e-3, "new_lr": 2e-3, "kind": "decision"},
    RollbackRecord: {"run_start_iso": "x", "crash_step": 9, "lr_at_crash": 1e-3, "rolled_back_to_step": 5,
                     "new_lr": 5e-4, "crash_reason": "nan_loss", "crash_count_in_run": 1},
    FinalResult: {"run_start_iso": "x", "final_eval_ppl": 30.1, "round": 1, "status": "ok"},
    BaselineResult: {"final_eval_loss": 3.5, "final_eval_ppl": 33.1, "seed": 42},
    LLMCallRecord: {"time": "t", "role": "controller", "backend": "OpenAIBackend", "model": "m", "messages": [],
                    "schema": True, "reply": "{}", "latency_s": 0.1},
    BriefRecord: {"round": 2, "timestamp": "t", "memory": "llm", "brief": "b"},
    RoundResult: {"status": "ok", "run_start_iso": "x", "update_step": 40},
}  # fmt: skip
CORRUPT = [
    (DecisionRecord, "step", "ten", "decisions.jsonl: field 'step' must be an int, got 'ten'"),
    (DecisionRecord, "new_lr", "fast", "decisions.jsonl: field 'new_lr' must be a number"),
    (DecisionRecord, "kind", "panic", "decisions.jsonl: field 'kind' must be one of decision, fallback"),
    (DecisionRecord, "reasoning", 3, "decisions.jsonl: field 'reasoning' must be a string or null, got 3"),
    (DecisionRecord, "effective_step", True, "decisions.jsonl: field 'effective_step' must be an int or null"),
    (RollbackRecord, "crash_step", 9.5, "rollbacks.jsonl: field 'crash_step' must be an int, got 9.5"),
    (FinalResult, "final_eval_ppl", "garbage", "final_results.jsonl: field 'final_eval_ppl' must be a number"),
    (FinalResult, "settings", [1], "final_results.jsonl: field 'settings' must be an object or null, got [1]"),
    (BaselineResult, "seed", "42", "baseline result json: field 'seed' must be an int or null, got '42'"),
    (LLMCallRecord, "messages", "hi", "llm_calls.jsonl: field 'messages' must be a list, got 'hi'"),
    (BriefRecord, "round", None, "briefs.jsonl: field 'round' must be an int, got None"),
    (RoundResult, "lr_trajectory", [[1, "x"]], "result.json: field 'lr_trajectory' must be a list of [step, value]"),
]


@pytest.mark.parametrize(("cls", "key", "bad", "message"), CORRUPT, ids=[f"{c.__name__}.{k}" for c, k, *_ in CORRUPT])
def test_a_corrupt_field_is_one_line_naming_file_and_field(cls, key, bad, message):
    cls.from_dict(GOOD[cls])  # the good line reads
    with pytest.raises(RecordError) as e:
        cls.from_dict({**GOOD[cls], key: bad})
    text = str(e.value)
    assert text.startswith(message) and "\n" not in text and e.value.field == key
    back = pickle.loads(pickle.dumps(e.value))  # crosses process boundaries (engine children, Ray) intact
    assert str(back) == text and back.field == key


def test_a_missing_required_field_and_a_non_object_are_named():
    with pytest.raises(RecordError, match=r"^rollbacks.jsonl: field 'lr_at_crash' is missing$"):
        RollbackRecord.from_dict({"crash_step": 3})
    with pytest.raises(RecordError, match=r"^briefs.jsonl: a record must be a JSON object, got \[1, 2\]$"):
        BriefRecord.from_dict([1, 2])
    with pytest.raises(RecordError, match="field 'loss' must be a number"):
        DecisionRecord(1, 1e-3, 1e-3, None)  # built in code: checked the same way


def test_kind_is_a_str_enum_and_json_is_unchanged():
    assert Kind.DECISION == "decision" and Kind("agent_rollback") is Kind.AGENT_ROLLBACK
    assert f"{Kind.EMERGENCY}" == "emergency" and str(Kind.FALLBACK) == "fallback"
    assert json.dumps({"kind": Kind.SUPERSEDED}) == '{"kind": "superseded"}' == json.dumps({"kind": "superseded"})
    assert "unanswered" in {Kind.UNANSWERED} and Kind.UNANSWERED in {"unanswered"}
    assert [d.get("kind") for d in [{"kind": "fallback"}, {}]].count(Kind.FALLBACK) == 1


#: `kind` values of other things than decision records, where the same word `kind` is used: the report's table
#: rows (report/tables.py), the progress events (progress.py) and the bench's methods (bench.py)
OTHER_KINDS = {"campaign", "baselines", "start", "end", "sweep", "single"}
_KIND_PATTERNS = [
    r'\bkind\s*=\s*"(\w+)"',  # kind="emergency" (a keyword argument)
    r'"kind"\s*:\s*"(\w+)"',  # {"kind": "decision"}
    r'\.get\("kind"(?:,\s*"(\w+)")?\)',  # rec.get("kind", "decision")
    r'\.get\("kind"\)\s*[!=]=\s*"(\w+)"',  # d.get("kind") == "fallback"
    r'\.kind\s*[!=]=\s*"(\w+)"',  # d.kind != "emergency"
]


def _kind_literals() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted(p for p in SRC.rglob("*.py") if p.name != "records.py"):  # records.py defines them
        text = path.read_text(encoding="utf-8")
        where = str(path.relative_to(SRC))
        for pat in _KIND_PATTERNS:
            for m in re.finditer(pat, text):
                if m.group(1):
                    found.setdefault(m.group(1), set()).add(where)
        # d.get("kind") in ("decision", "emergency", ...)
        for m in re.finditer(r'\.get\("kind"\)\s+(?:not\s+)?in\s+\(([^)]*)\)', text):
            for lit in re.findall(r'"(\w+)"', m.group(1)):
                found.setdefault(lit, set()).add(where)
    return found


def test_every_decision_kind_literal_in_src_is_a_kind_member():
    found = _kind_literals()
    assert {"superseded", "unanswered", "agent_rollback", "emergency"} <= set(found)  # the grep sees them
    stray = {k: sorted(v) for k, v in found.items() if k not in OTHER_KINDS and k not in {x.value for x in Kind}}
    assert not stray, f"kind literals that are not lrpilot.records.Kind members: {stray}"
    assert records.ANSWER_KINDS == (Kind.DECISION, Kind.FALLBACK)


# ------------------------------------------------------------------------------------------ real round


@pytest.mark.slow
def test_lines_of_a_real_campaign_and_a_crashing_baseline_round_trip_exactly(tmp_path, monkeypatch):
    """A real 2-round LLM campaign (controller and memory agents on a stdlib HTTP server) and a real baseline
    run whose trainer NaNs at step 5 on every launch (rollbacks, then a failed run): every line of every file
    they write reads into its record and writes back identically."""
    from llm_servers import ScriptedServer, chat_body

    from lrpilot.baseline import run_one
    from lrpilot.campaign import CampaignSettings, run_campaign
    from lrpilot.config import load_config

    def respond(req: dict) -> tuple[int, dict, dict]:
        if "response_format" in req:
            return 200, chat_body('{"reason": "loss falls, hold", "lr": 0.003}'), {}
        return 200, chat_body("Round 1 reached its ppl at peak 3e-3; try a higher peak."), {}

    for name in ("DASHSCOPE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    srv = ScriptedServer(responder=respond, models=("scripted",))
    try:
        cfg = load_config(
            "cpu-smoke",
            ["train.total_steps=30", f"agent.base_url={srv.base_url}", "agent.model=scripted", "agent.retries=0"],
        )
        settings = CampaignSettings(preset="cpu-smoke", overrides=(), controller="llm", memory="llm")
        run_campaign(cfg, tmp_path / "c", 2, settings, echo=lambda *_: None)
    finally:
        srv.stop()
    monkeypatch.setenv("LRPILOT_INJECT_NAN_AT_STEP", "5")
    base = run_one(load_config("cpu-smoke", ["checkpoint.every=5"]), "cosine", 3e-3, tmp_path / "b")
    assert base["diverged"] is True

    c, b = tmp_path / "c", tmp_path / "b"
    files = {
        DecisionRecord: [c / "decisions.jsonl", *c.glob("rounds/*/decisions_sent.jsonl"), b / "runs/cosine_lr3e-3/decisions.jsonl"],
        RollbackRecord: [b / "runs/cosine_lr3e-3/rollbacks.jsonl"],
        FinalResult: [c / "final_results.jsonl"],
        LLMCallRecord: [c / "llm_calls.jsonl"],
        BriefRecord: [c / "briefs.jsonl"],
    }  # fmt: skip
    seen = {}
    for cls, paths in files.items():
        lines = [line for p in paths for line in _lines(p)]
        seen[cls.__name__] = len(lines)
        for line in lines:
            _assert_round_trip(cls, line)
    assert min(seen.values()) >= 2, seen
    kinds = {DecisionRecord.from_dict(x).kind for x in _lines(c / "decisions.jsonl")}
    assert kinds <= set(Kind) and Kind.DECISION in kinds
    rbs = [RollbackRecord.from_dict(x) for x in _lines(b / "runs/cosine_lr3e-3/rollbacks.jsonl")]
    assert rbs[-1].rolled_back_to_step is None and "launch" in rbs[-1].extra  # the round gave up
    assert {x.role for x in map(LLMCallRecord.from_dict, _lines(c / "llm_calls.jsonl"))} == {"controller", "memory"}
    for p in [*c.glob("rounds/*/result.json"), b / "runs/cosine_lr3e-3/result.json"]:
        line = json.loads(p.read_text())
        rr = _assert_round_trip(RoundResult, line)
        assert rr.status in ("ok", "failed")
    _assert_round_trip(BaselineResult, json.loads((b / "cosine_lr3e-3.json").read_text()))


def test_a_wrong_type_is_named_before_a_missing_field_and_records_hash():
    with pytest.raises(RecordError, match=r"^rollbacks.jsonl: field 'crash_step' must be an int, got 'x'$"):
        RollbackRecord.from_dict({"crash_step": "x"})  # lr_at_crash is missing too: the wrong type is named
    d = DecisionRecord.from_dict({**GOOD[DecisionRecord], "clamp_reasons": ["ceiling"], "plan": [[10, 1e-3]]})
    assert hash(d) == hash(DecisionRecord.from_dict(d.to_dict()))  # Observation (frozen, hashable) holds these


def test_import_refuses_a_published_line_of_the_wrong_type_in_one_line(tmp_path, capsys):
    import shutil

    from lrpilot.importer import main_import

    src = tmp_path / "src"
    shutil.copytree(SEED, src)
    lines = (src / "decisions_log_agent_60m.jsonl").read_text(encoding="utf-8").splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "new_lr": "fast"}, ensure_ascii=False)
    (src / "decisions_log_agent_60m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main_import(src, tmp_path / "dest") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "decisions_log_agent_60m.jsonl record 3: field 'new_lr' must be a number" in err
    assert not (tmp_path / "dest").exists()  # nothing imported
