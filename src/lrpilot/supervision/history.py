"""The branch of the trajectory the trainer is on, and its restore from the run's logs after the supervisor
itself was restarted: the losses and LRs per step, one entry per decision point, the branches a rollback
abandoned, and which logged decisions the branch being resumed already claims (re-applied at their effective
steps) or were sent but never applied.

    python -m pytest -q tests/test_supervision.py -k history
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lrpilot.channel import CONTROL_FILE
from lrpilot.logs import as_float, finite_mean, is_positive_finite, iter_jsonl
from lrpilot.supervision import SupervisorError

#: RUN/decisions_sent.jsonl: each decision record as its command is sent (a write-ahead log; the decision log
#: proper gets the record once the trainer applied the command)
SENT_FILE = "decisions_sent.jsonl"
#: decision kinds whose LR the trainer used
_LR_KINDS = ("decision", "fallback", "emergency")


def read_round_file(path: Path) -> dict[str, Any] | None:
    """RUN/round.json (None when there is none); SupervisorError when it is unreadable or has no run_start_iso."""
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        if isinstance(d, dict) and d.get("run_start_iso"):
            return d
    except (ValueError, OSError):
        pass
    raise SupervisorError(f"{path}: unreadable round record; delete the run directory to start the round again")


class BranchHistory:
    """The branch the trainer is on: dense per-step losses and LRs, one (step, mean loss) and (step, LR) entry
    per decision point, the peak and post-warmup minimum LR trained at, and (launch that crashed, step rolled
    back to) for every rollback. After a restart also the decision points already answered on the branch being
    re-trained (`answered`) and the decisions sent but never applied (`unapplied_sent`)."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.losses: dict[int, float] = {}
        self.lrs: dict[int, float] = {}
        self.loss_history: list[tuple[int, float]] = []
        self.lr_history: list[tuple[int, float]] = []
        self.peak_lr, self.min_lr = -math.inf, math.inf
        self.rollback_points: list[tuple[int, int]] = []  # (launch that crashed, step rolled back to)
        # decision points after the checkpoint already answered on the branch being re-trained -> None (its
        # command is re-sent with at_step) or the record of a decision sent but never applied (sent again when
        # the trainer gets there, logged when applied)
        self.answered: dict[int, dict[str, Any] | None] = {}
        self.unapplied_sent: list[dict[str, Any]] = []  # restored: sent, never applied, not yet logged

    # ------------------------------------------------------------------------------- the live branch

    def track_step(self, step: int, ev: dict[str, Any]) -> tuple[float, float]:
        """Record a step event (live and when restoring); returns its (loss, lr)."""
        loss, lr = as_float(ev.get("loss")), as_float(ev.get("lr"))
        self.losses[step] = loss
        if is_positive_finite(lr):
            self.lrs[step] = lr
            self.peak_lr = max(self.peak_lr, lr)  # warmup included: the LRs actually trained at
            if step > self.warmup_steps:  # update number step-1 is past the warmup
                self.min_lr = min(self.min_lr, lr)
        return loss, lr

    def track_observe(self, step: int, ev: dict[str, Any], lr_in_force: float) -> tuple[list[float], float, float]:
        """Record a decision point (live and when restoring); returns (losses, mean, lr). An observe event
        without a usable LR gets `lr_in_force`."""
        raw = ev.get("losses")
        recent = [as_float(x) for x in raw] if isinstance(raw, list) else []
        lr = as_float(ev.get("lr"))
        lr = lr if is_positive_finite(lr) else lr_in_force
        mean = finite_mean(recent)
        self.record_point(step, mean, lr)
        return recent, mean, lr

    def record_point(self, step: int, mean: float, lr: float) -> None:
        """One entry per decision point on the current branch (a re-observed point replaces the old one,
        unless it has no losses of its own, as right after a resume from that very step)."""
        old = next((v for s, v in self.loss_history if s == step), math.nan)
        self.loss_history = [(s, v) for s, v in self.loss_history if s < step]
        self.lr_history = [(s, v) for s, v in self.lr_history if s < step]
        self.loss_history.append((step, mean if math.isfinite(mean) else old))
        self.lr_history.append((step, lr))

    def truncate(self, step: int) -> None:
        """The trainer goes back to `step`: what happened after it is no longer the run's trajectory."""
        self.losses = {s: v for s, v in self.losses.items() if s <= step}
        self.lrs = {s: v for s, v in self.lrs.items() if s <= step}
        self.loss_history = [(s, v) for s, v in self.loss_history if s <= step]
        self.lr_history = [(s, v) for s, v in self.lr_history if s <= step]

    def head(self) -> int:
        """The last step of the branch (0 before any)."""
        return max(self.losses, default=0)

    # ------------------------------------------------------------------------------- restore from logs

    def replay(self, telemetry: Path, lr_in_force: float) -> tuple[dict[Any, int], dict[str, Any] | None]:
        """Rebuild the branch from RUN/telemetry.jsonl (every launch's lines, in order; a start event goes back
        to its step). Returns (seq -> step the trainer first applied that command, the last eval event)."""
        applied: dict[Any, int] = {}
        last_eval = None
        for ev in iter_jsonl(telemetry):
            kind, step = ev.get("event"), ev.get("step")
            if not isinstance(step, int):
                continue
            if kind == "start":
                self.truncate(step)
            elif kind == "step":
                self.track_step(step, ev)
            elif kind == "observe":
                self.track_observe(step, ev, lr_in_force)
            elif kind == "applied":
                applied.setdefault(ev.get("seq"), step)
            elif kind == "eval":
                last_eval = ev
        return applied, last_eval

    def restore_sent(
        self, run_dir: Path, run_start_iso: str, logged: Iterable[dict[str, Any]], applied: dict[Any, int]
    ) -> list[dict[str, Any]]:
        """Decisions sent (RUN/decisions_sent.jsonl, RUN/control.jsonl) but not in the decision log (`logged`)
        when the supervisor died. Returns those the trainer applied (effective_step set), to be logged now; those
        it never applied are kept in `unapplied_sent` (sent again on resume, logged once applied)."""
        seqs = {d.get("seq") for d in logged}
        sent = {c.get("seq") for c in iter_jsonl(Path(run_dir) / CONTROL_FILE)}
        ahead = list(iter_jsonl(Path(run_dir) / SENT_FILE))
        resent = {r.get("resent_from_seq") for r in ahead if r.get("resent_from_seq") is not None}
        out = []
        for rec in ahead:
            seq = rec.get("seq")
            if rec.get("run_start_iso") != run_start_iso or seq in seqs or seq not in sent or seq in resent:
                continue
            rec["effective_step"] = applied.get(seq)
            seqs.add(seq)
            if rec["effective_step"] is None and isinstance(rec.get("step"), int):
                self.unapplied_sent.append(rec)
                continue
            out.append(rec)
        return out

    def restore_rollback_points(self, rollbacks_log: Path, run_start_iso: str) -> None:
        """The branches abandoned by this run's crash rollbacks, from the rollback log."""
        for r in iter_jsonl(rollbacks_log):
            if r.get("run_start_iso") == run_start_iso and isinstance(r.get("rolled_back_to_step"), int):
                self.rollback_points.append((int(r.get("launch") or 0), int(r["rolled_back_to_step"])))

    # ------------------------------------------------------------------------------- resuming the branch

    def claims(self, step: int, decisions: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Decision records of this run that say the trainer used their LR from an update after `step` on the
        branch being resumed (an emergency cut, a rollback's relaunch and any later rollback of it excluded)."""
        out = []
        for rec in decisions:
            eff = rec.get("effective_step")
            if rec.get("kind") not in _LR_KINDS or not isinstance(eff, int) or eff <= step:
                continue
            launch = rec.get("launch") if isinstance(rec.get("launch"), int) else 0
            # a rollback after the decision that went back before its effective step abandoned it
            if any(launch <= rb_launch and to < eff for rb_launch, to in self.rollback_points):
                continue
            out.append(rec)
        return sorted(out, key=lambda r: (r["effective_step"], r.get("seq") or 0))

    def plan_resume(
        self, step: int, decisions: Iterable[dict[str, Any]], run_dir: Path, note: Callable[[str], Any]
    ) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], list[dict[str, Any]]]:
        """What a relaunch from `step` sends so that it trains the branch its logs describe: (record, command) of
        every claimed decision, to be sent again with at_step = its effective step (its decision point is marked
        answered), and the sent-but-unapplied records to send again now (a later one waits in `answered` for
        its decision point). A claim whose command is not in RUN/control.jsonl gets a note and is dropped."""
        commands = {c.get("seq"): c for c in iter_jsonl(Path(run_dir) / CONTROL_FILE)}
        resend: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for rec in self.claims(step, decisions):
            cmd = commands.get(rec.get("seq"))
            if cmd is None or not is_positive_finite(cmd.get("lr")):
                note(f"resume: command seq={rec.get('seq')} of the decision at step {rec['step']} not in "
                     f"{CONTROL_FILE}; not re-applied")  # fmt: skip
                continue
            resend.append((rec, cmd))
            if int(rec["step"]) > step:
                self.answered[int(rec["step"])] = None
        now = []
        for rec in self.unapplied_sent:
            if int(rec["step"]) > step and int(rec["step"]) not in self.answered:
                self.answered[int(rec["step"])] = rec
            else:
                now.append(rec)
        self.unapplied_sent = []
        return resend, now


__all__ = ["SENT_FILE", "BranchHistory", "read_round_file"]
