"""One base class for every error lrpilot reports to a user as a single line (not a traceback)."""


class LrpilotError(Exception):
    """Bad input or an unusable environment; the message names the field or file and the fix."""
