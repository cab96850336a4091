"""Benchmarks: does steering beat the best fixed schedules and the LR-free optimizers, over seeds, at equal compute?

    lrpilot bench --preset cpu-small --methods cosine wsd d2z schedulefree prodigy rules rules+optuna:8 \
        --seeds 3 --peaks 1e-3 3e-3 1e-2 --out runs/bench --jobs 2

Methods (`parse_method`), each run once per seed (seeds train.seed, train.seed+1, ...):
  * `cosine`, `wsd`, `d2z`, `constant`: a sweep over --peaks (lrpilot.baseline); a seed's score is its best
    peak, and every peak's run is kept;
  * `schedulefree[:LR]`, `prodigy[:LR]`: one run at the optimizer's defaults (schedule-free AdamW lr 2.5e-3,
    the package's default; Prodigy 1.0) with a constant LR after the preset's warmup;
  * `rules` (one round, default parameters, no memory), `rules+optuna:K` (K rounds, Optuna TPE memory),
    `llm` (one round), `llm+memory:K` (K rounds, LLM memory; the --backend flags as for `campaign`),
    `replay:DIR` (every round of campaign DIR re-played): campaigns (lrpilot.campaign); a seed's score is the
    best round so far after the last round.
Every run has the preset's step budget (train.total_steps). Each run lives in its own directory under
`OUT/runs/<method>/seed<S>/` (a baseline sweep or a campaign directory, with their usual files), and its
record carries its seed. Re-running the command skips finished runs and resumes unfinished ones; a reused OUT
whose preset, overrides, peaks or agent settings differ is refused in one line naming the field (methods and
seeds may change: every run is keyed by method and seed). `--jobs J` runs J trainers at once.

Results (`summarise`, `write_results`): OUT/bench.json, OUT/bench.md and two figures. Per method: mean,
standard deviation and 95% t-interval of the score over seeds; paired differences against the best fixed
schedule (the sweep method with the lowest mean) on the same seeds, with their t-interval and win rate;
training steps and wall time spent; training steps until the best-so-far came within 1% of the reference's
score on that seed; survival at the lowest peak where cosine collapses (the report's rule: final eval loss
below SURVIVAL_LOSS_FACTOR x the seed's best loss).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import statistics
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrpilot.config import ConfigError, RunConfig, apply_overrides, load_config
from lrpilot.controllers.schedules import SCHEDULES
from lrpilot.errors import LrpilotError
from lrpilot.logs import as_float, now_iso, read_jsonl, write_json_atomic
from lrpilot.lr import is_positive_finite

#: the built-in fixed schedules (sweeps over --peaks); parse_method accepts every SCHEDULES name
FIXED = ("cosine", "wsd", "d2z", "constant")
#: schedulefree.AdamWScheduleFree's default lr; prodigyopt.Prodigy's default lr (a multiplier of its estimate)
SCHEDULEFREE_LR = 2.5e-3
PRODIGY_LR = 1.0
#: "within 1% of the best fixed schedule"
WITHIN = 0.01
CONFIDENCE = 0.95
SETTINGS_FILE = "bench_settings.json"


class BenchError(LrpilotError):
    """The bench cannot run as asked; one line naming the flag or field and the fix."""


# ------------------------------------------------------------------------------------------ methods


@dataclass(frozen=True)
class Method:
    """One method of a bench, parsed from its --methods spec."""

    spec: str
    #: sweep (a fixed schedule over --peaks), single (one run of an LR-free optimizer), campaign (rounds)
    kind: str
    schedule: str = ""
    optimizer: str = "adamw"
    lr: float = 0.0
    controller: str = ""
    memory: str = "none"
    rounds: int = 1
    replay_from: str = ""
    #: rule-controller parameters fixed for this method (`rules:KEY=V,...`), as `campaign --rule KEY=V`
    rule_params: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("sweep", "single", "campaign"):
            raise BenchError(f"--methods {self.spec}: unknown kind {self.kind!r}")
        if self.kind == "campaign" and self.rounds < 1:
            raise BenchError(f"--methods {self.spec}: needs at least 1 round")

    @property
    def slug(self) -> str:
        """The method's directory name under OUT/runs (replay: the source's name and a hash of its path)."""
        if self.replay_from:
            h = hashlib.sha256(str(Path(self.replay_from).resolve()).encode()).hexdigest()[:8]
            return f"replay_{Path(self.replay_from).name}_{h}"
        return self.spec.replace("+", "_").replace(":", "_")


def _count(spec: str, text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise BenchError(f"--methods {spec}: expected a positive number of rounds after ':', e.g. rules+optuna:8")
    return k


def _lr(spec: str, text: str) -> float:
    try:
        lr = float(text)
    except ValueError:
        lr = math.nan
    if not is_positive_finite(lr):
        raise BenchError(f"--methods {spec}: expected a positive LR after ':', e.g. schedulefree:2.5e-3")
    return lr


def replay_rounds(directory: str | Path) -> int:
    """How many rounds campaign `directory` finished (what replay:DIR re-plays); BenchError if none."""
    d = Path(directory)
    rounds = {r.get("round") for r in read_jsonl(d / "final_results.jsonl") if isinstance(r.get("round"), int)}
    if not rounds or not (d / "decisions.jsonl").is_file():
        raise BenchError(
            f"--methods replay:{directory}: not a campaign directory with finished rounds "
            "(final_results.jsonl and decisions.jsonl); give a `lrpilot campaign` --dir"
        )
    return max(rounds)


def _rule_params(spec: str, text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise BenchError(f"--methods {spec}: expected KEY=VALUE pairs after ':', e.g. rules:probe_steps=20")
        from lrpilot.controllers.rules import RuleParams

        known = RuleParams.names()
        if key.strip() not in known:  # was named "--rule KEY", a flag bench does not have
            raise BenchError(f"--methods {spec}: unknown rule parameter {key.strip()!r}; known: {', '.join(known)}")
        if key.strip() in (k for k, _ in pairs):  # the last one silently won
            raise BenchError(f"--methods {spec}: {key.strip()} is given twice; give each parameter once")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def parse_method(spec: str) -> Method:
    """cosine | wsd | d2z | constant | schedulefree[:LR] | prodigy[:LR] | rules | rules:KEY=V[,KEY=V...] |
    rules+optuna:K | llm | llm+memory:K | replay:DIR. `rules:KEY=V,...` is one round of the rule controller with
    those parameters fixed (as `campaign --rule KEY=V`), e.g. rules:probe_steps=20. Raises BenchError naming the
    spec."""
    s = spec.strip()
    name, _, arg = s.partition(":")
    if s in SCHEDULES:  # FIXED and any schedule registered since (lrpilot.controllers.schedules.SCHEDULES)
        return Method(s, "sweep", schedule=s)
    if name == "schedulefree":
        return Method(s, "single", optimizer="schedulefree_adamw", lr=_lr(s, arg) if arg else SCHEDULEFREE_LR)
    if name == "prodigy":
        return Method(s, "single", optimizer="prodigy", lr=_lr(s, arg) if arg else PRODIGY_LR)
    if s == "rules":
        return Method(s, "campaign", controller="rules")
    if name == "rules" and arg:
        return Method(s, "campaign", controller="rules", rule_params=_rule_params(s, arg))
    if name == "rules+optuna":
        return Method(s, "campaign", controller="rules", memory="optuna", rounds=_count(s, arg))
    if s == "llm":
        return Method(s, "campaign", controller="llm")
    if name == "llm+memory":
        return Method(s, "campaign", controller="llm", memory="llm", rounds=_count(s, arg))
    if name == "replay" and arg:
        return Method(s, "campaign", controller="replay", rounds=replay_rounds(arg), replay_from=arg)
    raise BenchError(
        f"--methods {spec!r}: unknown method; choose from {', '.join(SCHEDULES.names())}, schedulefree[:LR], "
        "prodigy[:LR], rules, rules:KEY=V, rules+optuna:K, llm, llm+memory:K, replay:DIR"
    )


# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class BenchSettings:
    """What a bench's runs depend on; stored in OUT/bench_settings.json and checked when OUT is reused."""

    preset: str
    overrides: tuple[str, ...]
    peaks: tuple[float, ...]
    methods: tuple[str, ...]
    seeds: int
    jobs: int = 1
    optuna_seed: int = 0
    #: the command line, written beside the results
    command: str = ""

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise BenchError(f"--seeds {self.seeds}: must be >= 1")
        if self.jobs < 1:
            raise BenchError(f"--jobs {self.jobs}: must be >= 1")
        if not self.methods:
            raise BenchError("--methods: give at least one method, e.g. --methods cosine rules")
        dup = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if dup:
            raise BenchError(f"--methods: {dup[0]} is given twice")
        for p in self.peaks:
            if not is_positive_finite(p):
                raise BenchError(f"--peaks {p!r}: must be positive numbers")

    #: fields that change what a finished run means; a reused OUT must match them
    FIXED_FIELDS = ("preset", "overrides", "peaks", "optuna_seed")

    def identity(self) -> dict[str, Any]:
        return {"preset": self.preset, "overrides": list(self.overrides), "peaks": list(self.peaks),
                "optuna_seed": self.optuna_seed}  # fmt: skip


