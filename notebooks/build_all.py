"""Rebuild every notebook from its builder (notebooks/build_*.py), or check that none is out of date.

    python notebooks/build_all.py            # writes every notebooks/*.ipynb that has a builder
    python notebooks/build_all.py --check    # exit 1 naming each notebook that differs from its builder

A builder is a `build_<anything>.py` here with `NOTEBOOKS = {"NN_name.ipynb": function returning the
notebook}` and a `main()`; adding one is all a new notebook needs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable

import nbformat

HERE = Path(__file__).resolve().parent


def builders() -> dict[str, Callable[[], nbformat.NotebookNode]]:
    """{notebook file name: build function} over every builder module next to this file."""
    found: dict[str, Callable[[], nbformat.NotebookNode]] = {}
    for path in sorted(HERE.glob("build_*.py")):
        if path.stem == "build_all":
            continue
        module = importlib.import_module(path.stem)
        for name, build in module.NOTEBOOKS.items():
            if name in found:
                raise SystemExit(f"{name} is built by two builders (the second: {path.name})")
            found[name] = build
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 if any differs")
    args = parser.parse_args(argv)
    from nbbuild import write

    stale = []
    for name, build in builders().items():
        nb = build()
        if not args.check:
            write(nb, name)
            continue
        path = HERE / name
        if not path.is_file() or path.read_text() != nbformat.writes(nb) + "\n":
            stale.append(name)
    if stale:
        print(f"out of date (run python notebooks/build_all.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
