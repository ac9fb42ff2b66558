"""Verified, resumable downloads of the kit's assets (step 2).

    from repro.hub import fetch_assets
    records = fetch_assets(["vavae-f16d32", "latents-stats"])   # -> list[AssetRecord]; writes runs/assets.json

    from repro.hub import check_client_version, MIN_HUB_VERSION  # step 1: is huggingface_hub recent enough?

Modules: `manifest` (configs/assets.yaml), `download` (resumable plain-HTTP downloader and the error
types), `client` (any huggingface_hub release through its public API), `untrusted` (checks on values
from the network), `hf` (Hugging Face files through huggingface_hub metadata + our resume), `assets`
(find, check disk, fetch, record).

Names are loaded on first use, so `from repro.hub.client import check_client_version` works before
requests, filelock or huggingface_hub are installed.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "AssetRecord": "assets", "fetch_assets": "assets", "plain_cache_dir": "assets", "write_assets_json": "assets",
    "AuthError": "download", "DiskFullError": "download", "DownloadError": "download",
    "HashMismatchError": "download", "NetworkError": "download", "NotFoundError": "download",
    "OfflineError": "download", "download_url": "download",
    "DEFAULT_MANIFEST": "manifest", "AssetSpec": "manifest", "Manifest": "manifest", "load_manifest": "manifest",
    "HubClientError": "client", "MIN_HUB_VERSION": "client", "check_client_version": "client",
}

__all__ = sorted([*_WHERE, "sha256_file"])


def __getattr__(name: str):
    if name == "sha256_file":
        from repro.utils.io import sha256_file

        return sha256_file
    if name not in _WHERE:
        raise AttributeError(f"module 'repro.hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"repro.hub.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
