"""Graceful stop on SIGTERM / SIGINT: finish (or drop) the work in flight, save, exit resumable.

Kaggle's "stop", Colab's disconnect, SLURM's preemption and `torchrun`'s shutdown send SIGTERM;
Ctrl-C and a notebook's "interrupt" send SIGINT. Inside `with StopSignals(...) as stops:` the first
of either only sets `stops.signum`; the run checks it at its safe points (training: after an
optimizer step; sampling: between batches, or it drops the batch in flight), writes what it has and
raises `repro.errors.Preempted`, which the command line turns into exit code 128 + signal (143 for
SIGTERM, 130 for SIGINT) and a notebook cell into an error. A second signal stops at once
(`StopNow`, a KeyboardInterrupt carrying the signal): every file is written atomically, so even that
loses only unsaved work; a run with helper threads joins them first (a thread still inside torch when
the interpreter exits aborts the process: "terminate called without an active exception").

Handlers exist only inside the block and only in the main thread (Python delivers signals there);
the previous handlers (a notebook kernel's interrupt handler included) are restored on exit.
Under torchrun every process must stop at the same step: the loop reduces `signum` over all
processes on a CPU (gloo) group (`all_reduce_values(..., cpu=True)`), so checking never waits for the GPU.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator, Optional

from repro.utils import distributed as du

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class BatchDropped(BaseException):
    """Raised by the handler inside `stops.droppable()`: the work in flight is abandoned.

    A BaseException (like KeyboardInterrupt), so no `except Exception` on the way swallows it."""


class StopNow(KeyboardInterrupt):
    """The second signal: stop at once. A KeyboardInterrupt (a notebook cell treats it as one) that keeps
    the signal's number, so a run can still exit with 128 + signum (143 for a second SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """SIGTERM / SIGINT -> `self.signum`, for the duration of a `with` block (see the module docstring)."""

    def __init__(self, doing: str = "finishing the work in flight"):
        self.doing = doing
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}
        self._droppable = False

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise StopNow(signum)  # the second signal: stop now (files on disk are complete or absent)
        self.signum = signum
        # os.write, not print: a handler may run while the main thread is inside print on the same stream
        with contextlib.suppress(OSError):
            os.write(2, f"\n{signal_name(signum)} received: {self.doing} (send it again to stop at "
                        "once)\n".encode())
        if self._droppable:
            raise BatchDropped

    def agreed(self) -> int:
        """The signal number any process received (0 if none): the same answer on every process."""
        return int(du.all_reduce_values([float(self.signum or 0)], "max", cpu=True)[0])

    @contextlib.contextmanager
    def droppable(self) -> Iterator[None]:
        """Inside this block the first signal abandons the work at once (raises BatchDropped)."""
        self._droppable = True
        try:
            yield
        finally:
            self._droppable = False
