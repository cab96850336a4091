"""Controllers by name: `CONTROLLERS.get("rules")` is the ControllerSpec that `--controller rules` builds.

A new controller is one file (a BaseController subclass and a `SPEC = ControllerSpec(build=...)`) and one
line here, `CONTROLLERS.add_lazy("NAME", "lrpilot.controllers.FILE:SPEC", help="...")`; the CLI's choices,
its help and the unknown-name error come from this registry (CONTRIBUTING.md, Extending). Entries are lazy,
so naming a controller imports only its own module.
"""

from __future__ import annotations

from lrpilot.controllers.base import ControllerSpec
from lrpilot.registry import Registry

CONTROLLERS: Registry[ControllerSpec] = Registry("controller", field="--controller")
CONTROLLERS.add_lazy("llm", "lrpilot.controllers.llm:SPEC", help="an LLM agent")
CONTROLLERS.add_lazy("rules", "lrpilot.controllers.rules:SPEC", help="no-LLM heuristic")
CONTROLLERS.add_lazy("replay", "lrpilot.controllers.replay:SPEC", help="re-play another campaign")
# the baseline schedules (lrpilot.controllers.schedules.SCHEDULES) as campaign controllers, at the preset's init_lr
CONTROLLERS.add_lazy("cosine", "lrpilot.controllers.schedules:COSINE_SPEC", help="cosine schedule at the preset's peak")
CONTROLLERS.add_lazy("d2z", "lrpilot.controllers.schedules:D2Z_SPEC", help="linear decay to zero")
CONTROLLERS.add_lazy("wsd", "lrpilot.controllers.schedules:WSD_SPEC", help="warmup-stable-decay")
CONTROLLERS.add_lazy("constant", "lrpilot.controllers.schedules:CONSTANT_SPEC", help="constant LR")
