"""One schema for every record lrpilot writes and reads back (no torch): the decision-log kinds and typed records.

    from lrpilot.records import DecisionRecord, Kind
    rec = DecisionRecord.from_dict(line)         # a decisions.jsonl line, types checked
    rec.kind is Kind.EMERGENCY                   # Kind is a str enum: Kind.EMERGENCY == "emergency"
    rec.to_dict() == line                        # same field names, same order, unknown keys kept (rec.extra)

Records and their files (docs/architecture.md, "Run directory" and "Campaign directory"):

- `DecisionRecord`: a line of decisions.jsonl (the published fields, lrpilot's, and the campaign's `round`,
  `controller`, ...). It is also the earlier decision a controller's next prompt sees (`Observation.decisions`),
  so `controllers.base.DecisionRecord` is this class. The published key `reasoning` is the attribute `reason`.
- `RollbackRecord`: a line of rollbacks.jsonl; also `Observation.rollbacks`.
- `RoundResult`: RUN/result.json, how one run ended (written by the round supervisor and by `Pilot.finish`).
- `FinalResult`: a line of DIR/final_results.jsonl, the campaign's commit point of a round.
- `BaselineResult`: a baseline result json (baselines/cosine_lr1e-3.json, the published cosine_baselines/).
- `LLMCallRecord`: a line of llm_calls.jsonl (one LLM call, AuditedBackend).
- `BriefRecord`: a line of briefs.jsonl (the memory brief given to a round).

`from_dict` checks each known field's type and raises `RecordError` with one line naming the file and field
(`decisions.jsonl: field 'step' must be an int, got 'abc'`); keys it does not know are kept in `extra`, and the
order of the keys is kept, so `to_dict(from_dict(line))` gives the line back (non-finite floats, written as the
strings "nan" / "inf" / "-inf" by `lrpilot.logs.dumps`, are floats in the record and are written the same way).
A record built in code writes its fields in the published order (the class's `ORDER`), then its extras.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lrpilot.errors import LrpilotError


class RecordError(LrpilotError, ValueError):
    """A record whose field has the wrong type or is missing (the message names the file and the field).
    `field` is the file's key ("" for a line that is not an object) and `problem` the rest of the message."""

    def __init__(self, file: str, field: str, problem: str) -> None:
        self.file, self.field, self.problem = file, field, problem
        super().__init__(f"{file}: field {field!r} {problem}" if field else f"{file}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (the engine's children, Ray)
        return (type(self), (self.file, self.field, self.problem))


class Kind(str, enum.Enum):
    """decisions.jsonl `kind` (docs/architecture.md): a str, so `Kind.DECISION == "decision"` and JSON is unchanged."""

    #: the controller's answer, guarded
    DECISION = "decision"
    #: no valid answer: the LR is kept
    FALLBACK = "fallback"
    #: the guard's emergency cut (logged with the LR it sent)
    EMERGENCY = "emergency"
    #: an answer that came after a rollback or an emergency cut: logged, not sent
    SUPERSEDED = "superseded"
    #: a question to a non-blocking controller still open when the round ended: LR kept, never sent
    UNANSWERED = "unanswered"
    #: a rollback the controller asked for and the guard granted
    AGENT_ROLLBACK = "agent_rollback"
    #: a crash rollback as an earlier decision (older logs; never replayed)
    ROLLBACK = "rollback"

    __str__ = str.__str__
    __hash__ = str.__hash__  # {"decision"} and {Kind.DECISION} find each other
    __format__ = str.__format__  # f"{Kind.DECISION}" == "decision" on every Python


#: kinds that are the controller's own answers (counted for `mostly_fallback`)
ANSWER_KINDS = (Kind.DECISION, Kind.FALLBACK)
#: the kinds that count as the round's decisions (total_decisions, an Observation's history)
COUNTED_KINDS = (Kind.DECISION, Kind.EMERGENCY, Kind.FALLBACK, Kind.AGENT_ROLLBACK)
#: the kinds that are a controller's reply (so have a latency): answers, superseded replies, agent rollbacks
ASKED_KINDS = (Kind.DECISION, Kind.FALLBACK, Kind.SUPERSEDED, Kind.AGENT_ROLLBACK)
#: kinds whose answer set no LR (a Pilot's or a supervisor's log: never sent to the trainer)
NO_LR_KINDS = (Kind.SUPERSEDED, Kind.UNANSWERED)

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

# type codes of the fields: what `from_dict` accepts (a trailing "?" also accepts null)
_DESCRIBE = {
    "int": "an int",
    "float": 'a number (or "nan", "inf", "-inf")',
    "str": "a string",
    "bool": "true or false",
    "list": "a list",
    "dict": "an object",
    "pairs": "a list of [step, value] pairs",
    "kind": "one of " + ", ".join(k.value for k in Kind),
    "any": "any value",
}


def _check(code: str, v: Any) -> bool:
    base = code.rstrip("?")
    if v is None:
        return code.endswith("?") or base == "any"
    if base == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if base == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if base == "str":
        return isinstance(v, str)
    if base == "bool":
        return isinstance(v, bool)
    if base == "list":
        return isinstance(v, (list, tuple))
    if base == "dict":
        return isinstance(v, Mapping)
    if base == "pairs":
        return isinstance(v, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and _check("int", p[0]) and _check("float", p[1]) for p in v
        )
    if base == "kind":
        return isinstance(v, Kind)
    return True


def _decode(code: str, v: Any) -> Any:
    """A file value as the record holds it: "nan"/"inf"/"-inf" -> float for number fields, a str -> Kind."""
    base = code.rstrip("?")
    if base == "float" and isinstance(v, str) and v in _NONFINITE:
        return _NONFINITE[v]
    if base == "pairs" and isinstance(v, list):
        return [
            tuple(_decode("float", x) if i else x for i, x in enumerate(p)) if isinstance(p, list) else p for p in v
        ]
    if base == "kind" and isinstance(v, str) and not isinstance(v, Kind):
        try:
            return Kind(v)
        except ValueError:
            return v  # __post_init__ names the field
    return v


def _encode(v: Any) -> Any:
    return v.value if isinstance(v, Kind) else v


@dataclass(frozen=True)
class _Record:
    """Shared machinery: subclasses declare their fields, `FILE`, `ORDER` and `TYPES` (attribute -> type code)."""

    #: the file the record is a line of (named in errors)
    FILE: ClassVar[str] = ""
    #: the file's keys in the order a record built in code writes them
    ORDER: ClassVar[tuple[str, ...]] = ()
    #: attribute -> type code (see _DESCRIBE)
    TYPES: ClassVar[dict[str, str]] = {}
    #: file key -> attribute, where they differ
    RENAMES: ClassVar[dict[str, str]] = {}
    #: keys a record built in code writes only when their value is not None
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    #: keys of the file line that no field holds, as they were
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False, kw_only=True)
    #: the keys of the line it was read from, in order (empty for a record built in code: ORDER then extra)
    keys: tuple[str, ...] = field(default=(), compare=False, repr=False, kw_only=True)

    def __post_init__(self) -> None:
        for attr, code in self.TYPES.items():
            v = getattr(self, attr)
            if code.rstrip("?") == "kind" and isinstance(v, str) and not isinstance(v, Kind):
                v = _decode(code, v)
                object.__setattr__(self, attr, v)
            if not _check(code, v):
                raise self._type_error(attr, v)

    @classmethod
    def _type_error(cls, attr: str, v: Any) -> RecordError:
        code = cls.TYPES[attr]
        kind = f"{_DESCRIBE[code.rstrip('?')]}{' or null' if code.endswith('?') else ''}"
        return RecordError(cls.FILE, cls._key(attr), f"must be {kind}, got {_short(v)}")

    @classmethod
    def _key(cls, attr: str) -> str:
        return next((k for k, a in cls.RENAMES.items() if a == attr), attr)

    @classmethod
    def _attrs(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls) if f.name not in ("extra", "keys")}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):  # noqa: ANN206 - the subclass
        """The record of one parsed line. Raises RecordError (one line: file, field, what it must be) for a line
        that is not an object, a field of the wrong type, or a missing required field."""
        if not isinstance(d, Mapping):
            raise RecordError(cls.FILE, "", f"a record must be a JSON object, got {_short(d)}")
        attrs = cls._attrs()
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for k, v in d.items():
            attr = cls.RENAMES.get(k, k)
            if attr in attrs and attr in cls.TYPES:
                kwargs[attr] = _decode(cls.TYPES[attr], v)
            else:
                extra[k] = v
        for attr, v in kwargs.items():  # the fields that are there first, then the ones that are not
            if not _check(cls.TYPES[attr], v):
                raise cls._type_error(attr, v)
        for name, f in attrs.items():
            if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(cls.FILE, cls._key(name), "is missing")
        return cls(**kwargs, extra=extra, keys=tuple(str(k) for k in d))

    def has(self, key: str) -> bool:
        """Whether the line holds `key` (a record built in code: whether to_dict writes it)."""
        return key in self._keys()

    def _keys(self) -> tuple[str, ...]:
        if self.keys:
            return self.keys
        own = tuple(k for k in self.ORDER if not (k in self.OPTIONAL and getattr(self, self.RENAMES.get(k, k)) is None))
        return own + tuple(k for k in self.extra if k not in own)

    def to_dict(self) -> dict[str, Any]:
        """The line: the file's field names, in the order read (or ORDER), extras included."""
        out: dict[str, Any] = {}
        for k in self._keys():
            attr = self.RENAMES.get(k, k)
            if attr in self.TYPES:
                out[k] = _encode(getattr(self, attr))
            elif k in self.extra:
                out[k] = self.extra[k]
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    def get(self, key: str, default: Any = None) -> Any:
        """The line's value of `key` (a field or an extra), `default` when the line lacks it."""
        if key in self.extra:
            return self.extra[key]
        attr = self.RENAMES.get(key, key)
        return _encode(getattr(self, attr)) if attr in self.TYPES and self.has(key) else default


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


