"""Downloads and writes, where a wrong file or a wrong order looks fine until a crash or a swap.

- Step 2 takes a file under --dest (or a search folder) only when its sha256 matches whenever a sha256 is
  known, the size alone is never enough: a same-size impostor (a truncated-then-padded copy, another
  revision of the same tensor shapes) must be ignored and the real file fetched. Real HTTP (tests/fakehub.py).
- The atomic writer flushes the temp file to disk (fsync) before renaming it onto the target, so a power
  loss after the rename cannot leave an empty or partial file under the final name. The order is observed by
  wrappers around os.fsync/os.replace that call through to the real functions.
- From mutation testing, repro/hub/assets.py: what step 2 records and prints (runs/assets.json key by key, the
  table, notes and warnings word for word), where it looks (the plain-URL cache's variables, search depth,
  a file's own name before the hub's, several hub-named copies), how a copy is checked (pinned or hub sha256,
  size, git blob id, a cache without symlinks) and the free-disk check on procfs, which reports 0 bytes free.
"""

from __future__ import annotations

import os
import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from repro.utils import io as rio
from steps.step2_download import main
from tests.fakehub import FakeHub, serve_manifest

VAE = ("hustvl/vavae-imagenet256-f16d32-dinov2", "vavae-imagenet256-f16d32-dinov2.pt")
INCEPTION = "weights-inception-2015-12-05-6726825d.pth"
STATS = ("hustvl/vavae-imagenet256-f16d32-dinov2", "latents_stats.pt")


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


# ---------------------------------------------------------------------------------------------------
# From mutation testing (docs/mutation_testing.md): repro/hub/assets.py (step 2's find, check, fetch, record)


def _edit(manifest: Path, name: str, **changes) -> Path:
    data = yaml.safe_load(manifest.read_text())
    data["assets"][name].update(changes)
    manifest.write_text(yaml.safe_dump(data))
    return manifest


def _notes(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("note: ")]


def test_the_record_the_table_and_the_progress_lines_name_every_field(hub, tmp_path, capsys):
    from repro import paths
    from repro.hub.assets import fetch_assets

    manifest = _edit(serve_manifest(tmp_path, hub), "vavae-f16d32", local_name="vae-f16d32.pt")
    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / (INCEPTION + ".part")).write_bytes(hub.plain[INCEPTION][:5000])  # what a killed run leaves
    records = fetch_assets(["vavae-f16d32", "fid-inception"], dest=dest, manifest=manifest)
    vae, inception = (dest / "vae-f16d32.pt", dest / INCEPTION)
    assert [(r.name, r.size, r.resumed_from) for r in records] == [("vavae-f16d32", 30_000, 0),
                                                                   ("fid-inception", 20_000, 5000)]
    # runs/assets.json, key by key: the HF file's repo and revision and its own name under --dest, the URL's file
    want = {
        "vavae-f16d32": {"path": str(vae), "size": 30_000, "sha256": hub.sha256(VAE), "source": "fetched",
                         "verified_by": "hub sha256", "filename": VAE[1], "local_name": "vae-f16d32.pt",
                         "repo_id": VAE[0], "revision": "main"},
        "fid-inception": {"path": str(inception), "size": 20_000, "sha256": hub.sha256(INCEPTION), "source": "fetched",
                          "verified_by": "pinned sha256", "filename": INCEPTION, "url": hub.plain_url(INCEPTION)}}
    assert json.loads(paths.assets_json().read_text()) == {"assets": want}
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [f"fetching vavae-f16d32: {VAE[0]}@main, file {VAE[1]} (30.0 KB)",
                       f"fetching fid-inception: {hub.plain_url(INCEPTION)} (20.0 KB)",
                       "fid-inception: resumed from 5.0 KB already on disk"]
    # the table: five padded columns, two spaces apart, the path last and unpadded
    assert out[3:] == [
        f"{'asset':13}  {'source':7}  {'size':7}  {'sha256':16}  {'verified':13}  path",
        f"{'vavae-f16d32':13}  fetched  30.0 KB  {hub.sha256(VAE)[:16]}  {'hub sha256':13}  {vae}",
        f"fid-inception  fetched  20.0 KB  {hub.sha256(INCEPTION)[:16]}  pinned sha256  {inception}"]

    # again: both found under --dest, checked by _check (sizes from the files, the same record otherwise)
    again = fetch_assets(["vavae-f16d32", "fid-inception"], dest=dest, manifest=manifest)
    assert [(r.source, r.size, r.resumed_from) for r in again] == [("found", 30_000, 0), ("found", 20_000, 0)]
    for name in want:
        want[name]["source"] = "found"
    assert json.loads(paths.assets_json().read_text()) == {"assets": want}


