"""Atomic file writes: a temp file in the same folder, fsync, then rename.

A reader (or a resumed run) either sees the old complete file or the new
complete file, never a half-written one, even if the process is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from repro.errors import ReproError

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success rename it onto `path`.

    On any exception the temp file is removed and `path` is untouched; a full disk becomes a
    ReproError naming the file and the free space (the writer's own error is its cause).
    `suffix` keeps the extension for writers that look at it (PIL, numpy, safetensors).
    """
    path = Path(path)
    make_dirs(path.parent)
    try:
        tmp_path = _create_temp(path.parent, f".{path.name}.", f".tmp{path.suffix if suffix is None else suffix}")
    except OSError as e:
        raise read_only_error(path.parent, e) or e
    try:
        # The data reaches the disk before the rename: after a crash `path` is the old file or the new, whole.
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        # Nothing half-written stays behind; a full disk is said as such, whoever the writer was.
        tmp_path.unlink(missing_ok=True)
        if disk_full(e):
            import shutil

            free = shutil.disk_usage(path.parent).free
            raise ReproError(f"the disk holding {path.parent} is full ({free / 1e6:.0f} MB free) while writing "
                                f"{path.name}: free some space or write to a larger disk, then run the same command "
                                "again (finished files are kept)") from e
        raise


# A read-only mount (EROFS: a dataset folder on Kaggle or Colab), a folder of another user (EACCES), or one
# the kernel refuses outright (EPERM: /sys, some network mounts).
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def read_only_error(folder: str | os.PathLike, exc: BaseException) -> "Exception | None":
    """A one-line ReproError for 'cannot write in `folder`' (read-only, not ours), or None for other errors."""
    if not (isinstance(exc, OSError) and exc.errno in READ_ONLY_ERRNOS):
        return None
    where = Path(exc.filename or folder)  # the folder that refused: the nearest one that exists
    while not where.is_dir() and where != where.parent:
        where = where.parent
    return ReproError(f"cannot write in {where} ({os.strerror(exc.errno)}): the folder is read-only (a dataset or "
                      f"input mount is) or not yours; write elsewhere: --out DIR for this step's outputs, "
                      f"REPRO_RUNS_DIR=DIR for the runs folder, or run from a folder you can write to")


def make_dirs(folder: str | os.PathLike) -> Path:
    """`mkdir -p folder`; a read-only or foreign parent is one line naming it (read_only_error)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise read_only_error(folder, e) or e from None
    return folder


def _create_temp(folder: Path, prefix: str, suffix: str) -> Path:
    """Create an empty temp file with mode 0666 & ~umask, as a plain `open(path, "w")` would.

    `tempfile.mkstemp` creates 0600 files, and the rename keeps that mode, so every output would be
    private under the usual umask 022; the kernel applies the umask here at creation (no chmod race).
    """
    for _ in range(100):
        name = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return name
    raise FileExistsError(f"no free temp name for {prefix}*{suffix} in {folder}")


def wrote_line(items: "Iterable[Any]") -> str:
    """The line every step ends with: `wrote: a, b, c` (None and empty entries left out; `wrote: nothing`
    when nothing was written), so a user, a notebook cell or a script finds a step's files in its last line."""
    named = [str(item) for item in items if item]
    return "wrote: " + (", ".join(named) if named else "nothing")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch  # imported here so that light users of this module (downloads) start fast

    # through a Python file: a full disk then surfaces as OSError(ENOSPC) in the chain
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from or during) is 'No space left on device'.

    Writers in other languages (safetensors' Rust core) report it only as text ("os error 28").
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def atomic_save_safetensors(tensors: dict[str, "torch.Tensor"], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete temp files left by a killed writer (`.NAME.*.tmp*`). Returns how many."""
    n = 0
    for p in Path(folder).glob(".*.tmp*"):  # none in a missing folder
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (multi-GB checkpoints never sit in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()