# ------------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class DecisionRecord(_Record):
    """One decision: a decisions.jsonl line, and the earlier decision a controller's prompt sees.

    Published fields (the study's logs): timestamp, run_start_iso, step, loss, trend, old_lr, new_lr,
    raw_lr_request, clamped, reasoning. lrpilot adds effective_step (the step the trainer first trained with
    new_lr; null while not applied, absent in the published logs: all applied), kind (absent: a decision),
    clamp_reasons, latency_s, wait_s, seq, plan, launch, and more by kind (probe, rollback_to_step, ...: extra).
    LRs in 1/step units of the optimizer, loss in nats per token, times in seconds."""

    step: int
    old_lr: float
    new_lr: float
    loss: float
    effective_step: int | None = None
    kind: Kind = Kind.DECISION
    #: the published `reasoning`: the controller's reason (for an LLM, its answer's text)
    reason: str = ""
    run_start_iso: str = ""
    timestamp: str | None = None
    trend: str | None = None
    raw_lr_request: float | None = None
    clamped: bool = False
    # lists as read (a log line's JSON): left out of the hash, so the record stays hashable like Observation
    clamp_reasons: tuple[str, ...] | list[str] = field(default=(), hash=False)
    latency_s: float | None = None
    wait_s: float = 0.0
    seq: int | None = None
    plan: Any = field(default=None, hash=False)
    launch: int | None = None

    FILE: ClassVar[str] = "decisions.jsonl"
    # lrpilot's order (supervisor._record): the published fields first, then lrpilot's
    ORDER: ClassVar[tuple[str, ...]] = (
        "run_start_iso", "step", "loss", "trend", "old_lr", "new_lr", "raw_lr_request", "clamped", "reasoning",
        "timestamp", "effective_step", "kind", "clamp_reasons", "latency_s", "wait_s", "seq", "plan", "launch",
    )  # fmt: skip
    RENAMES: ClassVar[dict[str, str]] = {"reasoning": "reason"}
    TYPES: ClassVar[dict[str, str]] = {
        "step": "int", "old_lr": "float", "new_lr": "float", "loss": "float", "effective_step": "int?",
        "kind": "kind", "reason": "str?", "run_start_iso": "str", "timestamp": "str?", "trend": "str?",
        "raw_lr_request": "float?", "clamped": "bool", "clamp_reasons": "list", "latency_s": "float?",
        "wait_s": "float", "seq": "int?", "plan": "any", "launch": "int?",
    }  # fmt: skip

    @classmethod
    def from_log(cls, d: Mapping[str, Any]) -> DecisionRecord:
        """A decisions.jsonl record (published field names: `reasoning` is the reason); = from_dict."""
        return cls.from_dict(d)

    @property
    def applied(self) -> bool:
        """False for a decision the trainer never applied (`effective_step: null`); the published logs have no
        effective_step: all count as applied."""
        return not (self.has("effective_step") and self.effective_step is None)