def test_a_plain_downloads_progress_bar_is_labelled_with_the_asset_name(hub, tmp_path, capsys, monkeypatch):
    from repro.hub.assets import fetch_assets

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")  # conftest turns bars off; this one is looked at
    fetch_assets(["fid-inception"], manifest=serve_manifest(tmp_path, hub))
    assert capsys.readouterr().err.startswith("\rfid-inception:   0%")  # not the file's long hashed name


def test_write_assets_json_merges_and_rewrites_what_it_cannot_read(tmp_path, capsys):
    from repro import paths
    from repro.hub.assets import AssetRecord, write_assets_json

    spec = _plain_spec("x", size=3)
    rec = AssetRecord("x", tmp_path / "x.bin", 3, "ab" * 32, "found", "size", spec)
    entry = {"path": str(tmp_path / "x.bin"), "size": 3, "sha256": "ab" * 32, "source": "found",
             "verified_by": "size", "filename": "x.bin", "url": spec.url}
    out = paths.assets_json()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"assets": {"other": {"path": "/o"}}, "version": 1}))
    write_assets_json([rec])
    assert json.loads(out.read_text()) == {"assets": {"other": {"path": "/o"}, "x": entry}, "version": 1}
    out.write_text(json.dumps({"version": 1}))  # no assets table yet
    write_assets_json([rec])
    assert json.loads(out.read_text()) == {"assets": {"x": entry}, "version": 1}
    capsys.readouterr()
    out.write_text("{torn")
    write_assets_json([rec])
    assert json.loads(out.read_text()) == {"assets": {"x": entry}}
    assert capsys.readouterr().out == f"note: {out} was unreadable and is rewritten\n"


def test_step_2_says_restricted_licences_missing_search_folders_and_probes_the_hub_once(hub, tmp_path, capsys):
    from repro.hub.assets import fetch_assets
    from repro.hub.manifest import manifest_from_dict

    data = yaml.safe_load(serve_manifest(tmp_path, hub).read_text())
    data["assets"]["vavae-f16d32"]["licence"] = "Some Lab Non-Commercial Licence v1"
    data["assets"]["latents-stats"] = dict(data["assets"]["vavae-f16d32"], filename="latents_stats.pt",
                                           licence="Apache-2.0")
    hub.files[(VAE[0], "latents_stats.pt")] = blob(2_000, 2)
    absent = tmp_path / "no-such-folder"
    data["search_dirs"] = [str(absent), {"path": str(tmp_path / "no-kaggle"), "when": "kaggle"}]
    # a Manifest object is used as given (nothing on disk to read)
    records = fetch_assets(["fid-inception", "vavae-f16d32", "latents-stats"], manifest=manifest_from_dict(data))
    assert [r.source for r in records] == ["fetched"] * 3
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["vavae-f16d32: licence Some Lab Non-Commercial Licence v1",  # Apache-2.0 needs no word
                       f"note: search folder {absent} does not exist; skipped"]  # a platform's folder: silent
    # one reachability probe (HEAD /) for all the Hugging Face files, before the first of them is asked for
    heads = [p for m, p, _ in hub.requests if m == "HEAD"]
    assert heads[0] == "/" and heads.count("/") == 1 and len(heads) >= 3, heads


