"""Campaigns: rounds that learn from each other, resumable.

    lrpilot campaign --preset cpu-small --rounds 8 --controller rules --memory optuna --dir runs/rules
    lrpilot campaign --preset cpu-small --rounds 3 --controller llm --backend local --dir runs/local

Each round is a full pre-training run under the round supervisor, started clean in `DIR/rounds/round_NNN/`.
Before it starts, the campaign's memory looks at the earlier rounds in DIR's logs:
  * `llm`    - the Memory agent writes a brief (<= 150 words) that the LLM Controller reads every decision;
  * `optuna` - an Optuna TPE study (stored in DIR) proposes the rule controller's parameters from the past
               rounds' final ppl: the embedded default's learner, and the honest control for the LLM memory;
  * `none`   - every round starts from the same prior.
With the rule controller, `rule_params` (`--rule NAME=VALUE`) fixes some of its parameters: every round uses
them, and Optuna searches only the others.
The round's final result is appended to `DIR/final_results.jsonl`; that line is the round's commit point, so
killing the campaign at any moment and running the same command again resumes the unfinished round from its
checkpoint and never counts a round twice. One process at a time holds `DIR/campaign.lock`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrpilot.config import ConfigError, RunConfig
from lrpilot.controllers import CONTROLLERS
from lrpilot.controllers.base import ControllerContext
from lrpilot.engine import Engine, LocalEngine, wait_first
from lrpilot.errors import LrpilotError
from lrpilot.locks import DirLock
from lrpilot.logs import append_jsonl, as_float, is_positive_finite, now_iso, read_jsonl, write_atomic
from lrpilot.memory.base import MEMORIES, Memory, MemoryContext
from lrpilot.records import BriefRecord, FinalResult, RoundResult


class CampaignError(LrpilotError, RuntimeError):
    """The campaign cannot run as asked; the message says why and what to do."""


@dataclass(frozen=True)
class CampaignSettings:
    """What identifies a campaign; stored in DIR/campaign.json and checked when the campaign resumes."""

    preset: str
    overrides: tuple[str, ...]
    controller: str
    memory: str
    backend: str = ""
    model: str = ""
    replay_from: str = ""
    optuna_seed: int = 0
    #: rule-controller parameters fixed for every round (Optuna searches only the others)
    rule_params: dict[str, float | str] = field(default_factory=dict)
    #: `--script`: the user's training command, run once per round (see execute_script_round); "" = lrpilot's trainer
    script: str = ""
    #: `--prune SPEC`: the memory may stop a hopeless round from its intermediate evals ("" = never; the
    #: memory must override Memory.prune, e.g. --memory optuna: lrpilot.memory.optuna_memory.PruneSpec)
    prune: str = ""

    def __post_init__(self) -> None:
        if self.script:
            try:
                argv = shlex.split(self.script)
            except ValueError as e:
                raise ConfigError(f"--script {self.script!r}: cannot split it into a command ({e})") from e
            if not argv:
                raise ConfigError('--script: empty; give the command that runs your loop, e.g. "python train.py"')
            if self.controller == "replay":
                raise ConfigError(
                    "--script runs rules or llm rounds; for a replay give your Pilot controller='replay:PLAN'"
                )
        CONTROLLERS.entry(self.controller)  # an unknown name: the registry's one-line error naming the choices
        MEMORIES.entry(self.memory)
        if self.prune:
            if self.script:
                raise ConfigError("--prune stops rounds of lrpilot's own trainer; it does not work with --script")
            if not getattr(MEMORIES.get(self.memory), "can_prune", lambda: False)():
                raise ConfigError(
                    f"--prune needs a memory that can stop a round (--memory optuna); --memory {self.memory} cannot"
                )
            from lrpilot.memory.optuna_memory import PruneSpec

            try:
                PruneSpec.parse(self.prune)
            except LrpilotError as e:
                raise ConfigError(str(e)) from None
        if self.memory == "optuna" and self.controller != "rules":
            raise ConfigError("--memory optuna tunes the rule controller: use it with --controller rules")
        if self.memory == "llm" and self.controller != "llm":
            raise ConfigError("--memory llm writes briefs for the LLM controller: use it with --controller llm")
        if not (isinstance(self.optuna_seed, int) and 0 <= self.optuna_seed < 2**32):
            raise ConfigError(f"--optuna-seed {self.optuna_seed!r}: must be an integer in 0 .. 2**32-1 (numpy's seeds)")
        if self.controller == "replay" and not self.replay_from:
            raise ConfigError("--controller replay needs --replay-from DIR (a campaign directory to re-play)")
        if self.replay_from and self.controller != "replay":  # it was ignored
            raise ConfigError(
                f"--replay-from re-plays a campaign with --controller replay, not {self.controller}: add "
                "--controller replay, or drop --replay-from"
            )
        if self.rule_params:
            if self.controller != "rules":
                raise ConfigError("--rule sets the rule controller's parameters: use it with --controller rules")
            from lrpilot.controllers.rules import RuleParams

            known = RuleParams.names()
            for name, value in self.rule_params.items():
                if name not in known:
                    raise ConfigError(f"--rule {name}: unknown parameter; known: {', '.join(known)}")
                if name == "decay_shape":
                    continue  # a word, checked by RuleParams (rules_for)
                if not (isinstance(value, (int, float)) and math.isfinite(value)):
                    raise ConfigError(f"--rule {name}: expected a finite number, got {value!r}")

    def rules_for(self, init_lr: float) -> Any:
        """The rule controller's default parameters for a workload whose warmup ends at init_lr, with the
        fixed ones (`rule_params`) applied; a bad value raises ConfigError naming rules.<field>."""
        from lrpilot.controllers.rules import RuleParams

        fixed = {k: (str(v) if k == "decay_shape" else float(v)) for k, v in self.rule_params.items()}
        return RuleParams.for_init_lr(init_lr, **fixed)


class CampaignLock(DirLock):
    """An exclusive, non-blocking lock on DIR/campaign.lock (lrpilot.locks.DirLock); released when the process dies."""

    def __init__(self, directory: Path) -> None:
        super().__init__(
            directory, "campaign.lock", what="a running campaign", hint="wait for it or use another --dir",
            error=CampaignError,
        )  # fmt: skip


def _check_settings(directory: Path, settings: CampaignSettings) -> None:
    path = directory / "campaign.json"
    mine = dataclasses.asdict(settings)
    mine["overrides"] = list(settings.overrides)
    if not settings.rule_params:
        del mine["rule_params"]  # campaigns without --rule keep the settings they were created with
    if not settings.script:
        del mine["script"]  # likewise for campaigns of lrpilot's own trainer
    if not settings.prune:
        del mine["prune"]  # and for campaigns without --prune
    preset_file = Path(settings.preset)
    if settings.preset.endswith(".json") and preset_file.is_file():  # a path preset: its content is the workload
        mine["preset_sha256"] = hashlib.sha256(preset_file.read_bytes()).hexdigest()
    holds_rounds = (directory / "final_results.jsonl").exists() or (
        (directory / "rounds").is_dir() and any((directory / "rounds").iterdir())
    )
    if not path.exists() and holds_rounds:
        raise CampaignError(
            f"{path}: missing, but {directory} already holds rounds (final_results.jsonl, rounds/) whose settings "
            "it records; restore campaign.json to resume them, or use a new --dir"
        )
    if path.exists():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(loaded, dict) or not isinstance(loaded.get("settings", {}), dict):
                raise ValueError("not a JSON object with a settings object")
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            # never overwritten: it is the only record of the settings the directory's rounds ran with
            reason = e.__class__.__name__ if isinstance(e, OSError) else str(e)
            raise CampaignError(
                f"{path}: unreadable ({reason}); restore it to resume this campaign, or use a new --dir"
                + ("" if holds_rounds else f" (or delete it: {directory} holds no rounds yet)")
            ) from None
        theirs = loaded.get("settings", {})
        if "preset_sha256" not in theirs or "preset_sha256" not in mine:
            # created before lrpilot stored it, or the file is not readable from here: nothing to compare with
            theirs.pop("preset_sha256", None)
            mine.pop("preset_sha256", None)
        if theirs.get("preset") == mine["preset"] and theirs.get("preset_sha256") != mine.get("preset_sha256"):
            raise CampaignError(
                f"--preset {settings.preset}: the file changed since {directory} started its campaign (its rounds "
                "would not be comparable); put the original file back to resume, or use a new --dir"
            )
        if theirs != mine:
            diff = sorted(k for k in mine if theirs.get(k) != mine[k])
            raise CampaignError(
                f"{directory} holds a campaign with different settings ({', '.join(diff)}); "
                "run the original command again to resume it, or use a new --dir"
            )
        return
    write_atomic(path, (json.dumps({"settings": mine, "created": now_iso()}, indent=2) + "\n").encode())


def _completed_rounds(directory: Path) -> dict[int, dict[str, Any]]:
    done: dict[int, dict[str, Any]] = {}
    for rec in read_jsonl(directory / "final_results.jsonl"):
        r = rec.get("round")
        if isinstance(r, int) and r not in done:
            done[r] = rec
    return done


def _brief_for(directory: Path, round_index: int) -> dict[str, Any] | None:
    """The brief already written for this round (so a resumed round keeps the brief it started with)."""
    for rec in read_jsonl(directory / "briefs.jsonl"):
        if rec.get("round") == round_index:
            return rec
    return None


def _ppl(rec: dict[str, Any]) -> float:
    return as_float(rec.get("final_eval_ppl"))


def _final_ppl(rec: dict[str, Any]) -> float:
    """The round's final ppl, NaN for a pruned round (its ppl is that of an intermediate eval: no final result)."""
    return math.nan if rec.get("status") == "pruned" else _ppl(rec)