@dataclass(frozen=True)
class RollbackRecord(_Record):
    """One rollback: a rollbacks.jsonl line, and an earlier rollback as a controller's prompt sees it.

    Published fields: timestamp, run_start_iso, crash_step, lr_at_crash, rolled_back_to_step, new_lr,
    crash_reason, crash_count_in_run. lrpilot adds lr_used_at_crash, crash_detail, launch_start_step, launch
    (and skip_batches, rollback_reason, ...: extra). rolled_back_to_step / new_lr are null when the round gave up."""

    crash_step: int
    lr_at_crash: float
    rolled_back_to_step: int | None
    new_lr: float | None
    crash_reason: str
    run_start_iso: str = ""
    crash_count_in_run: int | None = None
    timestamp: str | None = None

    FILE: ClassVar[str] = "rollbacks.jsonl"
    ORDER: ClassVar[tuple[str, ...]] = (
        "run_start_iso", "crash_step", "lr_at_crash", "rolled_back_to_step", "new_lr", "crash_reason",
        "crash_count_in_run", "timestamp",
    )  # fmt: skip
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"crash_count_in_run", "timestamp"})
    TYPES: ClassVar[dict[str, str]] = {
        "crash_step": "int", "lr_at_crash": "float", "rolled_back_to_step": "int?", "new_lr": "float?",
        "crash_reason": "str", "run_start_iso": "str", "crash_count_in_run": "int?", "timestamp": "str?",
    }  # fmt: skip