def test_offline_names_every_missing_file_and_a_changed_upstream_file_is_refused(hub, tmp_path):
    from repro.hub import DownloadError, OfflineError
    from repro.hub.assets import fetch_assets

    manifest = serve_manifest(tmp_path, hub, pin_hf=True)
    with pytest.raises(OfflineError) as err:
        fetch_assets(["vavae-f16d32", "fid-inception"], manifest=manifest, offline=True)
    assert str(err.value) == (f"offline mode (--offline or HF_HUB_OFFLINE=1) and not on disk: vavae-f16d32 "
                              f"({VAE[0]}@main, file {VAE[1]}); fid-inception ({hub.plain_url(INCEPTION)}); run once "
                              f"with network, or put the files under --dest or a search folder")
    pinned = hashlib.sha256(b"last year's release").hexdigest()
    _edit(manifest, "vavae-f16d32", sha256=pinned)
    with pytest.raises(DownloadError) as err:
        fetch_assets(["vavae-f16d32"], manifest=manifest)
    assert str(err.value) == (f"vavae-f16d32 ({VAE[0]}@main, file {VAE[1]}): the Hub serves sha256 "
                              f"{hub.sha256(VAE)}, the manifest pins {pinned}; the upstream file changed, check the "
                              f"manifest")
    assert hub.count("GET") == 0


def test_the_warning_lists_every_unchecked_file(hub, tmp_path, capsys):
    from repro.hub.assets import fetch_assets

    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / VAE[1]).write_bytes(hub.files[VAE])
    (dest / INCEPTION).write_bytes(hub.plain[INCEPTION])
    manifest = _edit(serve_manifest(tmp_path, hub), "fid-inception", sha256=None, size=None)
    records = fetch_assets(["vavae-f16d32", "fid-inception"], dest=dest, manifest=manifest, offline=True)
    assert [(r.source, r.verified_by) for r in records] == [("found", "unverified")] * 2
    assert capsys.readouterr().out.splitlines()[-1] == ("warning: 2 file(s) could not be checked (no known sha256 "
                                                        "or size): vavae-f16d32, fid-inception")


def test_a_download_leaves_its_digest_in_the_hash_cache(hub, tmp_path):
    from repro.hub.assets import fetch_assets
    from repro.utils.hashing import HashCache

    records = fetch_assets(["vavae-f16d32", "fid-inception"], manifest=serve_manifest(tmp_path, hub))
    cache = HashCache()  # what sampling and training read: no second pass over a fresh download
    assert [cache.sha256(r.path) for r in records] == [hub.sha256(VAE), hub.sha256(INCEPTION)] and cache.hashed == 0


def test_the_plain_url_cache_follows_the_hugging_face_variables(tmp_path, monkeypatch):
    from repro.hub.assets import plain_cache_dir

    for var in ("HF_ASSETS_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert plain_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "assets" / "repro"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert plain_cache_dir() == tmp_path / "xdg" / "huggingface" / "assets" / "repro"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert plain_cache_dir() == tmp_path / "hf" / "assets" / "repro"
    monkeypatch.setenv("HF_ASSETS_CACHE", "~/own-assets")  # a user's path, ~ expanded
    assert plain_cache_dir() == tmp_path / "home" / "own-assets" / "repro"


def test_the_plain_url_cache_is_looked_in_when_a_dest_is_given(hub, tmp_path):
    from repro.hub.assets import fetch_assets

    manifest = serve_manifest(tmp_path, hub)
    (first,) = fetch_assets(["fid-inception"], manifest=manifest)  # no --dest: the plain-URL cache
    hub.requests.clear()
    (again,) = fetch_assets(["fid-inception"], dest=tmp_path / "elsewhere", manifest=manifest)
    assert (again.source, again.path, hub.count()) == ("cache", first.path, 0)


def test_search_folders_are_searched_five_folders_deep_skipping_hidden_ones(tmp_path):
    from repro.hub.assets import SEARCH_DEPTH, _find_named

    assert SEARCH_DEPTH == 6  # /kaggle/input/<model>/<framework>/<variation>/<version>/<file>: 4 folders deep
    name = "w.pt"
    wanted = [tmp_path / name, tmp_path / "a" / name, tmp_path / "a/b/c/d/e" / name, tmp_path / "z/y" / name]
    too_deep = tmp_path / "a/b/c/d/e/f" / name
    hidden = tmp_path / ".cache/x" / name
    for p in wanted + [too_deep, hidden]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"w")
    (tmp_path / "z" / name).mkdir()  # a folder with the file's name is no file
    (tmp_path / "a/b/other.pt").write_bytes(b"o")
    assert _find_named(tmp_path, name) == sorted(wanted)
    assert _find_named(tmp_path / "a", name, depth=1) == [tmp_path / "a" / name]
    assert _find_named(tmp_path / "absent", name) == []


