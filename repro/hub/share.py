"""Share an exported model on the Hugging Face Hub, and fetch one back by its repo id.

    url = push_folder("my_model", "me/lightningdit-digits")      # create_repo + upload_folder (huggingface_hub)
    folder = fetch_shared("me/lightningdit-digits")              # -> the snapshot folder, every file verified

Pushing goes through huggingface_hub's upload API (`HfApi.create_repo`, `HfApi.upload_folder`, the endpoint
and token read from the environment now: HF_ENDPOINT, HF_TOKEN or `hf auth login`). Only the files the
export's index lists are uploaded.

Fetching is step 2's machinery (`repro.hub.hf`): the index `export.json` is resolved on the Hub (one HEAD:
the repo's current commit), then each file it lists is taken from the Hugging Face cache when it is there
with the index's sha256, else downloaded (resumable) and verified against that sha256. Offline
(HF_HUB_OFFLINE=1, or the Hub unreachable) the cached snapshot of the revision is used as it is, with the
same checks, and nothing is requested.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from repro import __version__
from repro.errors import ReproError
from repro.hub.download import NetworkError, NotFoundError, OfflineError
from repro.hub.export import INDEX, check_files, read_index
from repro.hub.hf import cached_file, download_hf, hub_settings, resolve_remote
from repro.hub.manifest import AssetSpec
from repro.utils.hashing import HashCache


def _spec(repo_id: str, filename: str, revision: str) -> AssetSpec:
    return AssetSpec(name=f"{repo_id}:{filename}", filename=filename, description="shared model file",
                     approx_size=0, repo_id=repo_id, revision=revision)


def _hub_failure(action: str, repo_id: str, endpoint: str, exc: BaseException) -> ReproError:
    """One line for a failed push: the repo, the endpoint, the HTTP status or the transport error, the fix."""
    from repro.hub.client import http_status, is_transport_error

    status = http_status(exc)
    if status == "?" and is_transport_error(exc):  # an HTTP error's class may derive from its transport's
        return NetworkError(f"{action} {repo_id}: cannot reach {endpoint} ({type(exc).__name__}); check the network "
                            "or HF_ENDPOINT, then run again")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    fix = ("set HF_TOKEN to a token with write access (or run `hf auth login`)" if status in (401, 403)
           else "check the repo id and try again")
    return ReproError(f"{action} {repo_id} on {endpoint} failed (HTTP {status}: {first}); {fix}")


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: Optional[bool] = None,
                token: Optional[str] = None, commit_message: Optional[str] = None) -> str:
    """Upload the exported `folder` to the model repo `repo_id` (created if missing); returns the repo's URL."""
    folder = Path(folder)
    info = read_index(folder)
    check_files(folder, info)  # never push a folder whose files no longer match their index
    settings = hub_settings()
    if settings.offline:
        raise OfflineError(f"push to {repo_id}: offline mode (HF_HUB_OFFLINE=1); unset it to upload")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=settings.endpoint, token=token or settings.token, library_name="repro",
                library_version=__version__)
    try:
        kwargs = {"private": private} if private is not None else {}
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True, **kwargs)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          allow_patterns=[INDEX, *info["files"]],
                          commit_message=commit_message or f"{info['model_type']} exported by repro {__version__}")
    except Exception as e:
        if isinstance(e, ReproError):
            raise
        raise _hub_failure("push to", repo_id, settings.endpoint, e) from None
    return str(url)


def fetch_shared(repo_id: str, revision: str = "main") -> Path:
    """The folder (the HF cache's snapshot of the revision) holding the exported model `repo_id`, verified."""
    settings = hub_settings()
    index_spec = _spec(repo_id, INDEX, revision)
    # Which commit: the Hub says (one HEAD); offline or unreachable, the cache's copy of the revision.
    try:
        remote = resolve_remote(index_spec, settings)
    except NotFoundError:
        raise NotFoundError(f"{repo_id} (revision {revision}) has no {INDEX}: it is not a model exported by this kit "
                            "(Pipeline.export / push_to_hub); for the official checkpoints load a preset, e.g. "
                            "Pipeline.from_pretrained('lightningdit_xl_800ep')") from None
    except (OfflineError, NetworkError) as e:
        hit = cached_file(index_spec, settings)
        if hit is None:
            raise type(e)(f"{repo_id}: {str(e).split(': ', 1)[-1].split(';')[0]}, and no copy of its revision "
                          f"{revision!r} is in the Hugging Face cache ({settings.cache_dir}); run once with network "
                          "(or check HF_HOME)") from None
        folder = hit[0].parent
        check_files(folder, read_index(folder))
        return folder
    commit = remote.commit_hash
    hit = cached_file(_spec(repo_id, INDEX, commit), settings)
    folder = (hit[0] if hit is not None else download_hf(index_spec, remote, settings).path).parent
    info = read_index(folder)
    # Each listed file: from the cache when its sha256 matches the index, else downloaded and verified.
    with HashCache() as cache:
        for name, entry in info["files"].items():
            spec = _spec(repo_id, name, commit)
            hit = cached_file(spec, settings)
            if hit is not None and cache.sha256(hit[0]) == entry.get("sha256"):
                continue
            got = download_hf(spec, resolve_remote(spec, settings, probe=False), settings,
                              expected_sha256=entry.get("sha256"))
            cache.remember(got.path, got.sha256)
    check_files(folder, info)
    return folder
