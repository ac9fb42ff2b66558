"""One small resumable HTTP downloader, used for plain URLs and for Hugging Face LFS blobs.

    download_url(url, dest, expected_size=..., expected_sha256=..., what="fid-inception")

Bytes go to a partial file next to the destination (`dest.part`, or the caller's `part_path`); a
later run (even after SIGKILL) continues it with an HTTP Range request. Only a complete file whose
size and sha256 check out is renamed onto `dest`, so `dest` is never a half file. A wrong sha256
deletes the partial file and raises HashMismatchError. The partial and lock files are opened
without following symlinks: one planted there is refused, never written through.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, NoReturn
from urllib.parse import urlparse

import requests

from repro.errors import ReproError
from repro.hub.untrusted import open_no_follow, refuse_symlink, shown

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

CHUNK_SIZE = 1 << 20  # bytes per read/write: the most a kill or a dropped connection loses
MAX_RESUMES = 3  # reconnects within one run after a dropped stream that had made progress


class DownloadError(ReproError):
    """A file could not be fetched or verified."""


class NotFoundError(DownloadError):
    """The repo, revision or file does not exist on the server (404)."""


class AuthError(DownloadError):
    """Gated or private: the server wants a (different) token (401/403)."""


class NetworkError(DownloadError):
    """The server cannot be reached (DNS, refused, timeout)."""


class OfflineError(DownloadError):
    """Offline mode is on and the file is not on disk."""


class DiskFullError(DownloadError):
    """Not enough free disk space, before or during a download."""


class HashMismatchError(DownloadError):
    """The downloaded bytes do not match the expected sha256 (the file was deleted)."""


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str
    resumed_from: int  # bytes that were already on disk when this run started


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def progress_bar(total: int | None, initial: int, desc: str):
    """The kit's bar (a widget in a live notebook, text refreshed every few seconds in a headless one), off when
    HF_HUB_DISABLE_PROGRESS_BARS is set like the HF client's own bars."""
    from repro.utils.progress import progress_bar as kit_bar

    disabled = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").upper() in ("1", "ON", "YES", "TRUE")
    return kit_bar(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                   disable=disabled, leave=False)


def _failer(what: str):
    def fail(problem: str) -> NoReturn:
        raise DownloadError(f"{what}: {problem}")
    return fail


