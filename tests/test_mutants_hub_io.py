"""Downloads and writes, where a wrong file or a wrong order looks fine until a crash or a swap.

- Step 2 takes a file under --dest (or a search folder) only when its sha256 matches whenever a sha256 is
  known, the size alone is never enough: a same-size impostor (a truncated-then-padded copy, another
  revision of the same tensor shapes) must be ignored and the real file fetched. Real HTTP (tests/fakehub.py).
- The atomic writer flushes the temp file to disk (fsync) before renaming it onto the target, so a power
  loss after the rename cannot leave an empty or partial file under the final name. The order is observed by
  wrappers around os.fsync/os.replace that call through to the real functions.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from repro.utils import io as rio
from steps.step2_download import main
from tests.fakehub import FakeHub, serve_manifest

VAE = ("hustvl/vavae-imagenet256-f16d32-dinov2", "vavae-imagenet256-f16d32-dinov2.pt")
INCEPTION = "weights-inception-2015-12-05-6726825d.pth"


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def hub(monkeypatch):
    content = {"vavae-f16d32": blob(30_000, 1), "fid-inception": blob(20_000, 3)}
    with FakeHub.for_assets(content) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


def _impostor(real: bytes) -> bytes:
    fake = bytearray(real)
    fake[len(fake) // 2] ^= 0xFF  # one byte flipped: same size, another sha256
    return bytes(fake)


@pytest.mark.parametrize("pin_hf", [False, True])
def test_a_same_size_impostor_under_dest_is_not_taken(hub, tmp_path, capsys, pin_hf):
    dest = tmp_path / "weights"
    dest.mkdir()
    real_vae, real_inception = hub.files[VAE], hub.plain[INCEPTION]
    (dest / VAE[1]).write_bytes(_impostor(real_vae))  # the Hub's (or the pinned) sha256 is known
    (dest / INCEPTION).write_bytes(_impostor(real_inception))  # plain URL: size and sha256 pinned
    manifest = serve_manifest(tmp_path, hub, pin_hf=pin_hf)
    out = main(dest=str(dest), manifest=str(manifest), only=["vavae-f16d32", "fid-inception"])["assets"]
    for name, real in (("vavae-f16d32", real_vae), ("fid-inception", real_inception)):
        rec = out[name]
        assert rec["source"] == "fetched", (name, rec)
        assert Path(rec["path"]).read_bytes() == real
    printed = capsys.readouterr().out
    assert f"ignoring {dest / VAE[1]}: sha256" in printed and f"ignoring {dest / INCEPTION}: sha256" in printed
    assert hub.count("GET", VAE[1]) == 1 and hub.count("GET", INCEPTION) == 1


def test_a_same_size_impostor_is_not_found_offline(hub, tmp_path, monkeypatch):
    from repro.hub import OfflineError

    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / INCEPTION).write_bytes(_impostor(hub.plain[INCEPTION]))
    manifest = serve_manifest(tmp_path, hub)
    with pytest.raises(OfflineError, match="fid-inception"):
        main(dest=str(dest), manifest=str(manifest), only=["fid-inception"], offline=True)
    (dest / INCEPTION).write_bytes(hub.plain[INCEPTION])  # the right bytes are found, offline too
    rec = main(dest=str(dest), manifest=str(manifest), only=["fid-inception"], offline=True)["assets"]["fid-inception"]
    assert rec["source"] == "found" and rec["verified_by"] == "pinned sha256"


# ---------------------------------------------------------------------------------------------------
# fsync before rename


def _fd_path(fd: int) -> str:
    return os.path.realpath(f"/proc/self/fd/{fd}")


@pytest.fixture
def calls(monkeypatch):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name an fd's file")
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", _fd_path(fd), os.fstat(fd).st_size))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _check_order(events: list[tuple], target: Path) -> None:
    target = os.path.realpath(target)
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == target]
    assert len(renames) == 1, events
    temp = events[renames[0]][1]
    synced = [i for i, e in enumerate(events) if e[0] == "fsync" and e[1] == temp]
    assert synced and synced[-1] < renames[0], f"the temp file was not fsynced before the rename: {events}"
    assert events[synced[-1]][2] == os.path.getsize(target)  # synced once complete, not before the write


def test_atomic_writers_fsync_the_temp_file_before_the_rename(tmp_path, calls):
    rio.atomic_write_bytes(tmp_path / "a.bin", b"x" * 1000)
    _check_order(calls, tmp_path / "a.bin")
    calls.clear()
    rio.atomic_write_json(tmp_path / "b.json", {"k": list(range(50))})
    _check_order(calls, tmp_path / "b.json")
    calls.clear()
    rio.atomic_torch_save({"w": torch.arange(100)}, tmp_path / "c.pt")
    _check_order(calls, tmp_path / "c.pt")
    calls.clear()
    rio.atomic_save_safetensors({"w": torch.ones(64)}, tmp_path / "d.safetensors")
    _check_order(calls, tmp_path / "d.safetensors")
    calls.clear()
    with rio.atomic_path(tmp_path / "e.txt") as tmp:
        tmp.write_text("hello")
    _check_order(calls, tmp_path / "e.txt")
    assert (tmp_path / "e.txt").read_text() == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json", "c.pt", "d.safetensors", "e.txt"]


# ---------------------------------------------------------------------------------------------------
# The rest of repro.utils.io, from mutation testing (docs/mutation_testing.md)


def test_temp_names_never_reuse_an_existing_file_and_give_up_after_100_tries(tmp_path, monkeypatch):
    import secrets

    names = iter(["aaaaaaaa", "aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(names))  # the random part, made predictable
    squatter = tmp_path / ".out.bin.aaaaaaaa.tmp.bin"
    squatter.write_bytes(b"someone else's")
    rio.atomic_write_bytes(tmp_path / "out.bin", b"mine")
    assert squatter.read_bytes() == b"someone else's"  # O_EXCL: an existing name is skipped, never truncated
    assert (tmp_path / "out.bin").read_bytes() == b"mine"
    tries = []
    monkeypatch.setattr(secrets, "token_hex", lambda n: tries.append(n) or "aaaaaaaa")
    with pytest.raises(FileExistsError, match=r"no free temp name for \.out\.bin\.\*\.tmp\.bin in "):
        rio.atomic_write_bytes(tmp_path / "out.bin", b"again")
    assert len(tries) == 100 and (tmp_path / "out.bin").read_bytes() == b"mine"


def test_json_is_written_sorted_indented_and_with_paths_as_text(tmp_path):
    rio.atomic_write_json(tmp_path / "a.json", {"b": [1, 2], "a": Path("/x/y")})
    assert (tmp_path / "a.json").read_text() == '{\n  "a": "/x/y",\n  "b": [\n    1,\n    2\n  ]\n}\n'
    rio.atomic_write_text(tmp_path / "t.txt", "é")
    assert (tmp_path / "t.txt").read_bytes() == "é".encode("utf-8")


def test_remove_stale_temps_counts_and_removes_only_temp_files(tmp_path):
    for name in (".a.pt.1234abcd.tmp.pt", ".b.json.0000ffff.tmp.json", ".c.0a0a0a0a.tmp"):
        (tmp_path / name).write_bytes(b"partial")
    for name in ("a.pt", "tmp.txt", ".hidden", "x.TMP"):
        (tmp_path / name).write_bytes(b"keep")
    assert rio.remove_stale_temps(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "a.pt", "tmp.txt", "x.TMP"]
    assert rio.remove_stale_temps(tmp_path) == 0 and rio.remove_stale_temps(tmp_path / "absent") == 0


def test_disk_full_is_recognised_through_causes_and_contexts():
    import errno

    assert rio.disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not rio.disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not rio.disk_full(ValueError("bad value")) and not rio.disk_full(None)
    assert rio.disk_full(RuntimeError("safetensors: No space left on device (os error 28)"))
    try:
        try:
            raise OSError(errno.ENOSPC, "disk")
        except OSError as inner:
            raise RuntimeError("writer failed") from inner
    except RuntimeError as outer:
        assert rio.disk_full(outer)
    try:
        try:
            raise OSError(errno.ENOSPC, "disk")
        except OSError:
            raise KeyError("during handling")  # noqa: B904 - the implicit context is what is followed
    except KeyError as outer:
        assert rio.disk_full(outer)
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a  # a cycle ends
    assert not rio.disk_full(a)


def test_a_full_disk_becomes_one_line_naming_the_file_and_nothing_is_left(tmp_path):
    import errno

    from repro.errors import ReproError

    with pytest.raises(ReproError, match=r"the disk holding .* is full \(\d+ MB free\) while writing out\.bin"):
        with rio.atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyError):  # any other error passes through, the temp file is removed too
        with rio.atomic_path(tmp_path / "out.bin"):
            raise KeyError("x")
    assert list(tmp_path.iterdir()) == []


def test_sha256_file_reads_in_chunks_to_the_same_digest(tmp_path):
    import hashlib

    data = random.Random(0).randbytes(10_000)
    (tmp_path / "f").write_bytes(data)
    assert rio.sha256_file(tmp_path / "f", chunk_size=7) == hashlib.sha256(data).hexdigest()
    (tmp_path / "e").write_bytes(b"")
    assert rio.sha256_file(tmp_path / "e") == hashlib.sha256(b"").hexdigest()


def test_read_only_error_names_the_nearest_existing_folder_of_the_refused_path(tmp_path):
    import errno

    from repro.errors import ReproError

    (tmp_path / "ro").mkdir()
    (tmp_path / "other").mkdir()
    refused = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro" / "sub" / "f.txt"))
    err = rio.read_only_error(tmp_path / "other", refused)  # the error's own path wins over the caller's folder
    assert isinstance(err, ReproError) and str(err) == (
        f"cannot write in {tmp_path / 'ro'} (Read-only file system): the folder is read-only (a dataset or input "
        "mount is) or not yours; write elsewhere: --out DIR for this step's outputs, REPRO_RUNS_DIR=DIR for the "
        "runs folder, or run from a folder you can write to")
    nameless = OSError(errno.EACCES, "Permission denied")  # no filename: the caller's folder, walked up
    assert str(rio.read_only_error(tmp_path / "other" / "x" / "y", nameless)).startswith(
        f"cannot write in {tmp_path / 'other'} (Permission denied): ")
    assert rio.read_only_error(tmp_path, OSError(errno.ENOSPC, "No space left on device")) is None
    assert rio.read_only_error(tmp_path, ValueError("not an OSError")) is None


def test_make_dirs_turns_only_a_refusal_into_one_line(tmp_path):
    from repro.errors import ReproError

    assert rio.make_dirs(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    with pytest.raises(ReproError, match=r"^cannot write in /sys \(Operation not permitted\): the folder is read-only"):
        rio.make_dirs("/sys/repro-mutation-test/out")  # /sys refuses mkdir even to root (EPERM)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as caught:  # any other error is raised as it is
        rio.make_dirs(tmp_path / "file" / "sub")
    assert not isinstance(caught.value, ReproError)


def test_remove_stale_temps_tolerates_a_temp_that_another_process_removed_first(tmp_path, monkeypatch):
    (tmp_path / ".a.json.tmp1").write_text("x")

    class Racing(type(tmp_path)):
        def glob(self, pattern):  # a listing that still holds a file deleted in between
            yield from super().glob(pattern)
            yield self / ".gone.json.tmp2"

    monkeypatch.setattr(rio, "Path", Racing)
    assert rio.remove_stale_temps(tmp_path) == 1 and not (tmp_path / ".a.json.tmp1").exists()


def test_wrote_line_joins_every_written_item_and_says_nothing_otherwise(tmp_path):
    assert rio.wrote_line([tmp_path / "a.npz", None, "b.png", ""]) == f"wrote: {tmp_path / 'a.npz'}, b.png"
    assert rio.wrote_line([None, ""]) == "wrote: nothing"
