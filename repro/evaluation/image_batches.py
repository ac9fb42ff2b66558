"""Image batches from an ADM-format npz or a folder of PNGs, streamed: 50,000 images never sit in memory.

npz (`arr_0`: uint8 N x H x W x 3, the ADM evaluator's format): an npz is a zip of `.npy` members.
- Stored members (`np.savez`, the usual case; zip64 for > 4 GB) are memory-mapped in place: the
  data offset is the member's local zip header offset + header length + the `.npy` header length,
  so any rank reads any slice without touching the rest of the file.
- Compressed members (`np.savez_compressed`) cannot be mapped: they are decompressed sequentially
  through `zipfile` (a rank's slice start is reached by a forward seek, i.e. by decompressing).
Folder: `*.png` at the top level, sorted by name (step 4 writes `{index:06d}.png`, so name order is
index order and the folder and its packed npz give the same features in the same order). Only
lossless PNG is read for samples: the protocol's numbers depend on exact pixels. Step 4's run
folder (`run.json`, `samples.npz`, `images/`, and figures such as the RGBA `preview.png`) is taken
as is: its complete `samples.npz`, else its `images/` when all N images are there.

Reference images (`ImageBatches.open_reference`, for users who score against their own data): an
npz of images, or a folder (searched recursively, sorted by relative path) of any common format,
JPEG included, converted to RGB as step 6 does. When their size differs from the samples', each is
brought to it with ADM's centre crop (`repro.tokenizer.images.center_crop_arr`, the crop that
made ADM's reference batches and that step 6 applies to training images).
"""

from __future__ import annotations

import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from repro.data.image_sources import IMAGE_EXTENSIONS, ImageLoadError, walk_folder
from repro.data.npz import FORMAT_HINT, IMAGE_KEY, NpyMember, npz_count, read_npy_member
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


