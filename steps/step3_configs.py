"""Step 3: resolve a preset into the config every later step runs with (and records).

    python -m steps.step3_configs --base configs/lightningdit_xl_800ep.yaml
    python -m steps.step3_configs --base tiny --set sample.cfg_scale=4.0 sample.per_proc_batch_size=8
    python -m steps.step3_configs --base lightningdit_xl_64ep --profile t4 --dry-run
    # notebook:  from steps.step3_configs import main; res = main(base="configs/tiny.yaml", set=["sample.seed=1"])

Fills `asset:NAME` / `asset-dir:NAME` / `runs:REL` paths from runs/assets.json (step 2), turns
`auto` precision and batch sizes into values for this machine from runs/env.json (step 1), applies
--set overrides (they win), prints every change, and writes runs/configs/<base>.resolved.yaml.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from repro.setup.resolve import HARDWARE_PROFILES, default_resolved_path, resolve_file, write_resolved
from repro.utils.cli import run_cli


def main(base: str, set: Optional[list[str]] = None, out: Optional[str] = None, dry_run: bool = False,
         assets: Optional[str] = None, env: Optional[str] = None, profile: Optional[str] = None) -> dict:
    """Returns {'config': Config, 'path': written file or None, 'changes': [str]}."""
    cfg, changes, base_path = resolve_file(base, overrides=set, assets=assets, env=env, profile=profile)
    print(f"base: {base_path}")
    for line in changes or ["(no changes: the preset is already concrete)"]:
        print(f"  {line}")
    path = None
    if not dry_run:
        path = write_resolved(cfg, out or default_resolved_path(base_path), base=base_path, changes=changes)
        print(f"wrote {path}", flush=True)
    return {"config": cfg, "path": path, "changes": changes}


def cli(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="preset YAML path or name (tiny, demo, lightningdit_xl_800ep, ...)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides such as sample.cfg_scale=4.0 (win over auto values)")
    p.add_argument("--out", default=None, help="output file (default runs/configs/<base>.resolved.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the changes, write nothing")
    p.add_argument("--assets", default=None, help="asset table (default runs/assets.json)")
    p.add_argument("--env", default=None, help="environment report (default runs/env.json)")
    p.add_argument("--profile", default=None, choices=sorted(HARDWARE_PROFILES),
                   help="plan for this hardware instead of the env report")
    args = p.parse_args(argv)
    run_cli(lambda: main(base=args.base, set=args.set, out=args.out, dry_run=args.dry_run,
                         assets=args.assets, env=args.env, profile=args.profile))


if __name__ == "__main__":
    cli()
