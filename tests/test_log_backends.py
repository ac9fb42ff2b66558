"""Watching a run: ETA, step time and peak memory in every log row; TensorBoard (upstream's tags) and
Weights & Biases (offline) behind config keys; a clear one-line error when either package is missing;
W&B never used unless asked.

TensorBoard and wandb are optional packages: the tests that write through them skip when the package
is not installed (`pip install tensorboard wandb` runs them); the missing-package errors are tested
always, by making the import fail the way a missing package does (`sys.modules[name] = None`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from repro.config import load_config
from repro.errors import ConfigError
from repro.training.log_backends import open_backends, wandb_run_id
from repro.training.logs import RunLogger, format_duration, format_row
from steps.step7_train import main
from tests.test_training import STAGE0, make_latents


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    return make_latents(tmp_path_factory.mktemp("latents"))


def run(latents: Path, out: Path, *extra: str) -> dict:
    return main(STAGE0, set=[f"data.data_path={latents}", f"train.output_dir={out}", "train.max_steps=4",
                             "train.log_every=2", "train.ckpt_every=4", *extra])


def test_every_row_has_step_time_eta_and_peak_memory(latents, tmp_path):
    result = run(latents, tmp_path)
    rows = [json.loads(x) for x in (Path(result["run_dir"]) / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    first = rows[0]
    assert first["seconds_per_step"] > 0 and first["memory_gib"] > 0
    assert first["eta_seconds"] == pytest.approx(2 * first["seconds_per_step"])  # 2 steps left at this pace
    assert rows[1]["eta_seconds"] == 0
    text = (Path(result["run_dir"]) / "log.txt").read_text()
    assert "| ETA 0m" in text and "GiB" in text and "s/step" in text and "grad norm" in text and "lr " in text
    assert not (Path(result["run_dir"]) / "tensorboard").exists()  # nothing but the kit's own files by default


def test_tensorboard_gets_upstreams_tags_and_every_number(latents, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(latents, tmp_path, "train.tensorboard=true")
    acc = EventAccumulator(str(Path(result["run_dir"]) / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "Loss/train" in scalars  # upstream train.py's tag
    for key in ("loss", "cos", "grad_norm", "lr", "images_per_sec", "eta_seconds", "memory_gib", "seconds_per_step"):
        assert f"train/{key}" in scalars, scalars
    assert [e.step for e in acc.Scalars("Loss/train")] == [2, 4]
    rows = [json.loads(x) for x in (Path(result["run_dir"]) / "log.jsonl").read_text().splitlines()]
    # upstream's Loss/train is the MSE term (its running_loss adds mse_loss); the kit's mse + cos is train/loss
    assert [e.value for e in acc.Scalars("Loss/train")] == pytest.approx([r["mse"] for r in rows])
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows])
    assert "training configs/text_summary" in acc.Tags()["tensors"]  # the config as text, as upstream


def test_wandb_offline_logs_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(STAGE0, [f"train.output_dir={tmp_path}", "train.wandb=true"])
    run_dir = tmp_path / "run"
    log = RunLogger(run_dir, cfg=cfg)
    assert [b.name for b in log.backends] == ["wandb"]
    log.metrics(2, {"loss": 0.5, "grad_norm": 0.5, "lr": 1e-3, "eta_seconds": 10.0, "cos": None})
    run_id = log.backends[0].run.id
    log.close()
    assert list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))  # on disk only; `wandb sync` uploads it
    assert wandb_run_id(run_dir) == run_id  # what a resumed run passes to wandb.init(id=..., resume="allow")


def test_weights_and_biases_is_opt_in(tmp_path):
    cfg = load_config(STAGE0)
    assert cfg.train.wandb_project == "lightningdit" and cfg.train.wandb is False  # upstream's key, unused
    assert open_backends(cfg, tmp_path) == []
    with pytest.raises(ConfigError, match="train.wandb_project is empty"):
        open_backends(load_config(STAGE0, ["train.wandb=true", "train.wandb_project=null"]), tmp_path)


@pytest.mark.parametrize("key,modules", [("train.tensorboard", ("tensorboard", "torch.utils.tensorboard")),
                                         ("train.wandb", ("wandb",))])
def test_a_missing_package_stops_the_run_before_it_starts(latents, tmp_path, monkeypatch, key, modules):
    for name in modules:  # what an uninstalled package looks like to `import`
        monkeypatch.setitem(sys.modules, name, None)
    package = modules[0]
    with pytest.raises(ConfigError) as info:
        run(latents, tmp_path, f"{key}=true")
    assert str(info.value) == (f"{key} is true but the '{package}' package is not installed: pip install {package} "
                               f"(or set {key}=false)")
    assert not list(tmp_path.rglob("*.pt"))  # stopped before training


def test_row_format():
    row = {"step": 1200, "loss": 0.5, "mse": 0.3, "cos": 0.2, "grad_norm": 1.5, "images_per_sec": 512.0, "lr": 2e-4,
           "seconds_per_step": 0.25, "memory_gib": 12.345, "eta_seconds": 3 * 86400 + 3600 + 61}
    assert format_row(row) == ("(step=0001200) | loss 0.5000 (mse 0.3000 + cos 0.2000) | grad norm 1.5 | 512.0 img/s "
                               "| lr 2.00e-04 | 0.25 s/step | peak mem 12.35 GiB | ETA 3d01h01m")
    assert format_duration(59) == "0m59s" and format_duration(3725) == "1h02m05s"
