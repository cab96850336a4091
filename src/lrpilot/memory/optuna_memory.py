"""`--memory optuna`: an Optuna TPE study proposes the rule controller's parameters for each round.

    lrpilot campaign --preset cpu-small --rounds 8 --controller rules --memory optuna --dir runs/rules

The no-LLM counterpart of the LLM Memory agent: after each round its final eval ppl is told to a real
Optuna study, and the next round runs `RuleController` with the parameters TPE asks for. The study lives
in the campaign directory (`DIR/optuna_journal.log`, Optuna's append-only journal storage: no database
server or SQL driver needed, and a killed campaign loses nothing), so a resumed or new process sees every
earlier trial.

Choices worth knowing:
  * round 1 is the plain heuristic: the first trial is the default `RuleParams`, enqueued. Rounds 2 ..
    n_startup_trials (default 5) are not Optuna's random start-up samples but local steps around the best
    round so far (the default until something beats it): each searched parameter moved by a Gaussian step of
    LOCAL_STEP x its range (in log space for log ranges), clipped to the range, seeded by (seed, round). On a
    workload where the default is already good, random start-up rounds only cost ppl (lrpilot issue 15: a
    first campaign's random rounds 2-3 gave 4.01 and 4.05 after the default's 3.80). The local steps are
    ordinary trials, so TPE, which takes over after them, learns from everything (a (1+1)-evolution-strategy
    start, Rechenberg 1973 / Beyer & Schwefel 2002, in front of TPE, Bergstra et al. 2011).
  * one trial per round, found again by its `round_index` user attr: proposing the same round twice
    (a campaign killed between propose and record) returns the same parameters.
  * the sampler is re-seeded per round (seed, round_index), so proposals do not depend on how many
    processes the campaign took.
  * parallel rounds (`campaign --parallel K`): rounds are proposed while others still run; with
    constant_liar=True TPE counts those running trials as if they had the worst value so far, so K rounds asked
    at once do not all get the same proposal (Optuna's documented mode for parallel workers; off for a
    sequential campaign, whose proposals stay those of earlier lrpilot versions).
  * a failed or diverged round (or one without a finite ppl) is told as ppl = FAILED_PPL (1e9) with the
    user attr failed=True, not as Optuna's FAIL state: TPE ignores FAIL trials and would propose the
    crashing region again, while a (rank-based) worst value steers it away. The brief's "best" skips them.
  * pruning (opt-in, `campaign --prune median`; off by default): during a round each intermediate eval loss
    is reported to the round's trial (`trial.report(loss, step)`) and Optuna's pruner (MedianPruner or
    PercentilePruner, see PruneSpec) may stop it; the trial is then told TrialState.PRUNED (TPE ranks pruned
    trials behind the completed ones by how far they got, Optuna's own rule) with user attr pruned_at_step.
"""

from __future__ import annotations

import dataclasses
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from lrpilot.controllers.rules import ParamRange, RuleParams
from lrpilot.errors import LrpilotError
from lrpilot.memory.base import Memory, MemoryContext, RoundBrief

STUDY_NAME = "lrpilot_rules"
JOURNAL_FILE = "optuna_journal.log"
#: the value told for a failed/diverged round (TPE only uses ranks, so any value worse than all real ones works)
FAILED_PPL = 1e9
#: the standard deviation of a local start-up step, as a fraction of each parameter's range
LOCAL_STEP = 0.1


class OptunaMemoryError(LrpilotError, ValueError):
    """The Optuna memory was used out of order or with a bad search space; the message says how to fix it."""


#: Optuna's default n_startup_trials for MedianPruner / PercentilePruner (optuna.pruners docs): no pruning
#: until this many rounds completed, so the median is taken over more than one or two curves
PRUNE_STARTUP = 5
PRUNE_NAMES = ("none", "median", "percentile")


