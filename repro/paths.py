"""Where the kit keeps its run records (env report, asset table, resolved configs), and reading the asset table."""

from __future__ import annotations

import json
import os
from pathlib import Path

from repro.errors import ConfigError


def runs_dir() -> Path:
    """`$REPRO_RUNS_DIR` if set, else `./runs` (relative to the working directory)."""
    return Path(os.environ.get("REPRO_RUNS_DIR", "runs"))


RUNS_MARKER = "runs:"


def runs_path(value: str) -> Path:
    """`runs:REL` -> REL under the runs folder (absolute); any other value is a path as written."""
    if value.startswith(RUNS_MARKER):
        root = runs_dir().resolve()
        target = (root / value[len(RUNS_MARKER):].lstrip("/")).resolve()
        if target != root and root not in target.parents:  # runs:../x would leave the runs folder
            raise ConfigError(f"'{value}' points outside the runs folder {root}: write runs:SUBFOLDER, or give the "
                              "path itself without the runs: prefix")
        return target
    return Path(value)


ASSET_MARKER, ASSET_DIR_MARKER = "asset:", "asset-dir:"  # a file / a folder of step 2's asset table
ASSET_MARKERS = (ASSET_MARKER, ASSET_DIR_MARKER)


def asset_name(value: str) -> str | None:
    """NAME of an `asset:NAME` value, None for any other value."""
    return value[len(ASSET_MARKER):] if value.startswith(ASSET_MARKER) else None


def resolve_file_value(value: str | None, key: str) -> Path | None:
    """A config value naming one file -> its path, for the keys read where no step 3 ran (steps 9 and 10).

    `asset:NAME` -> the file step 2 recorded (None when the table lacks it or it is not on disk), `runs:REL`
    -> under the runs folder, anything else -> the path as written (which may not exist); None for an empty
    value. `asset-dir:` names a folder: a ConfigError naming `key`.
    """
    if value is None or value == "":
        return None
    name = asset_name(value)
    if name is not None:
        entries, table = read_asset_table()
        found = recorded_asset_path(entries, name, table.parent)
        return found if found is not None and found.is_file() else None
    if value.startswith(ASSET_DIR_MARKER):
        raise ConfigError(f"config key '{key}' is {value!r}: name a file (asset:NAME), not a folder")
    return runs_path(value)


def resolve_runs_markers(cfg) -> list[str]:
    """Every `runs:REL` string value of the Config `cfg` -> its path under the runs folder, in place.

    The one meaning of `runs:` (step 3's): steps 5-8 and training call this, so no step treats
    `runs:tiny/latents` as a folder of that literal name. Returns the changes, "key: old -> new".
    """
    from repro.config import flatten, set_key

    changes = []
    for key, value in flatten(cfg).items():
        if isinstance(value, str) and value.startswith(RUNS_MARKER):
            new = str(runs_path(value))
            set_key(cfg, key, new)
            changes.append(f"{key}: {value} -> {new}")
    return changes


def refuse_asset_markers(cfg, keys) -> None:
    """A ConfigError naming the first of `keys` that still holds an `asset:`/`asset-dir:` marker (only
    step 3 knows the asset table's paths), with the commands that fill it in."""
    from repro.config import flatten

    values = flatten(cfg)
    for key in keys:
        value = values.get(key)
        if isinstance(value, str) and value.startswith(ASSET_MARKERS):
            raise ConfigError(f"config key '{key}' is {value!r}, an asset marker that step 3 fills in: run "
                              f"`python -m steps.step3_configs --config C` and pass the config it writes to --config, "
                              f"or pass --set {key}=PATH")


def env_json() -> Path:
    return runs_dir() / "env.json"


def assets_json() -> Path:
    return runs_dir() / "assets.json"


def read_asset_table(path: str | os.PathLike | None = None) -> tuple[dict, Path]:
    """(entries, file) of step 2's asset table `{"assets": {NAME: {"path": ..., "sha256": ...}}}`.

    A table that does not exist yet has no entries; an unreadable or malformed one is an error naming
    the file (step 2 rewrites it), never an empty table.
    """
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
