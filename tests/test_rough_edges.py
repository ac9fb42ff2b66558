"""Rough edges a newcomer met: step 6 keeping empty or stale shards and naming bad files only in its report,
read-only output folders, step 4's offline advice, a second SIGTERM while sampling, and steps that end
without saying what they wrote. Real files, real subprocesses."""

from __future__ import annotations

import json
import re
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repro.errors import ReproError

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# Step 6: bad images


def _vae():
    from repro.tokenizer.loader import build_tokenizer

    torch.manual_seed(0)
    return build_tokenizer({"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 4,
                            "embed_dim": 4, "resolution": 16, "norm_groups": 4})


def _good(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(path)


def _extract(src: Path, out: Path) -> dict:
    from repro.data.extract import extract_latents

    return extract_latents(_vae(), src, out, image_size=16, store="mean", batch_size=4)


def test_all_bad_images_leave_no_shard_and_the_fixed_image_is_used(tmp_path, capsys):
    folder = tmp_path / "src" / "only_class"
    folder.mkdir(parents=True)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "lat"
    with pytest.raises(ReproError, match=r"none of the 1 image\(s\) .* could be read: .*broken.png \(.*\); fix or "
                                         r"replace them and run the same command again \(no shard was kept\)"):
        _extract(tmp_path / "src", out)
    assert not list(out.glob("*.safetensors")), "a 0-latent shard must not stay behind"
    _good(folder / "broken.png", 0)  # the user fixes the file
    report = _extract(tmp_path / "src", out)
    assert report["num_encoded"] == 1 and report["num_corrupt"] == 0


def test_mixed_folder_rerun_picks_up_the_fixed_image_and_the_console_names_bad_files(tmp_path, capsys):
    folder = tmp_path / "src" / "only_class"
    folder.mkdir(parents=True)
    for i in range(3):
        _good(folder / f"ok_{i}.png", i)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "lat"
    first = _extract(tmp_path / "src", out)
    assert first["num_encoded"] == 3 and first["num_corrupt"] == 1
    console = capsys.readouterr().out
    assert "1 image(s) could not be read and were left out" in console and "broken.png" in console
    again = _extract(tmp_path / "src", out)  # nothing changed: reused, the bad file named again
    assert again["shards_reused"] == 1 and again["num_corrupt"] == 1 and "broken.png" in capsys.readouterr().out
    _good(folder / "broken.png", 9)
    fixed = _extract(tmp_path / "src", out)
    assert fixed["num_encoded"] == 4 and fixed["num_corrupt"] == 0
    assert fixed["shards_written"] == 1 and fixed["shards_reused"] == 0
    assert "broken.png, unreadable when the shard was written, reads now" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Read-only output folders (Kaggle's input folder): one line naming the folder, in every step


READ_ONLY_LINE = "the folder is read-only (a dataset or input mount is) or not yours; write elsewhere"


def test_read_only_folders_are_one_line_in_process():
    """/sys refuses writes even to root (EPERM to mkdir, EACCES to create): the same translation as EROFS."""
    from repro.utils.io import atomic_write_json, make_dirs

    with pytest.raises(ReproError, match=r"cannot write in /sys \(Operation not permitted\): " + re.escape(READ_ONLY_LINE)):
        make_dirs("/sys/repro-test/out")
    with pytest.raises(ReproError, match=r"cannot write in /sys \(.*\): " + re.escape(READ_ONLY_LINE)):
        atomic_write_json("/sys/repro-test.json", {})


def _read_only_mount_works(folder: Path) -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}"],
                           capture_output=True)
    return probe.returncode == 0


