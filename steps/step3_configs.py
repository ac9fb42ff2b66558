"""Step 3: resolve a preset into the config every later step runs with (and records).

    python -m steps.step3_configs --config configs/lightningdit_xl_800ep.yaml
    python -m steps.step3_configs --config tiny --set sample.cfg_scale=4.0 --set sample.per_proc_batch_size=8
    python -m steps.step3_configs --config lightningdit_xl_64ep --profile t4 --dry-run
    # notebook:  from steps.step3_configs import main; res = main(config="configs/tiny.yaml", set=["sample.seed=1"])

Fills `asset:NAME` / `asset-dir:NAME` / `runs:REL` paths from runs/assets.json (step 2), turns
`auto` precision and batch sizes into values for this machine from runs/env.json (step 1), applies
--set overrides (they win), prints every change, and writes runs/configs/<preset>.resolved.yaml.
With `vae.model_name: vfm_vae_f16d32` it also prints the VFM-VAE's computed memory budget (encode and decode
at the largest batch that fits) on the planned card(s): --profile, env.json's GPUs, or a T4 and an H100.
`--base` (and `main(base=...)`) is the old name of `--config` and still works.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from repro.errors import ConfigError
from repro.setup import envinfo
from repro.setup.resolve import HARDWARE_PROFILES, default_resolved_path, planned_gpus, resolve_file, write_resolved
from repro.utils.cli import add_config_arguments, run_cli, step_parser
from repro.utils.io import wrote_line


def main(config: Optional[str] = None, set: Optional[list[str]] = None, out: Optional[str] = None,
         dry_run: bool = False, assets: Optional[str] = None, env: Optional[str] = None,
         profile: Optional[str] = None, *, base: Optional[str] = None) -> dict:
    """Resolve the preset `config` (`base`: its old name); returns {'config': Config, 'path': written file
    or None, 'changes': [str]}."""
    if (config is None) == (base is None):
        raise ConfigError(f"step 3 takes one preset: pass config= (or its old name base=), got config={config!r} "
                          f"and base={base!r}")
    cfg, changes, base_path = resolve_file(config if base is None else base, overrides=set, assets=assets,
                                           env=env, profile=profile)
    print(f"base: {base_path}")
    for line in changes or ["(no changes: the preset is already concrete)"]:
        print(f"  {line}")
    from repro.tokenizer.loader import VFM_VAE

    if cfg.vae.model_name == VFM_VAE:  # its memory on the card(s) planned for (computed, repro.tokenizer.vfm_vae_budget)
        print("\n".join(envinfo.vfm_vae_budget_lines(planned_gpus(env, profile))), flush=True)
    path = None
    if not dry_run:
        path = write_resolved(cfg, out or default_resolved_path(base_path), base=base_path, changes=changes)
    print(wrote_line([path]) + (" (--dry-run)" if dry_run else ""), flush=True)
    return {"config": cfg, "path": path, "changes": changes}


def build_parser() -> argparse.ArgumentParser:
    p = step_parser("python -m steps.step3_configs", __doc__)
    add_config_arguments(p, "preset YAML path or name (tiny, demo, lightningdit_xl_800ep, ...); --base is its old name",
                         aliases=("--base",), set_help="overrides such as sample.cfg_scale=4.0 (win over auto values)")
    p.add_argument("--out", default=None, help="output file (default runs/configs/<preset>.resolved.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the changes, write nothing")
    p.add_argument("--assets", default=None, help="asset table (default runs/assets.json)")
    p.add_argument("--env", default=None, help="environment report (default runs/env.json)")
    p.add_argument("--profile", default=None, choices=sorted(HARDWARE_PROFILES),
                   help="plan for this hardware instead of the env report")
    return p


def cli(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    run_cli(lambda: main(config=args.config, set=args.set, out=args.out, dry_run=args.dry_run,
                         assets=args.assets, env=args.env, profile=args.profile))


if __name__ == "__main__":
    cli()