def check_settings(out: Path, settings: BenchSettings) -> None:
    """Write OUT/bench_settings.json, or refuse (one line naming the field) if OUT holds another bench."""
    path = out / SETTINGS_FILE
    mine = settings.identity()
    if path.exists():
        try:
            theirs = json.loads(path.read_text()).get("identity", {})
        except (json.JSONDecodeError, AttributeError):
            raise BenchError(f"{path} is unreadable; fix or delete it, or use another --out") from None
        for key in BenchSettings.FIXED_FIELDS:
            if theirs.get(key) != mine[key]:
                flag = {"overrides": "--set (and agent flags)", "optuna_seed": "--optuna-seed"}.get(key, f"--{key}")
                raise BenchError(
                    f"{out} holds a bench with different {key} ({theirs.get(key)!r}, now {mine[key]!r}, {flag}); "
                    "run the original command again to resume it, or use another --out"
                )
        stored = json.loads(path.read_text())
        commands = list(stored.get("commands", []))
        if settings.command and (not commands or commands[-1] != settings.command):
            write_json_atomic(path, {**stored, "commands": [*commands, settings.command]})
        return
    out.mkdir(parents=True, exist_ok=True)
    commands = [settings.command] if settings.command else []
    write_json_atomic(path, {"identity": mine, "created": now_iso(), "commands": commands})


