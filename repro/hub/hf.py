"""Hugging Face files: metadata through huggingface_hub, bytes through our resumable downloader.

Why not plain `hf_hub_download`: it writes each download to a process-unique `<etag>.<uuid>.incomplete`
file and deletes it on failure (2.4.0), so a download killed mid-file (a notebook that died) restarts
from zero; it checks only the size, not the sha256; and it builds cache paths from the server's
headers unchecked. Here:

- any huggingface_hub from MIN_HUB_VERSION (0.x, 1.x, 2.x) works, through its public API only
  (repro/hub/client.py);
- settings are read from the environment at call time (HF_ENDPOINT, HF_TOKEN, HF_TOKEN_PATH,
  HF_HOME/HF_HUB_CACHE, HF_HUB_OFFLINE, HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT): huggingface_hub
  freezes its constants at import, which surprises notebook users who set os.environ afterwards;
- `get_hf_file_metadata` (a HEAD on /resolve, no redirect to the CDN followed) gives the commit,
  the LFS sha256 (X-Linked-Etag), the size (X-Linked-Size) and the CDN location; each is checked
  (40/64 hex digits, http(s), a size >= 0) before any path is built from it (repro/hub/untrusted.py);
- the bytes stream from that location into `blobs/<sha256>.incomplete` (a fixed name, so the next
  run resumes it with a Range request), are verified, then renamed to `blobs/<sha256>` and linked
  from `snapshots/<commit>/<file>`: the standard cache layout, so `hf_hub_download(...)` finds it too.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn
from urllib.parse import urljoin, urlparse

from repro import __version__
from repro.hub import client
from repro.hub.client import MIN_HUB_VERSION, HubClientError, check_client_version, hub_errors  # noqa: F401
from repro.hub.download import (AuthError, DownloadError, Downloaded, HashMismatchError, NetworkError, NotFoundError,
                                OfflineError, download_url)
from repro.hub.manifest import AssetSpec
from repro.hub.untrusted import COMMIT, GIT_SHA1, SHA256, checked_hex, contained, shown
from repro.utils.io import atomic_write_text

DEFAULT_ENDPOINT = "https://huggingface.co"
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


def _token_file(home: str) -> str | None:
    """The token `hf auth login` saved, at HF_TOKEN_PATH or $HF_HOME/token as they are now."""
    try:
        return Path(os.environ.get("HF_TOKEN_PATH") or os.path.join(home, "token")).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def hub_settings(offline: bool = False) -> HubSettings:
    """The Hub settings a user expects from the environment right now (see module docstring)."""
    check_client_version()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    env_offline = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or _token_file(home) \
        or client.saved_token()  # the client's own lookup: a Colab secret, or its token path of import time
    return HubSettings(
        endpoint=(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
        cache_dir=Path(os.path.expandvars(os.path.expanduser(cache))),
        token=token or None,
        offline=bool(offline or env_offline in _TRUE or client.client_offline()),
        etag_timeout=_env_float("HF_HUB_ETAG_TIMEOUT", 10.0),
        download_timeout=_env_float("HF_HUB_DOWNLOAD_TIMEOUT", 10.0),
    )


def storage_folder(spec: AssetSpec, settings: HubSettings) -> Path:
    return settings.cache_dir / client.repo_folder_name(spec.repo_id, spec.repo_type)


def git_blob_id(path: str | os.PathLike) -> str:
    """The id git (and the Hub's ETag for a non-LFS file) gives these bytes: sha1(b"blob <size>\\0" + bytes)."""
    h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_file(spec: AssetSpec, settings: HubSettings) -> tuple[Path, str | None, str | None] | None:
    """(path, sha256, git blob id) of the file in the HF cache for the spec's revision, or None.

    Blobs are named by what the Hub's ETag said: the sha256 for an LFS file, the git blob id for a small
    non-LFS one; either way a cached file can be verified without the network (the other digest is None).
    """
    found = client.find_in_cache(spec.repo_id, spec.filename, cache_dir=settings.cache_dir,
                                 revision=spec.revision, repo_type=spec.repo_type)
    if not isinstance(found, str) or not os.path.isfile(found):
        return None
    blob_name = Path(os.path.realpath(found)).name
    return (Path(found), blob_name if SHA256.fullmatch(blob_name) else None,
            blob_name if GIT_SHA1.fullmatch(blob_name) else None)


@dataclass(frozen=True)
class RemoteFile:
    resolve_url: str
    location: str  # where the bytes are (CDN for LFS files)
    commit_hash: str  # 40 hex digits (checked)
    etag: str  # blob name in the cache: the sha256 for LFS files, the git sha1 otherwise (checked)
    sha256: str | None  # advertised LFS sha256, None for small non-LFS files
    size: int | None

    @property
    def git_blob(self) -> str | None:
        """The git blob id a non-LFS file's ETag is (None for an LFS file, which has its sha256)."""
        return self.etag if self.sha256 is None and GIT_SHA1.fullmatch(self.etag) else None


def _where(spec: AssetSpec, settings: HubSettings) -> str:
    return f"{spec.name} ({settings.endpoint}/{spec.repo_id}, revision {spec.revision}, file {spec.filename})"


def _hostile(spec: AssetSpec, settings: HubSettings):
    """The `fail` for remote values: one line naming the asset, the mirror, the value and what to do."""
    mirror = "HF_ENDPOINT" if os.environ.get("HF_ENDPOINT") else "the default endpoint"

    def fail(problem: str) -> NoReturn:
        raise DownloadError(f"{_where(spec, settings)}: the Hub at {settings.endpoint} ({mirror}) {problem}; "
                            f"nothing was written. A broken or hostile mirror: unset HF_ENDPOINT or point it at a "
                            f"mirror you trust, then run again")
    return fail


def _outside(spec: AssetSpec, settings: HubSettings):
    """The `fail` for a path that would leave its folder (header values are checked before, so a symlink)."""
    def fail(problem: str) -> NoReturn:
        raise DownloadError(f"{_where(spec, settings)}: refusing to write there: {problem}; nothing was written. "
                            f"A folder on that path is a symlink to elsewhere: remove it and run again")
    return fail


def _checked_metadata(meta, url: str, spec: AssetSpec, settings: HubSettings) -> RemoteFile:
    """Every header value a path or a request will be built from, checked (issue 17)."""
    fail = _hostile(spec, settings)
    commit = checked_hex(meta.commit_hash, (COMMIT,), "X-Repo-Commit", "a 40-hex-digit commit id", fail)
    etag = checked_hex(meta.etag, (SHA256, GIT_SHA1), "ETag/X-Linked-Etag",
                       "a 64-hex-digit sha256 (LFS file) or a 40-hex-digit git blob id", fail)
    location = urljoin(url, meta.location or url)
    if urlparse(location).scheme not in ("http", "https") or not urlparse(location).netloc:
        fail(f"redirected to Location: {shown(meta.location)}, expected an http(s) URL")
    if meta.size is not None and meta.size < 0:
        fail(f"sent X-Linked-Size/Content-Length: {shown(meta.size)}, expected a size in bytes")
    return RemoteFile(resolve_url=url, location=location, commit_hash=commit, etag=etag,
                      sha256=etag if SHA256.fullmatch(etag) else None, size=meta.size)


def _probe(where: str, settings: HubSettings) -> None:
    """Fail at once if the endpoint cannot be reached, whatever the client's retry policy.

    huggingface_hub 0.31-0.36 retries a failed metadata HEAD five times with back-off (about 23 s of
    waiting, "Retrying in 8s" warnings) and its public API cannot switch that off. So one HEAD on the
    endpoint's root with the kit's own transport (which honours the same proxy variables) comes
    first: any HTTP answer means reachable; no answer is the NetworkError the user needs, now.
    """
    import requests

    try:
        requests.head(settings.endpoint + "/", timeout=(settings.etag_timeout, settings.etag_timeout),
                      allow_redirects=False).close()
    except requests.exceptions.RequestException as e:
        raise NetworkError(f"{where}: cannot reach {settings.endpoint} ({type(e).__name__}); check the network or "
                           f"HF_ENDPOINT, or use --offline with files already on disk") from None


def resolve_remote(spec: AssetSpec, settings: HubSettings, probe: bool = True) -> RemoteFile:
    """HEAD the file on the Hub; every failure becomes a one-line ReproError naming asset/repo/file.
    `probe=False` skips the reachability check (a caller resolving several files probes with the first)."""
    where = _where(spec, settings)
    if settings.offline:
        raise OfflineError(f"{where}: offline mode (--offline or HF_HUB_OFFLINE=1) and the file is not on disk; "
                           f"run once with network, or put the file under --dest or a search folder")
    if probe:
        _probe(where, settings)
    url = client.file_url(spec.repo_id, spec.filename, repo_type=spec.repo_type, revision=spec.revision,
                          endpoint=settings.endpoint)
    token_hint = "set HF_TOKEN to a token that can read it" if not settings.token else "check that HF_TOKEN can read it"
    # Most specific first: GatedRepoError is a RepositoryNotFoundError, all four are HfHubHTTPErrors.
    gated, no_repo = hub_errors("GatedRepoError"), hub_errors("RepositoryNotFoundError")
    no_revision = hub_errors("RevisionNotFoundError")
    no_entry = hub_errors("RemoteEntryNotFoundError", "EntryNotFoundError")
    http_error, offline = hub_errors("HfHubHTTPError"), hub_errors("OfflineModeIsEnabled")
    not_a_hub = hub_errors("FileMetadataError")
    try:
        meta = client.file_metadata(url, token=settings.token or False, timeout=settings.etag_timeout,
                                    endpoint=settings.endpoint, library_version=__version__)
    except gated:
        raise AuthError(f"{where}: gated repo, access denied; accept its terms at {settings.endpoint}/"
                        f"{spec.repo_id} and {token_hint}") from None
    except no_repo:
        # The Hub answers 401 for both missing and private repos (X-Error-Code: RepoNotFound).
        raise NotFoundError(f"{where}: repository not found (or private); check repo_id in the manifest, "
                            f"and for a private repo {token_hint}") from None
    except no_revision:
        raise NotFoundError(f"{where}: revision {spec.revision!r} not found; check 'revision' in the "
                            f"manifest") from None
    except no_entry:
        raise NotFoundError(f"{where}: file not found in the repository; check 'filename' in the manifest") from None
    except http_error as e:
        status = client.http_status(e)
        if status in (401, 403):
            raise AuthError(f"{where}: unauthorised (HTTP {status}); {token_hint}") from None
        raise DownloadError(f"{where}: the Hub answered HTTP {status}; try again later") from None
    except offline:
        raise OfflineError(f"{where}: HF_HUB_OFFLINE was set when huggingface_hub was imported and the file is "
                           f"not on disk") from None
    except not_a_hub as e:
        raise DownloadError(f"{where}: {settings.endpoint} does not answer like a Hugging Face Hub "
                            f"({' '.join(str(e).split())[:160]})") from None
    except Exception as e:
        if not client.is_transport_error(e):
            raise
        raise NetworkError(f"{where}: cannot reach {settings.endpoint} ({type(e).__name__}); check the network or "
                           f"HF_ENDPOINT, or use --offline with files already on disk") from None
    if meta.commit_hash is None or meta.etag is None:
        raise DownloadError(f"{where}: the Hub's answer lacks X-Repo-Commit/ETag; is HF_ENDPOINT a Hub mirror?")
    return _checked_metadata(meta, url, spec, settings)


def _request_headers(remote: RemoteFile, settings: HubSettings) -> dict[str, str]:
    headers = client.request_headers(settings.token or False, __version__)
    same_origin = remote.location.split("/")[:3] == remote.resolve_url.split("/")[:3]
    if not same_origin:  # signed CDN URL: the token must not leave the Hub
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    return headers


def _cache_paths(spec: AssetSpec, remote: RemoteFile, settings: HubSettings) -> tuple[Path, Path, Path, Path]:
    """(blob, partial, lock, snapshot pointer) in the HF cache, each checked to stay inside it.

    The root is the cache itself, so a folder inside it that was replaced by a symlink to elsewhere
    (blobs/, snapshots/<commit>/, .locks/...) is caught too, not only a name with '..' in it.
    """
    fail, root = _outside(spec, settings), settings.cache_dir
    storage = storage_folder(spec, settings)
    blob = contained(root, storage / "blobs" / remote.etag, fail)
    # Same name pattern huggingface_hub's cache scanner reports as an incomplete download.
    part = contained(root, storage / "blobs" / f"{remote.etag}.incomplete", fail)
    lock = contained(root, root / ".locks" / client.repo_folder_name(spec.repo_id, spec.repo_type)
                     / f"{remote.etag}.lock", fail)  # the lock huggingface_hub itself takes for this blob
    snapshot = storage / "snapshots" / remote.commit_hash
    pointer = contained(root, contained(snapshot, snapshot / spec.filename, fail), fail)
    return blob, part, lock, pointer


def partial_path(spec: AssetSpec, remote: RemoteFile, settings: HubSettings, dest: Path | None) -> Path:
    """Where the bytes of an unfinished download live (what the next run resumes)."""
    if dest is not None:
        return contained(dest, dest / (spec.local_file + ".part"), _outside(spec, settings))
    return _cache_paths(spec, remote, settings)[1]


def download_hf(spec: AssetSpec, remote: RemoteFile, settings: HubSettings, dest: Path | None = None,
                expected_sha256: str | None = None) -> Downloaded:
    """Fetch into `dest/<local file>` (`local_name`, else `filename`), or into the HF cache layout (always
    `filename`) when `dest` is None; verify; return the path."""
    what = _where(spec, settings)
    kwargs = dict(expected_size=remote.size, expected_sha256=expected_sha256 or remote.sha256,
                  headers=_request_headers(remote, settings), what=what, label=spec.name,
                  connect_timeout=settings.etag_timeout, read_timeout=max(settings.download_timeout, 10.0))
    if dest is not None:
        target = contained(dest, dest / spec.local_file, _outside(spec, settings))
        got = download_url(remote.location, target, part_path=partial_path(spec, remote, settings, dest), **kwargs)
        return _check_git_blob(got, remote, what) if expected_sha256 is None else got
    blob, part, lock, pointer = _cache_paths(spec, remote, settings)
    lock.parent.mkdir(parents=True, exist_ok=True)
    got = download_url(remote.location, blob, part_path=part, lock_path=lock, **kwargs)
    if expected_sha256 is None:
        _check_git_blob(got, remote, what)
    _link_snapshot(pointer, blob)
    if spec.revision != remote.commit_hash:
        refs = storage_folder(spec, settings) / "refs"
        ref = contained(refs, refs / spec.revision, _outside(spec, settings))
        atomic_write_text(contained(settings.cache_dir, ref, _outside(spec, settings)), remote.commit_hash)
    return Downloaded(path=pointer, size=got.size, sha256=got.sha256, resumed_from=got.resumed_from)


def _check_git_blob(got: Downloaded, remote: RemoteFile, what: str) -> Downloaded:
    """A non-LFS file has no sha256 on the Hub, but its ETag is its git blob id: check that instead."""
    if remote.git_blob is not None and (actual := git_blob_id(got.path)) != remote.git_blob:
        got.path.unlink(missing_ok=True)
        raise HashMismatchError(f"{what}: git blob id mismatch: the Hub's ETag says {remote.git_blob}, the bytes "
                                f"give {actual}; the downloaded file was deleted, run again (if it repeats, the "
                                f"mirror serves other bytes than it names: unset HF_ENDPOINT or try another)")
    return got


def _link_snapshot(pointer: Path, blob: Path) -> Path:
    """snapshots/<commit>/<filename> -> ../../blobs/<etag> (relative symlink, as huggingface_hub makes).

    Both paths were checked by `_cache_paths`: whatever is replaced here lies inside this repo's cache.
    """
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    except OSError:  # no symlinks (some Windows/FUSE mounts): the file lives in the snapshot itself
        os.replace(blob, pointer)
    return pointer
