"""Values from the network (or from a folder someone else can write to) made safe to build paths from.

    commit = checked_hex(value, (COMMIT,), "X-Repo-Commit", "a commit id", fail)  # the value, or fail(...)
    path = contained(root, root / "blobs" / name, fail)  # stays under root, even through symlinked folders
    fd = open_no_follow(part, os.O_WRONLY | os.O_APPEND, "partial download", fail)  # a planted link: fail

Why (issue 17): a Hub mirror is a server like any other. huggingface_hub puts the ETag, X-Linked-Etag
and X-Repo-Commit headers into cache paths as they come (its own `hf_hub_download` 2.4 too), so a
mirror answering `ETag: "../../victim/file"` could make step 2 write anywhere the user can write.
Everything here fails through the caller's `fail(message)`, which raises the caller's DownloadError
with the asset and mirror named.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Callable, NoReturn

# The two digests the Hub names files by: the LFS object's sha256 and the git blob id (sha1).
SHA256 = re.compile(r"[0-9a-f]{64}")
GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
COMMIT = GIT_SHA1  # a full git commit id; the Hub always sends the full 40 digits, lower case
SHOWN_CHARS = 80  # how much of a hostile value an error message repeats

Fail = Callable[[str], NoReturn]


def shown(value: object) -> str:
    """A value for an error message: quoted, control characters escaped (one line), truncated."""
    text = str(value)
    cut = text[:SHOWN_CHARS]
    return repr(cut) + ("…" if len(text) > SHOWN_CHARS else "")


def checked_hex(value: str | None, patterns: tuple[re.Pattern, ...], header: str, expected: str,
                fail: Fail) -> str:
    """`value` if it fully matches one of `patterns`, else fail naming the header and the value."""
    if value is not None and any(p.fullmatch(value) for p in patterns):
        return value
    fail(f"sent {header}: {shown(value)}, expected {expected}")


def plain_segments(name: str) -> bool:
    """True for a relative path whose segments are real names: no '', '.', '..', backslash or NUL."""
    if not name or name.startswith("/") or "\\" in name or "\0" in name:
        return False
    return all(seg not in ("", ".", "..") for seg in name.split("/"))


def contained(root: Path, path: Path, fail: Fail) -> Path:
    """`path` if its folder, with every symlink resolved, is `root` or inside it; else fail.

    The last component is not resolved: it is what the caller creates, replaces or refuses to follow.
    """
    real_root = os.path.realpath(root)
    where = os.path.join(os.path.realpath(path.parent), path.name)
    if path.name in ("", ".", "..") or os.path.commonpath([real_root, where]) != real_root:
        fail(f"{path} leads outside {root} (to {where})")
    return path


def refuse_symlink(path: Path, role: str, fail: Fail) -> None:
    """Fail if `path` is a symlink or anything but a regular file (a missing file is fine)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        fail(f"refusing to use the {role} {path}: it is a symbolic link (to {shown(os.readlink(path))}), "
             f"not a file the kit wrote; delete it and run again")
    if not stat.S_ISREG(st.st_mode):
        fail(f"refusing to use the {role} {path}: it is not a regular file; delete it and run again")


def open_no_follow(path: Path, flags: int, role: str, fail: Fail, mode: int = 0o644) -> int:
    """os.open without following a symlink at `path` (O_NOFOLLOW where the OS has it)."""
    refuse_symlink(path, role, fail)
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP:  # planted between the check and the open
            refuse_symlink(path, role, fail)
        raise