def bench_commands(out: Path) -> list[str]:
    """Every distinct command line that ran in OUT, oldest first (from bench_settings.json)."""
    try:
        return list(json.loads((out / SETTINGS_FILE).read_text()).get("commands", []))
    except (OSError, ValueError, AttributeError):
        return []


def seed_list(cfg: RunConfig, n: int) -> list[int]:
    """The bench's seeds: the preset's train.seed and the n - 1 after it."""
    return [cfg.train.seed + i for i in range(n)]


def _single_overrides(m: Method, cfg: RunConfig) -> list[str]:
    over = [f"train.optimizer={m.optimizer}"]
    if m.lr > cfg.guard.ceiling:  # Prodigy's multiplier 1.0 is far above an LR ceiling such as 5e-2
        over.append(f"guard.ceiling={m.lr:g}")
    return over


@dataclass(frozen=True)
class Task:
    """One unit of work: a sweep peak, a single run, or a whole campaign (its rounds run in order)."""

    method: Method
    seed: int
    directory: Path
    cfg: RunConfig
    overrides: tuple[str, ...]
    peak: float = 0.0

    @property
    def cost(self) -> int:
        return self.method.rounds if self.method.kind == "campaign" else 1

    @property
    def label(self) -> str:
        what = f" peak {self.peak:g}" if self.method.kind == "sweep" else ""
        return f"{self.method.spec} seed {self.seed}{what}"


def plan_tasks(base: RunConfig, settings: BenchSettings, methods: list[Method], out: Path) -> list[Task]:
    """Every run of the bench, each config built (and so validated) before anything trains."""
    from lrpilot.controllers.schedules import baseline_config

    tasks = []
    for m in methods:
        if m.kind == "sweep" and not settings.peaks:
            raise BenchError(f"--peaks: {m.spec} sweeps over peak LRs; give --peaks, e.g. --peaks 1e-3 3e-3 1e-2")
        for seed in seed_list(base, settings.seeds):
            over = [*settings.overrides, f"train.seed={seed}"]
            d = out / "runs" / m.slug / f"seed{seed}"
            if m.kind == "sweep":
                cfg = apply_overrides(base, [f"train.seed={seed}"])
                for p in settings.peaks:
                    baseline_config(cfg, m.schedule, p)  # validates schedule and peak
                    tasks.append(Task(m, seed, d, cfg, tuple(over), peak=p))
            elif m.kind == "single":
                cfg = apply_overrides(base, [f"train.seed={seed}", *_single_overrides(m, base)])
                baseline_config(cfg, "constant", m.lr)
                tasks.append(Task(m, seed, d, cfg, tuple(over)))
            else:
                cfg = apply_overrides(base, [f"train.seed={seed}"])
                task = Task(m, seed, d, cfg, tuple(over))
                _campaign_settings(task, settings)  # validates the controller/memory pairing
                tasks.append(task)
    return tasks


