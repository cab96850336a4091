"""lrpilot: LLM agents discover learning-rate schedules for LM pre-training; plain code keeps the run alive."""

__version__ = "0.1.0"

__all__ = ["Pilot", "PilotScheduler"]


def __getattr__(name: str):  # lazy: `import lrpilot` (the report, the CLI) must not import torch
    if name == "Pilot":
        from lrpilot.pilot import Pilot

        return Pilot
    if name == "PilotScheduler":
        from lrpilot.scheduler import PilotScheduler

        return PilotScheduler
    raise AttributeError(f"module 'lrpilot' has no attribute {name!r}")
