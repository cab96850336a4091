"""The `lrpilot` command line.

    lrpilot info --preset cpu-small
    lrpilot train --preset cpu-smoke --dir runs/one --schedule cosine --peak 3e-3
    lrpilot baseline --preset cpu-small --schedule cosine --peaks 1e-3 3e-3 1e-2 --out runs/sweep
    lrpilot campaign --preset cpu-small --rounds 8 --controller rules --memory optuna --dir runs/rules
    lrpilot bench --preset cpu-small --methods cosine wsd rules --seeds 3 --peaks 1e-3 3e-3 1e-2 --out runs/bench
    lrpilot report runs/rules --baselines runs/sweep --out runs/report
    lrpilot report runs/llm --compare runs/rules --baselines runs/sweep --out runs/compare
    lrpilot import-logs ../shared/seed-experiments --dir runs/published
    lrpilot export-schedule runs/rules --round 3 --out plan.json
    lrpilot demo --dir runs/demo
    lrpilot status runs/demo --watch

Every command takes `--preset` plus any number of `--set section.key=value` overrides; `lrpilot info` shows
the resolved config and the keys that exist. Errors in input are one line naming the field and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from lrpilot.argtypes import non_negative_int, output_dir, output_file, positive_float, positive_int, rule_param
from lrpilot.config import PRESETS, ConfigError, RunConfig, load_config
from lrpilot.controllers import CONTROLLERS
from lrpilot.controllers.schedules import SCHEDULES
from lrpilot.errors import LrpilotError, disk_error, is_disk_error
from lrpilot.llm import LLM_BACKENDS
from lrpilot.memory.base import MEMORIES
from lrpilot.registry import Registry


def _named(registry: Registry) -> Callable[[str], str]:
    """An argparse `type` that accepts a name of `registry` (its choices are the registry's, read when the
    command line is parsed, so a component registered in its own file is accepted) and refuses any other
    with the registry's one-line error: `argument --controller: 'x': unknown controller; choose one of: ...`."""

    def check(name: str) -> str:
        try:
            registry.entry(name)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{registry.field} ")) from None
        return name

    check.__name__ = registry.kind
    return check


def _choices(registry: Registry, extra: str = "") -> str:
    """`registry`'s help text ('name: help; ...') for an argparse help string, then `extra`."""
    return registry.help_text() + (f"; {extra}" if extra else "")


def _add_config_args(p: argparse.ArgumentParser, default: str = "cpu-small") -> None:
    p.add_argument(
        "--preset",
        default=default,
        help=f"named preset ({', '.join(PRESETS)}) or a path to a saved config.json (default: {default})",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config field, e.g. --set train.total_steps=500 (repeatable; see `lrpilot info`); the "
        "trainer reads model, data, train, schedule, eval, checkpoint; the campaign also guard, agent, launch",
    )


def _set_aliases(p: argparse.ArgumentParser, **aliases: str) -> None:
    """Declare options already on `p` as other spellings of `--set`, dest=field (e.g. model="agent.model"): a
    value given joins the overrides after every --set, in this order (_overrides); their help says so."""
    by_dest = {a.dest: a for a in p._actions}
    for dest, field in aliases.items():
        by_dest[dest].help += f" (same as --set {field}=VALUE)"
    p.set_defaults(set_aliases=tuple(aliases.items()))


def _overrides(args: argparse.Namespace) -> list[str]:
    """The `section.key=value` overrides of a command line: every --set, then each alias given (_set_aliases)."""
    aliases = getattr(args, "set_aliases", ())
    return [*args.overrides, *(f"{field}={getattr(args, dest)}" for dest, field in aliases if getattr(args, dest))]


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """--engine, --ray-address, --resources (lrpilot.engine)."""
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="where runs execute: local (this machine, the default) or ray (each run a Ray task; pip install "
        "'lrpilot[ray]')",
    )
    p.add_argument(
        "--ray-address",
        default="",
        help="with --engine ray: join this running cluster ('auto', host:port or ray://host:10001); default: "
        "start Ray on this machine",
    )
    p.add_argument(
        "--resources",
        default="num_cpus=1",
        help="with --engine ray: what each run asks for, e.g. num_cpus=4,num_gpus=1 (default num_cpus=1)",
    )