def _campaign_settings(task: Task, settings: BenchSettings) -> Any:
    from lrpilot.campaign import CampaignSettings

    m, agent = task.method, task.cfg.agent
    return CampaignSettings(
        preset=settings.preset,
        overrides=task.overrides,
        controller=m.controller,
        memory=m.memory,
        backend=agent.backend,
        model=agent.model if agent.backend == "openai" else (agent.local_model_path or "SmolLM2-135M"),
        replay_from=m.replay_from,
        optuna_seed=settings.optuna_seed,
        rule_params={k: (v if k == "decay_shape" else _number(m.spec, k, v)) for k, v in m.rule_params},
    )


def _number(spec: str, key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise BenchError(f"--methods {spec}: {key}={value!r} is not a number") from None


def _run_task(task: Task, settings: BenchSettings, echo: Any) -> list[dict[str, Any]]:
    """Run (or resume, or skip) one task; returns its run records."""
    from lrpilot.baseline import run_one

    m = task.method
    if m.kind == "sweep":
        return [run_one(task.cfg, m.schedule, task.peak, task.directory, settings.preset)]
    if m.kind == "single":
        return [run_one(task.cfg, "constant", m.lr, task.directory, settings.preset)]
    from lrpilot.campaign import run_campaign

    return run_campaign(task.cfg, task.directory, m.rounds, _campaign_settings(task, settings), echo=lambda _: None)


def run_bench(
    settings: BenchSettings,
    out: str | Path,
    *,
    echo: Any = print,
    ping_llm: bool = True,
    engine: Any = None,
    train: bool = True,
) -> dict[str, Any]:
    """Validate everything, then run every task (J at once), then summarise into OUT. Returns bench.json's dict.
    engine (lrpilot.engine, e.g. RayEngine): each task a call there, engine.slots at once, instead of J threads.
    train=False (`--summarise-only`): start no run; summarise the runs already finished in OUT (unfinished and
    missing ones are left out and counted in the echoed line).

    Raises BenchError / ConfigError (one line) before any training for bad methods, peaks, seeds, config
    overrides, a replay directory without rounds, a changed setting on a reused OUT, an LLM endpoint that
    does not answer, or (train=False) an OUT that holds no bench. A run that fails leaves the others running; the first error is raised at the end, after
    the results of everything that finished are written."""
    out = Path(out)
    base = load_config(settings.preset, list(settings.overrides))
    methods = [parse_method(s) for s in settings.methods]
    tasks = plan_tasks(base, settings, methods, out)
    if train:  # each campaign method checked as `lrpilot campaign` checks it (its first seed's task stands for all)
        from lrpilot.preflight import check_campaign

        for m in methods:
            t = next((t for t in tasks if t.method is m and m.kind == "campaign"), None)
            if t is None:
                continue
            try:  # e.g. rules:start_ratio=0, or a replay:DIR found under other settings
                check_campaign(t.cfg, m.rounds, _campaign_settings(t, settings))
            except ConfigError as e:
                raise ConfigError(f"--methods {m.spec}: {e}") from None
    if train and ping_llm and any(m.controller == "llm" for m in methods):
        from lrpilot.llm.base import make_backend

        make_backend(base.agent, "controller", None).ping()  # fail fast on a wrong endpoint, model or key
    if not train and not (out / SETTINGS_FILE).is_file() and not (out / "runs").is_dir():
        # a mistyped --out would otherwise get a new directory with an empty bench.md
        raise BenchError(
            f"--out {out}: no bench here (neither {SETTINGS_FILE} nor runs/); check the path, or drop "
            "--summarise-only to run the bench"
        )
    check_settings(out, settings)
    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:
            echo(text)

    if not train:
        summary = summarise(collect(base, settings, methods, out), settings, base, bench_commands(out))
        write_results(summary, out)
        done = sum(m["runs"] for m in summary["methods"].values())
        planned = sum(t.method.rounds if t.method.kind == "campaign" else 1 for t in tasks)
        echo(f"bench: summarised {done} finished runs of {planned} planned (nothing trained)")
        echo("\n".join(method_table(summary)))
        return summary
    say(f"bench: {len(tasks)} tasks ({', '.join(settings.methods)}; seeds {seed_list(base, settings.seeds)}) in {out}")
    errors: list[tuple[Task, BaseException]] = []
    tasks.sort(key=lambda t: -t.cost)  # long campaigns first, so J workers finish together
    stack = contextlib.ExitStack()
    if engine is not None:  # each task a call on the engine (a Ray task), engine.slots at once
        from lrpilot.engine import run_each

        finished = run_each(engine, _run_task, tasks, settings, None)
    else:
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=settings.jobs))
        futures = {pool.submit(_run_task, t, settings, say): t for t in tasks}
        finished = ((futures[f], f) for f in as_completed(futures))
    with stack:
        for t, f in finished:
            try:
                recs = f.result()
            except Exception as e:  # noqa: BLE001 - the other runs go on; raised below
                errors.append((t, e))
                say(f"bench: {t.label} failed: {type(e).__name__}: {e}")
                continue
            best = min((as_float(r.get("final_eval_ppl")) for r in recs), default=math.nan)
            say(f"bench: {t.label} done (ppl {best:.3f})")
    summary = summarise(collect(base, settings, methods, out), settings, base, bench_commands(out))
    write_results(summary, out)
    echo("\n".join(method_table(summary)))
    if errors:
        t, e = errors[0]
        raise BenchError(f"{t.label}: {type(e).__name__}: {e} ({len(errors)} run(s) failed; re-run to resume)")
    return summary


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class SeedResult:
    """One method on one seed: its runs in order, its score and its best-so-far curve."""

    seed: int
    #: one per run: label, peak (sweeps) or round, ppl, status, wall_time_s, peak_lr_seen
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def score(self) -> float:
        ppls = [r["ppl"] for r in self.runs if r["status"] == "ok" and math.isfinite(r["ppl"])]
        return min(ppls) if ppls else math.nan

    def curve(self, total_steps: int) -> list[tuple[int, float]]:
        """(training steps spent, best ppl so far) after each run; a run's lookahead-probe updates count."""
        out, best, spent = [], math.inf, 0
        for r in self.runs:
            spent += total_steps + r.get("probe_steps", 0)
            if r["status"] == "ok" and math.isfinite(r["ppl"]):
                best = min(best, r["ppl"])
            out.append((spent, best if math.isfinite(best) else math.nan))
        return out


