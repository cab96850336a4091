"""A toy controller in one file: each decision moves the LR 10% toward half the warmup peak.

The whole recipe (CONTRIBUTING.md, Extending: a controller): a BaseController subclass, a build function
from the round's ControllerContext, and one registry line. `lrpilot campaign --controller toy-halfway` (in a
process that imported this module) then runs it through the same supervisor, guard and logs as the others.
"""

from __future__ import annotations

import math

from lrpilot.controllers import CONTROLLERS
from lrpilot.controllers.base import BaseController, ControllerSpec, Decision, Observation


class HalfwayController(BaseController):
    """lr <- lr + 0.1 * (init_lr / 2 - lr): a smooth, deterministic glide to half the peak."""

    name = "toy-halfway"
    blocking = True

    def decide(self, obs: Observation) -> Decision:
        target = obs.init_lr / 2
        lr = obs.lr + 0.1 * (target - obs.lr) if math.isfinite(obs.lr) and obs.lr > 0 else target
        return Decision(lr=lr, reason=f"toy: {lr:.3e}, 10% of the way to {target:.3e}")


CONTROLLERS.add(
    "toy-halfway", ControllerSpec(build=lambda ctx: HalfwayController()), help="toy: glide to half the peak"
)