def _engine(args: argparse.Namespace, slots: int):
    """The engine that --engine / --ray-address / --resources ask for, with `slots` runs at once; None for the
    default local engine without parallelism (the code paths lrpilot always had)."""
    from lrpilot.engine import Resources, make_engine

    resources = Resources.parse(args.resources)
    if args.engine == "local" and not args.ray_address and slots == 1:
        return None
    return make_engine(args.engine, slots, address=args.ray_address, resources=resources)


def _config(args: argparse.Namespace) -> RunConfig:
    return load_config(args.preset, _overrides(args))


def cmd_info(args: argparse.Namespace) -> int:
    import json

    cfg = _config(args)
    print(json.dumps(cfg.to_dict(), indent=2))
    try:
        import torch

        from lrpilot.model import LLaMA

        with torch.device("meta"):
            n = LLaMA(cfg.model).num_parameters()
        print(f"parameters: {n:,} ({n / 1e6:.2f}M)")
    except ImportError as e:  # pragma: no cover - torch is a core dependency
        print(f"parameters: unavailable ({e})")
    return 0


def _checked_config(args: argparse.Namespace) -> RunConfig:
    """The config, with everything the trainer would refuse at launch checked now (nothing written yet)."""
    from lrpilot.preflight import check_run

    cfg = _config(args)
    check_run(cfg)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from lrpilot.baseline import run_one, sweep_table

    cfg = _checked_config(args)
    peak = args.peak if args.peak is not None else cfg.schedule.init_lr
    rec = run_one(cfg, args.schedule, peak, Path(args.dir), preset=args.preset)
    print(sweep_table([rec]))
    return 0 if rec.get("status") == "ok" else 1


def cmd_baseline(args: argparse.Namespace) -> int:
    from lrpilot.baseline import run_sweep, sweep_table
    from lrpilot.progress import LiveProgress

    cfg = _checked_config(args)
    engine = _engine(args, args.jobs if args.engine == "ray" else 1)  # local: --jobs threads, as always
    with contextlib.ExitStack() as stack, LiveProgress([Path(args.out) / "runs"]) as live:
        if engine is not None:
            stack.enter_context(engine)
        recs = run_sweep(
            cfg, args.schedule, args.peaks, Path(args.out), jobs=args.jobs, preset=args.preset, engine=engine
        )
        live.write(sweep_table(recs))
    return 0


def _campaign_settings(args: argparse.Namespace, cfg: RunConfig):
    from lrpilot.campaign import CampaignSettings

    memory = args.memory or CONTROLLERS.get(args.controller).default_memory
    names = [name for name, _ in args.rule]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # the last one silently won
        raise ConfigError(f"--rule {twice[0]}: given more than once; give each parameter once")
    return CampaignSettings(
        preset=args.preset,
        overrides=tuple(_overrides(args)),
        controller=args.controller,
        memory=memory,
        backend=cfg.agent.backend,
        model=cfg.agent.model if cfg.agent.backend == "openai" else (cfg.agent.local_model_path or "SmolLM2-135M"),
        replay_from=args.replay_from or "",
        optuna_seed=args.optuna_seed,
        rule_params=dict(args.rule),
        script=_script(args),
        prune="" if args.prune in (None, "none") else args.prune,
    )


def _script(args: argparse.Namespace) -> str:
    """--script's command ("" without it); an empty one is refused here, where "" would mean lrpilot's trainer."""
    from lrpilot.config import ConfigError

    script = getattr(args, "script", None)
    if script is not None and not script.strip():
        raise ConfigError('--script: empty; give the command that runs your loop, e.g. --script "python train.py"')
    return script or ""