@contextlib.contextmanager
def _exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path`, a file opened without following a planted symlink.

    flock on the path huggingface_hub's own FileLock uses, so the two exclude each other. The lock file
    is left in place on purpose: deleting it while another process waits on it would let a third one in.
    """
    fail = _failer(what)
    if fcntl is None:  # Windows: no flock; filelock there locks a byte range of the same file
        from filelock import FileLock

        refuse_symlink(lock_path, "lock file", fail)
        with FileLock(str(lock_path)):
            yield
        return
    fd = open_no_follow(lock_path, os.O_RDWR | os.O_CREAT, "lock file", fail)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"note: {what}: another process is downloading it; waiting for it (lock {lock_path})", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _hash_prefix(part: Path, what: str) -> tuple["hashlib._Hash", int]:
    h = hashlib.sha256()
    n = 0
    with os.fdopen(open_no_follow(part, os.O_RDONLY, "partial download", _failer(what)), "rb") as f:
        while block := f.read(CHUNK_SIZE):
            h.update(block)
            n += len(block)
    return h, n


def _host(url: str) -> str:
    return urlparse(url).netloc or url


def _status_error(status: int, url: str, what: str) -> DownloadError:
    if status == 404:
        return NotFoundError(f"{what}: not found (HTTP 404 from {_host(url)}); check the URL in the asset manifest")
    if status in (401, 403):
        return AuthError(f"{what}: access denied (HTTP {status} from {_host(url)}); the server wants credentials")
    return DownloadError(f"{what}: HTTP {status} from {_host(url)}; try again later")


def _range_start(content_range: str | None) -> int:
    """First byte of a `Content-Range: bytes START-END/TOTAL` header, -1 if unreadable."""
    m = re.match(r"\s*bytes\s+(\d+)-", content_range or "")
    return int(m.group(1)) if m else -1


@dataclass
class _Progress:
    hasher: "hashlib._Hash"
    have: int  # bytes in the partial file, all fed to `hasher`
    restarted: bool = False  # the server ignored our Range: the bytes from disk were dropped


def _stream_once(url: str, part: Path, state: _Progress, headers: Mapping[str, str], what: str,
                 timeout: tuple[float, float], bar, limit: int | None) -> None:
    """One GET (with Range when bytes are on disk) appended to `part`; stops reading past `limit` bytes."""
    # Ask for the missing bytes only, uncompressed: the byte counts and the sha256 are of the file itself.
    req_headers = {"Accept-Encoding": "identity", **headers}
    if state.have:
        req_headers["Range"] = f"bytes={state.have}-"
    try:
        resp = requests.get(url, headers=req_headers, stream=True, timeout=timeout)
    except requests.exceptions.RequestException as e:
        raise NetworkError(f"{what}: cannot reach {_host(url)} ({type(e).__name__}); check the network, "
                           f"or run with --offline using files already on disk") from None
    # What the server answered decides where the body goes: after the bytes on disk, or from byte 0.
    with contextlib.closing(resp):
        if resp.status_code == 416 and state.have:
            # Range starts past the end: the partial file is already whole (or stale); the caller checks it.
            return
        if resp.status_code >= 400:
            raise _status_error(resp.status_code, url, what)
        if resp.status_code == 206:
            if _range_start(resp.headers.get("Content-Range")) != state.have:
                part.unlink(missing_ok=True)
                raise DownloadError(f"{what}: {_host(url)} answered a different byte range than asked for "
                                    f"(Content-Range: {shown(resp.headers.get('Content-Range'))} for bytes="
                                    f"{state.have}-); the partial file was deleted, run again")
        elif state.have:  # 200: the server ignored the Range header, so the body is the whole file
            state.hasher, state.have, state.restarted = hashlib.sha256(), 0, True
            bar.reset(total=bar.total)
        # Append block by block, hashing as it goes, so a resume never reads the whole prefix again;
        # fsync before returning: the caller trusts the size on disk.
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if state.have else os.O_TRUNC)
        try:
            with os.fdopen(open_no_follow(part, flags, "partial download", _failer(what)), "ab") as f:
                try:
                    for block in resp.iter_content(chunk_size=CHUNK_SIZE):
                        f.write(block)
                        state.hasher.update(block)
                        state.have += len(block)
                        bar.update(len(block))
                        if limit is not None and state.have > limit:
                            break  # more than the file's size: the caller deletes it, no need for the rest
                finally:
                    f.flush()
                    os.fsync(f.fileno())
        except requests.exceptions.RequestException as e:
            raise NetworkError(f"{what}: connection to {_host(url)} dropped after {state.have} bytes "
                               f"({type(e).__name__}); run the same command again to resume") from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFullError(f"{what}: disk full while writing {part}; free space and run again "
                                    f"(the bytes already written are kept and resumed)") from None
            raise


def download_url(url: str, dest: str | os.PathLike, *, expected_size: int | None = None,
                 expected_sha256: str | None = None, headers: Mapping[str, str] | None = None,
                 part_path: str | os.PathLike | None = None, lock_path: str | os.PathLike | None = None,
                 what: str | None = None, label: str | None = None,
                 connect_timeout: float = 10.0, read_timeout: float = 30.0) -> Downloaded:
    """Fetch `url` to `dest`, resuming `part_path` (default `dest.part`); verify; rename atomically.

    `what` names the asset (and its source) in error messages, `label` the progress bar. Raises NetworkError
    (unreachable, dropped), NotFoundError, AuthError, DiskFullError (ENOSPC), HashMismatchError (partial file
    deleted) and DownloadError (a symlink planted at the partial or lock file, a server sending other bytes
    than asked for).
    """
    dest = Path(dest)
    part = Path(part_path) if part_path is not None else dest.with_name(dest.name + ".part")
    what = what or dest.name
    part.parent.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Two processes fetching the same file (a second notebook, a forgotten terminal) must not
    # interleave their bytes in one partial file.
    with _exclusive(Path(lock_path or part.with_name(f".{part.name}.lock")), what):
        # The bytes already on disk are a prefix to resume from, unless they are longer than the file.
        refuse_symlink(part, "partial download", _failer(what))
        have = part.stat().st_size if part.exists() else 0
        if expected_size is not None and have > expected_size:
            part.unlink()  # longer than the real file: cannot be a prefix of it
            have = 0
        resumed_from = have
        state = _Progress(*_hash_prefix(part, what)) if have else _Progress(hashlib.sha256(), 0)
        # Stream until the expected size, resuming a dropped connection that made progress.
        with progress_bar(expected_size, have, label or dest.name) as bar:
            for attempt in range(MAX_RESUMES + 1):
                if expected_size is not None and state.have == expected_size:
                    break
                before = state.have
                try:
                    _stream_once(url, part, state, headers or {}, what, (connect_timeout, read_timeout), bar,
                                 expected_size)
                except NetworkError:
                    # A dropped stream that had made progress is resumed a few times; a dead server is not.
                    on_disk = part.stat().st_size if part.exists() else 0
                    if attempt == MAX_RESUMES or on_disk <= before:
                        raise
                    if on_disk != state.have:  # a block only partly written: the disk is the truth
                        state.hasher, state.have = _hash_prefix(part, what)
                    continue
                if expected_size is None or state.have >= expected_size:
                    break
        # Verify size and sha256 before the rename: `dest` only ever holds a whole, checked file.
        have = state.have
        if state.restarted:
            resumed_from = 0
        if expected_size is not None and have != expected_size:
            if have > expected_size:
                part.unlink(missing_ok=True)
                raise DownloadError(f"{what}: {_host(url)} sent more than the {expected_size} bytes the file has "
                                    f"({have} so far); the partial file was deleted, run again (if it repeats, "
                                    f"the server is broken: try another mirror)")
            raise NetworkError(f"{what}: download stopped at {have} of {expected_size} bytes from {_host(url)}; "
                               f"run the same command again to resume")
        digest = state.hasher.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256.lower():
            part.unlink(missing_ok=True)
            raise HashMismatchError(f"{what}: sha256 mismatch: expected {expected_sha256}, got {digest}; "
                                    f"the downloaded file was deleted, run again (if it repeats, the upstream "
                                    f"file changed: check the manifest)")
        os.replace(part, dest)
    return Downloaded(path=dest, size=have, sha256=digest, resumed_from=resumed_from)
