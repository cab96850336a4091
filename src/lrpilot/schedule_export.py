"""`lrpilot export-schedule DIR --round R --out plan.json`: a discovered schedule, replayable in any loop.

    lrpilot export-schedule runs/rules --round 3 --out plan.json
    pilot = Pilot(optimizer, controller="replay:plan.json", total_steps=..., warmup_steps=..., init_lr=...)

DIR is a campaign directory or a Pilot's run directory (final_results.jsonl + decisions.jsonl). The file holds
the round's decision records (the fields lrpilot.controllers.replay.ReplayController reads: step, new_lr,
effective_step, kind, rollback_to_step, reasoning, raw_reply, plan, plan_knots) and the settings the schedule was found under
(warmup_steps, decision_every, init_lr, total_steps): replay it with the same settings to reproduce its LR at
every step (the guard applies its rules again). Never imports torch.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from lrpilot.errors import LrpilotError, writing_output
from lrpilot.logs import iter_jsonl, now_iso, write_json_atomic

SCHEDULE_FORMAT = "lrpilot-schedule"
#: the decision-record fields a replay needs (and the published ones, for a reader)
_KEEP = ("run_start_iso", "step", "loss", "old_lr", "new_lr", "effective_step", "kind", "reasoning",
         "rollback_to_step", "raw_reply", "seq", "plan", "plan_knots")  # fmt: skip


class ExportError(LrpilotError, ValueError):
    """The directory or round cannot be exported; the message names it and the fix."""


def export_schedule(directory: str | Path, round: int | None, out: str | Path) -> dict[str, Any]:
    """Write the schedule of round `round` (None: the directory must hold one round) of `directory` to `out`;
    returns what was written. Raises ExportError naming the missing file or round."""
    d = Path(directory)
    finals_path = d / "final_results.jsonl"
    if not finals_path.is_file():
        raise ExportError(f"export-schedule {d}: no final_results.jsonl; give a campaign or Pilot run directory")
    finals = []
    for rec in iter_jsonl(finals_path):
        r = rec.get("round")
        if r is not None and (isinstance(r, bool) or not isinstance(r, int)):
            # as the report does with a record it cannot number: skipped, said once, the rest exported
            warnings.warn(f"{finals_path}: a record with round {r!r} (not an integer) skipped", stacklevel=2)
            continue
        finals.append(rec)
    rounds = sorted({r.get("round") for r in finals if r.get("round") is not None})
    if round is None:
        if len(finals) != 1:
            raise ExportError(f"export-schedule {d}: holds rounds {rounds}; pick one with --round R")
        rec = finals[0]
    else:
        mine = [r for r in finals if r.get("round") == round]
        if not mine:
            raise ExportError(f"export-schedule {d}: no round {round}; rounds in final_results.jsonl: {rounds}")
        rec = mine[-1]
    iso = rec.get("run_start_iso")
    decisions = [
        {k: x[k] for k in _KEEP if k in x}
        for x in iter_jsonl(d / "decisions.jsonl")
        if x.get("run_start_iso") == iso and (round is None or x.get("round", round) == round)
    ]
    settings = rec.get("settings") if isinstance(rec.get("settings"), dict) else {}
    plan = {
        "format": SCHEDULE_FORMAT,
        "version": 1,
        "exported": now_iso(),
        "source": str(d),
        "round": rec.get("round"),
        "run_start_iso": iso,
        "controller": rec.get("controller"),
        "final_eval_loss": rec.get("final_eval_loss"),
        "final_eval_ppl": rec.get("final_eval_ppl"),
        "warmup_steps": rec.get("warmup_steps"),
        "decision_every": rec.get("decision_every"),
        "init_lr": rec.get("init_lr"),
        "total_steps": settings.get("total_steps", rec.get("update_step")),
        "decisions": decisions,
    }
    with writing_output("--out", out):  # /proc/x.json: one line naming --out, not a traceback
        Path(out).parent.mkdir(parents=True, exist_ok=True)  # export-schedule --out plans/p.json: plans/ is made
        write_json_atomic(out, plan)
    return plan
