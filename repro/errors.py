"""One exception type for every user-facing failure.

Each message names the file, key or value at fault and says what to do, so a
notebook user never has to read a traceback to know the fix.
"""


class ReproError(RuntimeError):
    """A clear, actionable error caused by input, files or environment (not a bug)."""


class CheckpointError(ReproError):
    """A checkpoint file that cannot be loaded exactly (missing/unexpected keys, shapes, corruption)."""


class ConfigError(ReproError):
    """A config key or value that is unknown, mistyped or out of range."""