def _tell(mem: Memory, r: int, rec: dict[str, Any]) -> None:
    """Tell the memory how round r ended: record_pruned for a pruned round, else record."""
    if rec.get("status") == "pruned":
        step = rec.get("pruned_at_step")
        mem.record_pruned(r, int(step) if isinstance(step, int) else 0, as_float(rec.get("final_eval_loss")))
    else:
        mem.record(r, _ppl(rec), rec.get("status") != "ok")


def _fmt_ppl(x: float) -> str:
    """3 decimals; a huge finite ppl (the trainer logs up to ~1e307) in exponent form, not 300 digits."""
    return f"{x:.3f}" if not math.isfinite(x) or abs(x) < 1e9 else f"{x:.3g}"


def summary_line(rec: dict[str, Any], best: float) -> str:
    f = {k: as_float(rec.get(k)) for k in ("peak_lr_seen", "min_lr_seen", "wall_time_s")}
    ppl = _ppl(rec)
    if rec.get("status") == "pruned":  # its ppl is an intermediate eval's, not a final result
        return (
            f"round {rec.get('round')!s:>3}  pruned peak_lr {f['peak_lr_seen']:.2e}  "
            f"min_lr {f['min_lr_seen']:.2e}  crashes {rec.get('crash_count', 0)!s:>2}  "
            f"pruned at step {rec.get('pruned_at_step')} (eval ppl {_fmt_ppl(ppl)}, {rec.get('steps_saved')} steps "
            f"saved)  best so far {_fmt_ppl(best)}  ({f['wall_time_s']:.0f} s)" + fallback_note(rec)
        )
    return (
        f"round {rec.get('round')!s:>3}  {rec.get('status', 'ok')!s:<6} peak_lr {f['peak_lr_seen']:.2e}  "
        f"min_lr {f['min_lr_seen']:.2e}  crashes {rec.get('crash_count', 0)!s:>2}  "
        f"ppl {_fmt_ppl(ppl):>9}  best so far {_fmt_ppl(best)}  ({f['wall_time_s']:.0f} s)"
        + fallback_note(rec)
        + (f"  reason: {rec['failure_reason']}" if rec.get("status") == "failed" and rec.get("failure_reason") else "")
    )