# ------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RoundResult(_Record):
    """How one run ended; RUN/result.json. Every field is written (a missing one reads as its default:
    NaN for numbers, 0 for counts, [] for lists)."""

    status: str  # "ok" | "failed" | "pruned" (the campaign's memory stopped it early, --prune)
    run_start_iso: str
    final_eval_loss: float
    final_eval_ppl: float
    final_eval_tokens: int
    update_step: int
    crash_count: int
    total_decisions: int
    #: the highest LR any update used, warmup included
    peak_lr_seen: float
    #: the lowest LR an update after the warmup used
    min_lr_seen: float
    wall_time_s: float
    #: seconds the trainer blocked waiting for decisions
    wait_s: float
    #: per controller call: seconds decide() took
    decision_latency_s: list[float]
    #: per applied decision: effective_step - decided step
    effect_delay_steps: list[int]
    #: (step, lr) and (step, loss) of the trajectory the final model saw, sampled to <= 500 points
    lr_trajectory: list[tuple[int, float]]
    loss_trajectory: list[tuple[int, float]]
    failure_reason: str | None = None
    #: questions to a non-blocking controller still unanswered when the round ended (kind "unanswered")
    unanswered_decisions: int = 0
    #: controller answers (kinds decision + fallback) that kept the LR for want of a valid answer
    fallback_decisions: int = 0
    #: more than half of the controller's answers fell back: the round shows the fallback path, not the agent
    mostly_fallback: bool = False
    #: rollbacks the controller asked for and the guard granted (decisions of kind agent_rollback)
    agent_rollbacks: int = 0
    #: extra training updates spent in lookahead probes and LR range tests (Decision.probe_lrs), beyond update_step
    probe_steps: int = 0
    #: status "pruned": the last update the trainer ran before it stopped (None for any other status)
    pruned_at_step: int | None = None
    #: status "pruned": train.total_steps - pruned_at_step, the updates the stop saved (0 for any other status)
    steps_saved: int = 0

    FILE: ClassVar[str] = "result.json"
    TYPES: ClassVar[dict[str, str]] = {
        "status": "str", "run_start_iso": "str", "final_eval_loss": "float", "final_eval_ppl": "float",
        "final_eval_tokens": "int", "update_step": "int", "crash_count": "int", "total_decisions": "int",
        "peak_lr_seen": "float", "min_lr_seen": "float", "wall_time_s": "float", "wait_s": "float",
        "decision_latency_s": "list", "effect_delay_steps": "list", "lr_trajectory": "pairs",
        "loss_trajectory": "pairs", "failure_reason": "str?", "unanswered_decisions": "int",
        "fallback_decisions": "int", "mostly_fallback": "bool", "agent_rollbacks": "int", "probe_steps": "int",
        "pruned_at_step": "int?", "steps_saved": "int",
    }  # fmt: skip
    ORDER: ClassVar[tuple[str, ...]] = tuple(TYPES)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundResult:
        """result.json's record; a missing field reads as its default (NaN, 0, [], None), as before."""
        if not isinstance(d, Mapping):
            raise RecordError(cls.FILE, "", f"a record must be a JSON object, got {_short(d)}")
        missing = {
            "final_eval_loss": math.nan, "final_eval_ppl": math.nan, "final_eval_tokens": 0, "update_step": 0,
            "crash_count": 0, "total_decisions": 0, "peak_lr_seen": math.nan, "min_lr_seen": math.nan,
            "wall_time_s": math.nan, "wait_s": math.nan, "decision_latency_s": [], "effect_delay_steps": [],
            "lr_trajectory": [], "loss_trajectory": [],
        }  # fmt: skip
        rec = super().from_dict({**missing, **d})
        return dataclasses.replace(rec, keys=tuple(str(k) for k in d) if set(d) >= set(cls.TYPES) else ())