def cmd_campaign(args: argparse.Namespace) -> int:
    from lrpilot.campaign import run_campaign
    from lrpilot.preflight import check_campaign

    cfg = _config(args)
    settings = _campaign_settings(args, cfg)
    check_campaign(cfg, args.rounds, settings)
    engine = _engine(args, args.parallel)  # a bad --resources or a missing Ray fails here, before any LLM ping
    uses = (CONTROLLERS.get(settings.controller).uses_llm, MEMORIES.get(settings.memory).uses_llm)
    roles = [r for r, used in zip(("controller", "memory"), uses, strict=True) if used]
    if roles:
        from lrpilot.llm.base import ping_backends

        ping_backends(cfg.agent, roles)  # fail fast on a wrong endpoint, model or key, for every model it will use
    from lrpilot.progress import LiveProgress

    with contextlib.ExitStack() as stack, LiveProgress([Path(args.dir) / "rounds"]) as live:
        if engine is not None:
            stack.enter_context(engine)
        run_campaign(cfg, Path(args.dir), args.rounds, settings, echo=live.write, engine=engine)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Where every run under DIR stands, from its logs only; --watch redraws every N seconds until Ctrl-C."""
    import time

    from lrpilot.progress import DirWatch, status_table

    root = Path(args.dir)
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "no such directory"
        raise LrpilotError(f"status {root}: {what}; give a campaign, sweep (--out) or bench directory")
    watch = DirWatch([root])
    while True:
        watch.poll()
        statuses = watch.statuses()
        table = status_table(statuses, root)
        if not statuses and (root / "import.json").is_file():
            table = f"no run directories: {root} holds logs brought in by import-logs; see lrpilot report {root}"
        if args.watch is None:
            print(table)
            return 0
        if sys.stdout.isatty():
            print("\x1b[2J\x1b[H", end="")  # clear the screen, cursor home
        print(f"{root}  ({time.strftime('%H:%M:%S')}, every {args.watch:g}s, Ctrl-C to stop)\n{table}", flush=True)
        time.sleep(args.watch)  # the refresh period of a display, not synchronisation


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    from lrpilot.bench import BenchSettings, main_bench

    overrides = _overrides(args)
    settings = BenchSettings(
        preset=args.preset,
        overrides=tuple(overrides),
        peaks=tuple(args.peaks),
        methods=tuple(args.methods),
        seeds=args.seeds,
        jobs=args.jobs,
        optuna_seed=args.optuna_seed,
        # a summary-only call trains nothing, so it is not listed among the commands that made the results
        command=shlex.join(["lrpilot", *sys.argv[1:]])
        if sys.argv[1:2] == ["bench"] and not args.summarise_only
        else "",
    )
    if args.summarise_only:
        return main_bench(settings, Path(args.out), train=False)
    engine = _engine(args, args.jobs if args.engine == "ray" else 1)  # local: --jobs threads, as always
    if engine is None:
        return main_bench(settings, Path(args.out))
    with engine:
        return main_bench(settings, Path(args.out), engine=engine)


def cmd_export_schedule(args: argparse.Namespace) -> int:
    from lrpilot.schedule_export import export_schedule

    plan = export_schedule(args.dir, args.round, args.out)
    print(f"wrote {args.out}: round {plan['round']}, {len(plan['decisions'])} decisions")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lrpilot.report import main_report

    return main_report(
        Path(args.dir),
        [Path(b) for b in args.baselines],
        Path(args.out),
        [Path(c) for c in args.compare],
        [Path(b) for b in args.bench],
    )


def cmd_import_logs(args: argparse.Namespace) -> int:
    from lrpilot.importer import main_import

    return main_import(Path(args.src), Path(args.dir), tag=args.tag)


def cmd_demo(args: argparse.Namespace) -> int:
    """A short rules+Optuna campaign and a cosine sweep, side by side on 2 cores, then the report."""
    import os

    from lrpilot.baseline import run_sweep, sweep_table
    from lrpilot.campaign import CampaignSettings, run_campaign
    from lrpilot.controllers.schedules import baseline_config
    from lrpilot.preflight import check_campaign
    from lrpilot.progress import LiveProgress, fmt_duration

    cfg = _config(args)
    out = Path(args.dir)
    settings = CampaignSettings(
        preset=args.preset, overrides=tuple(args.overrides), controller="rules", memory="optuna"
    )
    # everything both halves will need, checked before either starts (the sweep runs in a thread beside it)
    check_campaign(cfg, args.rounds, settings)
    for p in args.peaks:
        baseline_config(cfg, "cosine", p)
    print(
        f"demo: {args.rounds} rule-controller rounds with Optuna memory in {out / 'campaign'}, and a cosine "
        f"sweep over {', '.join(f'{p:g}' for p in args.peaks)} in {out / 'sweep'}, side by side",
        flush=True,
    )
    try:
        from lrpilot.estimate import run_seconds

        per_run = run_seconds(cfg)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        runs = args.rounds + len(args.peaks)
        wall = per_run * (max(args.rounds, len(args.peaks)) if cores >= 2 else runs)
        print(
            f"estimate: about {fmt_duration(wall)} ({runs} runs of {cfg.train.total_steps} steps, ~{fmt_duration(per_run)} "
            f"each measured here, 2 at a time on {cores} cores; slower if the cores are busy)",
            flush=True,
        )
    except Exception as e:  # noqa: BLE001 - an estimate must never stop the demo
        print(f"estimate: unavailable ({e.__class__.__name__}: {e})", flush=True)
    errors: list[BaseException] = []
    with LiveProgress([out / "campaign" / "rounds", out / "sweep" / "runs"]) as live:

        def sweep() -> None:
            try:
                recs = run_sweep(cfg, "cosine", args.peaks, out / "sweep", jobs=1, preset=args.preset)
                live.write("cosine sweep:\n" + sweep_table(recs))
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                errors.append(e)

        t = threading.Thread(target=sweep, name="cosine-sweep")
        t.start()
        try:
            run_campaign(cfg, out / "campaign", args.rounds, settings, echo=live.write)
        finally:
            t.join()
    if errors:
        raise errors[0]
    from lrpilot.report import main_report

    return main_report(out / "campaign", [out / "sweep"], out / "report")


_NEGATIVE_NUMBER = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$|^-(?:inf|nan)$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (`lrpilot baseline: error: argument --peaks: ...`), no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_info_command(sub: argparse._SubParsersAction) -> None:
    """`lrpilot info`."""
    p = sub.add_parser("info", help="print a preset's resolved config and the model's parameter count")
    _add_config_args(p)
    p.set_defaults(func=cmd_info)


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    """`lrpilot train`."""
    p = sub.add_parser("train", help="one pre-training run with a fixed schedule, through the supervisor")
    _add_config_args(p)
    p.add_argument("--dir", type=output_dir, required=True, help="output directory (result json and the run directory)")
    p.add_argument(
        "--schedule",
        type=_named(SCHEDULES),
        default="cosine",
        metavar="NAME",
        help=f"LR schedule after warmup (default cosine): {', '.join(SCHEDULES.names())}",
    )
    p.add_argument("--peak", type=positive_float, default=None, help="peak LR (default: the preset's schedule.init_lr)")
    p.set_defaults(func=cmd_train)


def _add_baseline_command(sub: argparse._SubParsersAction) -> None:
    """`lrpilot baseline`."""
    p = sub.add_parser("baseline", help="sweep a schedule over peak LRs; one result json per peak")
    _add_config_args(p)
    p.add_argument(
        "--schedule",
        type=_named(SCHEDULES),
        default="cosine",
        metavar="NAME",
        help=_choices(SCHEDULES),
    )
    p.add_argument("--peaks", type=positive_float, nargs="+", required=True, help="peak LRs, e.g. 1e-3 3e-3 1e-2")
    p.add_argument("--out", type=output_dir, required=True, help="output directory; re-running skips finished peaks")
    p.add_argument(
        "--jobs", type=positive_int, default=1, help="runs at once, >= 1 (each uses train.num_threads threads)"
    )
    _add_engine_args(p)
    p.set_defaults(func=cmd_baseline)


def _add_campaign_command(sub: argparse._SubParsersAction) -> None:
    """`lrpilot campaign`."""
    p = sub.add_parser("campaign", help="run N rounds in DIR, each steered by a controller with memory")
    _add_config_args(p)
    p.add_argument(
        "--dir", type=output_dir, required=True, help="campaign directory; run the same command again to resume"
    )
    p.add_argument("--rounds", type=positive_int, required=True, help="total rounds, >= 1 (finished ones are skipped)")
    p.add_argument(
        "--controller",
        type=_named(CONTROLLERS),
        default="rules",
        metavar="NAME",
        help=_choices(CONTROLLERS),
    )
    p.add_argument(
        "--memory",
        type=_named(MEMORIES),
        default=None,
        metavar="NAME",
        help="cross-round memory: " + _choices(MEMORIES, "default llm for --controller llm, optuna for rules"),
    )
    p.add_argument(
        "--backend",
        type=_named(LLM_BACKENDS),
        default=None,
        metavar="NAME",
        help="LLM backend: " + _choices(LLM_BACKENDS),
    )
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default: DashScope compatible mode)")
    p.add_argument("--model", default=None, help="Controller model name (default qwen3.6-plus-2026-04-02)")
    p.add_argument("--memory-model", default=None, help="Memory agent model (default: same as --model)")
    p.add_argument("--replay-from", default=None, help="for --controller replay: the campaign directory to re-play")
    _set_aliases(
        p, backend="agent.backend", base_url="agent.base_url", model="agent.model", memory_model="agent.memory_model"
    )
    p.add_argument(
        "--optuna-seed",
        type=non_negative_int,
        default=0,
        help="seed of the Optuna TPE sampler (--memory optuna), 0 .. 2**32-1",
    )
    p.add_argument(
        "--rule",
        action="append",
        type=rule_param,
        default=[],
        metavar="NAME=VALUE",
        help="fix one rule-controller parameter for every round, e.g. --rule ceiling=3e-2 (repeatable; "
        "--controller rules; with --memory optuna it is left out of the search). Names: ceiling, climb_factor, "
        "climb_z, rise_z, cut_factor, decay_start, final_ratio, crash_margin, probe_steps, probe_every, "
        "probe_ceiling_factor, decay_shape (linear, 1-sqrt, geometric), start_ratio (the warmup ends at "
        "start_ratio x ceiling; 0.3 = the slow start of before), range_steps (an LR range test at the "
        "end of warmup sets the ceiling; 0 = off), range_factor, range_divisor",
    )
    p.add_argument(
        "--parallel",
        type=positive_int,
        default=1,
        help="rounds at once, >= 1 (default 1: one after another); each new round starts as one finishes",
    )
    p.add_argument(
        "--prune",
        default=None,
        metavar="SPEC",
        help="stop a hopeless round early from its intermediate evals (eval.every), with Optuna's pruners "
        "(--memory optuna; default: never): median, percentile:P, none; options ,startup=N (completed rounds "
        "first, default 5) ,warmup=STEPS (default the warmup). Pruned rounds and the steps saved are counted",
    )
    p.add_argument(
        "--script",
        default=None,
        metavar="COMMAND",
        help='run each round as your own training script, e.g. "python train.py --flag", whose loop builds its '
        "Pilot with Pilot.from_env() (README: Use it in your own loop); the preset gives the steps and schedule",
    )
    _add_engine_args(p)
    p.set_defaults(func=cmd_campaign)


def _add_bench_command(sub: argparse._SubParsersAction) -> None:
    """`lrpilot bench`."""
    p = sub.add_parser(
        "bench", help="methods x seeds at one step budget: fixed-schedule sweeps, LR-free optimizers, campaigns"
    )
    _add_config_args(p)
    p.add_argument(
        "--methods",
        nargs="+",
        required=True,
        metavar="M",
        help="cosine, wsd, d2z, constant (sweeps over --peaks), schedulefree[:LR], prodigy[:LR] (one run at "
        "defaults), rules (1 round, defaults, no memory), rules:KEY=V[,KEY=V] (1 round, those rule parameters "
        "fixed, e.g. rules:probe_steps=20), rules+optuna:K, llm, llm+memory:K, replay:DIR",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per method: train.seed, train.seed+1, ... (default 3)")
    p.add_argument("--peaks", type=positive_float, nargs="*", default=[], help="sweep peak LRs, e.g. 1e-3 3e-3 1e-2")
    p.add_argument(
        "--out", type=output_dir, required=True, help="bench directory; run the same command again to resume"
    )
    p.add_argument("--jobs", type=int, default=1, help="trainers at once (each uses train.num_threads threads)")
    p.add_argument(
        "--backend", type=_named(LLM_BACKENDS), default=None, metavar="NAME", help="LLM backend (llm methods)"
    )
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (llm methods)")
    p.add_argument("--model", default=None, help="Controller model name (llm methods)")
    p.add_argument("--memory-model", default=None, help="Memory agent model (llm+memory)")
    _set_aliases(
        p, backend="agent.backend", base_url="agent.base_url", model="agent.model", memory_model="agent.memory_model"
    )
    p.add_argument("--optuna-seed", type=int, default=0, help="seed of the Optuna TPE sampler (rules+optuna)")
    p.add_argument(
        "--summarise-only",
        action="store_true",
        help="train nothing: write bench.md/bench.json/figures from the runs already finished in --out",
    )
    _add_engine_args(p)
    p.set_defaults(func=cmd_bench)


def _add_report_command(sub: argparse._SubParsersAction) -> None:
    """`lrpilot report`."""
    p = sub.add_parser("report", help="tables and figures from a campaign's logs (never imports torch)")
    p.add_argument("dir", help="campaign directory")
    p.add_argument("--baselines", nargs="*", default=[], help="directories of baseline result jsons")
    p.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="DIR",
        help="other campaign directories to put side by side with DIR (table + best-so-far figure)",
    )
    p.add_argument(
        "--bench", nargs="+", default=[], metavar="DIR", help="`lrpilot bench` directories to link (bench.md)"
    )
    p.add_argument("--out", type=output_dir, required=True, help="output directory for report.html, report.md and PNGs")
    p.set_defaults(func=cmd_report)


def _add_export_schedule_command(sub: argparse._SubParsersAction) -> None:
    """`lrpilot export-schedule`."""
    p = sub.add_parser(
        "export-schedule", help="a round's LR decisions as plan.json, for Pilot(controller='replay:plan.json')"
    )
    p.add_argument("dir", help="a campaign directory or a Pilot's run directory")
    p.add_argument("--round", type=positive_int, default=None, help="the round to export (default: the only one)")
    p.add_argument(
        "--out", required=True, type=output_file, help="the plan file to write (json); missing folders are created"
    )
    p.set_defaults(func=cmd_export_schedule)


def _add_import_logs_command(sub: argparse._SubParsersAction) -> None:
    """`lrpilot import-logs`."""
    p = sub.add_parser("import-logs", help="turn the published study's log files into a campaign directory")
    p.add_argument("src", help="directory with final_results_log_*.jsonl, decisions_log_*, rollback_log_*")
    p.add_argument("--dir", type=output_dir, required=True, help="destination campaign directory")
    p.add_argument(
        "--tag",
        default=None,
        help="which campaign, when SRC holds several (final_results_log_<TAG>.jsonl); default: the only one",
    )
    p.set_defaults(func=cmd_import_logs)


def _add_demo_command(sub: argparse._SubParsersAction) -> None:
    """`lrpilot demo`."""
    p = sub.add_parser("demo", help="the embedded default end to end: campaign + cosine sweep + report")
    _add_config_args(p, default="cpu-small")
    p.add_argument("--dir", type=output_dir, default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--rounds", type=positive_int, default=3, help="campaign rounds, >= 1 (default 3)")
    p.add_argument(
        "--peaks",
        type=positive_float,
        nargs="+",
        default=[1e-3, 3e-3, 3e-2],
        help="cosine sweep peaks (default 1e-3 3e-3 3e-2: near-best, best, and where cosine collapses on cpu-small)",
    )
    p.set_defaults(func=cmd_demo)


def _add_status_command(sub: argparse._SubParsersAction) -> None:
    """`lrpilot status`."""
    p = sub.add_parser("status", help="where every run of a campaign, sweep or bench stands, from its logs only")
    p.add_argument("dir", help="a campaign directory, a sweep's --out directory, a bench directory or one run")
    p.add_argument(
        "--watch",
        type=positive_float,
        nargs="?",
        const=5.0,
        default=None,
        metavar="SECONDS",
        help="redraw every SECONDS (default 5) until Ctrl-C",
    )
    p.set_defaults(func=cmd_status)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lrpilot",
        description="LLM agents discover learning-rate schedules for LM pre-training; plain code keeps the run alive.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_info_command(sub)
    _add_train_command(sub)
    _add_baseline_command(sub)
    _add_campaign_command(sub)
    _add_bench_command(sub)
    _add_report_command(sub)
    _add_export_schedule_command(sub)
    _add_import_logs_command(sub)
    _add_demo_command(sub)
    _add_status_command(sub)
    for each in (parser, *sub.choices.values()):
        # "-1e-3" is a (negative) number, not an option, so --peaks -1e-3 reaches positive_float and is refused
        # as non-positive (argparse's own pattern misses exponents, and there are no numeric options)
        each._negative_number_matcher = _NEGATIVE_NUMBER
    return parser


def _stdout_gone() -> bool:
    """True if stdout is a pipe whose reader has left (`lrpilot info | head -1`: poll reports POLLERR on the
    write end); then stdout is pointed at /dev/null so the interpreter's final flush is quiet too (the Python
    docs' "Note on SIGPIPE", signal module). False where poll is missing (Windows)."""
    import os
    import select

    if not hasattr(select, "poll"):
        return False
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        gone = any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError):  # no real stdout (closed, or replaced by an object without a descriptor)
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return gone


def main(argv: list[str] | None = None) -> int:
    from lrpilot.logs import setup_cli_logging

    setup_cli_logging()  # warnings (a corrupt log line, ...) as one `lrpilot: warning: ...` line each
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("lrpilot: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except LrpilotError as e:
        print(f"lrpilot: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # a pipe other than stdout (a subprocess's, a socket's): a real error
        return 1
    except OSError as e:  # a write no lrpilot writer wrapped (a library's): the same one line
        if not is_disk_error(e):
            raise
        print(f"lrpilot: error: {disk_error(None, e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