@dataclass(frozen=True)
class PruneSpec:
    """`campaign --prune SPEC`: NAME[:PERCENTILE][,startup=N][,warmup=STEPS].

    name: "none" (never prune), "median" (optuna.pruners.MedianPruner: stop a round whose best eval loss so
    far is worse than the median of the completed rounds' eval losses at the same step) or "percentile"
    (optuna.pruners.PercentilePruner with `percentile` in (0, 100): worse than that percentile; 75 prunes
    less than the median). startup: completed rounds before any pruning (default PRUNE_STARTUP = 5, Optuna's
    documented default). warmup: no pruning before this update step (default None = the schedule's
    warmup_steps: during warmup every round of the rule controller runs the same LR, so a difference there is
    noise; Optuna's n_warmup_steps, whose own default is 0). A round that climbs to a higher LR may sit behind
    mid-run and win after its cool-down, so the median prunes only what looks worse than half the earlier
    rounds at the same step; `percentile:90` is the cautious choice."""

    name: str = "none"
    percentile: float = 50.0
    startup: int = PRUNE_STARTUP
    warmup: int | None = None

    def __post_init__(self) -> None:
        if self.name not in PRUNE_NAMES:
            raise OptunaMemoryError(f"--prune {self.name!r}: unknown pruner; choose one of {', '.join(PRUNE_NAMES)}")
        if not (0.0 < self.percentile < 100.0):
            raise OptunaMemoryError(f"--prune percentile:{self.percentile:g}: the percentile must be in (0, 100)")
        if self.startup < 0:
            raise OptunaMemoryError(f"--prune startup={self.startup}: must be >= 0 completed rounds")
        if self.warmup is not None and self.warmup < 0:
            raise OptunaMemoryError(f"--prune warmup={self.warmup}: must be >= 0 update steps")

    @classmethod
    def parse(cls, spec: str) -> PruneSpec:
        """PruneSpec from `--prune`'s text, e.g. "median", "percentile:75,startup=2", "median,warmup=100".
        Raises OptunaMemoryError (one line naming --prune and the form) for anything else."""
        form = "use NAME[:PERCENTILE][,startup=N][,warmup=STEPS], e.g. median or percentile:75,startup=2"
        head, *opts = [p.strip() for p in str(spec).split(",")]
        name, _, pct = head.partition(":")
        kwargs: dict[str, Any] = {"name": name.strip().lower()}
        try:
            if pct:
                if kwargs["name"] != "percentile":
                    raise ValueError
                kwargs["percentile"] = float(pct)
            for opt in opts:
                key, eq, value = opt.partition("=")
                if not eq or key.strip() not in ("startup", "warmup"):
                    raise ValueError
                kwargs[key.strip()] = int(value)
        except ValueError:
            raise OptunaMemoryError(f"--prune {spec!r}: cannot read it; {form}") from None
        if kwargs["name"] == "percentile" and not pct:
            raise OptunaMemoryError(f"--prune {spec!r}: percentile needs its value, e.g. percentile:75")
        return cls(**kwargs)

    def pruner(self, warmup_steps: int) -> optuna.pruners.BasePruner:
        """The Optuna pruner (NopPruner for "none"); warmup_steps: the schedule's, used when warmup is None."""
        warmup = warmup_steps if self.warmup is None else self.warmup
        if self.name == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.startup, n_warmup_steps=warmup)
        if self.name == "percentile":
            return optuna.pruners.PercentilePruner(
                self.percentile, n_startup_trials=self.startup, n_warmup_steps=warmup
            )
        return optuna.pruners.NopPruner()