def fallback_note(rec: dict[str, Any]) -> str:
    """'  MOSTLY FALLBACK (...)' for a round in which most decisions fell back (final_results
    `mostly_fallback`), else ''."""
    if not rec.get("mostly_fallback"):
        return ""
    n, k = rec.get("total_decisions", "?"), rec.get("fallback_decisions", "?")
    return f"  MOSTLY FALLBACK ({k} of {n} decisions kept the LR for want of a valid answer; see llm_calls.jsonl)"


def totals_line(recs: list[dict[str, Any]]) -> str:
    """'3 rounds: best ppl ..., median ..., failed ..., wall time ... min' ('' when no round has a ppl)."""
    ppls = [_final_ppl(r) for r in recs if math.isfinite(_final_ppl(r))]
    if not ppls:
        return ""
    pruned = [r for r in recs if r.get("status") == "pruned"]
    saved = sum(int(r.get("steps_saved") or 0) for r in pruned)
    return (
        f"{len(recs)} round{'s' * (len(recs) != 1)}: best ppl {_fmt_ppl(min(ppls))}, "
        f"median {_fmt_ppl(statistics.median(ppls))}, "
        f"failed {sum(r.get('status') == 'failed' for r in recs)}, "
        + (f"pruned {len(pruned)} ({saved} steps saved), " if pruned else "")
        + f"wall time {sum(as_float(r.get('wall_time_s', 0)) for r in recs) / 60:.1f} min"
    )


