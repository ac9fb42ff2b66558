"""The ADM evaluator's npz format at the byte level: read member headers, map stored members, stream-write.

An npz is a zip of `.npy` members (`arr_0`: uint8 N x H x W x 3 images, `arr_1`: int64 labels, as
openai/guided-diffusion's image_sample.py writes them). Stored (uncompressed) members can be read in
place: the data offset is the member's local zip header offset + header length + the `.npy` header
length. Writing streams row chunks into a stored zip64 member with a fixed timestamp, so the file is
a pure function of its rows (byte-identical reruns) and never holds more than one chunk in memory.
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from repro.errors import ReproError

IMAGE_KEY = "arr_0"
LABEL_KEY = "arr_1"
FORMAT_HINT = "the ADM format is arr_0: uint8 N x H x W x 3 (step 4 writes it)"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: fixed, so reruns give the same bytes


def npz_keys(path: str | os.PathLike) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise ReproError(f"{path}: not a readable .npz file ({e})") from None


@dataclass
class NpyMember:
    """Where one array of an npz lives: its header fields and, if stored uncompressed, its byte offset."""
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    header_len: int
    data_offset: Optional[int]  # absolute file offset of the data (None: compressed member)


def read_npy_member(path: str | os.PathLike, key: str) -> NpyMember:
    keys = npz_keys(path)
    if key not in keys:
        raise ReproError(f"{path}: no '{key}' array (it has: {', '.join(keys) or 'nothing'}); {FORMAT_HINT}")
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ReproError(f"{path}: '{key}' uses .npy format {version}; re-save it with np.savez")
            header_len = f.tell()
    data_offset = None
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
        with open(path, "rb") as raw:
            raw.seek(info.header_offset)
            local = raw.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ReproError(f"{path}: damaged zip header for '{key}'; re-create the file")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        data_offset = info.header_offset + 30 + name_len + extra_len + header_len
    return NpyMember(tuple(shape), np.dtype(dtype), bool(fortran), header_len, data_offset)


def npz_count(path: str | os.PathLike) -> int | None:
    """How many images `path`'s arr_0 holds (read from the .npy header only); None if absent or unreadable."""
    try:
        return int(read_npy_member(path, IMAGE_KEY).shape[0])
    except (ReproError, OSError, KeyError, ValueError, IndexError, zipfile.BadZipFile):
        return None


def write_npy_member(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype,
                chunks: Iterable[np.ndarray]) -> None:
    """Write `name` (a .npy file) into the zip from row chunks; never holds more than one chunk."""
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_STORED  # as np.savez: uncompressed, so readers can stream it
    info.external_attr = 0o644 << 16
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    rows = 0
    with zf.open(info, "w", force_zip64=True) as f:  # zip64: arr_0 of 50,000 x 256 px is ~9.8 GB
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            if chunk.shape[1:] != shape[1:]:
                raise ReproError(f"{name}: a chunk of shape {chunk.shape} does not match {shape}")
            f.write(chunk.tobytes())
            rows += chunk.shape[0]
    if rows != shape[0]:
        raise ReproError(f"{name}: wrote {rows} rows, expected {shape[0]}")
