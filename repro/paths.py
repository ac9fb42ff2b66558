"""Where the kit keeps its run records (env report, asset table, resolved configs)."""

from __future__ import annotations

import os
from pathlib import Path


def runs_dir() -> Path:
    """`$REPRO_RUNS_DIR` if set, else `./runs` (relative to the working directory)."""
    return Path(os.environ.get("REPRO_RUNS_DIR", "runs"))


def env_json() -> Path:
    return runs_dir() / "env.json"


def assets_json() -> Path:
    return runs_dir() / "assets.json"