def collect(base: RunConfig, settings: BenchSettings, methods: list[Method], out: Path) -> dict[str, list[SeedResult]]:
    """Read every finished run of the bench from OUT (what is missing is left out)."""
    from lrpilot.baseline import result_path

    results: dict[str, list[SeedResult]] = {}
    for m in methods:
        rows = []
        # the seeds asked for now and any this method ran in an earlier command on OUT (e.g. one long
        # rules+optuna:K seed next to three seeds of everything else)
        on_disk = {int(p.name[4:]) for p in (out / "runs" / m.slug).glob("seed*") if p.name[4:].isdigit()}
        for seed in sorted(set(seed_list(base, settings.seeds)) | on_disk):
            d = out / "runs" / m.slug / f"seed{seed}"
            sr = SeedResult(seed)
            if m.kind in ("sweep", "single"):
                sched, peaks = (m.schedule, settings.peaks) if m.kind == "sweep" else ("constant", (m.lr,))
                for p in peaks:
                    path = result_path(d, sched, p)
                    if not path.exists():
                        continue
                    rec = json.loads(path.read_text())
                    sr.runs.append(_run_row(rec, f"peak {p:g}", peak=p, seed=seed))
            else:
                for rec in sorted(read_jsonl(d / "final_results.jsonl"), key=lambda r: r.get("round", 0)):
                    sr.runs.append(_run_row(rec, f"round {rec.get('round')}", seed=seed))
            if sr.runs:
                rows.append(sr)
        results[m.spec] = rows
    return results


def _run_row(rec: dict[str, Any], label: str, seed: int, peak: float | None = None) -> dict[str, Any]:
    ppl = as_float(rec.get("final_eval_ppl"))
    return {
        "label": label,
        "peak_lr": peak,
        "peak_lr_seen": as_float(rec.get("peak_lr_seen", peak if peak is not None else math.nan)),
        "ppl": ppl,
        "eval_loss": as_float(rec.get("final_eval_loss")),
        "status": "ok" if rec.get("status", "ok") == "ok" and math.isfinite(ppl) else "failed",
        "wall_time_s": as_float(rec.get("wall_time_s", 0.0)),
        "seed": int(rec.get("seed", seed)),
        #: extra updates spent in lookahead probes and range tests (rules with probe_steps or range_steps > 0): compute too
        "probe_steps": int(rec.get("probe_steps", 0) or 0),
    }


