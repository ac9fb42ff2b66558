"""Thin-CLI plumbing shared by every step: one-line errors, non-zero exit, advice that names the config."""

from __future__ import annotations

import contextlib
import re
import shlex
import sys
from typing import Callable, Iterator, Optional, TypeVar

from repro.errors import Preempted, ReproError

T = TypeVar("T")

# Library messages cannot know which config the user ran with, so their advice says `--config C`
# (or step 3's `--base C`); a step that knows it puts the real name there (see `naming_config`).
_PLACEHOLDER = re.compile(r"(--config|--base) C\b")


def run_cli(fn: Callable[[], T]) -> T:
    """Run a step's CLI body; a ReproError becomes `error: <message>` on stderr and exit code 1.

    A run stopped by SIGTERM/SIGINT at a safe point (Preempted) prints its message and exits
    with 128 + the signal number (143, 130), as a process killed by it would: schedulers that
    requeue preempted jobs by exit status still see a preemption. Anything else is a bug and keeps its
    traceback.
    """
    try:
        return fn()
    except Preempted as e:
        print(str(e), file=sys.stderr, flush=True)  # "stopped by SIGTERM at step N; ...; resume with the same command"
        raise SystemExit(e.exit_code) from None
    except ReproError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def name_config(text: str, config: Optional[object]) -> str:
    """`text` with the advice placeholder `--config C` / `--base C` replaced by the config's path or name."""
    if not isinstance(config, str) or not config:
        return text
    return _PLACEHOLDER.sub(lambda m: f"{m.group(1)} {shlex.quote(config)}", text)


@contextlib.contextmanager
def naming_config(config: Optional[object]) -> Iterator[None]:
    """Inside a step's `main`: a ReproError whose advice says `--config C` names the step's config instead,
    so the advice is a command that runs as printed (the error keeps its type and traceback)."""
    try:
        yield
    except ReproError as e:
        if e.args and isinstance(e.args[0], str):
            e.args = (name_config(e.args[0], config), *e.args[1:])
        raise