def _offline_find(hub, root: Path, files: list[str], search: list[str], dest: bool = False, bad=(), **pins):
    """Step 2 offline for the VA-VAE, given its own name `vae-own.pt` (local_name): `files` (relative to
    `root`, holding the VA-VAE's bytes) and `bad` (an impostor's) exist, `search` are the search folders,
    `dest` is root/dest."""
    from repro.hub.assets import fetch_assets

    root.mkdir()
    for rel, data in [(rel, hub.files[VAE]) for rel in files] + [(rel, _impostor(hub.files[VAE])) for rel in bad]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    manifest = _edit(serve_manifest(root, hub, search_dirs=[root / s for s in search]), "vavae-f16d32",
                     local_name="vae-own.pt", **pins)
    (rec,) = fetch_assets(["vavae-f16d32"], dest=root / "dest" if dest else None, offline=True, manifest=manifest)
    return rec


def test_offline_the_own_name_comes_first_and_several_hub_named_copies_are_none(hub, tmp_path, capsys):
    from repro.hub import OfflineError

    hub_name = VAE[1]
    # under --dest by its own name, or found deeper in --dest, before any copy in the search folders
    rec = _offline_find(hub, tmp_path / "1", ["dest/vae-own.pt", f"s/b/{hub_name}"], ["s"], dest=True)
    assert rec.path == tmp_path / "1/dest/vae-own.pt"
    rec = _offline_find(hub, tmp_path / "2", ["dest/sub/vae-own.pt", "s/a/vae-own.pt", f"s/b/{hub_name}"], ["s"],
                        dest=True)
    assert (rec.path, rec.source) == (tmp_path / "2/dest/sub/vae-own.pt", "found")
    rec = _offline_find(hub, tmp_path / "3", ["s/a/vae-own.pt", f"s/b/{hub_name}", f"t/{hub_name}"], ["s", "t"])
    assert rec.path == tmp_path / "3/s/a/vae-own.pt"
    # one copy by the hub's name only: taken, and said to be unchecked
    capsys.readouterr()
    rec = _offline_find(hub, tmp_path / "4", [f"s/b/{hub_name}"], ["s"])
    assert (rec.path, rec.source, rec.verified_by) == (tmp_path / f"4/s/b/{hub_name}", "found", "unverified")
    assert capsys.readouterr().out.splitlines()[-1] == ("warning: 1 file(s) could not be checked (no known sha256 "
                                                        "or size): vavae-f16d32")
    # the same copy reached through two search folders (one inside the other) is still one copy
    rec = _offline_find(hub, tmp_path / "5", [f"s/b/{hub_name}"], ["s", "s/b"])
    assert rec.path == tmp_path / f"5/s/b/{hub_name}"
    # two copies by the hub's name, nothing to tell them apart: neither is taken
    with pytest.raises(OfflineError, match="vavae-f16d32"):
        _offline_find(hub, tmp_path / "6", [f"s/b/{hub_name}", f"s/c/{hub_name}"], ["s"])
    both = ", ".join(str(tmp_path / f"6/s/{d}/{hub_name}") for d in ("b", "c"))
    assert _notes(capsys.readouterr().out) == [
        f"note: vavae-f16d32: 2 files named {hub_name!r} in the search folders ({both}) and no sha256 to tell which "
        f"is {VAE[0]}@main, file {hub_name}: none is used; put the right one under --dest as 'vae-own.pt', or run "
        f"once online"]
    # with the size pinned, a copy is checked by its size
    rec = _offline_find(hub, tmp_path / "7", [f"s/b/{hub_name}"], ["s"], size=30_000)
    assert (rec.source, rec.verified_by) == ("found", "size")


def test_offline_a_known_sha256_picks_the_right_one_of_several_hub_named_copies(hub, tmp_path, capsys):
    hub_name = VAE[1]
    rec = _offline_find(hub, tmp_path / "1", [f"s/c/{hub_name}"], ["s"], bad=[f"s/b/{hub_name}"],
                        sha256=hub.sha256(VAE))
    assert (rec.path, rec.source, rec.verified_by) == (tmp_path / f"1/s/c/{hub_name}", "found", "pinned sha256")
    assert len(_notes(capsys.readouterr().out)) == 1  # the impostor, by its sha256