def round_lines(recs: list[dict[str, Any]]) -> list[str]:
    """The summary line of every round, in order, with the best ppl so far."""
    lines, best = [], math.inf
    for rec in recs:
        p = _final_ppl(rec)
        if math.isfinite(p):
            best = min(best, p)
        lines.append(summary_line(rec, best))
    return lines


def campaign_table(recs: list[dict[str, Any]]) -> str:
    """The summary line of every round (in order) and a totals line."""
    return "\n".join([*round_lines(recs), totals_line(recs)]).rstrip("\n")


def run_campaign(
    cfg: RunConfig,
    directory: Path,
    rounds: int,
    settings: CampaignSettings,
    *,
    echo: Any = print,
    engine: Engine | None = None,
) -> list[dict[str, Any]]:
    """Run rounds 1..`rounds` in `directory`, skipping those already finished. Returns the final records of
    rounds 1..`rounds` (a note says when the directory holds more).

    engine (lrpilot.engine): where rounds run; None or LocalEngine(1) runs them one after another in this
    process. With engine.slots = K > 1 up to K rounds run at once, a new one started as a slot frees up
    (`_run_rounds_on`); this process keeps campaign.lock and writes the briefs, each task its round's
    directory, log lines and final_results line.

    echo gets each round's summary line once: the rounds finished earlier when the campaign resumes, each new
    round as it ends, then the totals line."""
    directory = Path(directory)
    if rounds < 1:
        raise ConfigError("--rounds: must be >= 1")
    if settings.controller == "rules":
        settings.rules_for(cfg.schedule.init_lr)  # a bad --rule value fails here, before anything is written
    if (directory / "import.json").exists():
        raise CampaignError(
            f"{directory} holds logs that import-logs brought in (import.json), from another workload; "
            "run the campaign in a new --dir and compare them with lrpilot report --compare"
        )
    with CampaignLock(directory):
        _check_settings(directory, settings)
        done = _completed_rounds(directory)
        parallel = engine is not None and engine.slots > 1
        mem = MEMORIES.get(settings.memory)(MemoryContext(cfg, directory, settings, parallel))
        # the campaign may have died between a round's result line and telling the memory (Optuna): tell it now
        for r, rec in done.items():
            _tell(mem, r, rec)
        best = min((_final_ppl(r) for r in done.values() if math.isfinite(_final_ppl(r))), default=math.inf)
        if done:
            echo("\n".join(round_lines([done[r] for r in sorted(done) if r <= rounds])))  # finished before this run
        todo = [r for r in range(1, rounds + 1) if r not in done]
        if engine is None or engine.slots == 1 and isinstance(engine, LocalEngine):
            for r in todo:  # one round after another, in this process: lrpilot's behaviour before engines
                rec = _run_one_round(cfg, directory, r, settings, mem)
                done[r] = rec
                if math.isfinite(_final_ppl(rec)):
                    best = min(best, _final_ppl(rec))
                echo(summary_line(rec, best))
        else:
            best = _run_rounds_on(engine, cfg, directory, settings, mem, todo, done, best, echo)
        recs = [done[r] for r in sorted(done) if r <= rounds]
        if totals_line(recs):
            echo(totals_line(recs))  # the round lines were echoed already, each once
        more = sorted(r for r in done if r > rounds)
        if more:
            echo(
                f"{directory} already holds {len(more)} more round{'s' * (len(more) > 1)} ({more[0]}"
                f"{f'-{more[-1]}' if len(more) > 1 else ''}) than --rounds {rounds}; run with --rounds {more[-1]} "
                "to see them all"
            )
        return recs


