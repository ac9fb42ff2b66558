"""Thin-CLI plumbing shared by every step: one-line errors, non-zero exit."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

from repro.errors import ReproError

T = TypeVar("T")


def run_cli(fn: Callable[[], T]) -> T:
    """Run a step's CLI body; a ReproError becomes `error: <message>` on stderr and exit code 1.

    Anything else is a bug and keeps its traceback.
    """
    try:
        return fn()
    except ReproError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
