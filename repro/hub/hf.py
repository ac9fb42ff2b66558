"""Hugging Face files: metadata through huggingface_hub, bytes through our resumable downloader.

Why not plain `hf_hub_download`: huggingface_hub 2.4.0 writes each download to a process-unique
`<etag>.<uuid>.incomplete` file and deletes it on failure, so a download killed mid-file (a notebook
that died) restarts from zero; and it checks only the size, not the sha256. Here:

- settings are read from the environment at call time (HF_ENDPOINT, HF_TOKEN, HF_HOME/HF_HUB_CACHE,
  HF_HUB_OFFLINE, HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT): huggingface_hub freezes its
  constants at import, which surprises notebook users who set os.environ afterwards;
- `get_hf_file_metadata` (a HEAD on /resolve, no redirect to the CDN followed) gives the commit,
  the LFS sha256 (X-Linked-Etag), the size (X-Linked-Size) and the CDN location;
- the bytes stream from that location into `blobs/<sha256>.incomplete` (a fixed name, so the next
  run resumes it with a Range request), are verified, then renamed to `blobs/<sha256>` and linked
  from `snapshots/<commit>/<file>`: the standard cache layout, so `hf_hub_download(...)` finds it too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

from repro import __version__
from repro.hub.download import (AuthError, DownloadError, Downloaded, NetworkError, NotFoundError, OfflineError,
                                download_url)
from repro.hub.manifest import AssetSpec
from repro.utils.io import atomic_write_text

DEFAULT_ENDPOINT = "https://huggingface.co"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TRUE = ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class HubSettings:
    endpoint: str
    cache_dir: Path
    token: str | None
    offline: bool
    etag_timeout: float
    download_timeout: float


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


def hub_settings(offline: bool = False) -> HubSettings:
    """The Hub settings a user expects from the environment right now (see module docstring)."""
    from huggingface_hub import constants

    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    env_offline = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        from huggingface_hub import get_token

        token = get_token()  # `hf auth login` token file / Colab secret
    return HubSettings(
        endpoint=(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
        cache_dir=Path(os.path.expandvars(os.path.expanduser(cache))),
        token=token or None,
        offline=bool(offline or env_offline in _TRUE or constants.HF_HUB_OFFLINE),
        etag_timeout=_env_float("HF_HUB_ETAG_TIMEOUT", 10.0),
        download_timeout=_env_float("HF_HUB_DOWNLOAD_TIMEOUT", 10.0),
    )


def storage_folder(spec: AssetSpec, settings: HubSettings) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return settings.cache_dir / repo_folder_name(repo_id=spec.repo_id, repo_type=spec.repo_type)


def cached_file(spec: AssetSpec, settings: HubSettings) -> tuple[Path, str | None] | None:
    """(path, sha256 named by its blob) of the file in the HF cache for the spec's revision, or None.

    LFS blobs are named by their sha256, so a cached file can be verified without the network.
    """
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec.repo_id, spec.filename, cache_dir=settings.cache_dir,
                                   revision=spec.revision, repo_type=spec.repo_type)
    if not isinstance(found, str) or not os.path.isfile(found):
        return None
    blob_name = Path(os.path.realpath(found)).name
    return Path(found), (blob_name if _SHA256.match(blob_name) else None)


@dataclass(frozen=True)
class RemoteFile:
    resolve_url: str
    location: str  # where the bytes are (CDN for LFS files)
    commit_hash: str
    etag: str  # blob name in the cache: the sha256 for LFS files, the git sha1 otherwise
    sha256: str | None  # advertised LFS sha256, None for small non-LFS files
    size: int | None


def _where(spec: AssetSpec, settings: HubSettings) -> str:
    return f"{spec.name} ({settings.endpoint}/{spec.repo_id}, revision {spec.revision}, file {spec.filename})"


def resolve_remote(spec: AssetSpec, settings: HubSettings) -> RemoteFile:
    """HEAD the file on the Hub; every failure becomes a one-line ReproError naming asset/repo/file."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (FileMetadataError, GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    where = _where(spec, settings)
    if settings.offline:
        raise OfflineError(f"{where}: offline mode (--offline or HF_HUB_OFFLINE=1) and the file is not on disk; "
                           f"run once with network, or put the file under --dest or a search folder")
    url = hf_hub_url(spec.repo_id, spec.filename, repo_type=spec.repo_type, revision=spec.revision,
                     endpoint=settings.endpoint)
    token_hint = "set HF_TOKEN to a token that can read it" if not settings.token else "check that HF_TOKEN can read it"
    try:
        meta = get_hf_file_metadata(url, token=settings.token or False, timeout=settings.etag_timeout,
                                    endpoint=settings.endpoint, library_name="repro", library_version=__version__)
    except GatedRepoError:
        raise AuthError(f"{where}: gated repo, access denied; accept its terms at {settings.endpoint}/"
                        f"{spec.repo_id} and {token_hint}") from None
    except RepositoryNotFoundError:
        # The Hub answers 401 for both missing and private repos (X-Error-Code: RepoNotFound).
        raise NotFoundError(f"{where}: repository not found (or private); check repo_id in the manifest, "
                            f"and for a private repo {token_hint}") from None
    except RevisionNotFoundError:
        raise NotFoundError(f"{where}: revision {spec.revision!r} not found; check 'revision' in the manifest") from None
    except RemoteEntryNotFoundError:
        raise NotFoundError(f"{where}: file not found in the repository; check 'filename' in the manifest") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        if status in (401, 403):
            raise AuthError(f"{where}: unauthorised (HTTP {status}); {token_hint}") from None
        raise DownloadError(f"{where}: the Hub answered HTTP {status}; try again later") from None
    except (httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError) as e:
        raise NetworkError(f"{where}: cannot reach {settings.endpoint} ({type(e).__name__}); check the network or "
                           f"HF_ENDPOINT, or use --offline with files already on disk") from None
    except OfflineModeIsEnabled:
        raise OfflineError(f"{where}: HF_HUB_OFFLINE was set when huggingface_hub was imported and the file is "
                           f"not on disk") from None
    except FileMetadataError as e:
        raise DownloadError(f"{where}: {settings.endpoint} does not answer like a Hugging Face Hub "
                            f"({' '.join(str(e).split())[:160]})") from None
    if meta.commit_hash is None or meta.etag is None:
        raise DownloadError(f"{where}: the Hub's answer lacks X-Repo-Commit/ETag; is HF_ENDPOINT a Hub mirror?")
    sha = meta.etag if _SHA256.match(meta.etag) else None
    return RemoteFile(resolve_url=url, location=urljoin(url, meta.location), commit_hash=meta.commit_hash,
                      etag=meta.etag, sha256=sha, size=meta.size)


