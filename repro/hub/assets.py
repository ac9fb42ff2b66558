"""Fetch the kit's assets: use what is already on disk (verified), download the rest, record where.

    records = fetch_assets()                                  # everything in configs/assets.yaml
    records = fetch_assets(["vavae-f16d32"], dest="weights")  # one file, placed under weights/

Order per asset: the HF cache (or the plain-URL cache), then `dest`, then the manifest's search
folders (Kaggle's /kaggle/input on Kaggle): a file there whose sha256 matches (for a small non-LFS
file, its git blob id: the Hub's ETag) is used as it is, with no GET. Missing Hugging Face files are resolved first (one HEAD each, so a wrong repo/file or a gated
repo fails within seconds, before any byte moves), free disk is checked, then files are fetched one
by one with resume. Under `dest` (and in the plain-URL cache) a file sits at its manifest `local_name`, else at
`filename` as it is; search folders are searched by that name, then by the hub's own (several such files offline,
with no hash to tell them apart, are none of them taken). The result goes to `runs/assets.json`:

    {"assets": {"vavae-f16d32": {"path": ..., "size": ..., "sha256": ..., "source": "fetched",
                                 "verified_by": "hub sha256", "repo_id": ..., "revision": ...,
                                 "filename": ...}, ...}}
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from repro import paths
from repro.hub.download import DiskFullError, DownloadError, OfflineError, download_url, human_size
from repro.hub.hf import (RemoteFile, cached_file, download_hf, git_blob_id, hub_settings, partial_path,
                          resolve_remote)
from repro.hub.manifest import AssetSpec, Manifest, load_manifest
from repro.utils.hashing import HashCache
from repro.utils.io import atomic_write_json

SEARCH_DEPTH = 6  # /kaggle/input/<model>/<framework>/<variation>/<version>/<file> is 5 deep


@dataclass
class AssetRecord:
    name: str
    path: Path
    size: int
    sha256: str
    source: str  # "fetched" | "found" (under --dest or a search folder) | "cache" (HF or plain-URL cache)
    verified_by: str  # "pinned sha256" | "hub sha256" | "cache blob sha256" | "hub git blob id" (a non-LFS file)
    #                   | "cache blob git id" | "size" | "unverified"
    spec: AssetSpec = field(repr=False)
    resumed_from: int = 0

    def to_json(self) -> dict:
        out = {"path": os.path.abspath(self.path), "size": self.size, "sha256": self.sha256, "source": self.source,
               "verified_by": self.verified_by, "filename": self.spec.filename}
        if self.spec.local_name:  # its name under --dest, when not the hub's (two repos' model.safetensors)
            out["local_name"] = self.spec.local_name
        if self.spec.is_hf:
            out.update(repo_id=self.spec.repo_id, revision=self.spec.revision)
        else:
            out["url"] = self.spec.url
        return out


def plain_cache_dir() -> Path:
    """Plain-URL files without --dest: `$HF_ASSETS_CACHE/repro` (huggingface_hub's folder for libraries' assets)."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.environ.get("HF_ASSETS_CACHE") or os.path.join(home, "assets")).expanduser() / "repro"


def _find_named(root: Path, filename: str, depth: int = SEARCH_DEPTH) -> list[Path]:
    """Files called `filename` under `root`, at most `depth` levels down, skipping hidden folders."""
    out, stack = [], [(root, 1)]
    while stack:
        folder, level = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            if e.name == filename and e.is_file():
                out.append(Path(e.path))
            elif level < depth and not e.name.startswith(".") and e.is_dir():
                stack.append((Path(e.path), level + 1))
    return sorted(out)


def _local_candidates(spec: AssetSpec, dest: Path | None,
                      search_dirs: list[Path]) -> list[tuple[Path, str, bool]]:
    """(path, source, found by the hub's name) of every file on disk that may be the asset, best first."""
    cands: list[tuple[Path, str, bool]] = []
    if not spec.is_hf:
        cands.append((plain_cache_dir() / spec.local_file, "cache", False))
    # a file in a repo folder ("splits/split_aa") is found by its own name; one with a `local_name` by that name
    # first, then in the search folders by the hub's (a Kaggle copy of the repo keeps `model.safetensors`)
    name, *hub_names = spec.search_names
    if dest is not None:
        cands.append((dest / spec.local_file, "found", False))
        cands += [(p, "found", False) for p in _find_named(dest, name)]
    for folder in search_dirs:
        cands += [(p, "found", False) for p in _find_named(folder, name)]
    for hub_name in hub_names:
        for folder in search_dirs:
            cands += [(p, "found", True) for p in _find_named(folder, hub_name)]
    seen, out = set(), []
    for p, src, by_hub_name in cands:
        if p.is_file() and os.path.realpath(p) not in seen:
            seen.add(os.path.realpath(p))
            out.append((p, src, by_hub_name))
    return out


