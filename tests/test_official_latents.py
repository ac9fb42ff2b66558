"""Upstream's pre-extracted latents as an asset: the manifest group, fetched through a real (local) Hub
as a dataset repo, found under a Kaggle-style input folder without downloading, unpacked from the parts
without joining them (resumable; a cut-off or hostile archive refused by name), and trained on by
step 7 with the unpacked folder as data.data_path.

The archive here is made like upstream's: a tar.gz of `<config>/<split>_<size>/` holding upstream
shards and latents_stats.pt, cut into 12 parts named split_aa..split_al (`split -n 12`).
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
from pathlib import Path

import pytest
import torch

from repro.data.official_latents import MARKER, OFFICIAL_GROUP, find_shard_folder, unpack_parts
from repro.errors import ReproError
from repro.hub import fetch_assets, load_manifest
from repro.hub.manifest import SearchDir
from steps.step6_extract import main as step6
from steps.step7_train import main as step7
from tests.fakehub import FakeHub
from tests.test_training import STAGE0, make_latents

REPO = "hustvl/imagenet256-latents-vave-f16d32-dinov2"
INNER = "vavae_f16d32/imagenet_train_256"


def tar_gz(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def cut(blob: bytes, n: int = 12) -> dict[str, bytes]:
    step = -(-len(blob) // n)
    return {f"split_a{chr(ord('a') + i)}": blob[i * step:(i + 1) * step] for i in range(n)}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict:
    src = make_latents(tmp_path_factory.mktemp("upstream") / INNER)
    files = {f"{INNER}/{p.name}": p.read_bytes() for p in sorted(src.iterdir())}
    return {"files": files, "parts": cut(tar_gz(files))}


def write_parts(folder: Path, parts: dict[str, bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in parts.items():
        (folder / name).write_bytes(data)
    return sorted(folder / name for name in parts)


def test_the_manifest_lists_the_parts_as_a_group_outside_the_default():
    m = load_manifest()
    parts = m.select([OFFICIAL_GROUP])
    assert [p.filename for p in parts] == [f"splits/split_a{c}" for c in "abcdefghijkl"]
    assert {(p.repo_id, p.repo_type, p.group) for p in parts} == {(REPO, "dataset", OFFICIAL_GROUP)}
    assert not set(parts) & set(m.select())  # a plain step 2 never fetches 63 GB
    assert m.select(["imagenet256-latents-ac"]) == [parts[2]]


def test_step6_official_fetches_unpacks_and_step7_trains_on_it(archive, tmp_path, monkeypatch, capsys):
    served = {(f"datasets/{REPO}", f"splits/{name}"): data for name, data in archive["parts"].items()}
    with FakeHub(served) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        out = tmp_path / "latents"
        summary = step6(STAGE0, official=True, out=str(out))
        assert hub.count("GET") == 12 and not summary["reused"]
        again = step6(STAGE0, official=True, out=str(out))  # everything on disk: no download, no unpack
        assert again["reused"] and hub.count("GET") == 12
    assert summary["written"] == len(archive["files"]) and summary["shards"] == 2
    assert Path(summary["shard_folder"]) == out / INNER and Path(summary["stats"]) == out / INNER / "latents_stats.pt"
    for name, data in archive["files"].items():
        assert (out / name).read_bytes() == data
    result = step7(STAGE0, set=[f"data.data_path={out}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
                                "train.ckpt_every=2", "train.log_every=2"])
    assert result["step"] == 2 and f"from {out / INNER}" in capsys.readouterr().out


def test_parts_under_kaggle_input_are_used_without_downloading(archive, tmp_path, monkeypatch):
    kaggle = tmp_path / "kaggle_input"
    write_parts(kaggle / "imagenet-latents" / "splits", archive["parts"])  # an attached Kaggle dataset
    m = dataclasses.replace(load_manifest(), search_dirs=(SearchDir(kaggle),))
    served = {(f"datasets/{REPO}", f"splits/{name}"): data for name, data in archive["parts"].items()}
    with FakeHub(served) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        records = fetch_assets([OFFICIAL_GROUP], manifest=m)
        assert hub.count("GET") == 0  # HEADs for the sha256 only
    assert {r.source for r in records} == {"found"} and {r.verified_by for r in records} == {"hub sha256"}
    assert records[0].path.parent == kaggle / "imagenet-latents" / "splits"


def test_an_interrupted_unpack_resumes_and_a_cut_off_archive_is_named(archive, tmp_path):
    parts = write_parts(tmp_path / "parts", archive["parts"])
    out = tmp_path / "out"
    with pytest.raises(ReproError, match="ends early or is damaged .* 11 part"):
        unpack_parts(parts[:-1], out)  # the last part missing
    assert not (out / MARKER).exists()
    kept = [p for p in out.rglob("*") if p.is_file()]  # what was complete before the cut stays
    summary = unpack_parts(parts, out)
    assert summary["kept"] == len(kept) and summary["written"] == len(archive["files"]) - len(kept)
    assert find_shard_folder(out)[0] == out / INNER


def test_hostile_member_names_and_links_never_land_outside(tmp_path):
    evil = write_parts(tmp_path / "evil", cut(tar_gz({"ok/a.txt": b"a", "../escape.txt": b"x"}), 2))
    with pytest.raises(ReproError, match="'../escape.txt', which would land outside"):
        unpack_parts(evil, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
    linked = write_parts(tmp_path / "linked", cut(tar_gz({"d/a.txt": b"a"}, links={"d/passwd": "/etc/passwd"}), 3))
    summary = unpack_parts(linked, tmp_path / "out2")
    assert summary["not_files"] == 1 and not (tmp_path / "out2" / "d" / "passwd").exists()


def test_more_than_one_shard_folder_is_a_question_not_a_guess(tmp_path):
    for sub in ("a", "b"):
        make_latents(tmp_path / "root" / sub, shards=1, stats=False)
    with pytest.raises(ReproError, match="holds latent shards in 2 folders"):
        find_shard_folder(tmp_path / "root")
    assert find_shard_folder(tmp_path / "root" / "a")[0] == tmp_path / "root" / "a"