def t_interval(xs: list[float], confidence: float = CONFIDENCE) -> dict[str, float]:
    """Mean, sample standard deviation (n - 1) and the two-sided Student-t interval mean +- t * sd / sqrt(n),
    t = scipy.stats.t.ppf((1 + confidence) / 2, n - 1). With n < 2 the sd and interval are NaN."""
    n = len(xs)
    mean = statistics.fmean(xs) if xs else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "lo": math.nan, "hi": math.nan}
    from scipy import stats

    sd = statistics.stdev(xs)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "std": sd, "lo": mean - half, "hi": mean + half}


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """a - b on the seeds both have (finite scores): the t-interval of the differences (as `t_interval`), the
    mean relative difference in percent, and the win rate of a (a < b counts 1, a tie 0.5) over those seeds."""
    seeds = sorted(s for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s]))
    diffs = [a[s] - b[s] for s in seeds]
    res = t_interval(diffs)
    res["seeds"] = seeds
    res["mean_pct"] = statistics.fmean(100 * (a[s] - b[s]) / b[s] for s in seeds) if seeds else math.nan
    res["win_rate"] = sum(1.0 if d < 0 else 0.5 if d == 0 else 0.0 for d in diffs) / len(diffs) if diffs else math.nan
    return res


def steps_to_within(curve: list[tuple[int, float]], target: float, within: float = WITHIN) -> int | None:
    """Training steps spent when the best-so-far first came within `within` of `target` (<= target x (1 +
    within)); None if it never did."""
    for steps, best in curve:
        if math.isfinite(best) and best <= target * (1 + within):
            return steps
    return None


def summarise(
    results: dict[str, list[SeedResult]], settings: BenchSettings, base: RunConfig, commands: list[str] | None = None
) -> dict[str, Any]:
    """Everything bench.json holds: per-method statistics, the paired comparison, steps to within 1%, survival."""
    from lrpilot.report.tables import SURVIVAL_LOSS_FACTOR

    total = base.train.total_steps
    kinds = {s: parse_kind(s) for s in results}
    scores = {s: {r.seed: r.score for r in rows} for s, rows in results.items()}
    methods: dict[str, Any] = {}
    for spec, rows in results.items():
        finite = [r.score for r in rows if math.isfinite(r.score)]
        methods[spec] = {
            "kind": kinds[spec],
            "scores": {str(r.seed): r.score for r in rows},
            **{k: v for k, v in t_interval(finite).items()},
            "seeds_failed": sum(not math.isfinite(r.score) for r in rows),
            "runs": sum(len(r.runs) for r in rows),
            "train_steps": sum(len(r.runs) for r in rows) * total + sum(x["probe_steps"] for r in rows for x in r.runs),
            "wall_time_s": sum(x["wall_time_s"] for r in rows for x in r.runs),
            "curves": {str(r.seed): r.curve(total) for r in rows},
            "runs_detail": [x for r in rows for x in r.runs],
        }
    fixed = [s for s in results if kinds[s] == "sweep" and math.isfinite(methods[s]["mean"])]
    ref = min(fixed, key=lambda s: methods[s]["mean"]) if fixed else None
    paired, within = {}, {}
    if ref is not None:
        for spec, rows in results.items():
            paired[spec] = paired_difference(scores[spec], scores[ref])
            per_seed = {}
            for r in rows:
                target = scores[ref].get(r.seed, math.nan)
                per_seed[str(r.seed)] = steps_to_within(r.curve(total), target) if math.isfinite(target) else None
            reached = [v for v in per_seed.values() if v is not None]
            within[spec] = {
                "per_seed": per_seed,
                "reached": len(reached),
                "of": len(per_seed),
                "median_steps": statistics.median(reached) if reached else None,
            }
    return {
        "created": now_iso(),
        "command": settings.command,
        "commands": commands if commands is not None else [c for c in [settings.command] if c],
        "preset": settings.preset,
        "overrides": list(settings.overrides),
        "peaks": list(settings.peaks),
        "seeds": sorted({r.seed for rows in results.values() for r in rows} | set(seed_list(base, settings.seeds))),
        "total_steps": total,
        "confidence": CONFIDENCE,
        "methods": methods,
        "reference": ref,
        "paired": paired,
        "within_1pct": within,
        "survival": survival(results, settings, SURVIVAL_LOSS_FACTOR),
        "survival_loss_factor": SURVIVAL_LOSS_FACTOR,
    }


