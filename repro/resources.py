"""The kit's own files wherever the kit lives: its configs/ folder (the checkout's, or the copy
`pip install` ships as the package data `repro.configs`), presets by name, and its declared dependencies.

    find_config("tiny")                        # configs/tiny.yaml
    find_config("configs/train/tiny_stage_0.yaml")   # the same path as in the docs, from any folder
    configs_dir() / "assets.yaml"              # the asset manifest
"""

from __future__ import annotations

import os
from pathlib import Path


def configs_dir() -> Path:
    """The kit's `configs/` folder: the checkout's top-level configs/, or the copy `pip install` ships.

    An installed kit carries configs/ as the package data `repro.configs` (pyproject.toml maps it), so
    presets and the asset manifest are found from any working directory; a checkout that is merely
    importable (no install) has no `repro.configs` and uses the folder next to repro/.
    """
    import importlib.util

    spec = importlib.util.find_spec("repro.configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[1] / "configs"


CONFIGS_PREFIX = "configs/"


def find_config(name: str | os.PathLike) -> Path:
    """A config file from a path, a preset name ('tiny', 'train/tiny_stage_0') or a path written as in
    the kit's docs ('configs/train/tiny_stage_0.yaml'), which works from any folder once the kit is installed."""
    from repro.errors import ConfigError

    p = Path(name)
    folder = configs_dir()
    rel = Path(str(name)[len(CONFIGS_PREFIX):]) if str(name).startswith(CONFIGS_PREFIX) else p
    candidates = [p] if p.is_absolute() else [p, folder / rel, folder / f"{rel}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    presets = sorted(str(q.relative_to(folder).with_suffix("")) for q in folder.rglob("*.yaml")
                     if q.name != "assets.yaml")
    raise ConfigError(f"config not found: {name} (give a YAML path or a preset name: {', '.join(presets)})")


def installed_requirements() -> list[str]:
    """The kit's own dependencies from its installed metadata (pyproject.toml's `dependencies`, no extras):
    what step 1 checks when the kit was pip-installed, which ships no requirements.txt."""
    import importlib.metadata

    from repro.errors import ReproError

    try:
        from repro import DISTRIBUTION

        lines = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise ReproError("requirements.txt not found and the kit is not pip-installed: pass --requirements FILE "
                         "or run from the kit's folder") from None
    return [line for line in lines if "extra ==" not in line.replace('"', "").replace("'", "")]
