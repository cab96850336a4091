"""lrpilot: LLM agents discover learning-rate schedules for LM pre-training; plain code keeps the run alive."""

__version__ = "0.1.0"
