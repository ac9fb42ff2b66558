"""Where the kit keeps its run records (env report, asset table, resolved configs), and reading the asset table."""

from __future__ import annotations

import json
import os
from pathlib import Path


def runs_dir() -> Path:
    """`$REPRO_RUNS_DIR` if set, else `./runs` (relative to the working directory)."""
    return Path(os.environ.get("REPRO_RUNS_DIR", "runs"))


RUNS_MARKER = "runs:"


def runs_path(value: str) -> Path:
    """`runs:REL` -> REL under the runs folder (absolute); any other value is a path as written."""
    if value.startswith(RUNS_MARKER):
        return (runs_dir() / value[len(RUNS_MARKER):].lstrip("/")).resolve()
    return Path(value)


def env_json() -> Path:
    return runs_dir() / "env.json"


def assets_json() -> Path:
    return runs_dir() / "assets.json"


def read_asset_table(path: str | os.PathLike | None = None) -> tuple[dict, Path]:
    """(entries, file) of step 2's asset table `{"assets": {NAME: {"path": ..., "sha256": ...}}}`.

    A table that does not exist yet has no entries; an unreadable or malformed one is an error naming
    the file (step 2 rewrites it), never an empty table.
    """
    from repro.errors import ConfigError

    src = Path(path) if path is not None else assets_json()
    if not src.exists():
        return {}, src
    fix = "run `python -m steps.step2_download` to rewrite it"
    try:
        data = json.loads(src.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"asset table {src} is unreadable ({e}): {fix}") from None
    entries = data.get("assets") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise ConfigError(f"asset table {src} has no 'assets' object: {fix}")
    return entries, src


def recorded_asset_path(entries: dict, name: str, folder: Path) -> Path | None:
    """Where the table says asset `name` is (None if it is not listed with a path).

    Relative paths are taken as seen from here, else from the table's `folder`; the result may not exist.
    """
    entry = entries.get(name)
    if not isinstance(entry, dict) or not entry.get("path"):
        return None
    p = Path(str(entry["path"])).expanduser()
    if not p.is_absolute():
        p = p if p.exists() else folder / p
    return p.absolute()  # keep the snapshot folder: resolve() would follow the HF cache link into blobs/
