"""Image sources for latent extraction (step 6): class folders, a flat folder with labels, WebDataset tars.

Three layouts, each listed in a fixed order so that image index i (and so shard k's contents) is the
same on every process and every restart:

- ImageNet-style folder (what upstream's torchvision `ImageFolder` reads): one sub-folder per class,
  label = position of the folder name in sorted order; images found recursively inside each class
  folder, sorted (the torchvision order). Other files are counted as ignored. Directory links are
  followed (as torchvision does) but only into folders not listed yet: a link back into the image
  folder (`class_a/loop -> ..`) or into another class is reported once and not followed, so a loop
  can neither multiply images nor relabel another class's images.
- Flat folder with a labels file `labels.txt` or `labels.csv` (or `labels_file=`): one image per line,
  `relative/path.jpg,3` or `relative/path.jpg 3` (comma or whitespace); blank lines and `#` comments
  are skipped, a first line whose label is not an integer is a header. Images are taken in the labels
  file's order. A line whose label is not an integer in [0, MAX_LABEL], or whose path leaves the
  folder, is reported and not encoded; so are images in the folder without a line.
- WebDataset `.tar` shards (uncompressed; one file, several, or a folder of them, sorted by name):
  members grouped by key (path up to the first dot of the file name); a sample is one image
  (`.jpg`/`.jpeg`/`.png`/`.webp`) plus its `.cls` label (text integer in [0, MAX_LABEL]). Incomplete
  samples are reported; a bad `.cls` label fails that sample at load time (recorded, not encoded).

Loading (JPEG, PNG, WebP, ...) decodes the whole file, then converts grayscale, CMYK, palette and alpha
images to RGB as upstream's loader does (`repro.tokenizer.images.ensure_rgb`). EXIF orientation is not
applied (upstream does not). A file that cannot be read raises `ImageLoadError`; extraction records it
and moves on.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from repro.errors import ReproError

# torchvision's IMG_EXTENSIONS (what upstream's ImageFolder accepts)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_FILE_NAMES = ("labels.txt", "labels.csv")
# Labels are class indices (an embedding row each); beyond int32 they are corrupt data, and beyond
# int64 they could not even be stored in a shard's `labels` tensor.
MAX_LABEL = 2**31 - 1


class ImageLoadError(Exception):
    """One unreadable image (corrupt, truncated, missing, bad label); extraction skips and reports it.

    `ref` names the file (or `archive.tar::member`) and `named` is "ref: error", what a skip message
    prints; str(e) is the error alone because step 6 stores it beside the path in the shard headers.
    """

    def __init__(self, message: str, ref: str = ""):
        super().__init__(message)
        self.ref = ref

    def __reduce__(self):  # DataLoader workers pickle it: keep `ref`
        return type(self), (str(self), self.ref)

    @property
    def named(self) -> str:
        return f"{self.ref}: {self}" if self.ref else str(self)


@dataclass(frozen=True)
class ImageItem:
    ref: str  # a path, or "archive.tar::member" for WebDataset samples
    label: int | None = None  # None: read from `label_member` of the tar at load time
    tar: str | None = None
    offset: int = 0  # byte range of the image inside the tar
    size: int = 0
    label_offset: int = 0
    label_size: int = 0


@dataclass
class ImageSource:
    kind: str  # "imagefolder" | "flat" | "webdataset"
    root: str
    items: list[ImageItem]
    class_names: list[str] | None = None
    problems: list[dict] = field(default_factory=list)  # found while listing: {"path", "error"}, not encoded
    ignored: int = 0  # non-image files (class folders) or non-sample members (tars)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """(RGB PIL image, label) of item `index`; ImageLoadError naming it when it cannot be read."""
        item = self.items[index]
        if item.tar is None:
            return read_image_file(item.ref), item.label
        data = _read_bytes(item.tar, item.ref, item.offset, item.size)
        text = _read_bytes(item.tar, item.ref, item.label_offset,
                           item.label_size).decode("utf-8", "replace").strip()
        if (label := _label_value(text)) is None:
            raise ImageLoadError(f"label file (.cls) holds {text[:40]!r}, not an integer in 0..{MAX_LABEL}",
                                 item.ref)
        return decode_image(data, item.ref), label


def decode_image(data: bytes, ref: str) -> Image.Image:
    """The RGB image encoded in `data` (JPEG, PNG, WebP, ...; converted as upstream's loader does), decoded
    now so that a truncated or corrupt file fails here; ImageLoadError naming `ref` otherwise."""
    from repro.tokenizer.images import ensure_rgb

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return ensure_rgb(img)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ImageLoadError(_error_text(e), ref) from None


def read_image_file(path: str | os.PathLike) -> Image.Image:
    """The RGB image of one file (`decode_image`); ImageLoadError naming the file when it cannot be read."""
    return decode_image(_read_bytes(path, str(path)), str(path))


def _read_bytes(path: str | os.PathLike, ref: str, offset: int = 0, size: int = -1) -> bytes:
    """`size` bytes (all by default) of a file from `offset`; ImageLoadError naming `ref` when unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    except Exception as e:  # missing or unreadable file
        raise ImageLoadError(_error_text(e), ref) from None


def _error_text(e: Exception) -> str:
    # drop object addresses ("<_io.BytesIO object at 0x7f..>"): the report and shard headers
    # must be byte-identical between runs
    msg = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the image data", str(e))
    return f"{type(e).__name__}: {re.sub(r' at 0x[0-9a-fA-F]+', '', msg)}"


def _label_value(text: str) -> int | None:
    """The label an untrusted text holds, or None when it is not an integer in [0, MAX_LABEL]."""
    try:
        label = int(text)  # also ValueError for digit strings past Python's conversion limit
    except ValueError:
        return None
    return label if 0 <= label <= MAX_LABEL else None


def walk_folder(folder: Path, seen: dict, problems: list) -> list[tuple[str, list[str]]]:
    """(folder, file names) under a folder (a class folder, or step 8's reference folder), following directory
    links into unseen folders only.

    `seen` maps (device, inode) of every folder listed so far (the root and all class folders are in it
    from the start) to its path: a link to one of them is a loop or another class, reported once.
    """
    found = []

    def unreadable(e: OSError) -> None:
        problems.append({"path": e.filename, "error": f"cannot list folder ({e.strerror}); its images are skipped"})

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unreadable):
        dirnames.sort()
        follow = []
        for name in dirnames:
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError as e:  # removed or unreadable since os.walk listed it
                unreadable(e)
                continue
            if (key := (st.st_dev, st.st_ino)) in seen:
                problems.append({"path": path, "error": f"directory link to {os.path.realpath(path)}, which is "
                                 f"already listed as {seen[key]} (a loop or another class): not followed"})
                continue
            seen[key] = path
            follow.append(name)
        dirnames[:] = follow
        found.append((dirpath, filenames))
    return sorted(found)  # torchvision's order: sorted(os.walk(...)), then sorted file names