def survival(results: dict[str, list[SeedResult]], settings: BenchSettings, factor: float) -> dict[str, Any]:
    """Per seed, the collapse peak is the lowest --peaks value at which cosine's run did not survive (failed,
    or final eval loss >= factor x the seed's best loss over the whole bench, i.e. ppl >= best ** factor: the
    report's rule). At that peak a fixed schedule survives if its run there does; a campaign counts its
    rounds whose peak LR reached it; the LR-free optimizers have no peak ("n/a")."""
    cosine = {r.seed: r for r in results.get("cosine", [])}
    out: dict[str, Any] = {"collapse_peak": {}, "methods": {}}
    for seed, cr in cosine.items():
        allp = [x["ppl"] for rows in results.values() for r in rows if r.seed == seed for x in r.runs]
        best = min((p for p in allp if math.isfinite(p)), default=math.nan)
        if not (math.isfinite(best) and best > 1):
            continue
        thr = best**factor
        dead = [x["peak_lr"] for x in cr.runs if x["status"] != "ok" or not x["ppl"] < thr]
        if not dead:
            continue
        peak = min(dead)
        out["collapse_peak"][str(seed)] = {"peak": peak, "threshold_ppl": thr}
        for spec, rows in results.items():
            for r in rows:
                if r.seed != seed:
                    continue
                at = [x for x in r.runs if x["peak_lr"] is not None and math.isclose(x["peak_lr"], peak)]
                if not at and parse_kind(spec) == "campaign":
                    at = [x for x in r.runs if math.isfinite(x["peak_lr_seen"]) and x["peak_lr_seen"] >= peak * 0.999]
                elif not at:
                    continue
                m = out["methods"].setdefault(spec, {"survived": 0, "runs": 0})
                m["runs"] += len(at)
                m["survived"] += sum(x["status"] == "ok" and x["ppl"] < thr for x in at)
    return out


def parse_kind(spec: str) -> str:
    """A method spec's kind without touching the disk (replay:DIR is a campaign)."""
    return "campaign" if spec.startswith("replay:") else parse_method(spec).kind


# ------------------------------------------------------------------------------------------ output


