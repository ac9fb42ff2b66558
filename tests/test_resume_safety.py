"""Issue 12: a resumed run never mixes inputs, `runs:` means one thing in every step, files follow the umask.

- Sampling records the sha256 of the checkpoint, the VA-VAE and the latent statistics in run.json and
  refuses a folder whose images came from other files (the checkpoint replaced by another run's under
  the same name); a run.json from before the hashes is extended only if no input changed since its
  first image.
- Training records the run id and the sha256 of `train.weight_init` / `train.ckpt`: a checkpoint copied
  in from another run, or a start file replaced since, is refused by name.
- The hash cache reads each file once; `runs:REL` is a folder under the runs folder in steps 5, 6, 7 and
  their advice is a command that runs; atomic writes give 0644 files under umask 022.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repro.config import load_config
from repro.errors import ConfigError, ReproError
from repro.paths import runs_dir
from repro.utils.hashing import HashCache, listing_digest
from repro.utils.io import atomic_torch_save, atomic_write_text, sha256_file
from tests.conftest import PROJECT_ROOT
from tests.test_training import make_latents
from tests.tiny_assets import tiny_model, write_tiny_assets

STAGE0 = "configs/train/tiny_stage_0.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# The hash cache


def test_hash_cache_reads_each_file_once_and_sees_a_replaced_file(tmp_path, capsys):
    f, cache_file = tmp_path / "model.pt", tmp_path / "cache.json"
    f.write_bytes(b"a" * 1000)
    first = HashCache(cache_file)
    assert first.sha256(f) == sha256_file(f) and first.hashed == 1
    first.save()
    again = HashCache(cache_file)
    assert again.sha256(f) == sha256_file(f) and again.hashed == 0  # answered from the cache
    time.sleep(0.05)  # inode times tick at the kernel's clock granularity
    f.write_bytes(b"b" * 1000)  # rewritten in place, same size: the ctime moved
    assert again.sha256(f) == sha256_file(f) and again.hashed == 1
    other = tmp_path / "other.pt"
    other.write_bytes(b"c" * 1000)
    os.utime(other, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns))  # same size and mtime, a new inode
    os.replace(other, f)
    assert again.sha256(f) == sha256_file(f) and again.hashed == 2
    cache_file.write_text("{torn")
    assert HashCache(cache_file).sha256(f) == sha256_file(f)
    assert "unreadable hash cache" in capsys.readouterr().out
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"x")
    before = listing_digest(folder, folder.glob("*"))
    (folder / "b.png").write_bytes(b"y")
    assert listing_digest(folder, folder.glob("*")) != before


# ---------------------------------------------------------------------------------------------
# Sampling: the sha256 of its three input files


def _sampling_config(files: dict, steps: int = 2):
    return load_config(PROJECT_ROOT / "configs" / "tiny.yaml", [
        f"ckpt_path={files['lightningdit-xl-800ep']}", f"vae.ckpt_path={files['vavae-f16d32']}",
        f"data.data_path={files['latents-stats'].parent}", f"sample.num_sampling_steps={steps}"])


def _pngs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "images").glob("*.png") if not p.name.startswith("."))


def test_sampling_refuses_a_folder_made_from_another_checkpoint(tmp_path, capsys):
    from repro.sampling.run import run_sampling

    files = write_tiny_assets(tmp_path / "weights")
    cfg, out = _sampling_config(files), tmp_path / "out"
    model = files["lightningdit-xl-800ep"]
    kw = dict(out_dir=str(out), batch_size=2, device="cpu", progress=False, threaded_writer=False)
    run_sampling(cfg, num_samples=4, **kw)
    record = json.loads((out / "run.json").read_text())
    assert record["inputs"]["ckpt_path"] == {"file": str(model), "sha256": sha256_file(model)}
    assert record["inputs"]["vae.ckpt_path"]["sha256"] == sha256_file(files["vavae-f16d32"])
    assert record["inputs"]["data.data_path"]["sha256"] == sha256_file(files["latents-stats"])

    # another run's checkpoint under the same name: refused, naming the file and both hashes
    original = model.read_bytes()
    torch.save({"ema": tiny_model(seed=1).state_dict()}, tmp_path / "other.pt")
    os.replace(tmp_path / "other.pt", model)
    with pytest.raises(ReproError) as err:
        run_sampling(cfg, num_samples=8, **kw)
    message = str(err.value)
    assert (f"made from ckpt_path {model} with sha256 {record['inputs']['ckpt_path']['sha256']}; this run's {model} has sha256 "
            f"{sha256_file(model)}: run with the old file to resume, or choose a new --out") in message, message
    assert _pngs(out) == [f"{i:06d}.png" for i in range(4)]  # nothing written

    # the original file back (another inode, same bytes): the folder is extended
    model.write_bytes(original)
    assert run_sampling(cfg, num_samples=8, **kw)["new_images"] == 4

    # a run.json from before the hashes: refused while an input is newer than the first image ...
    legacy = json.loads((out / "run.json").read_text())
    del legacy["inputs"]
    (out / "run.json").write_text(json.dumps(legacy))
    first_png = (out / "images" / "000000.png").stat().st_mtime
    os.utime(model, (first_png + 5, first_png + 5))
    with pytest.raises(ReproError, match=r"predates input hashes and .*ckpt_path\) was modified after the first"):
        run_sampling(cfg, num_samples=10, **kw)
    # ... and extended (with a note; the hashes recorded from now on) when every input is older
    os.utime(model, (first_png - 100, first_png - 100))
    capsys.readouterr()
    assert run_sampling(cfg, num_samples=10, **kw)["new_images"] == 2
    assert "predates input hashes" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["inputs"]["ckpt_path"]["sha256"] == sha256_file(model)
    # --out runs:REL is a folder under the runs folder, as in every step
    run_sampling(cfg, num_samples=2, **{**kw, "out_dir": "runs:samples/mine"})
    assert (runs_dir().resolve() / "samples" / "mine" / "images" / "000001.png").is_file()


# ---------------------------------------------------------------------------------------------
# Training: the run's identity and its start files


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    return make_latents(tmp_path_factory.mktemp("latents"))


def _train(latents: Path, out: Path, *extra: str) -> dict:
    from steps.step7_train import main

    return main(STAGE0, set=[f"data.data_path={latents}", f"train.output_dir={out}", "train.ckpt_every=2",
                             "train.log_every=2", *extra])


def _weights(path: Path, seed: int) -> Path:
    from repro.models.lightningdit import build_model

    torch.manual_seed(seed)
    atomic_torch_save({"model": build_model(load_config(STAGE0).model, 4, 4).state_dict()}, path)
    return path


def test_training_refuses_a_changed_weight_init(latents, tmp_path):
    w = _weights(tmp_path / "init.pt", seed=1)
    first = _train(latents, tmp_path / "out", "train.max_steps=2", f"train.weight_init={w}")
    run_dir = Path(first["run_dir"])
    record = json.loads((run_dir / "run.json").read_text())
    assert record["sources"] == {"train.weight_init": {"path": str(w), "sha256": sha256_file(w)}}
    state = torch.load(first["checkpoint"], weights_only=True)
    assert state["kit"]["run_id"] == record["run_id"] and state["kit"]["sources"] == record["sources"]

    original = w.read_bytes()
    _weights(tmp_path / "init.pt", seed=2)
    with pytest.raises(ReproError, match=rf"train.weight_init={w} has sha256 {sha256_file(w)}, but run {run_dir} "
                                         rf"started from {w} with sha256 {record['sources']['train.weight_init']['sha256']}"):
        _train(latents, tmp_path / "out", "train.max_steps=4", f"train.weight_init={w}")
    w.write_bytes(original)
    assert _train(latents, tmp_path / "out", "train.max_steps=4", f"train.weight_init={w}")["step"] == 4


def test_training_refuses_a_checkpoint_copied_in_from_another_run(latents, tmp_path):
    mine = _train(latents, tmp_path / "a", "train.max_steps=2")
    theirs = _train(latents, tmp_path / "b", "train.max_steps=4")
    intruder = Path(mine["run_dir"]) / "checkpoints" / "0000004.pt"
    shutil.copy(theirs["checkpoint"], intruder)
    with pytest.raises(ReproError, match=rf"{intruder} belongs to another run .*; move it out of"):
        _train(latents, tmp_path / "a", "train.max_steps=6")
    intruder.unlink()
    assert _train(latents, tmp_path / "a", "train.max_steps=6")["step"] == 6


# ---------------------------------------------------------------------------------------------
# runs: markers and advice that runs


def test_runs_marker_is_a_folder_under_the_runs_folder_in_steps_5_6_7(tmp_path, monkeypatch, capsys):
    from steps import step5_fix_stats, step6_extract, step7_train

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = str(PROJECT_ROOT / STAGE0)
    where = runs_dir().resolve() / "tiny" / "latents"
    # step 5: the folder under the runs folder, and its advice names it and this config
    result = step5_fix_stats.main(config)
    assert Path(result["path"]) == where / "latents_stats.pt" and not result["verdict"].ok
    advice = capsys.readouterr().out
    assert f"--out {where}" in advice and f"step5_fix_stats --config {config} --refetch" in advice
    with pytest.raises(SystemExit) as exc:
        step5_fix_stats.cli(["--config", config])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 1 and f"`python -m steps.step5_fix_stats --config {config} --refetch`" in last, last

    # step 6 writes into it (--out runs:...), step 5 then finds the statistics, step 7 trains on them
    images = tmp_path / "images"
    for k in range(4):
        (images / f"class_{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((64, 64, 3), 40 * k, np.uint8)).save(images / f"class_{k % 2}" / f"{k}.png")
    from safetensors.torch import save_file

    from repro.tokenizer.vavae import AutoencoderKL

    torch.manual_seed(0)
    save_file(AutoencoderKL(ch=32).state_dict(), str(tmp_path / "vae.safetensors"))
    step6_extract.main(config, source=str(images), out="runs:tiny/latents", batch_size=4, device="cpu",
                       set=[f"vae.ckpt_path={tmp_path / 'vae.safetensors'}", "data.stats_subset=4"])
    assert sorted(p.name for p in where.glob("*.safetensors")) and (where / "latents_stats.pt").is_file()
    assert step5_fix_stats.main(config)["verdict"].ok
    trained = step7_train.main(config, set=["train.max_steps=2", "train.global_batch_size=4",
                                            "train.micro_batch_size=4", "data.num_classes=2"])  # the 2 class folders
    assert Path(trained["run_dir"]) == runs_dir().resolve() / "train" / "tiny_two_stage"
    assert not any(p.name.startswith("runs:") for p in cwd.rglob("*")), "a literal runs: folder was made"

    # an asset: marker only step 3 can fill in: the advice names the command with this config
    tiny = str(PROJECT_ROOT / "configs" / "tiny.yaml")
    with pytest.raises(ConfigError, match=rf"'vae.ckpt_path' is 'asset:[^']+'.*`python -m steps.step3_configs "
                                          rf"--config {tiny}`"):
        step6_extract.main(tiny, source=str(images), out="runs:x")


def test_step5_advice_is_a_command_that_works(tmp_path, monkeypatch, capsys):
    """The `--refetch` command step 5 prints for a missing file, run as printed, repairs it."""
    import io
    import shlex

    from steps import step5_fix_stats
    from tests.fakehub import FakeHub

    config = str(PROJECT_ROOT / STAGE0)
    with pytest.raises(SystemExit):
        step5_fix_stats.cli(["--config", config, "--set", "model.in_chans=32"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    command = shlex.split(err.split("`")[1])
    assert command[:3] == ["python", "-m", "steps.step5_fix_stats"] and command[-1] == "--refetch"
    buf = io.BytesIO()
    torch.save({"mean": torch.randn(1, 32, 1, 1), "std": torch.rand(1, 32, 1, 1) + 0.5}, buf)
    with FakeHub.for_assets({"latents-stats": buf.getvalue()}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        assert step5_fix_stats.cli(command[3:])["verdict"].ok


# ---------------------------------------------------------------------------------------------
# Files follow the umask


def test_written_files_follow_the_umask(tmp_path):
    from repro.sampling.writer import write_png

    old = os.umask(0o022)
    try:
        written = [atomic_write_text(tmp_path / "a.txt", "x"), atomic_torch_save({"a": torch.zeros(1)}, tmp_path / "b.pt"),
                   write_png(tmp_path / "c.png", np.zeros((4, 4, 3), np.uint8))]
        assert [oct(stat.S_IMODE(p.stat().st_mode)) for p in written] == ["0o644"] * 3
        os.umask(0o077)
        assert stat.S_IMODE(atomic_write_text(tmp_path / "d.txt", "x").stat().st_mode) == 0o600
    finally:
        os.umask(old)
