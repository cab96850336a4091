"""Importing the published logs (a copy lives in tests/data/seed-experiments) into a campaign directory.

.venv/bin/python -m pytest -q tests/test_import.py
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from lrpilot.campaign_logs import load_baselines, load_campaign
from lrpilot.cli import main
from lrpilot.importer import LogImportError, import_published, main_import

SEED = Path(__file__).parent / "data" / "seed-experiments"


def test_import_published_logs_round_trips(tmp_path):
    dest = tmp_path / "published"
    s = import_published(SEED, dest)
    assert (s.rounds, s.decisions, s.rollbacks, s.baselines, s.unjoined, s.already) == (40, 1230, 9, 8, 0, False)

    logs = load_campaign(dest)
    assert [r.round for r in logs.rounds] == list(range(1, 41))
    assert sum(len(r.decisions) for r in logs.rounds) == 1230
    assert sum(len(r.rollbacks) for r in logs.rounds) == 9
    assert logs.unjoined_decisions == 0 and logs.unjoined_rollbacks == 0
    assert {r.controller for r in logs.rounds} == {"llm"} and {r.status for r in logs.rounds} == {"ok"}
    # rollbacks sit in the rounds the published crash counts say
    assert {r.round: len(r.rollbacks) for r in logs.rounds if r.rollbacks} == {13: 7, 19: 1, 30: 1}
    assert all(r.crash_count == len(r.rollbacks) for r in logs.rounds)
    assert sorted((b.schedule, b.peak_lr) for b in logs.baselines) == [
        ("cosine", p) for p in (1e-3, 1.2e-3, 2.5e-3, 3e-3, 3.5e-3, 4.5e-3, 5e-3, 1e-2)
    ]
    assert logs.best_baseline().final_eval_ppl == pytest.approx(30.3698, abs=1e-4)

    # every published field is copied verbatim (the Chinese reasoning text included)
    src_dec = [json.loads(x) for x in (SEED / "decisions_log_agent_60m.jsonl").read_text().splitlines()]
    out_dec = [json.loads(x) for x in (dest / "decisions.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in d.items() if k != "round"} for d in out_dec] == src_dec
    src_fin = [json.loads(x) for x in (SEED / "final_results_log_agent_60m.jsonl").read_text().splitlines()]
    assert [r.raw["final_eval_ppl"] for r in logs.rounds] == [r["final_eval_ppl"] for r in src_fin]
    b = json.loads((dest / "baselines" / "cosine_lr3.5e-3_60m_final.json").read_text())
    assert b["peak_lr"] == 0.0035 and b["schedule"] == "cosine" and b["update_step"] == 10001
    assert json.loads((dest / "import.json").read_text())["counts"]["rounds"] == 40


def test_import_is_idempotent_and_refuses_another_campaign(tmp_path, capsys):
    dest = tmp_path / "c"
    assert main_import(SEED, dest) == 0
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert main_import(SEED, dest) == 0
    assert "already imported" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before

    # an interrupted import (a file not yet written) is completed by running it again
    (dest / "final_results.jsonl").unlink()
    s = import_published(SEED, dest)
    assert (
        not s.already
        and s.rounds == 40
        and (dest / "final_results.jsonl").read_bytes() == before[dest / "final_results.jsonl"]
    )

    # a destination whose campaign differs is refused, and nothing in it is touched
    with open(dest / "decisions.jsonl", "a") as f:
        f.write('{"run_start_iso": "other", "step": 1}\n')
    changed = (dest / "decisions.jsonl").read_bytes()
    with pytest.raises(LogImportError, match="already holds a different campaign"):
        import_published(SEED, dest)
    assert (dest / "decisions.jsonl").read_bytes() == changed
    assert main_import(SEED, dest) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "decisions.jsonl" in err


def test_missing_source_or_files_is_one_line_error(tmp_path, capsys):
    with pytest.raises(LogImportError, match="no such directory"):
        import_published(tmp_path / "nope", tmp_path / "d")
    with pytest.raises(LogImportError, match=r"no final_results_log_\*\.jsonl"):
        import_published(tmp_path, tmp_path / "d")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(SEED / "final_results_log_agent_60m.jsonl", src)
    with pytest.raises(LogImportError, match="missing decisions_log_agent_60m.jsonl"):
        import_published(src, tmp_path / "d")
    assert main_import(src, tmp_path / "d") == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "d").exists()  # nothing written on error

    # a baseline whose file name has no peak LR is named
    shutil.copy(SEED / "decisions_log_agent_60m.jsonl", src)
    (src / "cosine_baselines").mkdir()
    (src / "cosine_baselines" / "cosine_best.json").write_text('{"final_eval_ppl": 30.0}')
    with pytest.raises(LogImportError, match="cosine_best.json: no peak LR"):
        import_published(src, tmp_path / "d")
    (src / "cosine_baselines" / "cosine_best.json").unlink()
    s = import_published(src, tmp_path / "d")  # no rollback log: a campaign without crashes
    assert (s.rounds, s.decisions, s.rollbacks, s.baselines) == (40, 1230, 0, 0)


def test_a_baseline_that_diverged_to_infinity_imports_as_diverged(tmp_path):
    """json.loads reads `Infinity`; writing it back raised "Out of range float values are not JSON compliant"."""
    src = tmp_path / "src"
    shutil.copytree(SEED, src)
    path = src / "cosine_baselines" / "cosine_lr1e-2_60m_final.json"
    rec = json.loads(path.read_text())
    rec["final_eval_ppl"] = math.inf
    path.write_text(json.dumps(rec))  # Python writes Infinity, as the published trainer would
    s = import_published(src, tmp_path / "d")
    assert s.baselines == len(list((SEED / "cosine_baselines").glob("*.json")))
    (b,) = [b for b in load_baselines(tmp_path / "d" / "baselines") if b.peak_lr == 1e-2]
    assert not b.ok and b.final_eval_ppl == math.inf
    json.loads((tmp_path / "d" / "baselines" / path.name).read_text(), parse_constant=_refuse)  # strict JSON


def _refuse(name: str) -> None:
    raise AssertionError(f"non-standard JSON constant {name}")


def test_several_campaigns_in_one_source_name_the_tag_flag_and_it_picks_one(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(SEED, src)
    shutil.copy(src / "final_results_log_agent_60m.jsonl", src / "final_results_log_other.jsonl")
    shutil.copy(src / "decisions_log_agent_60m.jsonl", src / "decisions_log_other.jsonl")
    assert main_import(src, tmp_path / "d") == 2
    err = capsys.readouterr().err
    assert "(agent_60m, other)" in err and "--tag agent_60m" in err and "tag=" not in err
    assert main(["import-logs", str(src), "--dir", str(tmp_path / "d"), "--tag", "agent60m"]) == 2
    assert "no campaign 'agent60m'; --tag one of agent_60m, other" in capsys.readouterr().err
    assert main(["import-logs", str(src), "--dir", str(tmp_path / "d"), "--tag", "other"]) == 0
    assert json.loads((tmp_path / "d" / "import.json").read_text())["tag"] == "other"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("run_start_iso", 12, "field 'run_start_iso' must be a string"),
        ("final_eval_ppl", -5, "field 'final_eval_ppl' is -5, below 1"),  # was reported as the best round
        ("final_eval_loss", -0.5, "field 'final_eval_loss' is -0.5, below 0"),
    ],
)
def test_a_bad_field_is_named_once(tmp_path, capsys, field, value, message):
    src = tmp_path / "src"
    shutil.copytree(SEED, src)
    lines = (src / "final_results_log_agent_60m.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec[field] = value
    lines[1] = json.dumps(rec)
    (src / "final_results_log_agent_60m.jsonl").write_text("\n".join(lines) + "\n")
    assert main_import(src, tmp_path / "d") == 2
    err = capsys.readouterr().err
    assert err.count("import-logs:") == 1 and err.count("nothing imported") == 1, err
    assert message in err and "record 2" in err
    assert not (tmp_path / "d").exists()