def _load_png(path: Path, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """One PNG sample as (H, W, 3) uint8; `size` (H, W): the size all samples share (None: the first image)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode != "RGB":
                raise ReproError(f"{path}: image mode {im.mode}, expected 8-bit RGB (3 channels)")
            if size is not None and im.size != (size[1], size[0]):
                raise ReproError(f"{path}: image is {im.size[0]}x{im.size[1]}, the other images are "
                                 f"{size[1]}x{size[0]}; all samples must share one size")
            return np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise ReproError(f"{path}: unreadable image ({e})") from None


def _step4_choice(folder: Path, what: str) -> Optional[Path]:
    """The complete sample set inside step 4's run folder (`samples.npz`, else `images/`), or None when
    `folder` is not one. An interrupted run is refused: its numbers would describe fewer images."""
    npz, images = folder / "samples.npz", folder / "images"
    if not npz.is_file() and not images.is_dir():
        return None
    wanted = None
    if (folder / "run.json").is_file():
        try:
            wanted = int(json.loads((folder / "run.json").read_text())["num_samples"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ReproError(f"{folder / 'run.json'} is unreadable ({e}): pass --samples {npz} or {images}") from None
    have_npz = npz_count(npz) if npz.is_file() else None
    if have_npz is not None and wanted in (None, have_npz):
        choice = npz
    else:
        pngs = len(_list_pngs(images)) if images.is_dir() else 0
        if not pngs or (wanted is not None and pngs != wanted):
            raise ReproError(f"{what}: {folder} holds {pngs} of {wanted} images and no complete samples.npz (sampling "
                             "was interrupted?): run the same step 4 command again to finish it, or pass "
                             f"--samples {images} to score the images there")
        choice = images
    print0(f"{what}: using {choice} (step 4's run folder)")
    return choice


@dataclass
class ImageBatches:
    """N images of H x W x 3 uint8 from an npz (`member`), a PNG folder or a reference image folder (`files`).

    `resize_to`: reference images only; each is brought to that square size with ADM's centre crop."""
    path: Path
    kind: str  # "npz" | "folder" (PNG samples) | "images" (reference images, any format)
    num_images: int
    height: int
    width: int
    member: Optional[NpyMember] = None
    files: list[Path] = field(default_factory=list)
    resize_to: Optional[int] = None

    @classmethod
    def open(cls, path: str | os.PathLike, what: str = "samples") -> "ImageBatches":
        """Validate and describe `path` (reads headers only). Step 4's run folder is resolved to its
        `samples.npz` or `images/` folder, and the choice is printed."""
        path = Path(path)
        if not path.exists():
            raise ReproError(f"{what} not found: {path}")
        if path.is_dir():
            if (choice := _step4_choice(path, what)) is not None:
                return cls.open(choice, what)
            pngs = _list_pngs(path)
            if not pngs:
                raise ReproError(f"{what} folder {path} holds no .png images (nor samples.npz or images/)")
            return cls(path, "folder", len(pngs), *_load_png(pngs[0]).shape[:2], files=pngs)
        if path.suffix.lower() != ".npz":
            raise ReproError(f"{what} must be an .npz file or a folder of PNGs, got {path}")
        m = read_npy_member(path, IMAGE_KEY)
        _check_image_array(path, m.shape, m.dtype, m.fortran)
        return cls(path, "npz", m.shape[0], m.shape[1], m.shape[2], member=m)

    @classmethod
    def open_reference(cls, path: str | os.PathLike, height: int, width: int) -> "ImageBatches":
        """Reference images (an npz of images, or a folder of any common format) as `height` x `width`
        batches: images of another size go through ADM's centre crop (square sizes only)."""
        path = Path(path)
        if path.is_dir():
            files, ignored = _list_images(path)
            if not files:
                raise ReproError(f"reference folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}; "
                                 "searched recursively)")
            if ignored:
                print0(f"reference: {len(files)} images in {path}; {ignored} other file(s) ignored")
            source = cls(path, "images", len(files), height, width, files=files)
        elif path.suffix.lower() != ".npz":
            raise ReproError(f"reference {path}: expected ADM's reference batch (.npz), an npz of images (arr_0) or "
                             "a folder of images")
        else:
            source = cls.open(path, "reference images")
        if source.kind == "npz" and (source.height, source.width) == (height, width):
            return source
        if height != width:
            raise ReproError(f"samples are {height}x{width}: reference images can be brought to a square size only; "
                             f"give reference images of exactly {height}x{width}")
        source.resize_to = height
        return source

    def iter_batches(self, start: int, stop: int, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 (B, H, W, 3) arrays covering images [start, stop) in order."""
        if self.kind in ("folder", "images"):
            yield from self._folder_batches(start, stop, batch_size)
            return
        if self.member.data_offset is not None:
            mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.member.data_offset,
                           shape=self.member.shape)
            batches = (np.array(mm[s:min(s + batch_size, stop)]) for s in range(start, stop, batch_size))
        else:
            batches = self._compressed_batches(start, stop, batch_size)
        for batch in batches:
            yield batch if self.resize_to is None else np.stack([_crop(im, self.resize_to) for im in batch])

    def _folder_batches(self, start, stop, batch_size):
        size = (self.height, self.width)
        load = (lambda p: _load_png(p, size)) if self.kind == "folder" else (lambda p: _load_any(p, self.resize_to))
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
            for s in range(start, stop, batch_size):
                yield np.stack(list(pool.map(load, self.files[s:min(s + batch_size, stop)])))

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


# ---------------------------------------------------------------------------------------------
# Reference images of any format and size


def _list_images(folder: Path) -> tuple[list[Path], int]:
    """(image files under `folder`, recursively, sorted by relative path; how many other files).

    Step 6's walker: a directory link back into the folder (a loop) is not followed, so no image is counted
    twice; a sub-folder that cannot be listed is an error (its images would be missing from the statistics)."""
    st = os.stat(folder)
    seen, problems = {(st.st_dev, st.st_ino): str(folder)}, []
    files, ignored = [], 0
    for dirpath, filenames in walk_folder(folder, seen, problems):
        if any(part.startswith(".") for part in Path(dirpath).relative_to(folder).parts):
            continue  # hidden folders (.ipynb_checkpoints, ...) hold no reference images
        for name in filenames:
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(dirpath) / name)
            else:
                ignored += 1
    for problem in problems:
        if problem["error"].startswith("cannot list"):
            raise ReproError(f"reference folder {folder}: {problem['path']}: {problem['error']}; make it readable")
        print0(f"note: reference folder {folder}: {problem['path']}: {problem['error']}")
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix()), ignored


def _crop(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    from repro.tokenizer.images import center_crop_arr

    return np.asarray(center_crop_arr(Image.fromarray(image), size), dtype=np.uint8)


def _load_any(path: Path, size: int) -> np.ndarray:
    """One reference image as (size, size, 3) uint8: RGB as step 6 converts it, then ADM's centre crop."""
    from repro.data.image_loader import read_file_square  # torch is imported with it: only when a folder is read

    try:
        return read_file_square(path, size)
    except ImageLoadError as e:  # truncated, not an image, a decompression bomb...: named, never skipped
        raise ReproError(f"{path}: unreadable reference image ({e}); remove or replace it") from None
