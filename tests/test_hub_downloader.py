"""The resumable downloader against servers that misbehave (tests/fakehub.py, real HTTP, no mocks).

One test per branch of repro/hub/download.py that a well-behaved server never reaches: a Range
request answered 200 (restart from byte 0), a 206 with the wrong Content-Range, 416 for a partial
file that is already whole, a connection dropped mid-body (resumed in the same run, then a resumable
error), and a server sending more bytes than the file has.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path

import pytest

from repro.hub.download import (CHUNK_SIZE, MAX_RESUMES, DownloadError, HashMismatchError, NetworkError,
                                NotFoundError, download_url)
from steps.step2_download import main
from tests.fakehub import FakeHub, serve_manifest

NAME = "weights.bin"
DATA = random.Random(7).randbytes(200_000)
SHA = hashlib.sha256(DATA).hexdigest()
VAE = ("hustvl/vavae-imagenet256-f16d32-dinov2", "vavae-imagenet256-f16d32-dinov2.pt")


@pytest.fixture
def hub():
    with FakeHub(plain={NAME: DATA}) as h:
        yield h


def fetch(hub: FakeHub, folder: Path, *, size: int | None = len(DATA)):
    return download_url(hub.plain_url(NAME), folder / NAME, expected_size=size, expected_sha256=SHA, what=NAME)


def part_of(folder: Path) -> Path:
    return folder / f"{NAME}.part"


def test_range_ignored_restarts_from_zero(hub, tmp_path):
    # Stale bytes on disk (not even a prefix): a server that answers 200 to our Range sends the whole
    # file, so the stale bytes must go and the hash must start over.
    part_of(tmp_path).write_bytes(b"stale!" * 5_000)
    hub.ignore_range.add(NAME)
    got = fetch(hub, tmp_path)
    assert hub.ranges() == ["bytes=30000-"]
    assert (tmp_path / NAME).read_bytes() == DATA and got.sha256 == SHA and got.size == len(DATA)
    assert got.resumed_from == 0, "nothing from disk was kept, so the run must not claim a resume"
    assert not part_of(tmp_path).exists()


def test_range_ignored_by_the_cdn_in_step2(monkeypatch, tmp_path):
    with FakeHub({VAE: DATA}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        manifest = str(serve_manifest(tmp_path, hub))
        blobs = Path(os.environ["HF_HOME"]) / "hub" / "models--hustvl--vavae-imagenet256-f16d32-dinov2" / "blobs"
        blobs.mkdir(parents=True)
        (blobs / f"{SHA}.incomplete").write_bytes(DATA[:70_000])  # what a killed run left
        hub.ignore_range.add(VAE)
        out = main(only=["vavae-f16d32"], manifest=manifest)["assets"]["vavae-f16d32"]
        assert hub.ranges() == ["bytes=70000-"]
        assert Path(out["path"]).read_bytes() == DATA and out["sha256"] == SHA
        assert not list(blobs.glob("*.incomplete"))


def test_wrong_content_range_deletes_the_partial_file(hub, tmp_path):
    part_of(tmp_path).write_bytes(DATA[:50_000])
    hub.bad_range.add(NAME)  # answers "bytes 0-199999/200000" to "bytes=50000-"
    with pytest.raises(DownloadError) as err:
        fetch(hub, tmp_path)
    msg = str(err.value)
    assert type(err.value) is DownloadError and "\n" not in msg
    assert "different byte range" in msg and "'bytes 0-199999/200000'" in msg and "bytes=50000-" in msg
    assert not part_of(tmp_path).exists() and not (tmp_path / NAME).exists()
    # Once the server behaves, the next run starts from zero and succeeds.
    hub.bad_range.clear()
    hub.requests.clear()
    got = fetch(hub, tmp_path)
    assert hub.ranges() == [] and (tmp_path / NAME).read_bytes() == DATA and got.resumed_from == 0


def test_416_for_a_partial_file_that_is_already_whole(hub, tmp_path):
    # Size unknown (a plain URL with no pinned size): the whole file on disk only shows when the
    # server answers 416 to "bytes=200000-"; the bytes on disk are then verified and used.
    part_of(tmp_path).write_bytes(DATA)
    got = fetch(hub, tmp_path, size=None)
    assert hub.ranges() == [f"bytes={len(DATA)}-"] and hub.sent.get(NAME, 0) == 0
    assert (tmp_path / NAME).read_bytes() == DATA and got.sha256 == SHA and got.resumed_from == len(DATA)
    assert not part_of(tmp_path).exists()


def test_416_for_a_stale_longer_partial_file_is_a_hash_mismatch(hub, tmp_path):
    part_of(tmp_path).write_bytes(DATA + b"junk from an older, longer file")
    with pytest.raises(HashMismatchError, match=f"{NAME}: sha256 mismatch.*deleted"):
        fetch(hub, tmp_path, size=None)
    assert not part_of(tmp_path).exists()


def test_a_partial_file_longer_than_the_known_size_is_dropped_before_any_range(hub, tmp_path):
    part_of(tmp_path).write_bytes(DATA + b"junk from an older, longer file")
    got = fetch(hub, tmp_path)  # the size is known: no Range for bytes that cannot be a prefix
    assert hub.ranges() == [] and (tmp_path / NAME).read_bytes() == DATA and got.resumed_from == 0


def test_a_body_shorter_than_the_known_size_is_a_resumable_error(hub, tmp_path):
    # The server ends the body cleanly (its Content-Length) but the file is 10 bytes longer than that:
    # the downloader asks for the rest (416 each time), then stops with the bytes it has kept.
    with pytest.raises(NetworkError) as err:
        fetch(hub, tmp_path, size=len(DATA) + 10)
    assert f"download stopped at {len(DATA)} of {len(DATA) + 10} bytes" in str(err.value)
    assert "run the same command again to resume" in str(err.value)
    assert hub.ranges() == [f"bytes={len(DATA)}-"] * MAX_RESUMES
    assert part_of(tmp_path).read_bytes() == DATA and not (tmp_path / NAME).exists()


# A dropped connection loses the chunk being read (requests hands out whole chunks): every answer
# below hangs up after 1.5 chunks, so each keeps exactly one chunk on disk.
BIG = random.Random(8).randbytes(3 * CHUNK_SIZE + 700_000)
BIG_SHA = hashlib.sha256(BIG).hexdigest()
DROP = CHUNK_SIZE + CHUNK_SIZE // 2


def fetch_big(hub: FakeHub, folder: Path, data: bytes = BIG):
    hub.plain["big.bin"] = data
    return download_url(hub.plain_url("big.bin"), folder / "big.bin", expected_size=len(data),
                        expected_sha256=hashlib.sha256(data).hexdigest(), what="big.bin")


def test_dropped_stream_is_resumed_within_the_run(hub, tmp_path):
    hub.drop_after["big.bin"] = DROP  # four answers make the file: three reconnects (MAX_RESUMES)
    got = fetch_big(hub, tmp_path)
    assert hub.ranges() == [f"bytes={k * CHUNK_SIZE}-" for k in (1, 2, 3)]
    assert (tmp_path / "big.bin").read_bytes() == BIG and got.sha256 == BIG_SHA and got.resumed_from == 0


def test_dropped_stream_gives_up_with_a_resumable_error(hub, tmp_path):
    data = BIG + BIG  # more than four answers' worth
    hub.drop_after["big.bin"] = DROP
    with pytest.raises(NetworkError) as err:
        fetch_big(hub, tmp_path, data)
    kept = CHUNK_SIZE * (MAX_RESUMES + 1)
    msg = str(err.value)
    assert f"dropped after {kept} bytes" in msg and "run the same command again to resume" in msg
    assert (tmp_path / "big.bin.part").read_bytes() == data[:kept], "the bytes received must stay on disk"
    # The next run (the server fixed) continues from there.
    hub.drop_after.clear()
    hub.requests.clear()
    got = fetch_big(hub, tmp_path, data)
    assert hub.ranges() == [f"bytes={kept}-"] and got.resumed_from == kept
    assert (tmp_path / "big.bin").read_bytes() == data


def test_too_many_bytes_deletes_the_partial_file_and_stops_reading(hub, tmp_path):
    hub.extra[NAME] = bytes(64 << 20)  # 64 MB more than the 200 KB the file has
    with pytest.raises(DownloadError) as err:
        fetch(hub, tmp_path)
    msg = str(err.value)
    assert type(err.value) is DownloadError, "not a NetworkError: resuming these bytes would be wrong"
    assert f"sent more than the {len(DATA)} bytes the file has" in msg and "deleted" in msg
    assert not part_of(tmp_path).exists() and not (tmp_path / NAME).exists()
    # The reader stopped soon after the size was passed, not at the end of the 64 MB (the slack is
    # the chunk being read and the kernel's socket buffers).
    assert hub.sent[NAME] < 24 << 20


def test_a_missing_plain_file_is_a_not_found_error_naming_the_host(hub, tmp_path):
    with pytest.raises(NotFoundError, match=re.escape("missing.bin: not found (HTTP 404 from 127.0.0.1:")):
        download_url(hub.plain_url("missing.bin"), tmp_path / "missing.bin", what="missing.bin")
    assert not (tmp_path / "missing.bin").exists() and not (tmp_path / "missing.bin.part").exists()
