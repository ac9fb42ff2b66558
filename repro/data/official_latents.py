"""Upstream's pre-extracted latents as training data: unpack the parts, find the shard folder.

hustvl/LightningDiT's tutorial publishes the VA-VAE f16d32 latents of ImageNet-1k train (256 px) on the
Hub as one tar.gz cut into parts (`hustvl/imagenet256-latents-vave-f16d32-dinov2`, `splits/split_aa`, ...;
its recipe: `cat split_* > imagenet_latents.tar.gz && tar -xf imagenet_latents.tar.gz`). Step 2 fetches
the parts (the manifest group `imagenet256-latents`); `unpack_parts` then does what the recipe does
without the joined ~63 GB copy: it reads the parts one after the other as one stream, un-gzips and
un-tars it into a folder.

- Every regular file is written atomically (temp file, then rename); folders are created; anything
  else (links, devices) is not written and counted in the result. Member names come from a file
  off the network: a name that is absolute or climbs out with `..` stops the unpack with its name.
- Resumable: a file already on disk with the archive's size is not written again (the stream is still
  read past it: a gzip stream cannot seek); a finished unpack leaves `.repro-unpacked.json` and the same
  call returns at once. A cut-off stream (a missing or truncated part) is an error naming the parts.

`find_shard_folder(root)` lets step 7 take the unpacked folder as `data.data_path` directly: the shards
may sit a few folders down (upstream's extraction writes `<output>/<config>/<split>_<size>/`).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterable

from repro.data.latents import list_shards
from repro.data.stats import STATS_NAME
from repro.errors import ReproError
from repro.utils.io import atomic_path, atomic_write_json, remove_stale_temps

OFFICIAL_GROUP = "imagenet256-latents"  # the manifest group of the parts (configs/assets.yaml)
MARKER = ".repro-unpacked.json"
_SEARCH_DEPTH = 3


class _Parts(io.RawIOBase):
    """The parts, in order, read as one stream (what `cat split_*` gives tar)."""

    def __init__(self, parts: list[Path]):
        self.parts, self.index, self.handle = parts, 0, None
        self.done = 0  # bytes of whole parts already read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.index < len(self.parts):
            if self.handle is None:
                self.handle = open(self.parts[self.index], "rb")
            n = self.handle.readinto(buffer)
            if n:
                return n
            self.done += self.handle.tell()
            self.handle.close()
            self.handle, self.index = None, self.index + 1
        return 0

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        super().close()


def _inside(root: Path, name: str) -> Path:
    """root/name for an archive member name, refused if it is absolute or leaves root."""
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or any(p in ("..", "") for p in parts) or "\x00" in name:
        raise ReproError(f"the latent archive holds a member named {name!r}, which would land outside {root}: "
                         "the parts are not upstream's archive; delete them and fetch again with step 2")
    return root.joinpath(*[p for p in parts if p != "."])


def _signature(parts: list[Path]) -> list:
    return [[p.name, p.stat().st_size] for p in parts]


def unpack_parts(parts: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                 progress_every: float = 30.0) -> dict:
    """Unpack the tar.gz cut into `parts` (in name order) into `out_dir`; returns a summary dict."""
    # Every part present, in name order (the archive was cut in that order)
    parts = sorted((Path(p) for p in parts), key=lambda p: p.name)
    if not parts:
        raise ReproError(f"no parts of the latent archive given: fetch them first (python -m steps.step2_download "
                         f"--only {OFFICIAL_GROUP})")
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ReproError(f"part(s) of the latent archive not found: {', '.join(missing[:3])}: run python -m "
                         f"steps.step2_download --only {OFFICIAL_GROUP} again")
    # Already unpacked from these same parts: nothing to do
    out = Path(out_dir)
    marker = out / MARKER
    if marker.is_file():
        record = json.loads(marker.read_text())
        if record.get("parts") == _signature(parts):
            return dict(record, reused=True)
    out.mkdir(parents=True, exist_ok=True)
    for folder, _, _ in os.walk(out):  # temp files of a killed unpack, at any depth
        remove_stale_temps(folder)
    # Stream the parts as one gzip tar; each file written atomically, files of an interrupted unpack kept
    counts = {"written": 0, "kept": 0, "folders": 0, "not_files": 0, "bytes": 0}
    stream = _Parts(parts)
    t0 = last = time.monotonic()
    try:
        with tarfile.open(fileobj=io.BufferedReader(stream, 1 << 20), mode="r|gz") as tar:
            for member in tar:
                target = _inside(out, member.name)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    counts["folders"] += 1
                    continue
                if not member.isfile():  # links and devices are not latents: never created, counted
                    counts["not_files"] += 1
                    continue
                counts["bytes"] += member.size
                if target.is_file() and target.stat().st_size == member.size:
                    counts["kept"] += 1  # written by an earlier, interrupted unpack
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                with atomic_path(target) as tmp, open(tmp, "wb") as f:
                    while chunk := source.read(1 << 22):
                        f.write(chunk)
                counts["written"] += 1
                if time.monotonic() - last > progress_every:
                    last = time.monotonic()
                    print(f"unpacking: {counts['bytes'] / 1e9:.1f} GB of files, part {stream.index + 1} of "
                          f"{len(parts)} ({last - t0:.0f}s)", flush=True)
    except (tarfile.TarError, EOFError, zlib.error) as e:  # disk errors (OSError) keep their own message
        raise ReproError(f"the latent archive ends early or is damaged after {stream.done / 1e9:.1f} GB of "
                         f"{len(parts)} part(s) ({parts[0].name}..{parts[-1].name}; {type(e).__name__}: {e}): a part "
                         f"is missing or truncated, or the repo now has more parts than configs/assets.yaml lists; "
                         f"run python -m steps.step2_download --only {OFFICIAL_GROUP} again (or add the new parts), "
                         "then the same command: files already unpacked are kept") from None
    finally:
        stream.close()
    # Record what was unpacked from which parts: a rerun with the same parts reuses it
    folder, stats = find_shard_folder(out)
    record = {"parts": _signature(parts), "out_dir": str(out), "shard_folder": str(folder),
              "stats": str(stats) if stats.is_file() else None, "shards": len(list_shards(folder)), **counts}
    atomic_write_json(marker, record)
    return dict(record, reused=False)


def find_shard_folder(root: str | os.PathLike) -> tuple[Path, Path]:
    """(folder with the shards, its latents_stats.pt) for a data folder: `root` itself, or the one folder
    up to three levels below that holds `*.safetensors` shards. The statistics are the shard folder's
    own file, else `root`'s (where step 5 --refetch writes them). With no shards anywhere, `root`."""
    root = Path(root)
    if list_shards(root) or not root.is_dir():
        return root, root / STATS_NAME
    found: list[Path] = []
    level = [root]
    for _ in range(_SEARCH_DEPTH):
        level = sorted(d for folder in level for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        found += [d for d in level if list_shards(d)]
    if len(found) > 1:
        listed = ", ".join(str(d) for d in found[:3])
        more = " ..." if len(found) > 3 else ""
        raise ReproError(f"{root} holds latent shards in {len(found)} folders ({listed}{more}): set data.data_path "
                         "to the one to train on")
    if not found:
        return root, root / STATS_NAME
    folder = found[0]
    return folder, (folder / STATS_NAME if (folder / STATS_NAME).is_file() else root / STATS_NAME)

