"""Step 2: download the kit's weights and reference files, verified and resumable.

    python -m steps.step2_download                                  # everything in configs/assets.yaml but groups
    python -m steps.step2_download --only imagenet256-latents       # a group: upstream's pre-extracted latents (63 GB)
    python -m steps.step2_download --only vavae-f16d32 latents-stats lightningdit-xl-800ep
    python -m steps.step2_download --dest /kaggle/working/weights   # files under a folder, not the HF cache
    python -m steps.step2_download --offline                        # only use what is on disk (or HF_HUB_OFFLINE=1)
    HF_ENDPOINT=https://hf-mirror.com python -m steps.step2_download   # a Hub mirror; HF_TOKEN for gated repos
    # notebook:  from steps.step2_download import main; assets = main(only=["vavae-f16d32", "latents-stats"])

Files already in the Hugging Face cache, under --dest or in the manifest's search folders
(/kaggle/input on Kaggle) are verified by sha256 and used without downloading. A killed download
resumes from the bytes on disk when the same command runs again. Writes runs/assets.json, which
step 3 reads to fill the config's paths; returns its content.
"""

from __future__ import annotations

import argparse

from repro import paths
from repro.hub import fetch_assets
from repro.utils.cli import run_cli, step_parser
from repro.utils.io import wrote_line


def main(only: list[str] | None = None, dest: str | None = None, offline: bool = False,
         manifest: str | None = None) -> dict:
    """Fetch (or find) the selected assets; returns the content of runs/assets.json."""
    records = fetch_assets(names=only, dest=dest, offline=offline, manifest=manifest)
    fetched = sum(r.source == "fetched" for r in records)
    recorded = f"{len(records)} asset file(s) ({fetched} fetched now, {len(records) - fetched} already present)"
    print(wrote_line([paths.assets_json(), recorded] if records else []), flush=True)
    return {"assets": paths.read_asset_table()[0]}


def build_parser() -> argparse.ArgumentParser:
    parser = step_parser("python -m steps.step2_download", __doc__)
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="asset or group names from the manifest (default: every asset outside a group)")
    parser.add_argument("--dest", metavar="DIR", help="put files under DIR instead of the HF cache")
    parser.add_argument("--offline", action="store_true", help="never touch the network (like HF_HUB_OFFLINE=1)")
    parser.add_argument("--manifest", metavar="FILE", help="asset manifest (default: configs/assets.yaml)")
    return parser


def cli(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: main(only=args.only, dest=args.dest, offline=args.offline, manifest=args.manifest))


if __name__ == "__main__":
    cli()
