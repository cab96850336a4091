"""End-to-end campaigns on cpu-smoke: real trainer subprocesses, real Optuna study, real local LLM.

Each round is a full (tiny) pre-training run; these tests check the rounds loop, its logs, the lock that
refuses a second process, and kill-and-resume of the whole campaign.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from waiting import wait_until

from lrpilot.campaign import CampaignError, CampaignLock, CampaignSettings, run_campaign
from lrpilot.config import ConfigError, apply_overrides, load_config
from lrpilot.logs import read_jsonl

SMOKE = ["train.total_steps=40", "schedule.warmup_steps=10", "schedule.decision_every=10"]
PUBLISHED_FIELDS = {
    "run_start_iso", "final_eval_ppl", "final_eval_loss", "total_decisions", "crash_count", "peak_lr_seen",
    "min_lr_seen", "warmup_steps", "decision_every", "init_lr", "optimizer",
}  # fmt: skip


def _cfg():
    return apply_overrides(load_config("cpu-smoke"), SMOKE)


def _check_round_logs(d: Path, rounds: int, decisions_per_round: int) -> list[dict]:
    finals = read_jsonl(d / "final_results.jsonl", strict=True)
    assert [r["round"] for r in finals] == list(range(1, rounds + 1))
    for r in finals:
        assert r.keys() >= PUBLISHED_FIELDS
        assert r["status"] == "ok" and r["update_step"] == 40
    decisions = read_jsonl(d / "decisions.jsonl", strict=True)
    for r in range(1, rounds + 1):
        mine = [x for x in decisions if x["round"] == r]
        # every decision point was decided; none logged twice (a rollback may legitimately re-decide a step,
        # but then under a new command seq)
        assert len({x["step"] for x in mine}) == decisions_per_round, (r, mine)
        seqs = [x["seq"] for x in mine]
        assert len(seqs) == len(set(seqs)), (r, seqs)
    return finals


@pytest.mark.slow
def test_rules_campaign_with_optuna_memory(tmp_path):
    d = tmp_path / "camp"
    settings = CampaignSettings(preset="cpu-smoke", overrides=tuple(SMOKE), controller="rules", memory="optuna")
    lines: list[str] = []
    run_campaign(_cfg(), d, 3, settings, echo=lines.append)
    finals = _check_round_logs(d, 3, decisions_per_round=3)  # decision points at steps 10, 20, 30
    # Optuna proposed each round's rule parameters and was told each result
    assert all("rule_params" in r for r in finals)
    # each line's init_lr is where the round's warmup ended (config.json's; the rules: start_ratio x ceiling,
    # capped at 10/3 x the preset's init_lr), not the preset's init_lr (which the report drew as the warmup)
    for r in finals:
        run_cfg = json.loads((d / "rounds" / f"round_{r['round']:03d}" / "config.json").read_text())
        assert r["init_lr"] == run_cfg["schedule"]["init_lr"]
    assert finals[0]["init_lr"] == pytest.approx(10 / 3 * _cfg().schedule.init_lr)  # round 1: the default rules
    briefs = read_jsonl(d / "briefs.jsonl", strict=True)
    assert [b["round"] for b in briefs] == [1, 2, 3]
    assert any(p.name.startswith("optuna") for p in d.iterdir())
    assert "best so far" in lines[0] and "3 rounds" in lines[-1]
    # each round's summary line is echoed once (it used to come again in a table at the end)
    for r in (1, 2, 3):
        assert sum(f"round {r:>3} " in chunk for ln in lines for chunk in ln.splitlines()) == 1, lines
    # running the same command again is a no-op: nothing counted twice
    run_campaign(_cfg(), d, 3, settings, echo=lines.append)
    assert len(read_jsonl(d / "final_results.jsonl")) == 3
    # extending the campaign runs only the new round
    run_campaign(_cfg(), d, 4, settings, echo=lines.append)
    assert [r["round"] for r in read_jsonl(d / "final_results.jsonl")] == [1, 2, 3, 4]


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="--memory optuna"):
        CampaignSettings(preset="cpu-smoke", overrides=(), controller="llm", memory="optuna")
    with pytest.raises(ConfigError, match="--replay-from"):
        CampaignSettings(preset="cpu-smoke", overrides=(), controller="replay", memory="none")
    with pytest.raises(ConfigError, match="use it with --controller rules"):
        CampaignSettings(preset="cpu-smoke", overrides=(), controller="llm", memory="llm", rule_params={"ceiling": 1})
    with pytest.raises(ConfigError, match="--replay-from re-plays a campaign with --controller replay, not rules"):
        CampaignSettings(preset="cpu-smoke", overrides=(), controller="rules", memory="none", replay_from="x")
    with pytest.raises(ConfigError, match="--rule celing: unknown parameter"):
        CampaignSettings(preset="cpu-smoke", overrides=(), controller="rules", memory="none", rule_params={"celing": 1})
    fixed = CampaignSettings(preset="p", overrides=(), controller="rules", memory="none", rule_params={"ceiling": 3e-2})
    assert fixed.rules_for(3e-4).ceiling == 3e-2 and fixed.rules_for(3e-4).climb_factor == 2.0
    with pytest.raises(ConfigError, match="rules.climb_factor"):
        CampaignSettings(preset="p", overrides=(), controller="rules", memory="none",
                         rule_params={"climb_factor": 5.0}).rules_for(3e-4)  # fmt: skip
    # the cool-down's shape is the one word-valued parameter: --rule decay_shape=linear
    from lrpilot.argtypes import rule_param

    assert rule_param("decay_shape=linear") == ("decay_shape", "linear")
    shaped = CampaignSettings(preset="p", overrides=(), controller="rules", memory="none",
                              rule_params=dict([rule_param("decay_shape=linear")]))  # fmt: skip
    assert shaped.rules_for(3e-4).decay_shape == "linear"
    with pytest.raises(ConfigError, match="rules.decay_shape: must be one of 1-sqrt, linear, geometric"):
        CampaignSettings(preset="p", overrides=(), controller="rules", memory="none",
                         rule_params={"decay_shape": "cosine"}).rules_for(3e-4)  # fmt: skip


@pytest.mark.slow
def test_fixed_rule_params_are_used_every_round_and_left_out_of_the_search(tmp_path):
    """`lrpilot campaign --rule NAME=VALUE`: fixed for every round, recorded, not searched by Optuna."""
    import optuna

    d = tmp_path / "camp"
    cmd = [sys.executable, "-m", "lrpilot", "campaign", "--preset", "cpu-smoke", "--rounds", "2", "--dir", str(d),
           "--controller", "rules", "--memory", "optuna", "--rule", "ceiling=5e-3", "--rule", "climb_factor=2",
           *[a for o in SMOKE for a in ("--set", o)]]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    finals = _check_round_logs(d, 2, decisions_per_round=3)
    assert all(f["rule_params"]["ceiling"] == 5e-3 and f["rule_params"]["climb_factor"] == 2.0 for f in finals)
    assert all(f["peak_lr_seen"] <= 5e-3 * (1 + 1e-9) for f in finals)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(d / "optuna_journal.log")))
    trials = optuna.load_study(study_name="lrpilot_rules", storage=storage).trials
    assert len(trials) == 2 and all({"ceiling", "climb_factor"}.isdisjoint(t.params) for t in trials)
    assert trials[1].params and finals[1]["rule_params"] != finals[0]["rule_params"]  # the rest was searched
    assert json.loads((d / "campaign.json").read_text())["settings"]["rule_params"] == {
        "ceiling": 5e-3,
        "climb_factor": 2.0,
    }
    # another --rule value on the same directory is a different campaign: refused, naming the field
    r = subprocess.run([*cmd[:-1], cmd[-1], "--rule", "decay_start=0.6"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "rule_params" in r.stderr and r.stderr.count("\n") == 1


def test_changed_settings_on_an_existing_campaign_are_refused(tmp_path):
    d = tmp_path / "camp"
    s1 = CampaignSettings(preset="cpu-smoke", overrides=(), controller="rules", memory="none")
    from lrpilot.campaign import _check_settings

    d.mkdir()
    _check_settings(d, s1)
    assert "rule_params" not in json.loads((d / "campaign.json").read_text())["settings"]  # as before --rule
    s2 = CampaignSettings(preset="cpu-smoke", overrides=(), controller="rules", memory="optuna")
    with pytest.raises(CampaignError, match="memory"):
        _check_settings(d, s2)


def test_an_edited_preset_file_is_refused_when_the_campaign_resumes(tmp_path):
    """A --preset FILE edited between runs mixed rounds of two workloads in one campaign (the same change
    through --set was refused)."""
    from lrpilot.campaign import _check_settings

    preset = tmp_path / "mine.json"
    _cfg().save(preset)
    original = preset.read_bytes()
    d = tmp_path / "camp"
    d.mkdir()
    settings = CampaignSettings(preset=str(preset), overrides=(), controller="rules", memory="none")
    _check_settings(d, settings)
    preset.write_text(preset.read_text().replace('"total_steps": 40', '"total_steps": 80'))
    assert preset.read_bytes() != original
    with pytest.raises(CampaignError, match=r"--preset .*mine.json: the file changed since"):
        _check_settings(d, settings)
    preset.write_bytes(original)
    _check_settings(d, settings)  # the original file back: resumes
    other = CampaignSettings(preset="cpu-smoke", overrides=(), controller="rules", memory="none")
    with pytest.raises(CampaignError, match=r"different settings \(preset"):  # another preset: not "changed"
        _check_settings(d, other)


def test_a_campaign_in_an_imported_directory_is_refused(tmp_path):
    """A campaign appended cpu-smoke rounds to the published 60M study's logs and reported them side by side."""
    from lrpilot.importer import import_published

    d = tmp_path / "published"
    import_published(Path(__file__).parent / "data" / "seed-experiments", d)
    before = sorted(p.name for p in d.iterdir())
    settings = CampaignSettings(preset="cpu-smoke", overrides=tuple(SMOKE), controller="rules", memory="none")
    with pytest.raises(CampaignError, match="import-logs brought in"):
        run_campaign(_cfg(), d, 41, settings)
    assert sorted(p.name for p in d.iterdir()) == before


