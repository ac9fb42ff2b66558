"""Step 6 extraction on real image files: upstream-readable shards, corrupt files, SIGKILL resume, torchrun.

Images are made here: crops of matplotlib's bundled photo (grace_hopper.jpg) plus drawn shapes, in the
awkward formats users have (grayscale JPEG, CMYK JPEG, palette PNG with transparency, RGBA PNG, WebP)
and one truncated JPEG. The VA-VAE is the official layout at width 32 with seeded random weights.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from glob import glob
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file

from repro.data.extract import extract_latents
from repro.data.image_sources import list_images
from repro.data.latents import LatentShardDataset, image_seed
from repro.errors import ReproError
from repro.tokenizer.vavae import AutoencoderKL, load_vavae
from tests.conftest import PROJECT_ROOT
from tests.test_vavae import adm_center_crop_reference

SHARD_SIZE, BATCH = 5, 3


def _photo() -> Image.Image:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


def _make_images(root: Path) -> None:
    """3 classes, 24 files: 23 images in six formats/modes, 1 truncated JPEG, plus a stray text file."""
    photo = _photo()  # 512 x 600
    a, b, c = (root / n for n in ("class_a", "class_b", "class_c"))
    for d in (a, b, c):
        d.mkdir(parents=True)
    for i in range(8):  # photo crops of several sizes and aspect ratios
        box = (i * 30, i * 20, i * 30 + 90 + 25 * i, i * 20 + 120 + 10 * (i % 3))
        photo.crop(box).save(a / f"photo_{i}.jpg", quality=90)
    for i in range(6):  # drawn shapes
        img = Image.new("RGB", (96 + 8 * i, 72), (20 * i, 120, 240 - 30 * i))
        ImageDraw.Draw(img).ellipse((10 + i, 8, 60 + 4 * i, 64), fill=(250, 30 * i, 10))
        img.save(b / f"shape_{i}.png")
    photo.crop((100, 100, 260, 220)).convert("L").save(b / "gray.jpg")
    photo.crop((50, 200, 170, 300)).convert("CMYK").save(b / "cmyk.jpg")
    pal = photo.crop((0, 300, 128, 400)).convert("P", palette=Image.ADAPTIVE, colors=32)
    pal.save(b / "palette_transparent.png", transparency=0)
    rgba = photo.crop((200, 50, 300, 150)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(c / "rgba.png")
    for i in range(5):
        photo.crop((300 - 20 * i, 300, 400, 420 + 10 * i)).save(c / f"web_{i}.webp", quality=80)
    good = io.BytesIO()
    photo.crop((0, 0, 100, 100)).save(good, format="JPEG")
    (c / "truncated.jpg").write_bytes(good.getvalue()[:300])
    (c / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    _make_images(root / "images")
    torch.manual_seed(0)
    save_file(AutoencoderKL(ch=32).state_dict(), str(root / "vae.safetensors"))
    cfg = root / "tiny.yaml"
    cfg.write_text(f"data:\n  data_path: {root / 'latents'}\n  image_size: 64\n  stats_subset: 16\n"
                   f"vae:\n  ch: 32\n  ckpt_path: {root / 'vae.safetensors'}\nmodel:\n  in_chans: 32\n")
    vae = load_vavae(root / "vae.safetensors", ch=32)
    # the reference run: one process, one thread (torchrun also sets OMP_NUM_THREADS=1; CPU float
    # rounding of convolutions depends on the thread count, ~1e-6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = extract_latents(vae, root / "images", root / "ref", image_size=64, batch_size=BATCH,
                                 shard_size=SHARD_SIZE, seed=0, stats_subset=16)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "cfg": cfg, "vae": vae, "images": root / "images", "ref": root / "ref", "report": report}


def _upstream_style_read(folder: Path) -> dict[str, torch.Tensor]:
    """What upstream ImgLatentDataset does: sorted glob, safe_open each shard, concatenate."""
    parts: dict[str, list] = {"latents": [], "latents_flip": [], "labels": []}
    for f in sorted(glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(f, framework="pt", device="cpu") as h:
            for key in parts:
                parts[key].append(h.get_tensor(key))
    return {k: torch.cat(v) for k, v in parts.items()}


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))


def test_shards_read_by_upstream_conventions(kit):
    report, ref = kit["report"], kit["ref"]
    data = _upstream_style_read(ref)
    assert report["num_images_listed"] == 24 and report["num_encoded"] == 23
    assert data["latents"].shape == (23, 32, 4, 4) and data["latents"].dtype == torch.float32
    assert data["latents_flip"].shape == data["latents"].shape and data["labels"].dtype == torch.int64
    assert data["labels"].tolist() == [0] * 8 + [1] * 9 + [2] * 6  # sorted class folders -> labels
    assert not torch.equal(data["latents"], data["latents_flip"])
    # the corrupt file is reported (path + error) and counted, the stray text file counted as ignored
    assert report["num_corrupt"] == 1 and report["corrupt"][0]["path"].endswith("truncated.jpg")
    assert "truncated" in report["corrupt"][0]["error"].lower() and report["num_ignored_files"] == 1
    assert report["num_shards"] == 5 and sorted(p.name for p in ref.glob("*.safetensors"))[0] == \
        "latents_rank00_shard000.safetensors"

    # image 0 by hand, independently of the kit's image code: ADM crop written from its definition
    # (tests/test_vavae.py), ToTensor + Normalize(0.5, 0.5) in numpy, encode, own seeded noise
    src = list_images(kit["images"])
    with Image.open(src.items[0].ref) as f:
        img = f.convert("RGB")
    pixels = np.asarray(adm_center_crop_reference(img, 64), dtype=np.float32)
    x = torch.from_numpy(pixels / 255.0 * 2.0 - 1.0).permute(2, 0, 1)
    with torch.inference_mode():
        post = kit["vae"].encode(torch.stack([x, x.flip(-1)]))
    g = torch.Generator().manual_seed(image_seed(0, 0))
    eps = torch.randn(32, 4, 4, generator=g), torch.randn(32, 4, 4, generator=g)
    torch.testing.assert_close(data["latents"][0], post.mean[0] + post.std[0] * eps[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(data["latents_flip"][0], post.mean[1] + post.std[1] * eps[1], rtol=1e-5, atol=1e-5)

    # latents_stats.pt: upstream's formula (img_latent_dataset.py: per-channel mean and Bessel-corrected
    # std over N*h*w values of `latents`, not the flips) on the documented seeded subset of 16 of the 23
    stats = torch.load(ref / "latents_stats.pt", weights_only=True)
    picked = torch.randperm(23, generator=torch.Generator().manual_seed(0))[:16]
    subset = data["latents"][picked]
    assert stats["mean"].shape == stats["std"].shape == (1, 32, 1, 1)
    torch.testing.assert_close(stats["mean"], subset.mean(dim=[0, 2, 3], keepdim=True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["std"], subset.std(dim=[0, 2, 3], keepdim=True), rtol=1e-5, atol=1e-6)
    ds = LatentShardDataset(ref)
    assert len(ds) == 23 and ds.channels == 32 and ds.latent_size == 4 and ds.num_classes_seen == 3
    xn, y = ds.get(3, flip=True)
    torch.testing.assert_close(xn, ((data["latents_flip"][3:4] - stats["mean"]) / stats["std"])[0])
    assert y == 0


def test_image_modes_convert_to_rgb(kit):
    expected = {"class_b/gray.jpg": "L", "class_b/cmyk.jpg": "CMYK", "class_b/palette_transparent.png": "P",
                "class_c/rgba.png": "RGBA", "class_c/web_0.webp": "RGB"}
    for rel, mode in expected.items():
        with Image.open(kit["images"] / rel) as im:
            assert im.mode == mode, rel
    src = list_images(kit["images"])
    for i, item in enumerate(src.items):
        if not item.ref.endswith("truncated.jpg"):
            assert src.load(i)[0].mode == "RGB"


def test_flat_folder_and_webdataset_tars_match_class_folder(kit, tmp_path):
    """The same images listed three ways give the same latents (noise follows the image index)."""
    src = list_images(kit["images"])
    names = [Path(it.ref) for it in src.items[:7]]  # 7 images of class_a
    flat = tmp_path / "flat"
    flat.mkdir()
    lines = ["filename,label"]
    for i, p in enumerate(names):
        (flat / f"img{i:02d}{p.suffix}").write_bytes(p.read_bytes())
        lines.append(f"img{i:02d}{p.suffix},{src.items[i].label}")
    (flat / "labels.csv").write_text("\n".join(lines) + "\n")
    (flat / "unlisted.png").write_bytes((kit["images"] / "class_b" / "shape_0.png").read_bytes())
    tars = [tmp_path / "shard-000000.tar", tmp_path / "shard-000001.tar"]
    for t, part in zip(tars, (range(0, 4), range(4, 7))):
        with tarfile.open(t, "w") as tf:
            for i in part:
                for name, data in ((f"s{i:04d}.jpg", names[i].read_bytes()), (f"s{i:04d}.cls", b"0\n")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo("orphan.cls")  # a sample without an image: reported
            info.size = 2
            tf.addfile(info, io.BytesIO(b"1\n"))
    ref = _upstream_style_read(kit["ref"])
    for source, out in ((flat, tmp_path / "out_flat"), (tars, tmp_path / "out_tar")):
        rep = extract_latents(kit["vae"], source, out, image_size=64, batch_size=BATCH, shard_size=SHARD_SIZE,
                              seed=0, stats_subset=16)
        got = _upstream_style_read(out)
        assert rep["num_encoded"] == 7 and got["labels"].tolist() == [0] * 7
        torch.testing.assert_close(got["latents"], ref["latents"][:7], rtol=1e-5, atol=1e-5)
        assert rep["num_listing_problems"] == (1 if source is flat else 2)
    assert rep["source_kind"] == "webdataset" and "orphan" in rep["listing_problems"][0]["path"]


def test_moments_store_draws_samples_at_train_time(kit, tmp_path):
    rep = extract_latents(kit["vae"], kit["images"], tmp_path / "mom", image_size=64, batch_size=BATCH,
                          shard_size=SHARD_SIZE, seed=0, store="moments", stats_subset=16)
    ds = LatentShardDataset(tmp_path / "mom")
    assert ds.store == "moments" and len(ds) == rep["num_encoded"] == 23
    a = ds.get(2, flip=False, generator=torch.Generator().manual_seed(5))[0]
    b = ds.get(2, flip=False, generator=torch.Generator().manual_seed(5))[0]
    c = ds.get(2, flip=False, generator=torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    with safe_open(str(tmp_path / "mom" / "latents_rank00_shard000.safetensors"), "pt") as h:
        assert set(h.keys()) == {"mean", "logvar", "mean_flip", "logvar_flip", "labels"}


def test_rerun_with_other_settings_is_refused(kit, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in _shard_bytes(kit["ref"]).items():
        (out / name).write_bytes(data)
    with pytest.raises(ReproError, match="different extraction.*seed"):
        extract_latents(kit["vae"], kit["images"], out, image_size=64, batch_size=BATCH, shard_size=SHARD_SIZE,
                        seed=1, stats_subset=16)


def kill_after_first_shard(cmd: list[str], out: Path, env: dict, timeout: float) -> int:
    """Run step 6 (`cmd`), SIGKILL it as soon as its first shard is in `out`; the number of shards written then.
    The child runs niced so that this poller wins the CPU and kills it between shards on a busy machine."""
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: os.nice(19))
    deadline = time.time() + timeout
    while not list(out.glob("latents_rank*.safetensors")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(list(out.glob("latents_rank*.safetensors")))


def test_restart_after_sigkill_gives_identical_shards(kit, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "steps.step6_extract", "--config", str(kit["cfg"]), "--source", str(kit["images"]),
           "--out", str(out), "--batch-size", str(BATCH), "--shard-size", str(SHARD_SIZE), "--device", "cpu"]
    done_at_kill = kill_after_first_shard(cmd, out, _env(), timeout=60)
    assert 1 <= done_at_kill < 5 and not (out / "extract_report.json").exists()

    rerun = subprocess.run(cmd, cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    report = __import__("json").loads((out / "extract_report.json").read_text())
    assert report["shards_reused"] == done_at_kill and report["shards_written"] == 5 - done_at_kill
    assert _shard_bytes(out) == _shard_bytes(kit["ref"])
    assert (out / "latents_stats.pt").read_bytes() == (kit["ref"] / "latents_stats.pt").read_bytes()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # no temp files left behind


def test_torchrun_two_processes_match_one(kit, tmp_path):
    out = tmp_path / "out2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "steps.step6_extract", "--config", str(kit["cfg"]), "--source", str(kit["images"]),
           "--out", str(out), "--batch-size", str(BATCH), "--shard-size", str(SHARD_SIZE)]
    run = subprocess.run(cmd, cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "with 2 process(es)" in run.stdout
    assert _shard_bytes(out) == _shard_bytes(kit["ref"])
    assert (out / "latents_stats.pt").read_bytes() == (kit["ref"] / "latents_stats.pt").read_bytes()


def test_a_few_hundred_real_photo_crops(kit, tmp_path):
    """Scale check on real pixels: 300 crops of matplotlib's bundled photos, 10 classes, 5 shards."""
    from matplotlib import cbook

    photos = [_photo()]
    with cbook.get_sample_data("Minduka_Present_Blue_Pack.png") as f:
        photos.append(Image.open(f).convert("RGB"))
    rng = np.random.default_rng(0)
    for i in range(300):
        photo = photos[i % 2]
        w, h = photo.size
        side = int(rng.integers(48, min(w, h)))
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        folder = tmp_path / "images" / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        photo.crop((x0, y0, x0 + side, y0 + side + int(rng.integers(0, 16)))).save(folder / f"{i:03d}.jpg")
    report = extract_latents(kit["vae"], tmp_path / "images", tmp_path / "latents", image_size=64,
                             batch_size=32, shard_size=64, seed=0, stats_subset=256)
    data = _upstream_style_read(tmp_path / "latents")
    assert report["num_encoded"] == 300 and report["num_corrupt"] == 0 and report["num_shards"] == 5
    assert data["latents"].shape == (300, 32, 4, 4) and torch.isfinite(data["latents"]).all()
    assert torch.bincount(data["labels"]).tolist() == [30] * 10
    stats = torch.load(tmp_path / "latents" / "latents_stats.pt", weights_only=True)
    subset = data["latents"][torch.randperm(300, generator=torch.Generator().manual_seed(0))[:256]]
    torch.testing.assert_close(stats["mean"], subset.mean(dim=[0, 2, 3], keepdim=True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["std"], subset.std(dim=[0, 2, 3], keepdim=True), rtol=1e-5, atol=1e-6)


def test_a_full_disk_is_one_clear_error_for_every_atomic_writer(small_disk):
    """Shards (safetensors), torch files and plain bytes: the error names the file, nothing half-written stays."""
    import re

    import torch

    from repro.errors import ReproError
    from repro.utils.io import atomic_save_safetensors, atomic_torch_save, atomic_write_bytes

    big = 90 * 2**20  # more than the 80 MB disk
    writers = {"shard.safetensors": lambda p: atomic_save_safetensors({"x": torch.zeros(big // 4)}, p),
               "stats.pt": lambda p: atomic_torch_save({"x": torch.zeros(big // 4)}, p),
               "blob.bin": lambda p: atomic_write_bytes(p, b"x" * big)}
    for name, write in writers.items():
        with pytest.raises(ReproError, match=rf"disk holding .*small_disk is full \(\d+ MB free\) while writing "
                                             rf"{re.escape(name)}: free some space"):
            write(small_disk / name)
    assert list(small_disk.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Bad labels, directory loops, labels files, Ctrl-C (issue 17)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_bad_cls_labels_are_bad_samples_and_the_rerun_completes(kit, tmp_path):
    jpg = (kit["images"] / "class_a" / "photo_0.jpg").read_bytes()
    labels = [b"3\n", b"99999999999999999999\n", b"-3", b"cat", b"9" * 5000, b"2147483648", b"7"]
    shards = tmp_path / "shards"  # a folder holding only .tar shards
    shards.mkdir()
    _tar(shards / "part-0.tar", [m for i, cls in enumerate(labels[:4])
                                 for m in ((f"s{i}.jpg", jpg), (f"s{i}.cls", cls))])
    _tar(shards / "part-1.tar", [m for i, cls in enumerate(labels[4:], 4)
                                 for m in ((f"s{i}.jpg", jpg), (f"s{i}.cls", cls))])
    kw = dict(image_size=64, batch_size=BATCH, shard_size=3, seed=0, stats_subset=16)
    rep = extract_latents(kit["vae"], shards, tmp_path / "out", **kw)
    assert rep["source_kind"] == "webdataset" and rep["num_images_listed"] == 7
    assert rep["num_encoded"] == 2 and _upstream_style_read(tmp_path / "out")["labels"].tolist() == [3, 7]
    bad = {c["index"]: c for c in rep["corrupt"]}
    assert sorted(bad) == [1, 2, 3, 4, 5] and rep["num_corrupt"] == 5  # each bad sample once
    assert "'99999999999999999999'" in bad[1]["error"] and "not an integer in 0..2147483647" in bad[1]["error"]
    assert bad[2]["path"].endswith("part-0.tar::s2.jpg") and "'-3'" in bad[2]["error"]
    assert len(bad[4]["error"]) < 200  # a 5000-digit label is quoted, not dumped
    before = _shard_bytes(tmp_path / "out")
    again = extract_latents(kit["vae"], shards, tmp_path / "out", **kw)
    assert again["shards_reused"] == 3 and again["shards_written"] == 0 and again["corrupt"] == rep["corrupt"]
    assert _shard_bytes(tmp_path / "out") == before


def test_directory_link_loops_are_reported_once_and_change_no_label(kit, tmp_path):
    images = tmp_path / "images"
    for cls, name in (("class_a", "photo_0.jpg"), ("class_b", "shape_0.png")):
        (images / cls / "deeper").mkdir(parents=True)
        src = kit["images"] / ("class_a" if cls == "class_a" else "class_b") / name
        (images / cls / name).write_bytes(src.read_bytes())
    (images / "class_a" / "loop").symlink_to("..")  # back to the root: every class again, under class_a
    (images / "class_a" / "deeper" / "up").symlink_to("../..")  # a loop two levels down
    (images / "class_a" / "alias").symlink_to("../class_b")  # another class's images
    outside = tmp_path / "extra"  # a link to a folder outside the image folder is followed, once
    outside.mkdir()
    (outside / "more.jpg").write_bytes((kit["images"] / "class_a" / "photo_1.jpg").read_bytes())
    (images / "class_b" / "extra").symlink_to(outside)
    (images / "class_b" / "deeper" / "extra_again").symlink_to(outside)

    src = list_images(images)
    assert [(Path(i.ref).relative_to(images).as_posix(), i.label) for i in src.items] == [
        ("class_a/photo_0.jpg", 0), ("class_b/shape_0.png", 1), ("class_b/extra/more.jpg", 1)]
    reported = [Path(p["path"]).relative_to(images).as_posix() for p in src.problems]
    assert reported == ["class_a/alias", "class_a/loop", "class_a/deeper/up", "class_b/deeper/extra_again"]
    assert all("not followed" in p["error"] for p in src.problems)
    kw = dict(image_size=64, batch_size=BATCH, shard_size=2, seed=0, stats_subset=16)
    rep = extract_latents(kit["vae"], images, tmp_path / "out", **kw)
    assert rep["num_encoded"] == 3 and rep["num_listing_problems"] == 4
    assert _upstream_style_read(tmp_path / "out")["labels"].tolist() == [0, 1, 1]
    again = extract_latents(kit["vae"], images, tmp_path / "out", **kw)
    assert again["shards_reused"] == 2 and again["listing_problems"] == rep["listing_problems"]


def test_labels_file_lines_with_bad_labels_or_paths_are_reported(kit, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    png = (kit["images"] / "class_b" / "shape_0.png").read_bytes()
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png", "unlisted.png"):
        (flat / name).write_bytes(png)
    (tmp_path / "secret.png").write_bytes(png)
    (flat / "labels.txt").write_text(
        "filename label\n# a comment\n\na.png 2\nb.png 99999999999999999999\nc.png -1\nd.png cat\n"
        "../secret.png 0\ne.png\t5\n")
    src = list_images(flat)
    assert [(Path(i.ref).name, i.label) for i in src.items] == [("a.png", 2), ("e.png", 5)]
    errors = {Path(p["path"]).name: p["error"] for p in src.problems}
    assert set(errors) == {"b.png", "c.png", "d.png", "secret.png", "unlisted.png"}  # each once
    assert errors["b.png"].startswith("labels.txt line 5: label '99999999999999999999' is not an integer")
    assert "line 8: the path leaves the image folder" in errors["secret.png"] and len(src.problems) == 5
    assert errors["unlisted.png"] == "no label in labels.txt"
    rep = extract_latents(kit["vae"], flat, tmp_path / "out", image_size=64, batch_size=BATCH, shard_size=4,
                          seed=0, stats_subset=16)
    assert rep["num_encoded"] == 2 and rep["num_listing_problems"] == 5

    other = tmp_path / "my_labels.csv"  # labels_file= names a file elsewhere; its first line is data
    other.write_text("a.png,1\nb.png,0\n")
    assert [i.label for i in list_images(flat, labels_file=other).items] == [1, 0]
    cases = {"a.png,1\na.png,2\n": r"line 2: 'a.png' is listed twice \(first on line 1\)",
             "a.png,1\nonlyaname\n": r"line 2: 'onlyaname' is not 'filename,label'",
             "name,label\nb.png,-4\n": r"lists no usable images .*1 line\(s\) with a bad label or path"}
    for text, message in cases.items():
        other.write_text(text)
        with pytest.raises(ReproError, match=message):
            list_images(flat, labels_file=other)
    with pytest.raises(ReproError, match="labels file .*absent.txt not found"):
        list_images(flat, labels_file=tmp_path / "absent.txt")


def test_ctrl_c_exits_130_with_the_resume_hint_and_the_rerun_finishes(kit, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "steps.step6_extract", "--config", str(kit["cfg"]), "--source", str(kit["images"]),
           "--out", str(out), "--batch-size", str(BATCH), "--shard-size", str(SHARD_SIZE), "--device", "cpu"]
    # SIG_DFL: a suite started in the background (`pytest &`) hands its children SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: the extraction would finish instead (this test's "flake", 0 != 130)
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: (os.nice(19), signal.signal(signal.SIGINT, signal.SIG_DFL)))
    deadline = time.time() + 120
    while not list(out.glob("latents_rank*.safetensors")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C (or a notebook's interrupt) sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "\ninterrupted: run the same command again to resume\n" in err and "Traceback" not in err
    assert not (out / "extract_report.json").exists()
    rerun = subprocess.run(cmd, cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert _shard_bytes(out) == _shard_bytes(kit["ref"])
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_listing_errors_name_the_source_and_odd_tar_members_are_counted(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    tar = _tar(tmp_path / "odd.tar", [("a.png", png.getvalue()), ("a.jpg", png.getvalue()), ("a.cls", b"1"),
                                      ("README", b"no dot"), ("b.png", png.getvalue()), ("b.cls", b"0")])
    src = list_images([tar])
    assert [Path(i.ref.split("::")[1]).name for i in src.items] == ["b.png"] and src.ignored == 1
    assert src.problems == [{"path": f"{tar}::a", "error": "ambiguous sample: several images ['jpg', 'png']"}]
    (tmp_path / "gz.tar").write_bytes(b"\x1f\x8b" + b"\0" * 600)  # gzip bytes under a .tar name
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [([tmp_path / "gz.tar"], r"cannot read WebDataset shard .*gz.tar .*unpack \.tar\.gz to \.tar"),
             ([tar, tmp_path / "notes.txt"], r"notes.txt is not a \.tar shard"),
             ([tmp_path / "missing"], r"image source .*missing does not exist"),
             ([tmp_path / "empty", tmp_path / "empty"], r"pass one image folder as --source, not 2"),
             ([], r"no image source given"),
             ([tmp_path / "empty"], r"empty has no class sub-folders, no labels.txt / labels.csv and no \.tar")]
    for source, message in cases:
        with pytest.raises(ReproError, match=message):
            list_images(source)