def test_a_plain_file_with_its_own_name_is_taken_from_the_cache_before_hub_named_copies(hub, tmp_path):
    from repro.hub.assets import fetch_assets, plain_cache_dir

    search = tmp_path / "input"
    (search / "x").mkdir(parents=True)
    (search / "x" / INCEPTION).write_bytes(hub.plain[INCEPTION])  # a copy by the URL's own file name
    manifest = _edit(serve_manifest(tmp_path, hub, search_dirs=[search]), "fid-inception", sha256=None, size=None,
                     local_name="inception.pth")
    (first,) = fetch_assets(["fid-inception"], manifest=manifest)  # nothing to check it by: the one copy is taken
    assert (first.source, first.path) == ("found", search / "x" / INCEPTION)
    cached = plain_cache_dir() / "inception.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(hub.plain[INCEPTION])
    (rec,) = fetch_assets(["fid-inception"], manifest=manifest)  # the cache's copy is not one of "several"
    assert (rec.source, rec.path, hub.count("GET")) == ("cache", cached, 0)


def _blob(path) -> Path:
    return Path(os.path.realpath(path))  # the HF cache's blob behind the snapshot link


@pytest.mark.parametrize("pin", ["sha256", "size"])
def test_a_cached_file_is_checked_against_the_pin_and_noted_once(hub, tmp_path, capsys, pin):
    from repro.hub.assets import fetch_assets

    manifest = serve_manifest(tmp_path, hub, pin_hf=True)
    if pin == "size":  # only the size pinned: the cache's blob name (its sha256) is the digest to check
        manifest = _edit(manifest, "vavae-f16d32", sha256=None)
    real, sha = hub.files[VAE], hub.sha256(VAE)
    how = "pinned sha256" if pin == "sha256" else "cache blob sha256"
    fetch_assets(["vavae-f16d32"], manifest=manifest)
    hub.requests.clear()
    (rec,) = fetch_assets(["vavae-f16d32"], manifest=manifest)
    assert (rec.source, rec.verified_by, rec.size, rec.sha256) == ("cache", how, 30_000, sha) and hub.count("GET") == 0
    path = rec.path
    # a same-size copy with other bytes: one note (the cache is looked at before and after asking the hub)
    _blob(path).write_bytes(_impostor(real))
    capsys.readouterr()
    (rec,) = fetch_assets(["vavae-f16d32"], manifest=manifest)
    digest = hashlib.sha256(_impostor(real)).hexdigest()
    assert _notes(capsys.readouterr().out) == [
        f"note: vavae-f16d32: ignoring {path}: sha256 {digest[:12]}… differs from expected {sha[:12]}…"]
    assert rec.source == "fetched" and _blob(rec.path).read_bytes() == real
    # a truncated copy is refused by its size alone, before any hashing
    _blob(path).write_bytes(real[:100])
    capsys.readouterr()
    (rec,) = fetch_assets(["vavae-f16d32"], manifest=manifest)
    assert _notes(capsys.readouterr().out) == [f"note: vavae-f16d32: ignoring {path}: 100 bytes, expected 30000"]
    assert rec.source == "fetched" and _blob(rec.path).read_bytes() == real


def test_a_truncated_copy_under_dest_is_refused_by_the_hubs_size(hub, tmp_path, capsys):
    from repro.hub.assets import fetch_assets

    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / VAE[1]).write_bytes(hub.files[VAE][:100])
    (rec,) = fetch_assets(["vavae-f16d32"], dest=dest, manifest=serve_manifest(tmp_path, hub))
    # the manifest pins nothing: the size is the one the hub sends (X-Linked-Size)
    assert _notes(capsys.readouterr().out) == [
        f"note: vavae-f16d32: ignoring {dest / VAE[1]}: 100 bytes, expected 30000"]
    assert rec.source == "fetched" and rec.path.read_bytes() == hub.files[VAE]


def _cache_without_links(repo_id: str, filename: str, commit: str, data: bytes) -> None:
    """huggingface_hub's cache where symlinks are not available (Windows, or copied with cp -L): the snapshot
    holds the file itself, so its name (not a hash) tells nothing about its content."""
    repo = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / filename).write_bytes(data)