def test_second_process_is_refused(tmp_path):
    d = tmp_path / "camp"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lrpilot.campaign import CampaignLock; from pathlib import Path\n"
         "with CampaignLock(Path(sys.argv[1])):\n    print('locked', flush=True); sys.stdin.read()", str(d)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CampaignError, match="in use by a running campaign"), CampaignLock(d):
            pass
        r = subprocess.run(
            [sys.executable, "-m", "lrpilot", "campaign", "--preset", "cpu-smoke", "--rounds", "1",
             "--controller", "rules", "--dir", str(d)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 2 and "in use" in r.stderr and f"pid {holder.pid}" in r.stderr
        assert not (d / "final_results.jsonl").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with CampaignLock(d):  # released once the holder is gone
        pass


def test_fewer_rounds_than_the_directory_holds_are_counted_as_asked(tmp_path):
    """Issue 9, item 7: `campaign --rounds 1` on a directory with 2 finished rounds prints 1 round, and says
    that the directory holds more."""
    d = tmp_path / "camp"
    settings = CampaignSettings(preset="cpu-smoke", overrides=tuple(SMOKE), controller="rules", memory="none")
    d.mkdir()
    from lrpilot.campaign import _check_settings

    _check_settings(d, settings)  # campaign.json, as the run that finished these rounds wrote it
    for r, ppl in ((1, 5.0), (2, 4.0)):  # two rounds already finished (no training needed for --rounds 1)
        (d / "final_results.jsonl").open("a").write(
            json.dumps(
                {
                    "round": r,
                    "status": "ok",
                    "final_eval_ppl": ppl,
                    "wall_time_s": 1.0,
                    "peak_lr_seen": 3e-3,
                    "min_lr_seen": 1e-3,
                    "crash_count": 0,
                }
            )
            + "\n"  # fmt: skip
        )
    lines: list[str] = []
    recs = run_campaign(_cfg(), d, 1, settings, echo=lines.append)
    assert [r["round"] for r in recs] == [1]
    assert lines[-2].splitlines()[-1].startswith("1 round: best ppl 5.000"), lines
    assert "already holds 1 more round (2) than --rounds 1; run with --rounds 2" in lines[-1]


@pytest.mark.slow
def test_kill_and_resume(tmp_path):
    d = tmp_path / "camp"
    cmd = [sys.executable, "-m", "lrpilot", "campaign", "--preset", "cpu-smoke", "--rounds", "3",
           "--controller", "rules", "--memory", "optuna", "--dir", str(d)]  # fmt: skip
    for s in SMOKE:
        cmd += ["--set", s]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # kill the whole campaign (and its trainer) once round 2 has a checkpoint
        wait_until(lambda: list((d / "rounds" / "round_002" / "checkpoints").glob("*.json")), 300, "round 2 ckpt")
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert len(read_jsonl(d / "final_results.jsonl")) == 1
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    _check_round_logs(d, 3, decisions_per_round=3)
    # the interrupted round resumed (its run directory holds more than one trainer launch)
    starts = [e for e in read_jsonl(d / "rounds" / "round_002" / "telemetry.jsonl") if e.get("event") == "start"]
    assert len(starts) >= 2 and starts[-1].get("resumed_from")


@pytest.mark.slow
@pytest.mark.llm
def test_local_llm_campaign(tmp_path):
    pytest.importorskip("llama_cpp", reason="needs the `local` extra (make test installs it)")
    # the trainer waits for each answer: a smoke round (seconds) would otherwise end before SmolLM2's first one
    local = ["agent.backend=local", "agent.wait_for_decisions=true"]
    cfg = apply_overrides(_cfg(), local)
    d = tmp_path / "llm"
    settings = CampaignSettings(preset="cpu-smoke", overrides=(*SMOKE, *local), controller="llm",
                                memory="llm", backend="local", model="SmolLM2-135M")  # fmt: skip
    run_campaign(cfg, d, 3, settings, echo=lambda s: None)
    finals = read_jsonl(d / "final_results.jsonl", strict=True)
    assert [r["round"] for r in finals] == [1, 2, 3] and all(r["update_step"] == 40 for r in finals)
    calls = read_jsonl(d / "llm_calls.jsonl", strict=True)
    roles = {c.get("role") for c in calls}
    assert {"controller", "memory"} <= roles
    briefs = read_jsonl(d / "briefs.jsonl", strict=True)
    assert all(len(b["brief"].split()) <= 150 for b in briefs)
    _check_round_logs(d, 3, decisions_per_round=3)
    decisions = read_jsonl(d / "decisions.jsonl", strict=True)
    assert all(x["new_lr"] > 0 and x["effective_step"] == x["step"] for x in decisions)
    assert json.dumps(calls).count("sk-") == 0


@pytest.mark.slow
def test_a_campaign_directory_whose_campaign_json_is_corrupt_or_missing_is_refused(tmp_path, capsys):
    """campaign.json `{` (or no campaign.json) beside finished rounds: the campaign was silently re-created with
    the new command's settings (a cosine round 2 beside the rules round 1, campaign.json rewritten). Now one
    line naming the file and the fix, and nothing in the directory changes; the file restored, it resumes."""
    from lrpilot.cli import main

    d = tmp_path / "camp"
    settings = CampaignSettings(preset="cpu-smoke", overrides=tuple(SMOKE), controller="rules", memory="none")
    run_campaign(_cfg(), d, 1, settings, echo=lambda _: None)
    original = (d / "campaign.json").read_bytes()

    def snapshot() -> dict:
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    other = ["campaign", "--preset", "cpu-smoke", "--rounds", "2", "--controller", "cosine", "--dir", str(d),
             "--set", "train.total_steps=40"]  # fmt: skip
    for content, expected in [(b"{\n", "unreadable"), (b"[1, 2]\n", "unreadable"), (None, "missing")]:
        if content is None:
            (d / "campaign.json").unlink()
        else:
            (d / "campaign.json").write_bytes(content)
        before = snapshot()
        capsys.readouterr()
        assert main(other) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{d / 'campaign.json'}: {expected}" in err, err
        assert "restore" in err and "new --dir" in err, err
        assert snapshot() == before  # the corrupt file kept as it was, no round 2
        assert not (d / "rounds" / "round_002").exists()
    (d / "campaign.json").write_bytes(original)
    assert len(run_campaign(_cfg(), d, 1, settings, echo=lambda _: None)) == 1  # restored: resumes, trains nothing


def test_an_unreadable_campaign_json_without_rounds_is_kept_too(tmp_path):
    from lrpilot.campaign import _check_settings

    (tmp_path / "campaign.json").write_text('{"settings": null}')
    s = CampaignSettings(preset="cpu-smoke", overrides=(), controller="rules", memory="none")
    with pytest.raises(CampaignError, match=r"campaign.json: unreadable .*or delete it: .* holds no rounds yet"):
        _check_settings(tmp_path, s)
    assert (tmp_path / "campaign.json").read_text() == '{"settings": null}'