def _make_controller(
    cfg: RunConfig, directory: Path, settings: CampaignSettings, r: int, params: Any, run_start_iso: str = ""
):
    """Round r's controller, built by its CONTROLLERS entry (rules: `params`, Optuna's proposal or
    settings.rules_for, see _run_one_round; an LLM's calls audited to DIR/llm_calls.jsonl)."""
    ctx = ControllerContext(
        cfg,
        round_index=r,
        params=params,
        replay_from=settings.replay_from,
        audit_path=directory / "llm_calls.jsonl",
        audit_extra=_call_fields(r, run_start_iso),
    )
    return CONTROLLERS.get(settings.controller).build(ctx)


def _uses_llm(settings: CampaignSettings) -> bool:
    """The controller talks to an LLM (its ControllerSpec.uses_llm): rounds record backend and model."""
    return CONTROLLERS.get(settings.controller).uses_llm


def _call_fields(r: int, run_start_iso: str) -> dict[str, Any]:
    """What each llm_calls.jsonl line of round r carries to join its round (as decisions and rollbacks do)."""
    return {"round": r, "run_start_iso": run_start_iso}


def _run_start_iso(run_dir: Path) -> str:
    """The run_start_iso of a round already started (its round.json), else a new one for a fresh round."""
    try:
        iso = json.loads((run_dir / "round.json").read_text()).get("run_start_iso")
    except (OSError, ValueError, AttributeError):
        iso = None  # absent, or unreadable: the supervisor decides (and says so) when it opens the run
    return iso if isinstance(iso, str) and iso else now_iso()


def _memory_brief(
    mem: Memory, r: int, prior: dict[str, Any] | None, run_start_iso: str = "", running: tuple[int, ...] = ()
) -> tuple[str, Any, dict]:
    """(brief text, rule params or None, record for briefs.jsonl) from the campaign's memory (MEMORIES);
    prior: the brief already written for this round, if the round is being resumed; running: rounds started
    and not finished yet (--parallel), which the LLM brief names."""
    b = mem.brief(r, prior=prior, running=running, run_start_iso=run_start_iso)
    return b.text, b.params, b.extra


def _run_one_round(cfg: RunConfig, directory: Path, r: int, settings: CampaignSettings, mem: Memory) -> dict[str, Any]:
    t0 = time.time()
    brief, params, iso = _prepare_round(cfg, directory, r, settings, mem)
    rec = _runner(settings)(cfg, directory, r, settings, brief, params, iso, t0)
    _tell(mem, r, rec)
    return rec


def _prepare_round(
    cfg: RunConfig, directory: Path, r: int, settings: CampaignSettings, mem: Memory, running: tuple[int, ...] = ()
) -> tuple[str, Any, str]:
    """The driver's part of round r: its brief (written to briefs.jsonl once) and rule parameters, and its
    run_start_iso. Returns (brief, params or None, run_start_iso)."""
    run_dir = directory / "rounds" / f"round_{r:03d}"
    prior = _brief_for(directory, r)
    iso = _run_start_iso(run_dir)
    brief, params, extra = _memory_brief(mem, r, prior, iso, running)
    if prior is None:
        append_jsonl(
            directory / "briefs.jsonl",
            BriefRecord(round=r, timestamp=now_iso(), memory=settings.memory, brief=brief, extra=extra).to_dict(),
        )
    if params is None and settings.controller == "rules":
        params = settings.rules_for(cfg.schedule.init_lr)  # recorded with the round, as Optuna's are
    return brief, params, iso


def execute_round(
    cfg: RunConfig,
    directory: Path,
    r: int,
    settings: CampaignSettings,
    brief: str,
    params: Any,
    iso: str,
    t0: float,
) -> dict[str, Any]:
    """Round r itself, wherever the engine runs it (this process, a child, a Ray task): the round supervisor
    on DIR/rounds/round_NNN (resumed from its checkpoint when the directory exists: a retried or re-run
    round), then its line in DIR/final_results.jsonl, the round's commit point. Returns that record; a round
    already committed (a Ray task retried after its worker died past the commit point) returns its line as is.
    t0: when the round was prepared (time.time(), for round_wall_time_s)."""
    from lrpilot.supervisor import RoundLogs, run_round

    committed = _completed_rounds(directory).get(r)
    if committed is not None:  # a retried task whose worker died after the commit point: never a second line
        return committed
    run_dir = directory / "rounds" / f"round_{r:03d}"
    resume = run_dir.exists()
    controller = _make_controller(cfg, directory, settings, r, params, iso)
    logs = RoundLogs(
        decisions=directory / "decisions.jsonl",
        rollbacks=directory / "rollbacks.jsonl",
        extra={"round": r, "controller": settings.controller},
    )
    res = run_round(
        cfg, run_dir, controller, logs, memory_brief=brief, round_index=r, resume=resume, run_start_iso=iso,
        prune=_round_pruner(cfg, directory, settings, r),
    )  # fmt: skip
    from lrpilot.decision import warmup_end_lr

    start = warmup_end_lr(controller, cfg.schedule.init_lr, cfg.guard)  # as run_round starts the round's warmup
    return _commit(cfg, directory, r, settings, res, params, t0, init_lr=start)


