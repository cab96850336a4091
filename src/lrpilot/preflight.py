"""Checks that run before any training starts, so a bad setting fails in one line with nothing written.

    python -c "from lrpilot.config import load_config; from lrpilot.preflight import check_run; \
check_run(load_config('cpu-smoke', ['data.source=files', 'data.path=/nonexistent']))"

`RunConfig.__post_init__` checks each field and the cross-field rules of the config alone. What depends on
the machine or the files -- the batch split over `launch.devices`, the data files, the tokenizer's vocabulary
against the model, the optional loggers, a CUDA device -- the trainer would otherwise find out only once it
has been launched (after run directories were created, or, in `lrpilot demo`, after the cosine sweep started
beside the campaign). Every command that trains calls `check_run` first; campaigns also call
`check_campaign`. Checks that need the network (a hub tokenizer, streaming C4) are left to the trainer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lrpilot.config import ConfigError, RunConfig
from lrpilot.decision import GUARD_RULES
from lrpilot.llm import LLM_BACKENDS


def check_run(cfg: RunConfig) -> None:
    """Raise a one-line LrpilotError (ConfigError, DataError, TrainerError) for a setting the trainer would
    refuse at launch, or that the docs require of a run: agent.backend (a LLM_BACKENDS name), guard.rules (GUARD_RULES names), checkpoint.keep
    for the rollback distance, batch geometry for launch.devices, data.path, data.tokenizer vs model.vocab_size,
    train.loggers extras, train.device=cuda without CUDA. Reads file names, never file contents."""
    from lrpilot.data import c4_local_files, check_vocab, embedded_files, get_tokenizer, resolve_files
    from lrpilot.trainer import batch_geometry

    batch_geometry(cfg, cfg.launch.nproc)
    LLM_BACKENDS.entry(cfg.agent.backend)  # a registered backend name (agent.backend; imports nothing)
    for name in cfg.guard.rule_names():  # registered guard rules (guard.rules)
        GUARD_RULES.entry(name)
    every, back = cfg.checkpoint_every, cfg.guard.rollback_back_steps
    need = -(-back // every) + 2  # docs/architecture.md: keep >= rollback_back_steps / checkpoint_every + 2
    if cfg.checkpoint.keep < need:
        raise ConfigError(
            f"checkpoint.keep: must be >= guard.rollback_back_steps / checkpoint every ({back} / {every}, rounded "
            f"up) + 2 = {need}, so that pruning keeps `keep` checkpoints and one old enough to roll back to; "
            "raise it or checkpoint more often"
        )
    d = cfg.data
    if d.source == "files":
        resolve_files(d.path)
    elif d.source == "embedded":
        embedded_files(d.path)
    else:
        c4_local_files(d.path)  # local shards: train and validation present (a hub name is checked at launch)
    tok = d.tokenizer
    local_tok = tok in ("byte", "gpt2") or Path(tok).expanduser().exists() or tok.endswith(".json")
    if local_tok:  # a hub tokenizer would need the network: the trainer checks it
        check_vocab(get_tokenizer(tok).vocab_size, cfg.model.vocab_size)
    extras = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard")}
    for name in (x.strip() for x in cfg.train.loggers.split(",") if x.strip()):
        module, extra = extras[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.loggers={name} needs {module}: pip install 'lrpilot[{extra}]'")
    if cfg.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")


def check_campaign(cfg: RunConfig, rounds: int, settings: object) -> None:
    """check_run plus what a campaign adds: rounds >= 1, the rule parameters, --prune only with intermediate evals,
    --script's program found (on PATH or an executable path), and for --controller replay a --replay-from log that holds every round asked for."""
    from lrpilot.campaign import CampaignSettings

    assert isinstance(settings, CampaignSettings)
    if rounds < 1:
        raise ConfigError(f"--rounds: must be >= 1, got {rounds}")
    check_run(cfg)
    if settings.controller == "rules":
        settings.rules_for(cfg.schedule.init_lr)
    if settings.prune and cfg.eval.every == 0:  # no intermediate eval: nothing to prune on, silently
        raise ConfigError(
            f"--prune {settings.prune}: a round is judged at its intermediate evals, and eval.every is 0 (only a "
            f"final eval); add --set eval.every=N, e.g. N = {max(1, cfg.train.total_steps // 10)}"
        )
    if settings.script:
        import shlex
        import shutil

        program = shlex.split(settings.script)[0]  # CampaignSettings checked that it splits
        if shutil.which(program) is None:  # a mistyped command failed every round, silently, and kept exit 0
            raise ConfigError(
                f"--script: {program!r} is not a command on PATH nor an executable file; check its spelling, "
                'or run it through its interpreter, e.g. --script "python train.py"'
            )
    if settings.controller == "replay":
        from lrpilot.logs import read_jsonl

        log = Path(settings.replay_from) / "decisions.jsonl"
        if not log.is_file():
            raise ConfigError(f"--replay-from {settings.replay_from}: no decisions.jsonl there; give a campaign --dir")
        records = read_jsonl(log)
        have = {r.get("round") for r in records}
        missing = [r for r in range(1, rounds + 1) if r not in have]
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
            raise ConfigError(
                f"--rounds {rounds}: {log} has no decisions for round(s) {shown}; lower --rounds or re-play another campaign"
            )
        check_replay_steps(cfg, log, records, rounds, source=Path(settings.replay_from))


