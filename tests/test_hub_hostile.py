"""A hostile Hub mirror (tests/fakehub.py answering crafted headers) cannot write outside the cache.

Issue 17: cache paths are built from ETag / X-Linked-Etag (blob, partial and lock file) and
X-Repo-Commit (snapshot link); a planted symlink at a partial or lock file was followed. Each test
plants a victim file outside the cache, lets the mirror aim at it, and checks the download stops with
one line naming the header, its value and the mirror, and that the victim and its folder are untouched.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from repro.errors import ReproError
from repro.hub import AuthError, DownloadError
from repro.hub.manifest import manifest_from_dict
from steps.step2_download import main
from tests.fakehub import FakeHub, serve_manifest

REPO = "hustvl/vavae-imagenet256-f16d32-dinov2"
STATS = (REPO, "latents_stats.pt")
PAYLOAD = b"mirror payload " * 200
PRECIOUS = b"precious " * 256


@pytest.fixture
def hub(monkeypatch):
    with FakeHub.for_assets({"latents-stats": PAYLOAD}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


@pytest.fixture
def victim(tmp_path) -> Path:
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "file").write_bytes(PRECIOUS)
    (folder / STATS[1]).write_bytes(PRECIOUS)
    return folder


def storage() -> Path:
    return Path(os.environ["HF_HOME"]) / "hub" / "models--hustvl--vavae-imagenet256-f16d32-dinov2"


def untouched(victim: Path) -> bool:
    return (sorted(p.name for p in victim.iterdir()) == sorted(["file", STATS[1]])
            and all(not (victim / n).is_symlink() and (victim / n).read_bytes() == PRECIOUS
                    for n in ("file", STATS[1])))


def stopped(hub: FakeHub, tmp_path: Path, **kwargs) -> str:
    """Run step 2 for latents-stats; it must fail before any GET; the one-line message."""
    with pytest.raises(DownloadError) as err:
        main(only=["latents-stats"], manifest=str(serve_manifest(tmp_path, hub)), **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("latents-stats (")
    return msg


def hostile(msg: str, hub: FakeHub, header: str, value: str) -> None:
    assert header in msg and repr(value[:80]) in msg, msg
    assert f"the Hub at {hub.endpoint} (HF_ENDPOINT)" in msg and "nothing was written" in msg
    assert "unset HF_ENDPOINT" in msg


@pytest.mark.parametrize("lfs", [True, False], ids=["lfs-x-linked-etag", "non-lfs-etag"])
@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_etag_cannot_point_outside_the_cache(hub, tmp_path, victim, lfs, absolute):
    target = victim / "file"
    value = str(target) if absolute else os.path.relpath(target, storage() / "blobs")
    header = "X-Linked-Etag" if lfs else "ETag"
    if not lfs:
        hub.non_lfs.add(STATS)
    hub.headers[STATS] = {header: f'"{value}"'}
    msg = stopped(hub, tmp_path)
    hostile(msg, hub, header, value)
    assert "expected a 64-hex-digit sha256 (LFS file) or a 40-hex-digit git blob id" in msg
    assert untouched(victim), "no payload, .incomplete or .lock may appear beside the victim"
    assert hub.count("GET") == 0


def test_commit_cannot_point_outside_the_cache(hub, tmp_path, victim):
    value = os.path.relpath(victim, storage() / "snapshots")  # snapshots/<commit>/latents_stats.pt = victim's
    hub.headers[STATS] = {"X-Repo-Commit": value}
    msg = stopped(hub, tmp_path)
    hostile(msg, hub, "X-Repo-Commit", value)
    assert untouched(victim) and hub.count("GET") == 0


@pytest.mark.parametrize("header, value, expected", [
    ("X-Linked-Etag", "abc123", "64-hex-digit sha256"),
    ("X-Linked-Etag", "A" * 64, "64-hex-digit sha256"),  # the Hub sends lower case; a path must not differ
    ("X-Linked-Etag", "a" * 64 + "/x", "64-hex-digit sha256"),
    ("X-Linked-Etag", "f" * 5000, "64-hex-digit sha256"),
    ("X-Repo-Commit", "main", "40-hex-digit commit id"),
    ("X-Repo-Commit", "0" * 39, "40-hex-digit commit id"),
    ("Location", "file://localhost/etc/passwd", "an http(s) URL"),
    ("X-Linked-Size", "-5", "a size in bytes"),
], ids=["short", "upper-case", "slash", "5000-chars", "branch-name", "39-digits", "file-url", "negative-size"])
def test_malformed_header_values_are_refused(hub, tmp_path, header, value, expected):
    hub.headers[STATS] = {header: f'"{value}"' if "Etag" in header else value}
    msg = stopped(hub, tmp_path)
    assert expected in msg and f"the Hub at {hub.endpoint} (HF_ENDPOINT)" in msg
    assert len(msg) < 700, "a hostile value is repeated truncated, not whole"
    assert not storage().exists() and hub.count("GET") == 0


def test_missing_commit_header_is_named(hub, tmp_path):
    hub.headers[STATS] = {"X-Repo-Commit": None}
    msg = stopped(hub, tmp_path)
    assert "lacks X-Repo-Commit/ETag; is HF_ENDPOINT a Hub mirror?" in msg and hub.count("GET") == 0


@pytest.mark.parametrize("status, error, expected", [(400, DownloadError, "the Hub answered HTTP 400; try again later"),
                                                     (403, AuthError, "unauthorised (HTTP 403); set HF_TOKEN")])
def test_error_status_from_the_mirror_is_one_line(hub, tmp_path, status, error, expected):
    hub.status[STATS] = status  # no X-Error-Code: the client raises its generic HTTP error
    with pytest.raises(error) as err:
        main(only=["latents-stats"], manifest=str(serve_manifest(tmp_path, hub)))
    assert expected in str(err.value) and "\n" not in str(err.value) and hub.count("GET") == 0


def test_legitimate_etags_still_work(hub, tmp_path, monkeypatch):
    """LFS files are named by their 64-hex sha256; small non-LFS files by their 40-hex git blob id."""
    manifest = str(serve_manifest(tmp_path, hub))
    lfs = main(only=["latents-stats"], manifest=manifest)["assets"]["latents-stats"]
    assert lfs["verified_by"] == "hub sha256" and Path(lfs["path"]).read_bytes() == PAYLOAD
    assert len(Path(os.path.realpath(lfs["path"])).name) == 64

    monkeypatch.setenv("HF_HOME", str(tmp_path / "second_home"))
    with FakeHub.for_assets({"latents-stats": PAYLOAD + b"v2"}, non_lfs={STATS}, revision_sha="b" * 40) as small:
        monkeypatch.setenv("HF_ENDPOINT", small.endpoint)
        manifest = str(serve_manifest(tmp_path, small))
        rec = main(only=["latents-stats"], manifest=manifest)["assets"]["latents-stats"]
    assert rec["verified_by"] == "hub git blob id" and Path(rec["path"]).read_bytes() == PAYLOAD + b"v2"
    assert len(Path(os.path.realpath(rec["path"])).name) == 40 and f"/snapshots/{'b' * 40}/" in rec["path"]
    from huggingface_hub import hf_hub_download

    found = hf_hub_download(*STATS, cache_dir=storage().parent, local_files_only=True)
    assert Path(found).read_bytes() == PAYLOAD + b"v2"


def plant(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def test_planted_part_symlink_under_dest_is_refused(hub, tmp_path, victim):
    dest = tmp_path / "weights"
    plant(dest / f"{STATS[1]}.part", victim / "file")
    msg = stopped(hub, tmp_path, dest=str(dest))
    assert f"refusing to use the partial download {dest / STATS[1]}.part" in msg and "symbolic link" in msg
    assert "delete it and run again" in msg and untouched(victim)


def test_planted_incomplete_symlink_in_the_cache_is_refused(hub, tmp_path, victim):
    plant(storage() / "blobs" / f"{hub.sha256(STATS)}.incomplete", victim / "file")
    msg = stopped(hub, tmp_path)
    assert "refusing to use the partial download" in msg and "symbolic link" in msg and untouched(victim)


@pytest.mark.parametrize("where", ["cache", "dest"])
def test_planted_lock_symlink_is_refused(hub, tmp_path, victim, where):
    if where == "cache":
        lock = Path(os.environ["HF_HOME"]) / "hub" / ".locks" / storage().name / f"{hub.sha256(STATS)}.lock"
        kwargs = {}
    else:
        lock = tmp_path / "weights" / f".{STATS[1]}.part.lock"
        kwargs = {"dest": str(tmp_path / "weights")}
    plant(lock, victim / "file")
    msg = stopped(hub, tmp_path, **kwargs)
    assert f"refusing to use the lock file {lock}" in msg and untouched(victim), "an old filelock truncates it"


def test_cache_folder_replaced_by_a_symlink_is_refused(hub, tmp_path, victim):
    plant(storage() / "blobs", victim)
    msg = stopped(hub, tmp_path)
    assert "leads outside" in msg and str(victim) in msg and "remove it" in msg and untouched(victim)


@pytest.mark.parametrize("key, value", [("filename", "../../escape.pt"), ("filename", "/abs/x.pt"),
                                        ("filename", "a//b.pt"), ("revision", "../../../x")])
def test_manifest_names_cannot_leave_the_cache(key, value):
    entry = {"repo_id": "a/b", "filename": "f.pt", "approx_size": "1 MB", key: value}
    with pytest.raises(ReproError, match=f"asset 'x': key '{key}' must be"):
        manifest_from_dict({"assets": {"x": entry}})