@dataclass(frozen=True)
class FinalResult(_Record):
    """One line of DIR/final_results.jsonl: a round's result as the campaign commits it.

    Published fields: timestamp, run_start_iso, final_eval_ppl, final_eval_loss, total_decisions, crash_count,
    peak_lr_seen, min_lr_seen, warmup_steps, decision_every, init_lr, optimizer. lrpilot's campaign adds the
    rest (docs/architecture.md); `rule_params`, `script`, `pruned_at_step` and `steps_saved` only when set
    (the last two for a round of status "pruned", `campaign --prune`)."""

    run_start_iso: str
    final_eval_ppl: float | None = None
    final_eval_loss: float | None = None
    timestamp: str | None = None
    total_decisions: int | None = None
    unanswered_decisions: int | None = None
    fallback_decisions: int | None = None
    mostly_fallback: bool | None = None
    crash_count: int | None = None
    agent_rollbacks: int | None = None
    probe_steps: int | None = None
    peak_lr_seen: float | None = None
    min_lr_seen: float | None = None
    warmup_steps: int | None = None
    decision_every: int | None = None
    init_lr: float | None = None
    optimizer: str | None = None
    round: int | None = None
    status: str | None = None
    failure_reason: str | None = None
    seed: int | None = None
    controller: str | None = None
    memory: str | None = None
    backend: str | None = None
    model: str | None = None
    preset: str | None = None
    final_eval_tokens: int | None = None
    update_step: int | None = None
    wall_time_s: float | None = None
    round_wall_time_s: float | None = None
    wait_s: float | None = None
    decision_latency_s: float | None = None
    effect_delay_steps: float | None = None
    settings: dict[str, Any] | None = None
    rule_params: dict[str, Any] | None = None
    script: str | None = None
    pruned_at_step: int | None = None
    steps_saved: int | None = None

    FILE: ClassVar[str] = "final_results.jsonl"
    ORDER: ClassVar[tuple[str, ...]] = (
        "timestamp", "run_start_iso", "final_eval_ppl", "final_eval_loss", "total_decisions",
        "unanswered_decisions", "fallback_decisions", "mostly_fallback", "crash_count", "agent_rollbacks",
        "probe_steps", "peak_lr_seen", "min_lr_seen", "warmup_steps", "decision_every", "init_lr", "optimizer",
        "round", "status", "failure_reason", "seed", "controller", "memory", "backend", "model", "preset",
        "final_eval_tokens", "update_step", "wall_time_s", "round_wall_time_s", "wait_s", "decision_latency_s",
        "effect_delay_steps", "settings", "rule_params", "script", "pruned_at_step", "steps_saved",
    )  # fmt: skip
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"rule_params", "script", "pruned_at_step", "steps_saved"})
    TYPES: ClassVar[dict[str, str]] = {
        "run_start_iso": "str", "final_eval_ppl": "float?", "final_eval_loss": "float?", "timestamp": "str?",
        "total_decisions": "int?", "unanswered_decisions": "int?", "fallback_decisions": "int?",
        "mostly_fallback": "bool?", "crash_count": "int?", "agent_rollbacks": "int?", "probe_steps": "int?",
        "peak_lr_seen": "float?", "min_lr_seen": "float?", "warmup_steps": "int?", "decision_every": "int?",
        "init_lr": "float?", "optimizer": "str?", "round": "int?", "status": "str?", "failure_reason": "str?",
        "seed": "int?", "controller": "str?", "memory": "str?", "backend": "str?", "model": "str?",
        "preset": "str?", "final_eval_tokens": "int?", "update_step": "int?", "wall_time_s": "float?",
        "round_wall_time_s": "float?", "wait_s": "float?", "decision_latency_s": "float?",
        "effect_delay_steps": "float?", "settings": "dict?", "rule_params": "dict?", "script": "str?",
        "pruned_at_step": "int?", "steps_saved": "int?",
    }  # fmt: skip