class OptunaMemory:
    """Rule parameters per round from a seeded TPE study stored in the campaign directory."""

    def __init__(
        self,
        campaign_dir: str | Path,
        seed: int = 0,
        search_space: dict[str, ParamRange] | None = None,
        defaults: RuleParams | None = None,
        n_startup_trials: int = 5,
        constant_liar: bool = False,
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        self.dir = Path(campaign_dir)
        self.seed = int(seed)
        self.search_space = dict(search_space if search_space is not None else RuleParams.search_space())
        self.defaults = defaults if defaults is not None else RuleParams()
        self.n_startup_trials = int(n_startup_trials)
        self.constant_liar = bool(constant_liar)
        #: asked by prune(); None = Optuna's NopPruner (never prunes)
        self.pruner = pruner
        self._check_space()
        self.dir.mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "Trial n finished" lines in the campaign output
        # the journal file backend takes a lock per write (its default JournalFileSymlinkLock, an atomic symlink
        # that works on NFS too), so several processes may propose and record on one study
        path = str(self.dir / JOURNAL_FILE)
        self.storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(
                path, lock_obj=optuna.storages.journal.JournalFileSymlinkLock(path)
            )
        )

    def _check_space(self) -> None:
        known = set(RuleParams.names())
        for name, r in self.search_space.items():
            if name not in known:
                raise OptunaMemoryError(f"search_space: {name!r} is not a RuleParams field; known: {sorted(known)}")
            if not (isinstance(r, ParamRange) and math.isfinite(r.low) and math.isfinite(r.high) and r.low < r.high):
                raise OptunaMemoryError(f"search_space.{name}: needs ParamRange(low, high) with low < high, got {r!r}")
            if r.log and r.low <= 0:
                raise OptunaMemoryError(f"search_space.{name}: a log range needs low > 0, got {r.low}")
        # every corner of the box must be a valid RuleParams, or TPE could ask for an invalid one
        lows = {n: r.low for n, r in self.search_space.items()}
        highs = {n: r.high for n, r in self.search_space.items()}
        for corner in (lows, highs):
            try:
                replace(self.defaults, **corner)
            except LrpilotError as e:
                raise OptunaMemoryError(f"search_space: its corner {corner} is not a valid RuleParams ({e})") from e

    # ------------------------------------------------------------------------------------------- study

    def _study(self, round_index: int = 0) -> optuna.Study:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(
                seed=(self.seed * 1_000_003 + round_index) % 2**32,
                n_startup_trials=self.n_startup_trials,
                multivariate=True,
                constant_liar=self.constant_liar,
            )
        return optuna.create_study(
            study_name=STUDY_NAME,
            storage=self.storage,
            sampler=sampler,
            pruner=self.pruner or optuna.pruners.NopPruner(),
            direction="minimize",
            load_if_exists=True,
        )

    @staticmethod
    def _trial_of(trials: Sequence[optuna.trial.FrozenTrial], round_index: int) -> optuna.trial.FrozenTrial | None:
        mine = [t for t in trials if t.user_attrs.get("round_index") == round_index]
        return mine[-1] if mine else None

    def _params_of(self, trial: optuna.trial.BaseTrial) -> RuleParams:
        values: dict[str, float] = {}
        with warnings.catch_warnings():  # an enqueued default outside a custom range is still used, quietly
            warnings.simplefilter("ignore")
            for name, r in self.search_space.items():
                values[name] = trial.suggest_float(name, r.low, r.high, log=r.log)
        return replace(self.defaults, **values)

    def _local_step(self, trials: Sequence[optuna.trial.FrozenTrial], round_index: int) -> dict[str, float]:
        """A start-up proposal: the best finished round's parameters (the default until one beats it) moved by
        a seeded Gaussian step of LOCAL_STEP x each range, clipped to the range."""
        ok = [
            t for t in trials
            if t.state == TrialState.COMPLETE and not t.user_attrs.get("failed") and t.value is not None
        ]  # fmt: skip
        defaults = self.defaults.to_dict()
        base = min(ok, key=lambda t: t.value).params if ok else {}
        rng = random.Random((self.seed * 1_000_003 + round_index) % 2**32)
        out: dict[str, float] = {}
        for name, r in self.search_space.items():
            x = float(base.get(name, defaults[name]))
            if r.log:
                lo, hi = math.log(r.low), math.log(r.high)
                v = math.exp(
                    min(max(math.log(min(max(x, r.low), r.high)) + rng.gauss(0, LOCAL_STEP * (hi - lo)), lo), hi)
                )
            else:
                v = min(max(x + rng.gauss(0, LOCAL_STEP * (r.high - r.low)), r.low), r.high)
            out[name] = min(max(v, r.low), r.high)
        return out

    # ------------------------------------------------------------------------------------------- API

    def propose(self, round_index: int) -> RuleParams:
        """The rule parameters for round `round_index`; the same ones again if asked again for that round."""
        study = self._study(round_index)
        trials = study.get_trials(deepcopy=False)
        old = self._trial_of(trials, round_index)
        if old is not None:
            if old.state == TrialState.RUNNING:  # killed after propose: same trial, missing params filled in
                return self._params_of(optuna.trial.Trial(study, old._trial_id))
            return replace(self.defaults, **old.params)
        for t in trials:  # killed between ask and set_user_attr: that trial has no round, close it
            if t.state == TrialState.RUNNING and "round_index" not in t.user_attrs:
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        if not trials:  # round 1 = the plain heuristic
            defaults = self.defaults.to_dict()
            study.enqueue_trial({n: defaults[n] for n in self.search_space})
        elif len([t for t in trials if "round_index" in t.user_attrs]) < self.n_startup_trials:
            study.enqueue_trial(self._local_step(trials, round_index))
        trial = study.ask()
        trial.set_user_attr("round_index", round_index)
        return self._params_of(trial)

    def _running_trial(self, round_index: int, caller: str) -> tuple[optuna.Study, Any]:
        """(study, the trial of round `round_index`), the trial None once it is finished (told before: the
        first result stays). Raises OptunaMemoryError when the round was never proposed."""
        study = self._study(round_index)
        trial = self._trial_of(study.get_trials(deepcopy=False), round_index)
        if trial is None:
            raise OptunaMemoryError(
                f"{caller}: round {round_index} was never proposed; call propose({round_index}) first"
            )
        return study, (trial if trial.state == TrialState.RUNNING else None)

    def record(self, round_index: int, final_ppl: float | None, failed: bool) -> None:
        """Tell the study how round `round_index` went. Failed, diverged or ppl-less rounds are told as
        FAILED_PPL with user attr failed=True. Recording a round twice keeps the first result."""
        study, trial = self._running_trial(round_index, "record")
        if trial is None:
            return
        ppl = math.nan if final_ppl is None else float(final_ppl)
        bad = bool(failed) or not (math.isfinite(ppl) and ppl > 0)
        self.storage.set_trial_user_attr(trial._trial_id, "failed", bad)
        self.storage.set_trial_user_attr(trial._trial_id, "final_ppl", None if not math.isfinite(ppl) else ppl)
        study.tell(trial.number, FAILED_PPL if bad else ppl, skip_if_finished=True)

    def prune(self, round_index: int, step: int, eval_loss: float) -> bool:
        """Report round `round_index`'s eval loss after update `step` to its trial and ask the pruner whether to
        stop it. False for a non-finite loss (the guard handles those), or a round not running in the study."""
        if not math.isfinite(eval_loss):
            return False
        study = self._study(round_index)
        old = self._trial_of(study.get_trials(deepcopy=False), round_index)
        if old is None or old.state != TrialState.RUNNING:
            return False
        trial = optuna.trial.Trial(study, old._trial_id)
        with warnings.catch_warnings():  # a resumed round reports a step again: Optuna keeps the first, warns
            warnings.simplefilter("ignore")
            trial.report(float(eval_loss), int(step))
        return bool(trial.should_prune())

    def record_pruned(self, round_index: int, step: int) -> None:
        """Tell the study that round `round_index` was pruned after update `step` (TrialState.PRUNED, user attr
        pruned_at_step). Told twice (a resumed campaign), the first stays."""
        study, trial = self._running_trial(round_index, "record_pruned")
        if trial is None:
            return
        self.storage.set_trial_user_attr(trial._trial_id, "failed", False)
        self.storage.set_trial_user_attr(trial._trial_id, "pruned_at_step", int(step))
        study.tell(trial.number, state=TrialState.PRUNED, skip_if_finished=True)

    def history(self) -> list[dict[str, Any]]:
        """One dict per trial: round, state, ppl (None if failed/running), failed, params."""
        out = []
        for t in self._study().get_trials(deepcopy=False):
            failed = bool(t.user_attrs.get("failed", t.state == TrialState.FAIL))
            ppl = t.value if t.state == TrialState.COMPLETE and not failed else None
            out.append(
                {
                    "round": t.user_attrs.get("round_index"),
                    "state": t.state.name,
                    "ppl": ppl,
                    "failed": failed,
                    "params": dict(t.params),
                }
            )
        return out

    def brief(self) -> str:
        """A few lines for the round's log: trials so far, the best parameters and their ppl."""
        hist = [h for h in self.history() if h["round"] is not None]
        done = [h for h in hist if h["state"] == "COMPLETE"]
        ok = [h for h in done if not h["failed"]]
        pruned = sum(h["state"] == "PRUNED" for h in hist)
        head = (
            f"Optuna TPE memory (seed {self.seed}): {len(done)} round(s) told ({len(ok)} ok, "
            f"{len(done) - len(ok)} failed), {len(hist) - len(done) - pruned} running."
        )
        if pruned:  # only with --prune: the brief of a campaign without it reads as before
            head += f" {pruned} pruned."
        if not ok:
            return head + (
                " No successful round yet; the first round uses the default rule parameters, the next ones "
                f"TPE's random start-up samples (the first {self.n_startup_trials} trials)."
            )
        best = min(ok, key=lambda h: h["ppl"])
        params = ", ".join(f"{k}={v:.3g}" for k, v in sorted(best["params"].items()))
        return f"{head} Best ppl {best['ppl']:.4g} (round {best['round']}) with {params}."