def _f(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def _order(s: dict[str, Any]) -> list[str]:
    """Methods by mean score, best first; methods without a score last."""
    return sorted(s["methods"], key=lambda k: (not math.isfinite(s["methods"][k]["mean"]), s["methods"][k]["mean"]))


def method_table(s: dict[str, Any]) -> list[str]:
    """The per-method table (markdown rows): seeds, mean, std, interval, runs, steps and wall time."""
    conf = int(round(100 * s["confidence"]))
    lines = [
        f"| method | seeds | mean | std | {conf}% interval | runs | training steps | wall time (min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in _order(s):
        m = s["methods"][k]
        ci = f"{_f(m['lo'])} .. {_f(m['hi'])}" if math.isfinite(m["lo"]) else "— (1 seed)"
        failed = f" ({m['seeds_failed']} failed)" if m["seeds_failed"] else ""
        lines.append(
            f"| {k}{' (reference)' if k == s['reference'] else ''} | {m['n']}{failed} | {_f(m['mean'])} | "
            f"{_f(m['std'])} | {ci} | {m['runs']} | {m['train_steps']} | {m['wall_time_s'] / 60:.1f} |"
        )
    return lines


def render_markdown(s: dict[str, Any]) -> str:
    """bench.md: the command, then the tables (statistics, paired differences, steps to 1%, survival, runs)."""
    conf = int(round(100 * s["confidence"]))
    lines = [
        "# lrpilot bench",
        "",
        "Commands that ran in this directory (oldest first; a re-run skips finished runs):",
        "",
        *[f"    {c}" for c in s.get("commands", [])],
        "",
        f"Preset `{s['preset']}`{' with ' + ', '.join(s['overrides']) if s['overrides'] else ''}; seeds "
        f"{', '.join(map(str, s['seeds']))}; every run {s['total_steps']} training steps; sweep peaks "
        f"{', '.join(f'{p:g}' for p in s['peaks']) or '—'}. Score = final eval ppl (a sweep's best peak, a "
        f"campaign's best round). Created {s['created']}.",
        "",
        "## Final eval ppl per method",
        "",
        *method_table(s),
        "",
    ]
    order = _order(s)
    if s["reference"]:
        ref = s["reference"]
        lines += [
            f"## Paired against the best fixed schedule ({ref}, its best peak per seed)",
            "",
            f"Difference = method - {ref} on the same seed (negative: the method is better). Win rate = share of "
            f"seeds where the method's ppl is lower (a tie counts half). {conf}% t-interval over seeds.",
            "",
            f"| method | seeds | mean diff (ppl) | {conf}% interval | mean diff (%) | win rate |",
            "|---|---|---|---|---|---|",
        ]
        for k in order:
            if k == ref:
                continue
            p = s["paired"][k]
            ci = f"{_f(p['lo'])} .. {_f(p['hi'])}" if math.isfinite(p["lo"]) else "—"
            lines.append(
                f"| {k} | {p['n']} | {_f(p['mean'])} | {ci} | {_f(p['mean_pct'], 2)} | {_f(p['win_rate'], 2)} |"
            )
        lines += [
            "",
            f"## Training steps until within {WITHIN:.0%} of {ref}'s score on the same seed",
            "",
            "| method | seeds that got there | median steps | per seed |",
            "|---|---|---|---|",
        ]
        for k in order:
            w = s["within_1pct"][k]
            per = ", ".join(f"{seed}: {v if v is not None else 'never'}" for seed, v in w["per_seed"].items())
            med = f"{w['median_steps']:.0f}" if w["median_steps"] is not None else "—"
            lines.append(f"| {k} | {w['reached']}/{w['of']} | {med} | {per} |")
        lines.append("")
    sv = s["survival"]
    lines += ["## Survival at the peak where cosine collapses", ""]
    if sv["collapse_peak"]:
        cp = ", ".join(
            f"seed {k}: {v['peak']:g} (ppl >= {v['threshold_ppl']:.2f})" for k, v in sv["collapse_peak"].items()
        )
        lines += [
            f"Cosine collapses (final eval loss >= {s['survival_loss_factor']:g} x the seed's best) at {cp}. "
            "Fixed schedules: their run at that peak; campaigns: rounds whose peak LR reached it.",
            "",
            "| method | survived |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v['survived']}/{v['runs']} |" for k, v in sv["methods"].items()]
    else:
        lines.append("Cosine did not collapse at any of the peaks (or was not run), so there is nothing to survive.")
    lines += ["", "## Every run", "", "| method | seed | run | ppl | status | wall (s) |", "|---|---|---|---|---|---|"]
    for k in order:
        for x in s["methods"][k]["runs_detail"]:
            lines.append(
                f"| {k} | {x['seed']} | {x['label']} | {_f(x['ppl'])} | {x['status']} | {x['wall_time_s']:.0f} |"
            )
    lines += ["", "![ppl per method](bench_ppl.png)", "", "![best so far](bench_best_so_far.png)", ""]
    return "\n".join(lines)


def write_figures(s: dict[str, Any], out: Path) -> list[Path]:
    """bench_ppl.png (mean and interval per method, each seed a dot) and bench_best_so_far.png (mean best-so-far
    ppl over seeds against training steps spent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in s["methods"] if math.isfinite(s["methods"][k]["mean"])]
    paths = []
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 4))
    for i, k in enumerate(names):
        m = s["methods"][k]
        err = [[m["mean"] - m["lo"]], [m["hi"] - m["mean"]]] if math.isfinite(m["lo"]) else None
        ax.errorbar([i], [m["mean"]], yerr=err, fmt="o", capsize=5, color="C0" if k != s["reference"] else "C3")
        pts = [v for v in m["scores"].values() if math.isfinite(v)]
        ax.scatter([i + 0.15] * len(pts), pts, s=12, color="grey", zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(f"final eval ppl (mean, {int(100 * s['confidence'])}% interval; dots = seeds)")
    ax.set_title(f"{s['preset']}: seeds {', '.join(map(str, s['seeds']))}; {s['total_steps']} steps per run")
    fig.tight_layout()
    paths.append(out / "bench_ppl.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, k in enumerate(names):
        curves = list(s["methods"][k]["curves"].values())
        n = min(len(c) for c in curves)
        xs = [curves[0][j][0] for j in range(n)]
        ys = [statistics.fmean(c[j][1] for c in curves) if all(math.isfinite(c[j][1]) for c in curves) else math.nan
              for j in range(n)]  # fmt: skip
        ax.plot(xs, ys, marker="o", drawstyle="steps-post", label=k, color=f"C{i % 10}")
    ax.set_xlabel("training steps spent (runs x budget)")
    ax.set_ylabel("best-so-far final eval ppl (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "bench_best_so_far.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_results(s: dict[str, Any], out: Path) -> None:
    """OUT/bench.json, OUT/bench.md and the figures."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "bench.json", _jsonable(s))
    (out / "bench.md").write_text(render_markdown(s))
    write_figures(s, out)


def _jsonable(x: Any) -> Any:
    """NaN/Inf as null (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if dataclasses.is_dataclass(x):
        return _jsonable(dataclasses.asdict(x))
    return x


def main_bench(settings: BenchSettings, out: Path, engine: Any = None, train: bool = True) -> int:
    """`lrpilot bench`: 0 when every run finished; errors propagate as LrpilotError (one line, exit 2)."""
    run_bench(settings, out, echo=lambda t: print(t, flush=True), engine=engine, train=train)
    print(f"bench: results in {out / 'bench.md'}", file=sys.stderr)
    return 0


__all__ = ["BenchError", "BenchSettings", "ConfigError", "Method", "parse_method", "paired_difference",
           "run_bench", "steps_to_within", "summarise", "t_interval"]  # fmt: skip