@dataclass(frozen=True)
class BaselineResult(_Record):
    """A baseline result json (one fixed schedule at one peak LR). Published fields: final_eval_loss,
    final_eval_ppl, final_eval_tokens, update_step, seed; lrpilot's `baseline` adds the rest. (The report's
    view of one, with the LR read from the file name, is lrpilot.campaign_logs.BaselineResult.)"""

    final_eval_loss: float | None = None
    final_eval_ppl: float | None = None
    final_eval_tokens: int | None = None
    update_step: int | None = None
    seed: int | None = None
    schedule: str | None = None
    peak_lr: float | None = None
    peak_lr_seen: float | None = None
    min_lr_seen: float | None = None
    preset: str | None = None
    status: str | None = None
    diverged: bool | None = None
    crash_count: int | None = None
    wall_time_s: float | None = None
    total_steps: int | None = None
    warmup_steps: int | None = None
    run_start_iso: str | None = None
    lr_trajectory: list | None = None
    loss_trajectory: list | None = None

    FILE: ClassVar[str] = "baseline result json"
    TYPES: ClassVar[dict[str, str]] = {
        "final_eval_loss": "float?", "final_eval_ppl": "float?", "final_eval_tokens": "int?",
        "update_step": "int?", "seed": "int?", "schedule": "str?", "peak_lr": "float?", "peak_lr_seen": "float?",
        "min_lr_seen": "float?", "preset": "str?", "status": "str?", "diverged": "bool?", "crash_count": "int?",
        "wall_time_s": "float?", "total_steps": "int?", "warmup_steps": "int?", "run_start_iso": "str?",
        "lr_trajectory": "list?", "loss_trajectory": "list?",
    }  # fmt: skip
    ORDER: ClassVar[tuple[str, ...]] = tuple(TYPES)