def _round_pruner(cfg: RunConfig, directory: Path, settings: CampaignSettings, r: int) -> Any:
    """`--prune`: round r's prune(step, eval_loss) callback for the supervisor, from a memory built here (in
    the process that runs the round; its state is in DIR, e.g. Optuna's journal); None without --prune."""
    if not settings.prune:
        return None
    mem = MEMORIES.get(settings.memory)(MemoryContext(cfg, directory, settings))
    return lambda step, loss: mem.prune(r, step, loss)


def _commit(
    cfg: RunConfig,
    directory: Path,
    r: int,
    settings: CampaignSettings,
    res: Any,
    params: Any,
    t0: float,
    init_lr: float | None = None,
) -> dict[str, Any]:
    """Round r's line in DIR/final_results.jsonl (the round's commit point) from its result `res` (a
    records.RoundResult: the supervisor's, or one read from a Pilot's result.json). `init_lr`: the LR the
    round's warmup reached (the controller's warmup_to; the rules' ceiling), logged as the line's init_lr
    (default cfg.schedule.init_lr). Returns the line."""
    rec: dict[str, Any] = {
        "timestamp": now_iso(),
        "run_start_iso": res.run_start_iso,
        "final_eval_ppl": res.final_eval_ppl,
        "final_eval_loss": res.final_eval_loss,
        "total_decisions": res.total_decisions,
        "unanswered_decisions": res.unanswered_decisions,
        "fallback_decisions": res.fallback_decisions,
        "mostly_fallback": res.mostly_fallback,
        "crash_count": res.crash_count,
        "agent_rollbacks": res.agent_rollbacks,
        "probe_steps": getattr(res, "probe_steps", 0),  # extra updates spent in lookahead probes
        "peak_lr_seen": res.peak_lr_seen,
        "min_lr_seen": res.min_lr_seen,
        "warmup_steps": cfg.schedule.warmup_steps,
        "decision_every": cfg.schedule.decision_every,
        "init_lr": init_lr if init_lr is not None else cfg.schedule.init_lr,
        "optimizer": cfg.train.optimizer,
        "round": r,
        "status": res.status,
        "failure_reason": res.failure_reason,
        "seed": cfg.train.seed,
        "controller": settings.controller,
        "memory": settings.memory,
        "backend": settings.backend if _uses_llm(settings) else "",
        "model": settings.model if _uses_llm(settings) else "",
        "preset": settings.preset,
        "final_eval_tokens": res.final_eval_tokens,
        "update_step": res.update_step,
        "wall_time_s": res.wall_time_s,
        "round_wall_time_s": time.time() - t0,
        "wait_s": res.wait_s,
        "decision_latency_s": _mean(res.decision_latency_s),
        "effect_delay_steps": _mean(res.effect_delay_steps),
        "settings": {
            "total_steps": cfg.train.total_steps,
            "min_ratio": cfg.guard.min_ratio,
            "max_ratio": cfg.guard.max_ratio,
            "floor": cfg.guard.floor,
            "ceiling": cfg.guard.ceiling,
            "max_cross_run_history": cfg.agent.max_cross_run_history,
            "agent_model": cfg.agent.model,
            "memory_model": cfg.agent.memory_model or cfg.agent.model,
        },
    }
    if params is not None:
        rec["rule_params"] = dataclasses.asdict(params)
    if settings.script:
        rec["script"] = settings.script
    if res.status == "pruned":
        rec["pruned_at_step"], rec["steps_saved"] = res.pruned_at_step, res.steps_saved
    rec = FinalResult.from_dict(rec).to_dict()  # the schema's types checked before the commit point
    append_jsonl(directory / "final_results.jsonl", rec)
    return rec