def test_a_cached_copy_not_named_by_its_hash_is_checked_against_the_hub_first(hub, tmp_path):
    from repro.hub.assets import fetch_assets

    _cache_without_links(*VAE, hub.revision_sha, hub.files[VAE])
    manifest = serve_manifest(tmp_path, hub)
    (rec,) = fetch_assets(["vavae-f16d32"], manifest=manifest, offline=True)  # nothing to check it by: taken as is
    assert (rec.source, rec.verified_by, hub.count()) == ("cache", "unverified", 0)
    (rec,) = fetch_assets(["vavae-f16d32"], manifest=manifest)  # online: hashed against the hub's sha256 first
    assert (rec.source, rec.verified_by) == ("cache", "hub sha256")
    assert hub.count("HEAD", VAE[1]) == 1 and hub.count("GET") == 0


@pytest.fixture
def small_hub(monkeypatch):
    """latents_stats.pt as the real Hub serves it: a small non-LFS file, its ETag a git blob id, no sha256."""
    with FakeHub.for_assets({"latents-stats": blob(2_000, 2)}, non_lfs={STATS}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


def test_a_non_lfs_copy_with_other_bytes_is_noted_with_both_git_blob_ids(small_hub, tmp_path, capsys):
    from repro.hub.assets import fetch_assets

    good = small_hub.files[STATS]
    dest = tmp_path / "weights"
    dest.mkdir()
    bad = bytes(b ^ 1 for b in good)
    (dest / STATS[1]).write_bytes(bad)
    (rec,) = fetch_assets(["latents-stats"], dest=dest, manifest=serve_manifest(tmp_path, small_hub))
    git = [hashlib.sha1(b"blob 2000\0" + data).hexdigest() for data in (bad, good)]  # git's blob id, by hand
    assert _notes(capsys.readouterr().out) == [
        f"note: latents-stats: ignoring {dest / STATS[1]}: git blob id {git[0][:12]}… differs from expected "
        f"{git[1][:12]}…"]
    assert (rec.source, rec.verified_by) == ("fetched", "hub git blob id") and rec.path.read_bytes() == good


def test_a_non_lfs_file_in_the_cache_is_checked_by_its_blob_name_and_its_pinned_size(small_hub, tmp_path, capsys):
    from repro.hub.assets import fetch_assets

    good = small_hub.files[STATS]
    manifest = _edit(serve_manifest(tmp_path, small_hub), "latents-stats", size=2_000)
    fetch_assets(["latents-stats"], manifest=manifest)
    small_hub.requests.clear()
    (rec,) = fetch_assets(["latents-stats"], manifest=manifest)
    assert (rec.source, rec.verified_by, small_hub.count()) == ("cache", "cache blob git id", 0)
    _blob(rec.path).write_bytes(good[:100])
    capsys.readouterr()
    (again,) = fetch_assets(["latents-stats"], manifest=manifest)
    assert _notes(capsys.readouterr().out) == [f"note: latents-stats: ignoring {rec.path}: 100 bytes, expected 2000"]
    assert again.source == "fetched" and _blob(again.path).read_bytes() == good


def test_a_non_lfs_file_in_a_cache_without_links_is_checked_by_the_hubs_git_blob_id(small_hub, tmp_path):
    from repro.hub.assets import fetch_assets

    _cache_without_links(*STATS, small_hub.revision_sha, small_hub.files[STATS])
    (rec,) = fetch_assets(["latents-stats"], manifest=serve_manifest(tmp_path, small_hub))
    assert (rec.source, rec.verified_by, small_hub.count("GET")) == ("cache", "hub git blob id", 0)


def test_what_a_download_is_verified_by_and_each_pin_is_enforced(hub, tmp_path, capsys):
    from repro.hub import DownloadError
    from repro.hub.assets import fetch_assets

    (rec,) = fetch_assets(["vavae-f16d32"], manifest=serve_manifest(tmp_path, hub, pin_hf=True))
    assert (rec.source, rec.verified_by) == ("fetched", "pinned sha256")
    # a plain URL pinned by its size alone: a server sending more than that is refused, the right size taken
    manifest = serve_manifest(tmp_path, hub)
    _edit(manifest, "fid-inception", sha256=None, size=19_000)
    with pytest.raises(DownloadError, match="sent more than the 19000 bytes"):
        fetch_assets(["fid-inception"], manifest=manifest, dest=tmp_path / "a")
    _edit(manifest, "fid-inception", size=20_000)
    (rec,) = fetch_assets(["fid-inception"], manifest=manifest, dest=tmp_path / "a")
    assert (rec.source, rec.verified_by) == ("fetched", "size")
    # neither pinned: fetched, said to be unchecked
    _edit(manifest, "fid-inception", size=None)
    capsys.readouterr()
    (rec,) = fetch_assets(["fid-inception"], manifest=manifest, dest=tmp_path / "b")
    assert (rec.source, rec.verified_by) == ("fetched", "unverified")
    assert capsys.readouterr().out.splitlines()[-1] == ("warning: 1 file(s) could not be checked (no known sha256 "
                                                        "or size): fid-inception")


def test_a_non_lfs_file_must_match_a_pinned_sha256_not_only_its_git_blob_id(small_hub, tmp_path):
    from repro.hub import HashMismatchError
    from repro.hub.assets import fetch_assets

    served = small_hub.files[STATS]
    # the manifest pins another file's sha256 (upstream replaced it); the hub's git blob id fits what it serves
    manifest = _edit(serve_manifest(tmp_path, small_hub), "latents-stats",
                     sha256=hashlib.sha256(b"the pinned release").hexdigest())
    with pytest.raises(HashMismatchError, match="latents-stats"):
        fetch_assets(["latents-stats"], manifest=manifest)
    _edit(manifest, "latents-stats", sha256=hashlib.sha256(served).hexdigest())
    (rec,) = fetch_assets(["latents-stats"], manifest=manifest)
    assert (rec.source, rec.verified_by, rec.sha256) == ("fetched", "pinned sha256", hashlib.sha256(served).hexdigest())


def _plain_spec(name: str, approx: int = 0, size: int | None = None):
    from repro.hub.manifest import AssetSpec

    return AssetSpec(name, f"{name}.bin", "test file", approx, url=f"http://127.0.0.1/{name}.bin", size=size)


def _lfs_remote(size: int | None):
    from repro.hub.hf import RemoteFile

    return RemoteFile("http://h/r", "http://h/r", "0" * 40, "a" * 64, "a" * 64, size)


def test_the_disk_check_counts_only_the_missing_bytes_per_disk(tmp_path):
    import shutil

    from repro.hub import DiskFullError
    from repro.hub.assets import _free_disk_check

    full = Path("/proc/self/repro-absent/weights")  # procfs says 0 bytes free: the check's edge, exactly
    if not full.parent.parent.is_dir() or shutil.disk_usage(full.parent.parent).free != 0:
        pytest.skip("needs procfs, which reports 0 bytes free")
    none = tmp_path / "no.part"
    _free_disk_check([(_plain_spec("a"), None, full, none)])  # nothing to fetch fits even a full disk
    part = tmp_path / "c.part"
    part.write_bytes(b"p" * 5000)
    _free_disk_check([(_plain_spec("c", size=5000), None, full, part)])  # a complete partial file: nothing left
    part.write_bytes(b"p" * 6000)
    _free_disk_check([(_plain_spec("c", size=5000), None, full, part)])  # longer than the file: nothing either
    # one byte does not fit: the hub's size first, then the manifest's exact size, then its estimate
    for spec, remote in ((_plain_spec("b", approx=0), _lfs_remote(1)), (_plain_spec("b", approx=0, size=1), None),
                         (_plain_spec("b", approx=1), None), (_plain_spec("b", approx=0, size=1), _lfs_remote(None))):
        with pytest.raises(DiskFullError, match="need 1 B under /proc/self,"):
            _free_disk_check([(spec, remote, full, none)])
    part.write_bytes(b"p" * 4000)
    with pytest.raises(DiskFullError) as err:  # what is missing, summed over the files on that disk
        _free_disk_check([(_plain_spec("c", size=5000), None, full, part),
                          (_plain_spec("d", approx=7), None, full, none)])
    assert str(err.value) == ("not enough disk space for c, d: need 1.0 KB under /proc/self, only 0 B free; free "
                              "some space or pass --dest on a bigger disk")
    # each disk on its own: a byte for tmp_path's disk is not counted against the full one
    _free_disk_check([(_plain_spec("a"), None, full, none), (_plain_spec("e", size=1), None, tmp_path / "w", none)])
