"""Step 9 on the one training engine (repro.training.engine): FSDP2 within float32 rounding of DDP, exact
resume after SIGKILL under torchrun, log backends, background saves, and what FSDP refuses.

The tokenizer trainer adds only its modules and loss; everything here is the engine's, which step 7 shares.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from repro.errors import ConfigError
from repro.tokenizer_training.trainer import train_tokenizer
from tests.conftest import PROJECT_ROOT
from tests.test_tokenizer_training import TINY, digits, tiny_cfg  # noqa: F401 (the digits fixture)

CONFIG = str(PROJECT_ROOT / "configs/tokenizer/digits_f4.yaml")


def step9_torchrun(n: int, digits_dir: Path, out: Path, *more: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "steps.step9_train_tokenizer", "--config", CONFIG, "--set", *TINY,
           f"data.image_folder={digits_dir / 'train'}", f"train.output_dir={out}", *more]
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (torchrun's workers start sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def test_fsdp_ends_within_float32_rounding_of_ddp(digits, tmp_path):
    runs = {}
    for strategy in ("ddp", "fsdp"):
        out = finish(step9_torchrun(2, digits, tmp_path / strategy, "train.max_steps=3", "train.ema_decay=0.5",
                                    f"train.strategy={strategy}"))
        assert f"strategy {strategy}" in out
        run = tmp_path / strategy / "own_data"
        runs[strategy] = (load_file(str(run / "tokenizer.safetensors")),
                          torch.load(run / "checkpoints" / "0000003.pt", weights_only=True))
    (ddp_file, ddp), (fsdp_file, fsdp) = runs["ddp"], runs["fsdp"]
    assert (ddp["kit"]["strategy"], fsdp["kit"]["strategy"]) == ("ddp", "fsdp")
    assert list(ddp["model"]) == list(fsdp["model"]) and list(ddp["ema"]) == list(fsdp["ema"])
    # the same single-file layout: the optimizer state indexed as the unsharded Adam's
    assert ddp["opt"]["ae"]["param_groups"] == fsdp["opt"]["ae"]["param_groups"]
    for k in ddp_file:  # reduce-scatter vs all-reduce order only (Adam amplifies near-zero gradients' rounding)
        torch.testing.assert_close(fsdp_file[k], ddp_file[k], rtol=1e-4, atol=2e-4)
    for k in ddp["model"]:
        torch.testing.assert_close(fsdp["model"][k], ddp["model"][k], rtol=1e-4, atol=2e-4)


def test_a_torchrun_run_killed_with_sigkill_resumes_bitwise(digits, tmp_path):
    more = ["train.max_steps=40", "train.ckpt_every=2", "train.keep_last=0", "train.lr_schedule=constant",
            "train.warmup_steps=0", "train.ema_decay=0.9"]
    finish(step9_torchrun(2, digits, tmp_path / "ref", *more))
    cut = step9_torchrun(2, digits, tmp_path / "cut", *more)
    ckpts = tmp_path / "cut" / "own_data" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and cut.poll() is None and not list(ckpts.glob("0000004.pt")):
        time.sleep(0.01)
    assert cut.poll() is None, "the run ended before the kill"
    for pid in [cut.pid, *descendants(cut.pid)]:  # torchrun and both workers, as a dying notebook takes them
        os.kill(pid, signal.SIGKILL)
    cut.communicate()
    left = sorted(ckpts.glob("*.pt"))
    assert left and int(left[-1].stem) < 40
    out = finish(step9_torchrun(2, digits, tmp_path / "cut", *more))
    assert "resumed from" in out
    a = torch.load(tmp_path / "ref/own_data/checkpoints/0000040.pt", weights_only=True)
    b = torch.load(ckpts / "0000040.pt", weights_only=True)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    ta, tb = (load_file(str(p / "own_data/tokenizer.safetensors")) for p in (tmp_path / "ref", tmp_path / "cut"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_fsdp_refuses_the_adaptive_weights_by_name(digits, tmp_path):
    with pytest.raises(ConfigError, match=r"train.strategy=fsdp trains the tokenizer without the PatchGAN"):
        train_tokenizer(tiny_cfg(digits, tmp_path, "train.max_steps=1", "train.strategy=fsdp", "loss.disc_start=1"))


@pytest.mark.parametrize("key,package", [("train.tensorboard", "tensorboard"), ("train.wandb", "wandb")])
def test_the_log_backends_are_the_engines(digits, tmp_path, monkeypatch, key, package):
    monkeypatch.setitem(sys.modules, package, None)  # what an uninstalled package looks like to `import`
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=f"{key} is true but the '{package}' package is not installed"):
        train_tokenizer(tiny_cfg(digits, tmp_path, "train.max_steps=1", f"{key}=true"))
    assert not list(tmp_path.rglob("*.pt"))  # stopped before training


def test_checkpoints_are_written_in_the_background_and_the_loop_result_names_them(digits, tmp_path):
    res = train_tokenizer(tiny_cfg(digits, tmp_path, "train.max_steps=4", "train.ckpt_every=2", "train.keep_last=0"))
    log = (Path(res["run_dir"]) / "log.txt").read_text()
    assert "written in the background; the step loop waited" in log
    assert res["checkpoint"].endswith("0000004.pt") and res["tokenizer"].endswith("tokenizer.safetensors")
    assert sorted(p.name for p in Path(res["run_dir"], "checkpoints").iterdir()) == ["0000002.pt", "0000004.pt"]
    sync = train_tokenizer(tiny_cfg(digits, tmp_path / "sync", "train.max_steps=4", "train.async_save=false"))
    a, b = load_file(res["tokenizer"]), load_file(sync["tokenizer"])
    assert all(torch.equal(a[k], b[k]) for k in a)  # where the write happens changes nothing written


def test_the_tokenizer_file_holds_the_ema_and_an_ema_switched_on_later_starts_from_the_weights(digits, tmp_path):
    from repro.tokenizer.loader import read_tokenizer_header

    # no EMA for two steps, then resumed with one: it starts from the step-2 weights and follows the model
    train_tokenizer(tiny_cfg(digits, tmp_path, "train.max_steps=2", "train.keep_last=0"))
    res = train_tokenizer(tiny_cfg(digits, tmp_path, "train.max_steps=3", "train.keep_last=0", "train.ema_decay=0.9"))
    assert "has no EMA (train.ema_decay was off): the EMA starts from its weights" in (
        Path(res["run_dir"]) / "log.txt").read_text()
    ckpts = Path(res["run_dir"]) / "checkpoints"
    two, three = (torch.load(ckpts / f"000000{s}.pt", weights_only=True) for s in (2, 3))
    assert two["ema"] == {}
    for k, ema in three["ema"].items():
        expected = two["model"][f"vae.{k}"] * 0.9 + three["model"][f"vae.{k}"] * 0.1
        torch.testing.assert_close(ema, expected, rtol=0, atol=1e-6)
    # the exported inference weights are the EMA's, not the model's
    exported = load_file(res["tokenizer"])
    assert read_tokenizer_header(res["tokenizer"])["weights"] == "ema"
    assert all(torch.equal(v, three["ema"][k].float()) for k, v in exported.items())
    assert any(not torch.equal(v, three["model"][f"vae.{k}"]) for k, v in exported.items())


def test_a_non_finite_tokenizer_loss_stops_before_saving_and_names_the_step(digits, tmp_path):
    from repro.errors import ReproError

    with pytest.raises(ReproError, match=r"non-finite loss \(NaN/inf\) at step (\d+) in tokenizer run .*none yet "
                                         r"\(no checkpoint was written\)\. Lower train.lr"):
        train_tokenizer(tiny_cfg(digits, tmp_path, "train.max_steps=4", "train.lr=1e30", "train.warmup_steps=0",
                                 "train.lr_schedule=constant"))
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("tokenizer.safetensors"))
