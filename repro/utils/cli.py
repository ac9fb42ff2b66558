"""Thin-CLI plumbing shared by every step: one parser shape (`--config`, accumulating `--set`, the example
commands at the end of `--help`), one tail (`run_step`), one-line errors, non-zero exit, advice that names
the config."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import shlex
import sys
from typing import Callable, Iterator, Optional, TypeVar

from repro.errors import Preempted, ReproError

T = TypeVar("T")

# Library messages cannot know which config the user ran with, so their advice says `--config C`
# (or `--base C`, step 3's old spelling, still accepted); a step that knows it puts the real name there
# (see `naming_config`).
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


def example_commands(doc: str) -> str:
    """The example commands of a step's docstring: its paragraphs indented by 4+ spaces (the command lines,
    their `\\` continuations and the `# notebook:` calls), as they appear there."""
    return "\n\n".join("\n".join(lines) for lines in _paragraphs(doc) if _is_example(lines))


def step_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A step's parser: the docstring's prose above the options, its example commands below them, so
    `--help` ends with commands that run as printed."""
    prose = "\n\n".join("\n".join(lines) for lines in _paragraphs(doc) if not _is_example(lines))
    return argparse.ArgumentParser(prog=prog, description=prose, epilog="examples:\n" + example_commands(doc),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str, *, required: bool = True,
                         aliases: tuple[str, ...] = (), set_help: str = "config overrides") -> None:
    """`--config` and `--set` as every step spells them. `--set` accumulates: `--set a=1 --set b=2` and
    `--set a=1 b=2` both give [a=1, b=2] (a plain nargs="+" would keep only the last one)."""
    parser.add_argument("--config", *aliases, dest="config", required=required, help=config_help)
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help=f"{set_help}; repeatable: --set a=1 --set b=2 keeps both")


def run_step(body: Callable[[], T], finish: Optional[Callable[[T], Optional[str]]] = None) -> T:
    """The end every step's `cli` shares: `body` under `run_cli`, the process group shut down whatever
    happens (torchrun or not), then `finish(result)` on every rank, which may raise a ReproError (exit 1)
    or return a closing line that rank 0 prints."""
    from repro.utils import distributed  # here, so steps without torch.distributed never import it

    def whole() -> T:
        try:
            result = body()
            main_rank = distributed.is_main()  # asked before the group is gone
        finally:
            distributed.shutdown()
        line = finish(result) if finish is not None else None
        if line and main_rank:
            print(line, flush=True)
        return result

    return run_cli(whole)


def _paragraphs(doc: str) -> list[list[str]]:
    """The docstring's blank-line-separated paragraphs, each a list of lines (trailing spaces dropped)."""
    groups = itertools.groupby((doc or "").splitlines(), key=lambda line: bool(line.strip()))
    return [[line.rstrip() for line in lines] for text, lines in groups if text]


def _is_example(lines: list[str]) -> bool:
    return all(line.startswith("    ") for line in lines)
