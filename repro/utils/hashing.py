"""sha256 of input files, hashed once: a cache keyed by what `stat` says about the file.

Sampling and training record the sha256 of every file that fixes their results (checkpoint, VA-VAE,
latent statistics, `train.weight_init`) so that a resumed run can refuse a file that changed under
it; step 2 verifies downloads through the same cache, so step 4 does not read them again. Hashing a 10 GB checkpoint takes a minute, so each digest is kept in `runs/sha256_cache.json`:

    {"/real/path": [[size, mtime_ns, ctime_ns, inode], "hex digest"], ...}

and reused while the file's (size, mtime_ns, ctime_ns, inode) are unchanged. Replacing a file (a
copy, a download, a rename onto it) gives it a new inode and ctime; rewriting it in place gives it a
new ctime, which no tool can set back (`touch -d` and `cp -p` restore only the mtime). A
reference folder of images is keyed by `listing_digest` (names, sizes and mtimes), not by its bytes.

    sha = cached_sha256("model.pt")                    # hashes once, then answers from the cache
    with HashCache() as cache: cache.sha256(a); cache.sha256(b)   # one read and one write of the cache

The cache file is written atomically and merged with what other processes wrote meanwhile; an
unreadable one is replaced (with a note), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional

from repro.utils.io import atomic_write_json, sha256_file

CACHE_NAME = "sha256_cache.json"
ANNOUNCE_BYTES = 500 * 10**6


def default_cache_path() -> Path:
    from repro.paths import runs_dir

    return runs_dir() / CACHE_NAME


def file_stamp(path: str | os.PathLike) -> tuple[str, list[int]]:
    """(real path, [size, mtime_ns, ctime_ns, inode]) of `path`: what the cached digest is valid for."""
    st = os.stat(path)
    return os.path.realpath(path), [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class HashCache:
    """The digests of `runs/sha256_cache.json` (or `path`); `save()` writes the new ones back."""

    def __init__(self, path: Optional[str | os.PathLike] = None):
        self.path = Path(path) if path is not None else default_cache_path()
        self.entries = self._read(note=True)
        self.new: dict[str, list] = {}
        self.hashed = 0  # files actually read (not answered from the cache)

    def _read(self, note: bool) -> dict:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict):
                return data
        except (OSError, ValueError):
            pass
        if note:
            print(f"note: unreadable hash cache {self.path}; files are hashed again and the cache rewritten", flush=True)
        return {}

    def sha256(self, path: str | os.PathLike) -> str:
        real, stamp = file_stamp(path)
        entry = self.new.get(real) or self.entries.get(real)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == stamp and isinstance(entry[1], str):
            return entry[1]
        if stamp[0] >= ANNOUNCE_BYTES:  # a minute for a 10 GB checkpoint: say why the run waits
            print(f"sha256 of {path} ({stamp[0] / 1e9:.1f} GB), once: then it is cached in {self.path}", flush=True)
        digest = sha256_file(path)
        self.hashed += 1
        if file_stamp(path)[1] == stamp:  # unchanged while it was read: the digest describes this file
            self.new[real] = [stamp, digest]
        return digest

    def remember(self, path: str | os.PathLike, digest: str) -> None:
        """Record a digest computed elsewhere (a download hashes the bytes as it writes them)."""
        real, stamp = file_stamp(path)
        self.new[real] = [stamp, digest]

    def save(self) -> None:
        """Merge the new digests into the cache file (re-read first: another process may have added some)."""
        if not self.new:
            return
        merged = {**self._read(note=False), **self.new}
        try:
            atomic_write_json(self.path, merged)
        except OSError as e:  # a cache: losing it costs time, never correctness
            print(f"note: could not write the hash cache {self.path} ({e}); files will be hashed again next time",
                  flush=True)
        self.entries, self.new = merged, {}

    def __enter__(self) -> "HashCache":
        return self

    def __exit__(self, *exc) -> None:
        self.save()


def cached_sha256(path: str | os.PathLike, cache_path: Optional[str | os.PathLike] = None) -> str:
    """sha256 of one file through the cache."""
    with HashCache(cache_path) as cache:
        return cache.sha256(path)


def listing_digest(root: str | os.PathLike, files: Iterable[str | os.PathLike]) -> str:
    """sha256 over the sorted (relative name, size, mtime_ns) of `files` under `root`.

    Identifies a folder of thousands of images without reading them: adding, removing, renaming or
    rewriting a file changes it (an edit that keeps both size and mtime is not seen).
    """
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(Path(f) for f in files):
        st = os.stat(p)
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