# ------------------------------------------------------------------------------------------- LLM side


@dataclass(frozen=True)
class LLMCallRecord(_Record):
    """One LLM call: a line of llm_calls.jsonl (lrpilot.llm.base.AuditedBackend). The campaign's join fields
    (`round`, `run_start_iso`) come between `model` and `messages` (extra); `parse_error` only when set."""

    time: str
    role: str
    backend: str
    model: str
    messages: list[Any]
    schema: bool = False
    reply: str = ""
    parsed: Any = None
    usage: Any = None
    latency_s: float = 0.0
    error: str | None = None
    reasoning: str | None = None
    finish_reason: str | None = None
    parse_error: str | None = None

    FILE: ClassVar[str] = "llm_calls.jsonl"
    ORDER: ClassVar[tuple[str, ...]] = (
        "time", "role", "backend", "model", "messages", "schema", "reply", "parsed", "usage", "latency_s",
        "error", "reasoning", "finish_reason", "parse_error",
    )  # fmt: skip
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"parse_error"})
    TYPES: ClassVar[dict[str, str]] = {
        "time": "str", "role": "str", "backend": "str", "model": "str", "messages": "list", "schema": "bool",
        "reply": "str?", "parsed": "any", "usage": "any", "latency_s": "float", "error": "str?",
        "reasoning": "str?", "finish_reason": "str?", "parse_error": "str?",
    }  # fmt: skip

    def with_join(self, join: Mapping[str, Any]) -> LLMCallRecord:
        """This record with the campaign's join fields written after `model` (AuditedBackend's `extra`)."""
        head = ("time", "role", "backend", "model")
        rest = tuple(k for k in self._keys() if k not in head and k not in join)
        return dataclasses.replace(self, extra={**join, **self.extra}, keys=head + tuple(join) + rest)


@dataclass(frozen=True)
class BriefRecord(_Record):
    """The memory brief given to one round: a line of briefs.jsonl. By memory (extra): optuna `params`;
    llm `fallback`, `words`, `truncated`, `truncated_by`, `running`."""

    round: int
    brief: str
    timestamp: str | None = None
    memory: str | None = None

    FILE: ClassVar[str] = "briefs.jsonl"
    ORDER: ClassVar[tuple[str, ...]] = ("round", "timestamp", "memory", "brief")
    TYPES: ClassVar[dict[str, str]] = {"round": "int", "brief": "str", "timestamp": "str?", "memory": "str?"}


#: the record class of each file name (the published names too)
RECORD_FOR_FILE: dict[str, type[_Record]] = {
    "decisions.jsonl": DecisionRecord,
    "rollbacks.jsonl": RollbackRecord,
    "final_results.jsonl": FinalResult,
    "result.json": RoundResult,
    "llm_calls.jsonl": LLMCallRecord,
    "briefs.jsonl": BriefRecord,
}

__all__ = [
    "ANSWER_KINDS",
    "ASKED_KINDS",
    "COUNTED_KINDS",
    "NO_LR_KINDS",
    "RECORD_FOR_FILE",
    "BaselineResult",
    "BriefRecord",
    "DecisionRecord",
    "FinalResult",
    "Kind",
    "LLMCallRecord",
    "RecordError",
    "RollbackRecord",
    "RoundResult",
]
