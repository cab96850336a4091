"""A toy guard rule: the whole of a new rule is this file (CONTRIBUTING.md "Extending > Guard rule")."""

from __future__ import annotations

from lrpilot import guard
from lrpilot.decision import GUARD_RULES, GuardContext, GuardRule

#: the LR the toy rule never lets a decision exceed
TOY_CAP = 1e-3


class ToyCapRule(GuardRule):
    """Caps every decision's LR (and a plan's knots) at TOY_CAP."""

    name = "toy_cap"

    def bound_lr(self, lr: float, ctx: GuardContext) -> guard.ClampResult:
        if lr <= TOY_CAP:
            return guard.ClampResult(lr=lr, clamped=False)
        return guard.ClampResult(lr=TOY_CAP, clamped=True, reasons=(f"toy cap: {lr:.6g} > {TOY_CAP:g}",))

    def bound_plan(self, plan: tuple[tuple[int, float], ...], ctx: GuardContext) -> guard.PlanResult:
        capped = tuple((s, min(lr, TOY_CAP)) for s, lr in plan)
        return guard.PlanResult(plan=capped, reasons=("toy cap on the plan",) if capped != plan else ())


GUARD_RULES.add("toy_cap", ToyCapRule, help="toy: cap the LR at 1e-3")