def _list_image_folder(root: Path) -> ImageSource:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    seen = {}
    for folder in [root] + [root / name for name in classes]:
        st = os.stat(folder)
        seen.setdefault((st.st_dev, st.st_ino), str(folder))
    items, problems, ignored = [], [], 0
    for label, name in enumerate(classes):
        for dirpath, filenames in walk_folder(root / name, seen, problems):
            images = [fname for fname in sorted(filenames) if fname.lower().endswith(IMAGE_EXTENSIONS)]
            items += [ImageItem(os.path.join(dirpath, fname), label) for fname in images]
            ignored += len(filenames) - len(images)
    return ImageSource("imagefolder", str(root), items, class_names=classes, problems=problems, ignored=ignored)


def _parse_labels_file(path: Path) -> tuple[list[tuple[str, int]], list[dict]]:
    """(name, label) entries in file order, and one problem per line whose label or path is unusable."""
    entries, problems, seen, first = [], [], {}, True
    for lineno, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        header_allowed, first = first, False
        parts = [p.strip() for p in (line.rsplit(",", 1) if "," in line else line.rsplit(None, 1))]
        if len(parts) != 2 or not parts[0]:
            raise ReproError(f"{path} line {lineno}: {raw!r} is not 'filename,label'")
        name, text = parts
        label = _label_value(text)
        if label is None and header_allowed and not text.lstrip("+-").isdigit():
            continue  # a header such as "filename,label"
        if name in seen:
            raise ReproError(f"{path} line {lineno}: {name!r} is listed twice (first on line {seen[name]})")
        seen[name] = lineno
        rel = os.path.normpath(name)
        if label is None:
            error = f"{path.name} line {lineno}: label {text[:40]!r} is not an integer in 0..{MAX_LABEL}"
        elif os.path.isabs(rel) or rel == ".." or rel.startswith(".." + os.sep):
            error = f"{path.name} line {lineno}: the path leaves the image folder"
        else:
            entries.append((name, label))
            continue
        problems.append({"path": name, "error": error + "; not encoded"})
    if not entries:
        raise ReproError(f"labels file {path} lists no usable images ('filename,label' per line, label an integer "
                         f"in 0..{MAX_LABEL}; {len(problems)} line(s) with a bad label or path)")
    return entries, problems


