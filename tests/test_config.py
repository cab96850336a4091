"""Config: presets, --set overrides, JSON round trip and one-line errors that name the field."""

from __future__ import annotations

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