def _in_read_only(folder: Path, args: list[str], env: dict):
    """Run `python -m ...args` where `folder` is a read-only mount (a private mount namespace: a real EROFS)."""
    import subprocess

    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(folder),
                           sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_read_only_output_folder_is_one_line_in_steps_1_3_4_6(tmp_path):
    ro = tmp_path / "input"
    ro.mkdir()
    if not _read_only_mount_works(ro):
        pytest.skip("no private read-only bind mount here (needs unshare and CAP_SYS_ADMIN)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    on_ro = {**env, "REPRO_RUNS_DIR": str(ro / "runs")}
    images = tmp_path / "images" / "cls"
    images.mkdir(parents=True)
    _good(images / "a.png", 0)
    from steps import step3_configs

    resolved = step3_configs.main(base="tiny")["path"]  # the runs folder of this test: writable
    cases = [(["steps.step1_install", "--dry-run"], on_ro), (["steps.step3_configs", "--base", "tiny"], on_ro),
             (["steps.step4_inference", "--config", "tiny", "--num-samples", "2", "--no-progress"], on_ro),
             (["steps.step4_inference", "--config", str(resolved), "--num-samples", "2", "--no-progress",
               "--out", str(ro / "samples")], env),
             (["steps.step6_extract", "--config", str(resolved), "--source", str(images.parent), "--out",
               str(ro / "latents")], env)]
    for args, case_env in cases:
        proc = _in_read_only(ro, args, case_env)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        err = proc.stderr.strip().splitlines()
        assert err[-1] == f"error: cannot write in {ro} (Read-only file system): {READ_ONLY_LINE}: --out DIR for " \
                          f"this step's outputs, REPRO_RUNS_DIR=DIR for the runs folder, or run from a folder you " \
                          f"can write to", (args, proc.stderr)
        assert "Traceback" not in proc.stderr, (args, proc.stderr)


# ----------------------------------------------------------------------------------------------
# Step 4 without network: advice that names what step 4 users can run


@pytest.mark.parametrize("how", ["no-network", "HF_HUB_OFFLINE"])
def test_step4_offline_advice_names_runnable_commands(how, monkeypatch, capsys):
    import socket

    from steps.step4_inference import cli

    if how == "no-network":
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exc:
        cli(["--no-progress"])  # the official demo: needs the XL checkpoint and the VA-VAE
    assert exc.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: step 4 needs ") and ("cannot reach" in line or "offline mode" in line)
    assert "python -m steps.step2_download --only " in line and "python -m steps.step4_inference --config tiny" in line
    assert "use --offline" not in line and "put the files under --dest" not in line  # step 4 takes neither flag


# ----------------------------------------------------------------------------------------------
# A second SIGTERM while sampling: exit 143 with the resume line, not an abort (-6)


@pytest.mark.parametrize("gap", [0.0, 0.05])
def test_second_sigterm_during_sampling_exits_143_cleanly(tmp_path, gap):
    import signal
    import subprocess
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "steps.step4_inference", "--config", "tiny", "--num-samples", "400",
                             "--batch-size", "4", "--no-progress", "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while len(list((out / "images").glob("[0-9]*.png"))) < 8:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        time.sleep(gap)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "terminate called" not in output and proc.returncode in (143, -signal.SIGTERM), (proc.returncode, output)
    if proc.returncode == 143:  # the second signal came while the run could still say what it left
        assert re.search(r"stopped (at once by a second SIGTERM|by SIGTERM): \d+ of 400 images are written", output)
    from repro.sampling.writer import read_png

    assert all(read_png(p).shape == (64, 64, 3) for p in (out / "images").glob("[0-9]*.png"))  # complete PNGs only


# ----------------------------------------------------------------------------------------------
# Steps end by saying what they wrote


def test_steps_4_and_6_end_with_the_paths_they_wrote(tmp_path, capsys):
    from steps import step4_inference, step6_extract

    demo = step4_inference.cli(["--config", "tiny", "--demo", "--no-progress", "--out", str(tmp_path / "demo"),
                                "--set", "sample.num_sampling_steps=2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("wrote: ") and demo["grid"] in last and demo["preview"] in last
    assert demo["grid"].endswith("demo_samples.png") and demo["config"] in last
    fid = step4_inference.main(config="tiny", num_samples=2, out=str(tmp_path / "fid"), progress=False,
                               set=["sample.num_sampling_steps=2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("wrote: ") and fid["npz"] in last and fid["npz"].endswith("samples.npz")

    images = tmp_path / "images" / "cls"
    images.mkdir(parents=True)
    _good(images / "a.png", 0)
    from steps import step3_configs

    resolved = step3_configs.main(base="tiny")["path"]
    out = tmp_path / "latents"
    step6_extract.main(str(resolved), source=str(images.parent), out=str(out))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"wrote: 1 shard(s) in {out}, {out / 'latents_stats.pt'}, {out / 'extract_report.json'}"