#: the settings that place a round's decisions (trainer.is_decision_point): a replay must run under the same
_PLACING = ("schedule.warmup_steps", "schedule.decision_every", "train.total_steps")


def _round_settings(source: Path, r: int) -> dict[str, object]:
    """The _PLACING settings round r of campaign `source` ran under: its rounds/round_NNN/config.json (a round of
    the trainer) or pilot.json (a --script round); {} when neither can be read (an imported study)."""
    import json

    run = source / "rounds" / f"round_{r:03d}"
    try:
        c = json.loads((run / "config.json").read_text(encoding="utf-8"))
        return {k: c[k.split(".")[0]][k.split(".")[1]] for k in _PLACING}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        c = json.loads((run / "pilot.json").read_text(encoding="utf-8"))
        return {k: c[k.split(".")[1]] for k in _PLACING}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def check_replay_steps(
    cfg: RunConfig,
    log: Path,
    records: list[dict],
    rounds: int,
    flag: str = "--replay-from",
    source: Path | None = None,
) -> None:
    """A replay run under other warmup_steps, decision_every or total_steps than the replayed round (read from
    `source`, its campaign directory, where it has them) would train another schedule; one whose logged
    decision steps are none of this run's decision points (trainer.is_decision_point: warmup_steps + k x
    decision_every, below total_steps) would hold the LR at every step and end "ok". Both are refused with a
    ConfigError naming `flag` (the campaign's --replay-from, or bench's --methods replay:DIR) and the fix."""
    from lrpilot.trainer import is_decision_point

    s = cfg.schedule
    ours = {"schedule.warmup_steps": s.warmup_steps, "schedule.decision_every": s.decision_every,
            "train.total_steps": cfg.train.total_steps}  # fmt: skip
    for r in range(1, rounds + 1):
        theirs = _round_settings(source, r) if source is not None else {}
        for key, value in theirs.items():
            if value != ours[key]:
                raise ConfigError(
                    f"{flag}: round {r} of {source} ran with {key}={value}, this run has {ours[key]}; replay "
                    f"with --set {key}={value} (under other settings a replay trains another schedule)"
                )
        steps = sorted({n for x in records if x.get("round") == r and isinstance(n := x.get("step"), int)})
        if steps and not any(is_decision_point(n, cfg) for n in steps):
            shown = ", ".join(map(str, steps[:3])) + (" ..." if len(steps) > 3 else "")
            raise ConfigError(
                f"{flag}: round {r} of {log} decided at steps {shown}, none of this run's decision points "
                f"(from step {s.warmup_steps} every {s.decision_every} steps, below {cfg.train.total_steps}); replay "
                "with the preset and --set values that campaign used"
            )