#: the environment a `--script` round runs with (besides $LRPILOT_PILOT = @RUN/pilot.json, for Pilot.from_env)
ENV_RUN_DIR, ENV_RESUME, ENV_ROUND = "LRPILOT_RUN_DIR", "LRPILOT_RESUME", "LRPILOT_ROUND"


def _runner(settings: CampaignSettings) -> Any:
    """What runs a round: lrpilot's trainer under the round supervisor, or the user's `--script`."""
    return execute_script_round if settings.script else execute_round


def execute_script_round(
    cfg: RunConfig,
    directory: Path,
    r: int,
    settings: CampaignSettings,
    brief: str,
    params: Any,
    iso: str,
    t0: float,
) -> dict[str, Any]:
    """Round r as the user's `--script` (execute_round's contract, another runner). The round's Pilot settings
    go to RUN/pilot.json (RUN = DIR/rounds/round_NNN): run_dir, controller, rule_params (Optuna's proposal),
    memory_brief, round_index, total_steps / warmup_steps / init_lr / decision_every (the preset's schedule),
    guard (and agent for --controller llm). The script runs in the current directory with
    $LRPILOT_PILOT=@RUN/pilot.json (what Pilot.from_env reads), $LRPILOT_RUN_DIR=RUN, $LRPILOT_ROUND=r and
    $LRPILOT_RESUME: "1" when RUN holds an earlier launch of this round (a crash, or a killed campaign run
    again), "0" otherwise; the contract is that the script then resumes from the last checkpoint it saved with
    pilot.state_dict() (examples/plain_torch.py: RUN/checkpoint.pt). Its stdout and stderr go to RUN/script.log.
    A launch that exits non-zero (or is killed) without writing RUN/result.json (Pilot.finish) is relaunched
    with $LRPILOT_RESUME=1, at most guard.max_fast_crash times; then the round is failed (status "failed", the
    exit code and the log's last line in failure_reason). On success the round's decisions and rollbacks are
    copied from RUN into DIR's logs (once) and RUN/result.json becomes the final_results line."""
    from lrpilot.pilot import ENV_SETTINGS

    committed = _completed_rounds(directory).get(r)
    if committed is not None:
        return committed
    run_dir = (directory / "rounds" / f"round_{r:03d}").resolve()
    resume = (run_dir / "telemetry.jsonl").exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    pilot: dict[str, Any] = {
        "run_dir": str(run_dir),
        "controller": settings.controller,
        "memory_brief": brief,
        "round_index": r,
        "total_steps": cfg.train.total_steps,
        "warmup_steps": cfg.schedule.warmup_steps,
        "init_lr": cfg.schedule.init_lr,
        "decision_every": cfg.schedule.decision_every,
        "guard": dataclasses.asdict(cfg.guard),
    }
    if params is not None:
        pilot["rule_params"] = dataclasses.asdict(params)
    if _uses_llm(settings):
        pilot["agent"] = dataclasses.asdict(cfg.agent)  # names the key's variable, never the key
    write_atomic(run_dir / "pilot.json", (json.dumps(pilot, indent=2) + "\n").encode())
    argv = shlex.split(settings.script)
    crashes, reason = 0, None
    while not (run_dir / "result.json").exists():  # a launch that finished before the campaign was killed counts
        env = {**os.environ, ENV_SETTINGS: f"@{run_dir / 'pilot.json'}", ENV_RUN_DIR: str(run_dir),
               ENV_ROUND: str(r), ENV_RESUME: "1" if resume else "0"}  # fmt: skip
        with open(run_dir / "script.log", "ab") as out:
            try:
                rc = subprocess.run(
                    argv, env=env, stdout=out, stderr=subprocess.STDOUT, check=False, preexec_fn=_die_with_parent
                ).returncode
            except OSError as e:  # not found, not executable: relaunching will not help
                reason, rc = f"--script {argv[0]!r}: cannot start it ({e.strerror or e})", None
        if rc == 0 and (run_dir / "result.json").exists():
            break
        resume = True
        if rc is not None:
            crashes += 1
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            if rc == 0:
                how = "exited 0 without calling pilot.finish() (no result.json)"
            reason = f"script {how}; last log line: {_last_line(run_dir / 'script.log')!r}"
            print(f"round {r:>3}  {reason}; crash {crashes} of max_fast_crash={cfg.guard.max_fast_crash}",
                  file=sys.stderr)  # fmt: skip
        if rc is None or crashes > cfg.guard.max_fast_crash:
            res = RoundResult.from_dict(_failed_result(run_dir, crashes, reason or "", t0))
            return _commit(cfg, directory, r, settings, res, params, t0)
    fields = json.loads((run_dir / "result.json").read_text())
    fields["crash_count"] = int(fields.get("crash_count", 0)) + crashes
    for name in ("decisions.jsonl", "rollbacks.jsonl"):
        if not any(x.get("round") == r for x in read_jsonl(directory / name)):  # once, even when re-run
            for x in read_jsonl(run_dir / name):
                append_jsonl(directory / name, {**x, "round": r, "controller": settings.controller})
    # the warmup end the Pilot used (its own final_results line: Pilot.init_lr after the controller's warmup_to)
    lines = read_jsonl(run_dir / "final_results.jsonl")
    start = as_float(lines[-1].get("init_lr")) if lines else math.nan
    res = RoundResult.from_dict(fields)
    return _commit(cfg, directory, r, settings, res, params, t0, init_lr=start if is_positive_finite(start) else None)