def _request_headers(remote: RemoteFile, settings: HubSettings) -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers(token=settings.token or False, library_name="repro", library_version=__version__)
    same_origin = remote.location.split("/")[:3] == remote.resolve_url.split("/")[:3]
    if not same_origin:
        headers.pop("authorization", None)  # signed CDN URL: the token must not leave the Hub
    return headers


def partial_path(spec: AssetSpec, remote: RemoteFile, settings: HubSettings, dest: Path | None) -> Path:
    """Where the bytes of an unfinished download live (what the next run resumes)."""
    if dest is not None:
        return dest / (spec.filename + ".part")
    # Same name pattern huggingface_hub's cache scanner reports as an incomplete download.
    return storage_folder(spec, settings) / "blobs" / f"{remote.etag}.incomplete"


def download_hf(spec: AssetSpec, remote: RemoteFile, settings: HubSettings, dest: Path | None = None,
                expected_sha256: str | None = None) -> Downloaded:
    """Fetch into `dest/filename`, or into the HF cache layout when `dest` is None; verify; return the path."""
    from huggingface_hub.file_download import repo_folder_name

    what = _where(spec, settings)
    kwargs = dict(expected_size=remote.size, expected_sha256=expected_sha256 or remote.sha256,
                  headers=_request_headers(remote, settings), what=what, label=spec.name,
                  connect_timeout=settings.etag_timeout, read_timeout=max(settings.download_timeout, 10.0))
    if dest is not None:
        return download_url(remote.location, dest / spec.filename, **kwargs)
    storage = storage_folder(spec, settings)
    blob = storage / "blobs" / remote.etag
    lock = settings.cache_dir / ".locks" / repo_folder_name(repo_id=spec.repo_id, repo_type=spec.repo_type) \
        / f"{remote.etag}.lock"  # the lock huggingface_hub itself takes for this blob
    lock.parent.mkdir(parents=True, exist_ok=True)
    got = download_url(remote.location, blob, part_path=partial_path(spec, remote, settings, None),
                       lock_path=lock, **kwargs)
    pointer = _link_snapshot(storage, blob, remote.commit_hash, spec.filename)
    if spec.revision != remote.commit_hash:
        atomic_write_text(storage / "refs" / spec.revision, remote.commit_hash)
    return Downloaded(path=pointer, size=got.size, sha256=got.sha256, resumed_from=got.resumed_from)


def _link_snapshot(storage: Path, blob: Path, commit: str, filename: str) -> Path:
    """snapshots/<commit>/<filename> -> ../../blobs/<etag> (relative symlink, as huggingface_hub makes)."""
    pointer = storage / "snapshots" / commit / filename
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    except OSError:  # no symlinks (some Windows/FUSE mounts): the file lives in the snapshot itself
        os.replace(blob, pointer)
    return pointer