def _note(notes: list[str], msg: str) -> None:
    """Say why a file on disk was not used, once (the same file can be looked at twice)."""
    if msg not in notes:
        notes.append(msg)
        print(f"note: {msg}", flush=True)


def _check(spec, path, source, sha, size, how, stamps, notes, git: str | None = None) -> AssetRecord | None:
    """A record if the file at `path` matches `sha`/`size` (or, with no sha256 known, the git blob id `git`);
    a note (not an error) if it does not."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        _note(notes, f"{spec.name}: ignoring {path}: {actual_size} bytes, expected {size}")
        return None
    if sha is None and git is not None:
        # A small non-LFS file: the Hub names it by its git blob id, not a sha256 (issue: no refetch).
        if (blob_id := git_blob_id(path)) != git:
            _note(notes, f"{spec.name}: ignoring {path}: git blob id {blob_id[:12]}… differs from expected {git[:12]}…")
            return None
    digest = stamps.sha256(path)
    if sha is not None and digest != sha:
        _note(notes, f"{spec.name}: ignoring {path}: sha256 {digest[:12]}… differs from expected {sha[:12]}…")
        return None
    verified = how if sha is not None or git is not None else ("size" if size is not None else "unverified")
    return AssetRecord(spec.name, path, actual_size, digest, source, verified, spec)


def _find_local(spec, dest, search_dirs, settings, stamps, notes, remote: RemoteFile | None = None,
                accept_unverified: bool = False) -> AssetRecord | None:
    pinned = spec.sha256
    sha = pinned or (remote.sha256 if remote else None)
    git = None if sha else (remote.git_blob if remote else None)
    size = spec.size or (remote.size if remote else None)
    how = "pinned sha256" if pinned else ("hub sha256" if sha or not git else "hub git blob id")
    if spec.is_hf and (hit := cached_file(spec, settings)) is not None:
        path, blob_sha, blob_git = hit
        if pinned or not (blob_sha or blob_git):
            rec = _check(spec, path, "cache", sha, size, how, stamps, notes, git)
        elif blob_sha:
            rec = _check(spec, path, "cache", blob_sha, size, "cache blob sha256", stamps, notes)
        else:
            rec = _check(spec, path, "cache", None, size, "cache blob git id", stamps, notes, blob_git)
        if rec and (rec.verified_by != "unverified" or accept_unverified):
            return rec
    cands = _local_candidates(spec, dest, search_dirs)
    by_hub_name = [str(p) for p, _, hub_name in cands if hub_name]
    for path, source, hub_name in cands:
        if sha is None and git is None and not accept_unverified:
            continue  # decided after the Hub tells us the sha256 (or the git blob id)
        if hub_name and sha is None and git is None and len(by_hub_name) > 1:
            # Nothing to tell which of several `model.safetensors` is this asset's: none is taken.
            _note(notes, f"{spec.name}: {len(by_hub_name)} files named {Path(spec.filename).name!r} in the search "
                         f"folders ({', '.join(by_hub_name)}) and no sha256 to tell which is {spec.where}: none is "
                         f"used; put the right one under --dest as {spec.local_file!r}, or run once online")
            continue
        rec = _check(spec, path, source, sha, size, how, stamps, notes, git)
        if rec:
            return rec
    return None


def _free_disk_check(plans: list[tuple[AssetSpec, RemoteFile | None, Path, Path]]) -> None:
    """Fail before fetching anything if a target disk cannot hold what is still missing."""
    need: dict[int, list] = {}
    for spec, remote, folder, part in plans:
        probe = folder
        while not probe.exists():
            probe = probe.parent
        total = (remote.size if remote and remote.size is not None else None) or spec.size or spec.approx_size
        have = part.lstat().st_size if part.is_file() and not part.is_symlink() else 0  # a planted link counts 0
        entry = need.setdefault(os.stat(probe).st_dev, [probe, 0, []])
        entry[1] += max(total - have, 0)
        entry[2].append(spec.name)
    for probe, nbytes, names in need.values():
        free = shutil.disk_usage(probe).free
        if nbytes > free:
            raise DiskFullError(f"not enough disk space for {', '.join(names)}: need {human_size(nbytes)} under "
                                f"{probe}, only {human_size(free)} free; free some space or pass --dest on a "
                                f"bigger disk")


def _fetch(spec: AssetSpec, remote: RemoteFile | None, folder: Path, settings, dest: Path | None) -> AssetRecord:
    print(f"fetching {spec.name}: {spec.where} ({human_size((remote and remote.size) or spec.size)})", flush=True)
    if remote is not None:
        got = download_hf(spec, remote, settings, dest, expected_sha256=spec.sha256)
        how = "pinned sha256" if spec.sha256 else ("hub sha256" if remote.sha256 else
                                                   "hub git blob id" if remote.git_blob else "size")
    else:
        got = download_url(spec.url, folder / spec.local_file, expected_size=spec.size, expected_sha256=spec.sha256,
                           what=f"{spec.name} ({spec.url}, file {spec.filename})", label=spec.name,
                           connect_timeout=settings.etag_timeout, read_timeout=max(settings.download_timeout, 10.0))
        how = "pinned sha256" if spec.sha256 else ("size" if spec.size else "unverified")
    if got.resumed_from:
        print(f"{spec.name}: resumed from {human_size(got.resumed_from)} already on disk", flush=True)
    return AssetRecord(spec.name, got.path, got.size, got.sha256, "fetched", how, spec, got.resumed_from)


def print_table(records: Iterable[AssetRecord]) -> None:
    rows = [("asset", "source", "size", "sha256", "verified", "path")]
    rows += [(r.name, r.source, human_size(r.size), r.sha256[:16], r.verified_by, str(r.path)) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[5], flush=True)


def write_assets_json(records: Iterable[AssetRecord]) -> Path:
    """Merge these records into runs/assets.json (other assets' entries are kept), atomically."""
    out = paths.assets_json()
    data: dict = {"assets": {}}
    if out.is_file():
        try:
            data = json.loads(out.read_text())
            data.setdefault("assets", {})
        except (OSError, ValueError):
            print(f"note: {out} was unreadable and is rewritten", flush=True)
            data = {"assets": {}}
    data["assets"].update({r.name: r.to_json() for r in records})
    return atomic_write_json(out, data)


def fetch_assets(names: list[str] | None = None, dest: str | os.PathLike | None = None, offline: bool = False,
                 manifest: str | os.PathLike | Manifest | None = None) -> list[AssetRecord]:
    """Make every selected asset present and verified; print a table; write runs/assets.json."""
    # What to fetch, and where files may already be (a missing search folder is said, not an error).
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    specs = m.select(names)
    for spec in specs:  # a restricted licence is said before the file is used (kit: VFM-VAE's non-commercial files)
        if spec.licence and "non-commercial" in spec.licence.lower():
            print(f"{spec.name}: licence {spec.licence}", flush=True)
    settings = hub_settings(offline)
    dest = Path(dest).expanduser() if dest is not None else None
    search_dirs = m.active_search_dirs()
    for d in m.search_dirs:
        if d.when is None and not d.path.is_dir():
            print(f"note: search folder {d.path} does not exist; skipped", flush=True)
    stamps = HashCache()  # runs/sha256_cache.json, shared with sampling and training
    notes: list[str] = []
    records: dict[str, AssetRecord] = {}
    try:
        # Files already on disk (cache, --dest, search folders), verified through the shared hash cache.
        missing = []
        for spec in specs:
            # Without a hash to check against, a plain-URL file (or any file offline) is taken by name.
            lenient = not spec.is_hf or settings.offline
            rec = _find_local(spec, dest, search_dirs, settings, stamps, notes, accept_unverified=lenient)
            if rec:
                records[spec.name] = rec
            else:
                missing.append(spec)
        if missing and settings.offline:
            raise OfflineError("offline mode (--offline or HF_HUB_OFFLINE=1) and not on disk: " + "; ".join(
                f"{s.name} ({s.where})" for s in missing) + "; run once with network, or put the files under "
                "--dest or a search folder")
        # The rest: ask the Hub what it serves (a changed upstream file is refused), look on disk once more
        # under the name it gives, and plan a download for what is still missing.
        plans = []
        probed = False  # one reachability check for all the files, not one per file (a group holds a dozen)
        for spec in missing:
            remote = resolve_remote(spec, settings, probe=not probed) if spec.is_hf else None
            probed = probed or spec.is_hf
            if remote and spec.sha256 and remote.sha256 and remote.sha256 != spec.sha256:
                raise DownloadError(f"{spec.name} ({spec.where}): the Hub serves sha256 {remote.sha256}, the manifest "
                                    f"pins {spec.sha256}; the upstream file changed, check the manifest")
            if remote and (rec := _find_local(spec, dest, search_dirs, settings, stamps, notes, remote)):
                records[spec.name] = rec
                continue
            if spec.is_hf:
                folder = dest or settings.cache_dir
                part = partial_path(spec, remote, settings, dest)
            else:
                folder = dest or plain_cache_dir()
                part = folder / (spec.local_file + ".part")
            plans.append((spec, remote, folder, part))
        # One disk-space check for all the planned downloads, then fetch them one by one.
        _free_disk_check(plans)
        for spec, remote, folder, _ in plans:
            records[spec.name] = rec = _fetch(spec, remote, folder, settings, dest)
            stamps.remember(rec.path, rec.sha256)
    finally:  # what was found or fetched is recorded even when a later file fails
        stamps.save()
        if records:
            write_assets_json(records.values())
    # The table in the order asked for, and a count of the files nothing could check.
    ordered = [records[s.name] for s in specs]
    print_table(ordered)
    unverified = [r.name for r in ordered if r.verified_by == "unverified"]
    if unverified:
        print(f"warning: {len(unverified)} file(s) could not be checked (no known sha256 or size): "
              f"{', '.join(unverified)}", flush=True)
    return ordered
