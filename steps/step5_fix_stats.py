"""Step 5: validate and repair `latents_stats.pt` (the file behind upstream's `torch.cat` crash).

Checks `<data.data_path>/latents_stats.pt` (weights-only load; keys `mean`, `std`; each (1, C, 1, 1)
with C = model.in_chans; finite; std > 0) and prints a verdict. Repairs, keeping the old file as
`latents_stats.pt.bak-<timestamp>` and writing atomically:
  --refetch    the official file (step 2, asset `latents-stats`; the statistics of VA-VAE f16d32 on ImageNet)
  --recompute  from the latent shards in data.data_path (seeded subset of data.stats_subset latents,
               the same code as step 6)

    python -m steps.step5_fix_stats --config configs/tiny.yaml
    python -m steps.step5_fix_stats --config C --recompute --set data.data_path=data/latents
    python -m steps.step5_fix_stats --config C --refetch
    # notebook:  from steps.step5_fix_stats import main; main("configs/tiny.yaml", recompute=True)
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from pathlib import Path

from repro.config import Config, apply_overrides, load_config
from repro.data.latents import list_shards
from repro.data.stats import STATS_NAME, install_stats_file, validate_stats
from repro.data.stats_recompute import recompute_stats_file, repair_advice
from repro.errors import ConfigError, ReproError
from repro.paths import refuse_asset_markers, resolve_runs_markers
from repro.utils.cli import add_config_arguments, name_config, naming_config, run_step, step_parser
from repro.utils.io import wrote_line


def main(config: str | Config | None = None, recompute: bool = False, refetch: bool = False,
         set: list[str] | None = None, seed: int = 0) -> dict:
    """Validate (and with `recompute` / `refetch`, repair) the stats; returns dict(verdict, action, path)."""
    with naming_config(config):  # advice in errors names this config, not `--config C`
        return _main(config, recompute, refetch, set, seed)


def _main(config, recompute, refetch, set, seed) -> dict:
    if recompute and refetch:
        raise ConfigError("choose one repair: --recompute (from shards) or --refetch (official file), not both")
    cfg = apply_overrides(copy.deepcopy(config), set) if isinstance(config, Config) else load_config(config, set)
    resolve_runs_markers(cfg)  # runs:REL is a folder under the runs folder, as in every step
    refuse_asset_markers(cfg, ["data.data_path"])
    if not cfg.data.data_path:
        raise ConfigError("data.data_path is not set: pass --set data.data_path=DIR (the folder of "
                          f"{STATS_NAME} and the latent shards)")
    data_dir, channels = Path(cfg.data.data_path), cfg.model.in_chans
    path = data_dir / STATS_NAME
    verdict = validate_stats(path, channels)
    print(f"{STATS_NAME} verdict: {verdict}", flush=True)
    if not recompute and not refetch:
        if not verdict.ok:
            print(name_config(repair_advice(data_dir), config), flush=True)
        print(wrote_line([]) + f" (checked {path})", flush=True)
        return {"verdict": verdict, "action": "none", "path": str(path)}
    if recompute:
        action = recompute_stats_file(data_dir, channels, subset=cfg.data.stats_subset, seed=seed)
    else:
        from repro.hub import fetch_assets  # imported only when a refetch is asked for

        fetched = fetch_assets(["latents-stats"])[0].path  # step 2's verified download
        install_stats_file(fetched, path, channels)  # the official bytes, unchanged
        action = f"refetched from {fetched}"
    verdict = validate_stats(path, channels)
    print(f"{action}; {STATS_NAME} verdict now: {verdict}", flush=True)
    print(wrote_line([path]), flush=True)
    return {"verdict": verdict, "action": action, "path": str(path)}


def build_parser() -> argparse.ArgumentParser:
    p = step_parser("python -m steps.step5_fix_stats", __doc__)
    add_config_arguments(p, "YAML config (data.data_path, model.in_chans)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--recompute", action="store_true", help="recompute from the latent shards")
    group.add_argument("--refetch", action="store_true", help="download the official file (step 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent subset (--recompute)")
    return p


def cli(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)

    def refuse_unusable(result: dict) -> None:
        if not result["verdict"].ok:  # the fix as commands: this very command line with a repair flag
            again = shlex.join(["python", "-m", "steps.step5_fix_stats", *(sys.argv[1:] if argv is None else argv)])
            folder = Path(result["path"]).parent
            fixes = ([f"`{again} --recompute` (from the latent shards in {folder})"] if list_shards(folder) else [])
            fixes.append(f"`{again} --refetch` (the official file)")
            raise ReproError(f"{result['path']} is not usable: {result['verdict'].reason}; repair it with "
                             + " or ".join(fixes))

    return run_step(lambda: main(args.config, recompute=args.recompute, refetch=args.refetch, set=args.set,
                                 seed=args.seed), finish=refuse_unusable)


if __name__ == "__main__":
    cli()
