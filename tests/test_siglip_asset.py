"""The SigLIP2 tower VFM-VAE encodes with, as step-2 asset `siglip2-large-512`, beside dinov2-vitl14: both are a
hub's `model.safetensors`, so the SigLIP2 file takes its manifest `local_name` under --dest (dinov2's keeps its
path), a manifest where two assets would land on one local path is refused, search folders are searched by the
local name and the hub's, and step 3 fills `vae.siglip_path: asset:siglip2-large-512`. Local fake hub, tiny files."""

from __future__ import annotations

import json
import random

import pytest

from repro import paths
from repro.errors import ConfigError, ReproError
from repro.hub import OfflineError, load_manifest
from repro.hub.manifest import manifest_from_dict
from steps.step2_download import cli, main
from tests.fakehub import FakeHub, serve_manifest

SIGLIP, DINO = "siglip2-large-512", "dinov2-vitl14"
SIGLIP_KEY = ("google/siglip2-large-patch16-512", "model.safetensors")
DINO_KEY = ("timm/vit_large_patch14_dinov2.lvd142m", "model.safetensors")
SIGLIP_LOCAL = "siglip2-large-patch16-512.safetensors"


@pytest.fixture
def hub(monkeypatch):
    files = {SIGLIP_KEY: random.Random(1).randbytes(40_000), DINO_KEY: random.Random(2).randbytes(30_000)}
    with FakeHub(files) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


def test_manifest_lists_siglip_beside_dinov2_under_its_own_local_name():
    m = load_manifest()
    siglip, dino = m.assets[SIGLIP], m.assets[DINO]
    assert (siglip.repo_id, siglip.filename) == SIGLIP_KEY and (dino.repo_id, dino.filename) == DINO_KEY
    assert siglip.local_file == SIGLIP_LOCAL and siglip.search_names == (SIGLIP_LOCAL, "model.safetensors")
    assert dino.local_file == "model.safetensors" and dino.local_name is None  # existing users' --dest unchanged
    # fetched only by name: the official checkpoint holds the tower, so `--only vfm-vae` does not pull 3.5 GB more
    assert siglip.group == "vfm-vae-encoder" and siglip not in m.select(["vfm-vae"]) and siglip not in m.select()
    assert siglip in m.select(["siglip2-large-512"])
    assert siglip.licence.startswith("Apache-2.0") and siglip.sha256 is None and siglip.size is None
    assert "VFM-VAE encodes" in siglip.description
    # every other asset keeps its local path: the hub's filename as it is
    assert all(a.local_file == a.filename for a in m.assets.values() if a.name != SIGLIP)
    assert "not listed yet" not in m.path.read_text()


def test_two_assets_on_one_local_path_are_refused_naming_both_and_the_fix():
    a = {"repo_id": "google/a", "filename": "model.safetensors", "approx_size": "1 MB"}
    b = {"repo_id": "timm/b", "filename": "model.safetensors", "approx_size": "1 MB"}
    with pytest.raises(ReproError, match=r"assets 'a' and 'b' would both be stored as 'model.safetensors' under "
                                         r"--dest; .*key 'local_name'"):
        manifest_from_dict({"assets": {"a": a, "b": b}})
    # a local_name that takes another asset's file name clashes the same way
    with pytest.raises(ReproError, match=r"assets 'a' and 'c' would both be stored as 'model.safetensors'"):
        manifest_from_dict({"assets": {"a": a, "c": {**b, "filename": "x.pt", "local_name": "model.safetensors"}}})
    # nor may one asset's file be the folder another's path needs (a repo path keeps its folders under --dest)
    with pytest.raises(ReproError, match=r"asset 'c' would be stored as 'splits' under --dest, the folder asset 'd'"):
        manifest_from_dict({"assets": {"c": {**b, "local_name": "splits"}, "d": {**a, "filename": "splits/x"}}})
    m = manifest_from_dict({"assets": {"a": a, "b": {**b, "local_name": "b.safetensors"}}})
    assert [s.local_file for s in m.assets.values()] == ["model.safetensors", "b.safetensors"]
    # the name is joined to --dest: a plain file name only
    for bad in ("../model.safetensors", "sub/model.safetensors", ".hidden", "", "x.part", "a\\b"):
        with pytest.raises(ReproError, match=r"asset 'b': key 'local_name' must be a plain file name"):
            manifest_from_dict({"assets": {"a": a, "b": {**b, "local_name": bad}}})


@pytest.mark.parametrize("first", [DINO, SIGLIP])
def test_dest_holds_both_model_safetensors_and_a_second_run_fetches_nothing(hub, tmp_path, first):
    dest, manifest = tmp_path / "weights", str(serve_manifest(tmp_path, hub))
    second = SIGLIP if first == DINO else DINO
    main(only=[first], dest=str(dest), manifest=manifest)
    cli(["--only", second, "--dest", str(dest), "--manifest", manifest])
    assert (dest / "model.safetensors").read_bytes() == hub.files[DINO_KEY]  # neither overwrote the other
    assert (dest / SIGLIP_LOCAL).read_bytes() == hub.files[SIGLIP_KEY]
    assert hub.count("GET") == 2
    table = json.loads(paths.assets_json().read_text())["assets"]
    assert table[SIGLIP]["path"] == str(dest / SIGLIP_LOCAL) and table[SIGLIP]["local_name"] == SIGLIP_LOCAL
    assert table[DINO]["path"] == str(dest / "model.safetensors") and "local_name" not in table[DINO]
    # a second run finds both where the first put them: verified by the hub's sha256, no GET
    again = main(only=[DINO, SIGLIP], dest=str(dest), manifest=manifest)["assets"]
    assert {r["source"] for r in again.values()} == {"found"} and hub.count("GET") == 2
    assert again[SIGLIP]["path"] == str(dest / SIGLIP_LOCAL) and again[SIGLIP]["sha256"] == hub.sha256(SIGLIP_KEY)
    assert again[DINO]["path"] == str(dest / "model.safetensors") and again[DINO]["sha256"] == hub.sha256(DINO_KEY)