class OptunaCampaignMemory(Memory):
    """`--memory optuna` (lrpilot.memory.base.MEMORIES): the campaign's OptunaMemory over the rule controller's
    parameters, scaled to the preset's init_lr, without those fixed by `--rule`; parallel rounds are proposed
    while others run (TPE's constant liar counts them as pending). Each round's brief is the study's summary."""

    def __init__(self, ctx: MemoryContext) -> None:
        init_lr, settings = ctx.cfg.schedule.init_lr, ctx.settings
        space = {k: r for k, r in RuleParams.search_space(init_lr).items() if k not in settings.rule_params}
        self.study = OptunaMemory(
            ctx.directory,
            seed=settings.optuna_seed,
            search_space=space,
            defaults=settings.rules_for(init_lr),
            constant_liar=ctx.parallel,
            pruner=_pruner(getattr(settings, "prune", ""), ctx.cfg.schedule.warmup_steps),
        )

    def brief(
        self,
        round_index: int,
        *,
        prior: dict[str, Any] | None = None,
        running: tuple[int, ...] = (),
        run_start_iso: str = "",
    ) -> RoundBrief:
        params = self.study.propose(round_index)  # the same trial again for a resumed round
        return RoundBrief(self.study.brief(), params, {"params": dataclasses.asdict(params)})

    def record(self, round_index: int, final_ppl: float, failed: bool) -> None:
        self.study.record(round_index, final_ppl, failed)

    def prune(self, round_index: int, step: int, eval_loss: float) -> bool:
        return self.study.prune(round_index, step, eval_loss)

    def record_pruned(self, round_index: int, step: int, eval_loss: float) -> None:
        self.study.record_pruned(round_index, step)


def _pruner(spec: str, warmup_steps: int) -> optuna.pruners.BasePruner | None:
    """The campaign's `--prune` pruner (None without it: Optuna's NopPruner, the campaign as before)."""
    return PruneSpec.parse(spec).pruner(warmup_steps) if spec else None
