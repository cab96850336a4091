"""Config: presets, --set overrides, JSON round trip and one-line errors that name the field."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from lrpilot.config import PRESETS, ConfigError, ModelConfig, RunConfig, apply_overrides, load_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_round_trip(name, tmp_path):
    cfg = load_config(name)
    cfg.save(tmp_path / "config.json")
    assert RunConfig.load(tmp_path / "config.json") == cfg


def test_presets_keep_enough_checkpoints_for_rollback():
    # the guard rolls back >= rollback_back_steps: pruning must not delete every checkpoint that old
    for name in PRESETS:
        cfg = load_config(name)
        needed = cfg.guard.rollback_back_steps // cfg.checkpoint_every + 2
        assert cfg.checkpoint.keep >= needed, name


def test_llama_60m_matches_the_published_config():
    cfg = load_config("llama_60m")
    assert (cfg.model.hidden_size, cfg.model.intermediate_size, cfg.model.num_hidden_layers) == (512, 1376, 8)
    assert (cfg.schedule.init_lr, cfg.schedule.warmup_steps, cfg.schedule.decision_every) == (3e-4, 1000, 300)
    assert cfg.train.total_steps == 10000 and cfg.data.tokenizer == "t5-base"


def test_overrides_apply_in_any_order():
    cfg = apply_overrides(load_config("llama_60m"), ["train.total_steps=500", "schedule.warmup_steps=50"])
    assert cfg.train.total_steps == 500 and cfg.schedule.warmup_steps == 50
    cfg = apply_overrides(load_config("cpu-small"), ["train.compile=true", "schedule.init_lr=1e-3", "name=x"])
    assert cfg.train.compile is True and cfg.schedule.init_lr == 1e-3 and cfg.name == "x"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.nope=1", "train.nope"),
        ("nosection.x=1", "nosection"),
        ("train.total_steps=abc", "train.total_steps"),
        ("train.total_steps=1.5", "train.total_steps"),
        ("schedule.init_lr=-1", "schedule.init_lr"),
        ("schedule.init_lr=nan", "schedule.init_lr"),
        ("train.compile=maybe", "train.compile"),
        ("guard.floor=1", "guard.floor"),
        ("launch.devices=gpu0", "launch.devices"),
        ("train.total_steps", "section.key=value"),
        ("schedule.warmup_steps=999999", "schedule.warmup_steps"),
        # numpy's seeding takes 0 .. 2**32 - 1: the trainer used to crash 5 times and the run read "diverged"
        ("train.seed=-1", "train.seed"),
        ("train.seed=4294967296", "train.seed"),
    ],
)
def test_bad_overrides_name_the_field(override, fragment):
    with pytest.raises(ConfigError) as e:
        apply_overrides(load_config("cpu-small"), [override])
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


def test_model_config_from_json_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(bad)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match="lacks"):
        ModelConfig.from_json(partial)


def test_corrupt_run_config_is_one_line(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"train": {"total_steps": "many"}}')
    with pytest.raises(ConfigError, match="train.total_steps"):
        RunConfig.load(p)
    p.write_text('{"trian": {}}')
    with pytest.raises(ConfigError, match="unknown section"):
        RunConfig.load(p)


def test_cli_reports_bad_input_in_one_line():
    r = subprocess.run(
        [sys.executable, "-m", "lrpilot", "info", "--preset", "cpu-smoke", "--set", "train.bogus=1"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "train.bogus" in r.stderr


def test_cli_info_prints_parameter_count():
    r = subprocess.run(
        [sys.executable, "-m", "lrpilot", "info", "--preset", "llama_60m"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert '"hidden_size": 512' in r.stdout
    assert "parameters: 58,0" in r.stdout  # HF LlamaForCausalLM with llama_60m.json: 58,073,600


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["schedule.init_lr=0.2"], "above guard.ceiling (0.05)"),
        (["schedule.init_lr=1e-7"], "below guard.floor (1e-06)"),
        (["schedule.init_lr=3e-3", "guard.ceiling=1e-3"], "above guard.ceiling (0.001)"),
    ],
)
def test_init_lr_outside_the_guard_bounds_is_refused(overrides, fragment):
    """Issue 9.5: the warmup trains at init_lr before the guard sees a decision."""
    with pytest.raises(ConfigError) as e:
        apply_overrides(load_config("cpu-smoke"), overrides)
    assert str(e.value).startswith("schedule.init_lr:") and fragment in str(e.value) and "\n" not in str(e.value)
    # raising the bound first is the fix, in either order
    cfg = apply_overrides(load_config("cpu-smoke"), ["schedule.init_lr=0.2", "guard.ceiling=0.3"])
    assert cfg.schedule.init_lr == 0.2


def test_check_same_config_names_the_field(tmp_path):
    """Issue 9.6: a run directory is only reused with the settings it was made with."""
    from lrpilot.config import check_same_config, config_differences

    cfg = load_config("cpu-smoke")
    path = tmp_path / "config.json"
    check_same_config(path, cfg)  # nothing stored yet
    cfg.save(path)
    check_same_config(path, cfg)
    check_same_config(path, apply_overrides(cfg, ["train.progress=true", "guard.hang_timeout_s=5"]))  # how, not what
    with pytest.raises(ConfigError) as e:
        check_same_config(path, apply_overrides(cfg, ["model.hidden_size=64"]))
    msg = str(e.value)
    assert msg.startswith("model.hidden_size:") and "model.hidden_size=32" in msg and "64" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"schedule.init_lr: .*\(and 1 more: train.seed\)"):
        check_same_config(path, apply_overrides(cfg, ["schedule.init_lr=1e-3", "train.seed=1"]))
    # a field the stored file lacks (written before it existed) is not compared
    d = json.loads(path.read_text())
    del d["guard"]["max_fast_crash"]
    assert config_differences(d, cfg) == []
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        check_same_config(path, cfg)


def test_trainer_part_and_campaign_part_split_every_section():
    from lrpilot.config import CAMPAIGN_SECTIONS, TRAINER_SECTIONS, CampaignConfig, TrainerConfig, _section_names

    assert sorted(TRAINER_SECTIONS + CAMPAIGN_SECTIONS) == _section_names()  # each section in exactly one part
    cfg = load_config("cpu-smoke")
    tp, cp = cfg.trainer_part(), cfg.campaign_part()
    assert isinstance(tp, TrainerConfig) and isinstance(cp, CampaignConfig)
    assert all(getattr(tp, s) is getattr(cfg, s) for s in TRAINER_SECTIONS) and tp.name == cfg.name
    assert all(getattr(cp, s) is getattr(cfg, s) for s in CAMPAIGN_SECTIONS)
    assert tp.rollback_back_steps == cfg.guard.rollback_back_steps and tp.checkpoint_every == cfg.checkpoint_every
    # a campaign-only setting leaves the trainer's view (and the checkpoint fingerprint) as it was
    other = apply_overrides(cfg, ["agent.model=x", "guard.emergency_loss=9", "launch.devices=cpu:2"])
    assert other.trainer_part() == tp and other.campaign_part() != cp
    assert apply_overrides(cfg, ["guard.rollback_back_steps=20"]).trainer_part() != tp


def test_the_trainer_reads_only_its_part_of_the_config():
    """Every `cfg.X[.Y]` in lrpilot/trainer.py is in TrainerConfig (or is to_dict, which only records the whole
    config in checkpoints and loggers): a campaign setting cannot change what the trainer does."""
    import re
    from pathlib import Path

    import lrpilot.trainer
    from lrpilot.config import CAMPAIGN_SECTIONS, TrainerConfig

    source = Path(lrpilot.trainer.__file__).read_text()
    reads = set(re.findall(r"\bcfg\.(\w+)(?:\.(\w+))?", source))
    assert ("train", "grad_clip") in reads and ("guard", "rollback_back_steps") in reads  # the pattern sees them
    allowed = {f.name for f in dataclasses.fields(TrainerConfig)} | {"checkpoint_every", "to_dict"}
    outside = sorted(
        f"{a}.{b}" if b else a
        for a, b in reads
        if (a in CAMPAIGN_SECTIONS and (a, b) != ("guard", "rollback_back_steps")) or a not in allowed | {"guard"}
    )
    assert outside == []
