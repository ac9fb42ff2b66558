"""Image batches from an ADM-format npz or a folder of PNGs, streamed: 50,000 images never sit in memory.

npz (`arr_0`: uint8 N x H x W x 3, the ADM evaluator's format): an npz is a zip of `.npy` members.
- Stored members (`np.savez`, the usual case; zip64 for > 4 GB) are memory-mapped in place: the
  data offset is the member's local zip header offset + header length + the `.npy` header length,
  so any rank reads any slice without touching the rest of the file.
- Compressed members (`np.savez_compressed`) cannot be mapped: they are decompressed sequentially
  through `zipfile` (a rank's slice start is reached by a forward seek, i.e. by decompressing).
Folder: `*.png` at the top level, sorted by name (step 4 writes `{index:06d}.png`, so name order is
index order and the folder and its packed npz give the same features in the same order). Only
lossless PNG is read: the protocol's numbers depend on exact pixels.
"""

from __future__ import annotations

import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from repro.data.npz import FORMAT_HINT, IMAGE_KEY, NpyMember, read_npy_member
from repro.errors import ReproError
from repro.utils.distributed import print0

LOSSY_SUFFIXES = {".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _check_image_array(path, shape, dtype, fortran: bool) -> None:
    if dtype != np.uint8:
        raise ReproError(f"{path}: '{IMAGE_KEY}' has dtype {dtype}, images must be uint8 in [0, 255]; "
                         f"convert with np.clip(np.round(x), 0, 255).astype(np.uint8) ({FORMAT_HINT})")
    if len(shape) != 4 or shape[3] != 3:
        hint = " (channels-first? transpose to N x H x W x 3)" if len(shape) == 4 and shape[1] == 3 else ""
        raise ReproError(f"{path}: '{IMAGE_KEY}' has shape {shape}, expected N x H x W x 3 RGB{hint}")
    if shape[0] < 1:
        raise ReproError(f"{path}: '{IMAGE_KEY}' holds no images")
    if fortran:
        raise ReproError(f"{path}: '{IMAGE_KEY}' is stored in Fortran order; re-save it with "
                         f"np.savez(path, arr_0=np.ascontiguousarray(images))")


def _list_pngs(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    pngs = sorted((p for p in files if p.suffix.lower() == ".png"), key=lambda p: p.name)
    lossy = [p for p in files if p.suffix.lower() in LOSSY_SUFFIXES]
    if lossy:
        raise ReproError(f"{folder}: {len(lossy)} non-PNG image files (e.g. {lossy[0].name}) next to "
                         f"{len(pngs)} PNGs; the protocol needs lossless PNGs only: move them out")
    return pngs


def _load_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode != "RGB":
                raise ReproError(f"{path}: image mode {im.mode}, expected 8-bit RGB (3 channels)")
            if im.size != (size[1], size[0]):
                raise ReproError(f"{path}: image is {im.size[0]}x{im.size[1]}, the other images are "
                                 f"{size[1]}x{size[0]}; all samples must share one size")
            return np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise ReproError(f"{path}: unreadable image ({e})") from None


@dataclass
class ImageBatches:
    """N images of H x W x 3 uint8 from an npz (`member`) or a PNG folder (`files`)."""
    path: Path
    kind: str  # "npz" | "folder"
    num_images: int
    height: int
    width: int
    member: Optional[NpyMember] = None
    files: list[Path] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | os.PathLike, what: str = "samples") -> "ImageBatches":
        """Validate and describe `path` (reads headers only). A run folder holding `samples.npz` or an
        `images/` folder (step 4's layout) is resolved to it, and the choice is printed."""
        path = Path(path)
        if not path.exists():
            raise ReproError(f"{what} not found: {path}")
        if path.is_dir():
            pngs = _list_pngs(path)
            if not pngs:
                for alt in (path / "samples.npz", path / "images"):
                    if alt.exists():
                        print0(f"{what}: {path} holds no PNGs; using {alt}")
                        return cls.open(alt, what)
                raise ReproError(f"{what} folder {path} holds no .png images (nor samples.npz or images/)")
            with_size = _probe_png(pngs[0])
            return cls(path, "folder", len(pngs), with_size[0], with_size[1], files=pngs)
        if path.suffix.lower() != ".npz":
            raise ReproError(f"{what} must be an .npz file or a folder of PNGs, got {path}")
        m = read_npy_member(path, IMAGE_KEY)
        _check_image_array(path, m.shape, m.dtype, m.fortran)
        return cls(path, "npz", m.shape[0], m.shape[1], m.shape[2], member=m)

    def iter_batches(self, start: int, stop: int, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 (B, H, W, 3) arrays covering images [start, stop) in order."""
        if self.kind == "folder":
            yield from self._folder_batches(start, stop, batch_size)
        elif self.member.data_offset is not None:
            mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.member.data_offset,
                           shape=self.member.shape)
            for s in range(start, stop, batch_size):
                yield np.array(mm[s:min(s + batch_size, stop)])
            del mm
        else:
            yield from self._compressed_batches(start, stop, batch_size)

    def _folder_batches(self, start, stop, batch_size):
        size = (self.height, self.width)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
            for s in range(start, stop, batch_size):
                chunk = self.files[s:min(s + batch_size, stop)]
                yield np.stack(list(pool.map(lambda p: _load_png(p, size), chunk)))

    def _compressed_batches(self, start, stop, batch_size):
        per_image = self.height * self.width * 3
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{IMAGE_KEY}.npy") as f:
            f.seek(self.member.header_len + start * per_image)
            for s in range(start, stop, batch_size):
                n = min(batch_size, stop - s)
                data = f.read(n * per_image)
                if len(data) != n * per_image:
                    raise ReproError(f"{self.path}: '{IMAGE_KEY}' is truncated at image {s}; re-create the file")
                yield np.frombuffer(bytearray(data), dtype=np.uint8).reshape(n, self.height, self.width, 3)


def _probe_png(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode != "RGB":
                raise ReproError(f"{path}: image mode {im.mode}, expected 8-bit RGB (3 channels)")
            return im.size[1], im.size[0]
    except OSError as e:
        raise ReproError(f"{path}: unreadable image ({e})") from None
