"""Verified, resumable downloads of the kit's assets (step 2).

    from repro.hub import fetch_assets
    records = fetch_assets(["vavae-f16d32", "latents-stats"])   # -> list[AssetRecord]; writes runs/assets.json

Modules: `manifest` (configs/assets.yaml), `download` (resumable plain-HTTP downloader and the error
types), `hf` (Hugging Face files through huggingface_hub metadata + our resume), `assets` (find,
check disk, fetch, record).
"""

from repro.hub.assets import AssetRecord, fetch_assets, plain_cache_dir, write_assets_json
from repro.hub.download import (AuthError, DiskFullError, DownloadError, HashMismatchError, NetworkError,
                                NotFoundError, OfflineError, download_url)
from repro.hub.manifest import DEFAULT_MANIFEST, AssetSpec, Manifest, load_manifest
from repro.utils.io import sha256_file

__all__ = [
    "AssetRecord", "AssetSpec", "AuthError", "DEFAULT_MANIFEST", "DiskFullError", "DownloadError",
    "HashMismatchError", "Manifest", "NetworkError", "NotFoundError", "OfflineError", "download_url",
    "fetch_assets", "load_manifest", "plain_cache_dir", "sha256_file", "write_assets_json",
]
