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


class Preempted(ReproError):
    """SIGTERM/SIGINT stopped a run at a safe point (checkpoint or finished images written); the same
    command resumes it. The command line exits with 128 + the signal's number (143, 130)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
