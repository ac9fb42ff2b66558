"""Step 2 against a real local HTTP server speaking the Hub protocol (tests/fakehub.py), no mocks.

Covers: fresh download into the HF cache layout, a second run with no GET, SIGKILL mid-file then a
Range resume, sha256 mismatch (file deleted), each 404 kind, gated repos and HF_TOKEN, an unreachable
server, offline with and without the cache, files found under --dest / a search folder, the disk check.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from repro.errors import ReproError
from repro.hub import (AuthError, DiskFullError, HashMismatchError, NetworkError, NotFoundError, OfflineError,
                       load_manifest)
from repro.hub.manifest import SearchDir, manifest_from_dict
from steps.step2_download import cli, main
from tests.fakehub import FakeHub, serve_manifest

ROOT = Path(__file__).resolve().parent.parent
VAE_REPO = "hustvl/vavae-imagenet256-f16d32-dinov2"
VAE = (VAE_REPO, "vavae-imagenet256-f16d32-dinov2.pt")
STATS = (VAE_REPO, "latents_stats.pt")
INCEPTION = "weights-inception-2015-12-05-6726825d.pth"
# Errors must come back at once: no retry loops. Loose bound, a hang guard rather than a benchmark.
PROMPT_S = 15


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def hub(monkeypatch):
    content = {"vavae-f16d32": blob(300_000, 1), "latents-stats": blob(2_000, 2), "fid-inception": blob(50_000, 3)}
    with FakeHub.for_assets(content) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


def hf_cache() -> Path:
    return Path(os.environ["HF_HOME"]) / "hub"


def partials() -> list[Path]:
    home = Path(os.environ["HF_HOME"])
    return [p for p in home.rglob("*") if p.name.endswith((".incomplete", ".part"))]


def edited_manifest(tmp_path: Path, hub: FakeHub, name: str, **changes) -> Path:
    path = serve_manifest(tmp_path, hub)
    data = yaml.safe_load(path.read_text())
    data["assets"][name].update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


def test_real_manifest_names_every_asset():
    m = load_manifest()
    # what a plain step 2 fetches; grouped assets (issue 16: upstream's 63 GB of latents) only when named
    assert {a.name for a in m.select()} == {"vavae-f16d32", "latents-stats", "lightningdit-xl-800ep",
                                            "lightningdit-xl-64ep", "fid-inception", "adm-ref-imagenet256"}
    assert {a.group for a in m.assets.values()} == {None, "imagenet256-latents", "tokenizer-training", "vfm-vae",
                                                    "vfm-vae-encoder"}
    assert (m.assets["latents-stats"].repo_id, m.assets["latents-stats"].filename) == STATS
    assert m.assets["lightningdit-xl-800ep"].repo_id == "hustvl/lightningdit-xl-imagenet256-800ep"
    assert m.assets["adm-ref-imagenet256"].url.endswith("/VIRTUAL_imagenet256_labeled.npz")
    assert all(s.approx_size > 0 for s in m.assets.values())
    # Kaggle's folder comes from the manifest, searched only on Kaggle.
    kaggle = SearchDir(Path("/nonexistent/kaggle/input"), when="kaggle")
    assert not kaggle.active({}) and kaggle.active({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"})


def test_manifest_errors_name_entry_and_key(tmp_path):
    good = {"repo_id": "a/b", "filename": "f.pt", "approx_size": "1 MB"}
    with pytest.raises(ReproError, match=r"asset 'x': unknown key 'sha265' \(did you mean 'sha256'\?\)"):
        manifest_from_dict({"assets": {"x": {**good, "sha265": None}}})
    with pytest.raises(ReproError, match="asset 'x': give exactly one of 'repo_id'"):
        manifest_from_dict({"assets": {"x": {**good, "url": "https://h/f.pt"}}})
    with pytest.raises(ReproError, match="asset 'x': key 'sha256' must be 64 hex digits"):
        manifest_from_dict({"assets": {"x": {**good, "sha256": "abc"}}})
    with pytest.raises(ReproError, match="unknown asset 'vavae'.*did you mean 'vavae-f16d32'"):
        load_manifest().select(["vavae"])


def test_fresh_download_then_second_run_makes_no_get(hub, tmp_path):
    manifest = serve_manifest(tmp_path, hub)
    out = main(manifest=str(manifest))["assets"]
    assert set(out) == {"vavae-f16d32", "latents-stats", "fid-inception"}
    for name, key in (("vavae-f16d32", VAE), ("latents-stats", STATS)):
        rec = out[name]
        assert rec["source"] == "fetched" and rec["verified_by"] == "hub sha256"
        assert rec["sha256"] == hub.sha256(key) and Path(rec["path"]).read_bytes() == hub.files[key]
        assert (rec["repo_id"], rec["filename"]) == key
        assert f"/snapshots/{hub.revision_sha}/" in rec["path"]
    assert out["fid-inception"]["verified_by"] == "pinned sha256"
    assert Path(out["fid-inception"]["path"]).read_bytes() == hub.plain[INCEPTION]
    assert hub.count("GET") == 3 and not partials()
    # The standard cache layout: huggingface_hub itself finds the file offline.
    from huggingface_hub import hf_hub_download

    found = hf_hub_download(*VAE, cache_dir=hf_cache(), local_files_only=True)
    assert os.path.realpath(found) == os.path.realpath(out["vavae-f16d32"]["path"])

    hub.requests.clear()
    again = main(manifest=str(manifest))["assets"]
    assert {r["source"] for r in again.values()} == {"cache"}
    assert hub.count("GET") == 0 and hub.count() == 0
    assert {k: v["sha256"] for k, v in again.items()} == {k: v["sha256"] for k, v in out.items()}
    # the digests are in the cache sampling and training read: step 4 does not hash the downloads again
    from repro.utils.hashing import HashCache

    cache = HashCache()
    assert all(cache.sha256(r["path"]) == r["sha256"] for r in out.values()) and cache.hashed == 0


def test_sigkill_mid_file_resumes_with_range(hub, tmp_path):
    big = blob(4 << 20, 4)
    hub.files[VAE] = big
    hub.throttle[VAE] = 1.5 * (1 << 20)  # ~3 s for the file: time to kill it halfway
    manifest = serve_manifest(tmp_path, hub)
    # Keep the caller's PYTHONPATH after ROOT: tests/test_hub_versions.py runs this file with an older
    # huggingface_hub put first on it, and the killed child must use the same release.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "steps.step2_download", "--only", "vavae-f16d32",
                             "--manifest", str(manifest)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size >= 1 << 20 for p in partials() if p.exists()):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no partial download appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    (part,) = partials()
    have = part.stat().st_size
    assert part.name.endswith(".incomplete") and 0 < have < len(big)
    assert part.read_bytes() == big[:have]
    assert not list(hf_cache().rglob(VAE[1])), "nothing may appear at the final path before it is verified"

    hub.throttle.clear()
    hub.requests.clear()
    out = main(only=["vavae-f16d32"], manifest=str(manifest))["assets"]["vavae-f16d32"]
    assert hub.ranges() == [f"bytes={have}-"]
    assert out["sha256"] == hub.sha256(VAE) and Path(out["path"]).read_bytes() == big
    assert not partials()


def test_plain_url_resumes_its_part_file(hub, tmp_path):
    data = hub.plain[INCEPTION]
    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / (INCEPTION + ".part")).write_bytes(data[:20_000])  # what a killed run leaves
    out = main(only=["fid-inception"], dest=str(dest), manifest=str(serve_manifest(tmp_path, hub)))
    rec = out["assets"]["fid-inception"]
    assert hub.ranges() == ["bytes=20000-"]
    assert rec["path"] == str(dest / INCEPTION) and (dest / INCEPTION).read_bytes() == data
    assert not (dest / (INCEPTION + ".part")).exists()


@pytest.mark.parametrize("name, key", [("vavae-f16d32", VAE), ("fid-inception", INCEPTION)])
def test_corrupted_content_is_deleted_and_reported(hub, tmp_path, name, key):
    hub.corrupt.add(key)
    manifest = serve_manifest(tmp_path, hub)
    with pytest.raises(HashMismatchError) as err:
        main(only=[name], manifest=str(manifest))
    msg = str(err.value)
    assert name in msg and "sha256 mismatch" in msg and "deleted" in msg and "\n" not in msg
    filename = key[1] if isinstance(key, tuple) else key
    assert not partials() and not [p for p in Path(os.environ["HF_HOME"]).rglob(filename)]


@pytest.mark.parametrize("change, expected", [
    ({"repo_id": "hustvl/no-such-repo"}, "repository not found"),
    ({"revision": "v9"}, "revision 'v9' not found"),
    ({"filename": "missing.pt"}, "file not found in the repository"),
])
def test_not_found_errors_are_one_line_and_prompt(hub, tmp_path, capsys, change, expected):
    manifest = edited_manifest(tmp_path, hub, "latents-stats", **change)
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        cli(["--only", "latents-stats", "--manifest", str(manifest)])
    assert exit_.value.code == 1 and time.monotonic() - start < PROMPT_S
    err = capsys.readouterr().err.strip()
    spec = load_manifest(manifest).assets["latents-stats"]
    assert err.startswith("error: latents-stats (") and "\n" not in err and expected in err
    assert spec.repo_id in err and spec.filename in err
    with pytest.raises(NotFoundError):
        main(only=["latents-stats"], manifest=str(manifest))
    assert hub.count("GET") == 0


def test_gated_repo_asks_for_hf_token(hub, tmp_path, monkeypatch):
    hub.gated[VAE_REPO] = "hf_right"
    manifest = str(serve_manifest(tmp_path, hub))
    with pytest.raises(AuthError, match="gated repo.*set HF_TOKEN"):
        main(only=["latents-stats"], manifest=manifest)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(AuthError, match="gated repo.*check that HF_TOKEN"):
        main(only=["latents-stats"], manifest=manifest)
    monkeypatch.setenv("HF_TOKEN", "hf_right")
    out = main(only=["latents-stats"], manifest=manifest)["assets"]["latents-stats"]
    assert out["sha256"] == hub.sha256(STATS)
    cdn_gets = [h for m, p, h in hub.requests if m == "GET" and p.startswith("/lfs/")]
    assert cdn_gets and all("authorization" not in h for h in cdn_gets), "token must not go to the CDN"


def test_saved_login_token_is_used(hub, tmp_path):
    """`hf auth login` leaves the token in $HF_HOME/token; read where HF_HOME points now (any client release)."""
    hub.gated[VAE_REPO] = "hf_saved"
    home = Path(os.environ["HF_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "token").write_text("hf_saved\n")
    out = main(only=["latents-stats"], manifest=str(serve_manifest(tmp_path, hub)))["assets"]["latents-stats"]
    assert out["sha256"] == hub.sha256(STATS)
    heads = [h for m, p, h in hub.requests if m == "HEAD" and "/resolve/" in p]
    assert heads and all(h.get("authorization") == "Bearer hf_saved" for h in heads)


def test_unreachable_server_fails_fast(hub, tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    manifest = edited_manifest(tmp_path, hub, "fid-inception", url=f"{closed}/plain/{INCEPTION}")
    monkeypatch.setenv("HF_ENDPOINT", closed)
    for name, what in (("latents-stats", STATS[1]), ("fid-inception", INCEPTION)):
        start = time.monotonic()
        with pytest.raises(NetworkError, match=f"{name} .*{what}.*cannot reach .*127.0.0.1"):
            main(only=[name], manifest=str(manifest))
        assert time.monotonic() - start < PROMPT_S


def test_offline_uses_cache_or_says_what_is_missing(hub, tmp_path, monkeypatch):
    manifest = str(serve_manifest(tmp_path, hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="offline mode.*vavae-f16d32 .*latents-stats"):
        main(manifest=manifest)
    assert hub.count() == 0
    monkeypatch.delenv("HF_HUB_OFFLINE")
    main(manifest=manifest)
    hub.requests.clear()
    out = main(manifest=manifest, offline=True)["assets"]
    assert {r["source"] for r in out.values()} == {"cache"} and hub.count() == 0


def test_files_under_dest_or_search_dir_are_verified_and_used(hub, tmp_path):
    dest, kaggle = tmp_path / "weights", tmp_path / "input"
    (kaggle / "vavae-weights" / "1").mkdir(parents=True)
    dest.mkdir()
    (dest / VAE[1]).write_bytes(hub.files[VAE])
    (kaggle / "vavae-weights" / "1" / INCEPTION).write_bytes(hub.plain[INCEPTION])
    (kaggle / "vavae-weights" / "1" / STATS[1]).write_bytes(b"not the stats")  # wrong copy: ignored
    manifest = serve_manifest(tmp_path, hub, search_dirs=[kaggle])
    out = main(dest=str(dest), manifest=str(manifest))["assets"]
    assert out["vavae-f16d32"]["source"] == "found" and out["vavae-f16d32"]["path"] == str(dest / VAE[1])
    assert out["vavae-f16d32"]["verified_by"] == "hub sha256"
    assert out["fid-inception"]["source"] == "found" and "vavae-weights" in out["fid-inception"]["path"]
    assert out["latents-stats"]["source"] == "fetched" and out["latents-stats"]["path"] == str(dest / STATS[1])
    assert hub.count("GET") == 1 and hub.count("GET", "latents_stats") == 1  # only the bad one is fetched


def test_free_disk_is_checked_before_any_get(hub, tmp_path):
    manifest = edited_manifest(tmp_path, hub, "fid-inception", size=None, approx_size="900 TB")
    with pytest.raises(DiskFullError, match="not enough disk space for fid-inception"):
        main(manifest=str(manifest))
    assert hub.count("GET") == 0


@pytest.fixture
def small_hub(monkeypatch):
    """latents_stats.pt as the real Hub serves it: a small non-LFS file, its ETag a git blob id, no sha256."""
    with FakeHub.for_assets({"latents-stats": blob(2_000, 2)}, non_lfs={STATS}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


@pytest.mark.parametrize("use_dest", [False, True], ids=["hf-cache", "dest"])
def test_non_lfs_file_is_verified_by_git_blob_id_and_not_fetched_again(small_hub, tmp_path, use_dest):
    manifest = str(serve_manifest(tmp_path, small_hub))
    dest = str(tmp_path / "weights") if use_dest else None
    first = main(manifest=manifest, dest=dest)["assets"]["latents-stats"]
    assert first["source"] == "fetched" and first["verified_by"] == "hub git blob id"
    small_hub.requests.clear()
    again = main(manifest=manifest, dest=dest)["assets"]["latents-stats"]
    assert small_hub.count("GET") == 0, small_hub.requests
    assert again["sha256"] == first["sha256"] and again["verified_by"] in ("hub git blob id", "cache blob git id")
    small_hub.requests.clear()
    offline = main(manifest=manifest, dest=dest, offline=True)["assets"]["latents-stats"]
    assert small_hub.count() == 0 and offline["sha256"] == first["sha256"]


@pytest.mark.parametrize("use_dest", [False, True], ids=["hf-cache", "dest"])
def test_same_size_non_lfs_file_with_other_bytes_is_fetched_again(small_hub, tmp_path, capsys, use_dest):
    manifest = str(serve_manifest(tmp_path, small_hub))
    dest = str(tmp_path / "weights") if use_dest else None
    path = Path(main(manifest=manifest, dest=dest)["assets"]["latents-stats"]["path"])
    good = small_hub.files[STATS]
    real = Path(os.path.realpath(path))
    real.write_bytes(bytes(b ^ 1 for b in good))  # same size, other content (a flipped bit, a bad copy)
    capsys.readouterr()
    small_hub.requests.clear()
    rec = main(manifest=manifest, dest=dest)["assets"]["latents-stats"]
    assert small_hub.count("GET") == 1 and Path(rec["path"]).read_bytes() == good
    assert rec["source"] == "fetched" and "git blob id" in capsys.readouterr().out


def test_mirror_serving_other_bytes_than_its_git_blob_id_is_refused(small_hub, tmp_path):
    small_hub.corrupt.add(STATS)
    with pytest.raises(HashMismatchError, match="latents-stats .*git blob id mismatch.*deleted"):
        main(manifest=str(serve_manifest(tmp_path, small_hub)))
    assert not list(hf_cache().rglob(STATS[1])) and not partials()