def test_online_search_folder_copy_under_the_hubs_name_is_told_apart_by_sha256(hub, tmp_path):
    kaggle = tmp_path / "input"
    for folder, key in (("dinov2", DINO_KEY), ("siglip2", SIGLIP_KEY)):
        (kaggle / folder / "1").mkdir(parents=True)
        (kaggle / folder / "1" / "model.safetensors").write_bytes(hub.files[key])
    manifest = str(serve_manifest(tmp_path, hub, search_dirs=[kaggle]))
    rec = main(only=[SIGLIP], manifest=manifest)["assets"][SIGLIP]
    assert rec["source"] == "found" and rec["path"] == str(kaggle / "siglip2" / "1" / "model.safetensors")
    assert rec["verified_by"] == "hub sha256" and hub.count("GET") == 0


@pytest.mark.parametrize("name", [SIGLIP_LOCAL, "model.safetensors"], ids=["local-name", "hub-name"])
def test_offline_from_a_search_folder(hub, tmp_path, name):
    kaggle = tmp_path / "input" / "siglip2" / "transformers" / "large-patch16-512" / "1"
    kaggle.mkdir(parents=True)
    (kaggle / name).write_bytes(hub.files[SIGLIP_KEY])
    manifest = str(serve_manifest(tmp_path, hub, search_dirs=[tmp_path / "input"]))
    rec = main(only=[SIGLIP], manifest=manifest, offline=True)["assets"][SIGLIP]
    assert rec["source"] == "found" and rec["path"] == str(kaggle / name) and hub.count() == 0
    assert rec["sha256"] == hub.sha256(SIGLIP_KEY)


def test_offline_two_files_with_the_hubs_name_are_not_guessed_between(hub, tmp_path, capsys):
    kaggle = tmp_path / "input"
    for folder, key in (("a", DINO_KEY), ("b", SIGLIP_KEY)):
        (kaggle / folder).mkdir(parents=True)
        (kaggle / folder / "model.safetensors").write_bytes(hub.files[key])
    manifest = str(serve_manifest(tmp_path, hub, search_dirs=[kaggle]))
    with pytest.raises(OfflineError, match=SIGLIP):
        main(only=[SIGLIP], manifest=manifest, offline=True)
    assert f"put the right one under --dest as '{SIGLIP_LOCAL}'" in capsys.readouterr().out
    assert hub.count() == 0


def test_step3_fills_siglip_path_and_step6_refuses_the_marker(hub, tmp_path):
    from repro.config import load_config
    from repro.setup.resolve import resolve_config
    from steps import step6_extract

    dest, manifest = tmp_path / "weights", str(serve_manifest(tmp_path, hub))
    marker = f"vae.siglip_path=asset:{SIGLIP}"
    with pytest.raises(ConfigError, match=f"needs asset '{SIGLIP}'.*--only {SIGLIP}"):
        resolve_config(load_config(None, [marker]), profile="cpu")
    main(only=[SIGLIP], dest=str(dest), manifest=manifest)
    cfg, changes = resolve_config(load_config(None, [marker]), profile="cpu")
    assert cfg.vae.siglip_path == str(dest / SIGLIP_LOCAL)
    assert any(c.startswith(f"vae.siglip_path: asset:{SIGLIP} -> ") for c in changes)
    # without step 3 the marker is not a file name: step 6 says so before loading anything
    raw = load_config(None, [marker, f"vae.ckpt_path={tmp_path / 'vae.pt'}"])
    with pytest.raises(ConfigError, match=r"config key 'vae.siglip_path' is 'asset:siglip2-large-512', an asset "
                                          r"marker that step 3 fills in"):
        step6_extract.main(raw, source=str(tmp_path), out=str(tmp_path / "latents"))


def test_plain_url_file_takes_its_local_name_under_dest(tmp_path, monkeypatch):
    import hashlib

    from repro.hub import fetch_assets

    data = random.Random(3).randbytes(5_000)
    with FakeHub(plain={"vgg.pth": data}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        entry = {"url": h.plain_url("vgg.pth"), "local_name": "heads-vgg.pth", "size": len(data),
                 "sha256": hashlib.sha256(data).hexdigest()}
        m = manifest_from_dict({"assets": {"heads": entry}}, tmp_path / "assets.yaml")
        dest = tmp_path / "weights"
        dest.mkdir()
        (dest / "vgg.pth").write_bytes(b"another source's vgg.pth")  # left alone
        assert fetch_assets(["heads"], dest=dest, manifest=m)[0].path == dest / "heads-vgg.pth"
        assert (dest / "heads-vgg.pth").read_bytes() == data and (dest / "vgg.pth").read_bytes().startswith(b"another")
        again = fetch_assets(["heads"], dest=dest, manifest=m)[0]
        assert (again.source, again.path) == ("found", dest / "heads-vgg.pth") and h.count("GET") == 1