def _die_with_parent() -> None:
    """In the script's process before exec (Linux): SIGKILL it when the campaign dies (prctl PR_SET_PDEATHSIG),
    so a campaign killed alone never leaves a script writing RUN beside the one a re-run launches."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG = 1, SIGKILL = 9


def _last_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][-200:] if lines else ""


def _failed_result(run_dir: Path, crashes: int, reason: str, t0: float) -> dict[str, Any]:
    """A failed script round's result fields (those of supervisor.RoundResult that _commit reads)."""
    iso = _run_start_iso(run_dir)
    return {
        "status": "failed", "failure_reason": reason, "run_start_iso": iso, "final_eval_ppl": math.nan,
        "final_eval_loss": math.nan, "final_eval_tokens": 0, "update_step": 0, "crash_count": crashes,
        "total_decisions": 0, "unanswered_decisions": 0, "fallback_decisions": 0, "mostly_fallback": False,
        "agent_rollbacks": 0, "peak_lr_seen": math.nan, "min_lr_seen": math.nan, "wall_time_s": time.time() - t0,
        "wait_s": 0.0, "decision_latency_s": [], "effect_delay_steps": [],
    }  # fmt: skip


def _run_rounds_on(
    engine: Engine,
    cfg: RunConfig,
    directory: Path,
    settings: CampaignSettings,
    mem: Memory,
    todo: list[int],
    done: dict[int, dict[str, Any]],
    best: float,
    echo: Any,
) -> float:
    """Rounds `todo` on `engine`, up to engine.slots at once, each started (brief written, Optuna asked) as a
    slot frees up. A finished round is told to Optuna and echoed as it ends (so lines come in finishing order).
    A round that raises stops new rounds from starting; the running ones finish, then its error is raised.
    Anything else that stops the driver (Ctrl-C, SIGTERM as SystemExit) cancels the running rounds (their
    trainers are killed) and propagates; the same command resumes them from their checkpoints. Returns the
    best ppl so far."""
    todo = list(todo)
    running: dict[Any, int] = {}
    error: BaseException | None = None
    try:
        while (todo and error is None) or running:
            while todo and error is None and len(running) < engine.slots:
                r = todo.pop(0)
                t0 = time.time()
                brief, params, iso = _prepare_round(cfg, directory, r, settings, mem, tuple(sorted(running.values())))
                running[engine.submit(_runner(settings), cfg, directory, r, settings, brief, params, iso, t0)] = r
            for fut in sorted(wait_first(running), key=lambda f: running[f]):
                r = running.pop(fut)
                try:
                    rec = fut.result()
                except Exception as e:  # noqa: BLE001 - the running rounds finish first
                    error = error or e
                    echo(f"round {r:>3}  failed to run: {type(e).__name__}: {e}")
                    continue
                done[r] = rec
                _tell(mem, r, rec)
                if math.isfinite(_final_ppl(rec)):
                    best = min(best, _final_ppl(rec))
                echo(summary_line(rec, best))
    except BaseException:
        engine.cancel_all()
        raise
    if error is not None:
        raise error
    return best


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None