def _list_flat(root: Path, labels_file: Path) -> ImageSource:
    entries, bad_lines = _parse_labels_file(labels_file)
    # an image on a bad line is reported for that line only, not again as "no label"
    listed = {os.path.normpath(name) for name, _ in entries} | {os.path.normpath(p["path"]) for p in bad_lines}
    items = [ImageItem(str(root / name), label) for name, label in entries]
    problems = [dict(p, path=os.path.join(root, p["path"])) for p in bad_lines]
    ignored = 0
    for dirpath, _, filenames in sorted(os.walk(root)):  # the whole walk, sorted by folder
        for fname in sorted(filenames):
            rel = os.path.normpath(os.path.relpath(os.path.join(dirpath, fname), root))
            if rel in listed:
                continue
            if fname.lower().endswith(IMAGE_EXTENSIONS):
                problems.append({"path": os.path.join(dirpath, fname), "error": f"no label in {labels_file.name}"})
            elif Path(dirpath, fname) != labels_file:
                ignored += 1
    return ImageSource("flat", str(root), items, problems=problems, ignored=ignored)


def _list_tars(tars: list[Path]) -> ImageSource:
    items, problems, ignored = [], [], 0
    for tar_path in tars:
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(tar_path, mode="r:") as tf:  # uncompressed: members can be read by offset
                for m in tf:
                    if not m.isfile():
                        continue
                    head, base = os.path.split(m.name)
                    if "." not in base or base.startswith("."):
                        ignored += 1
                        continue
                    stem, ext = base.split(".", 1)
                    samples.setdefault(os.path.join(head, stem), {})[ext.lower()] = m
        except (tarfile.TarError, OSError) as e:
            raise ReproError(f"cannot read WebDataset shard {tar_path} ({e}); only uncompressed .tar is "
                             f"supported: re-download it or unpack .tar.gz to .tar") from None
        for key, members in samples.items():  # insertion order = order in the tar
            ref = f"{tar_path}::{key}"
            images = [e for e in TAR_IMAGE_EXTENSIONS if e in members]
            ignored += len([e for e in members if e not in TAR_IMAGE_EXTENSIONS and e != "cls"])
            if not images or "cls" not in members:
                what = "no image (.jpg/.jpeg/.png/.webp)" if not images else "no .cls label"
                problems.append({"path": ref, "error": f"incomplete sample: {what} (has {sorted(members)})"})
            elif len(images) > 1:
                problems.append({"path": ref, "error": f"ambiguous sample: several images {images}"})
            else:
                img, cls = members[images[0]], members["cls"]
                items.append(ImageItem(f"{ref}.{images[0]}", None, str(tar_path), img.offset_data, img.size,
                                       cls.offset_data, cls.size))
    return ImageSource("webdataset", ",".join(str(t) for t in tars), items, problems=problems, ignored=ignored)


def list_images(source: str | os.PathLike | list, labels_file: str | os.PathLike | None = None) -> ImageSource:
    """List an image source (see the module docstring for the three layouts) in a fixed order."""
    paths = [Path(p) for p in (source if isinstance(source, (list, tuple)) else [source])]
    if not paths:
        raise ReproError("no image source given: pass --source with an image folder or .tar shards")
    if missing := [p for p in paths if not p.exists()]:
        raise ReproError(f"image source {missing[0]} does not exist: check --source (or data.raw_data_dir)")
    if any(p.is_file() for p in paths):
        if bad := [str(p) for p in paths if not (p.is_file() and p.name.endswith(".tar"))]:
            raise ReproError(f"image source {bad[0]} is not a .tar shard; pass one folder, or .tar files only")
        return _list_tars(sorted(paths))
    if len(paths) > 1:
        raise ReproError(f"pass one image folder as --source, not {len(paths)}")
    root = paths[0]
    if labels_file is not None and not Path(labels_file).is_file():
        raise ReproError(f"labels file {Path(labels_file)} not found")
    for lf in [Path(labels_file)] if labels_file is not None else [root / name for name in LABEL_FILE_NAMES]:
        if lf.is_file():  # the labels file given, else the first of LABEL_FILE_NAMES in the folder
            return _list_flat(root, lf)
    if any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(root)):
        return _list_image_folder(root)
    if tars := sorted(root.glob("*.tar")):
        return _list_tars(tars)
    raise ReproError(f"image folder {root} has no class sub-folders, no {' / '.join(LABEL_FILE_NAMES)} and no "
                     f".tar shards: put images in one sub-folder per class, or add labels.txt ('filename,label')")
