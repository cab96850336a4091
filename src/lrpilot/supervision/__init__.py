"""The round supervisor's parts that own state of their own (lrpilot.supervisor wires them into a round):

- process.TrainerProcess: one trainer launch at a time (start, follow its start event, exit code, hang, kill)
- history.BranchHistory: the branch of the trajectory the trainer is on and its restore from the run's logs
- recovery.CrashRecovery: crash counting, the checkpoint to roll back to, agent rollbacks, disk failures

    python -m pytest -q tests/test_supervision.py
"""

from __future__ import annotations

from lrpilot.errors import LrpilotError


class SupervisorError(LrpilotError):
    """The round cannot be run as asked (a used run directory without resume=True or with other settings, or
    a trainer that rejects its config, data, flags or checkpoint: exit code 2 is never retried)."""


__all__ = ["SupervisorError"]
