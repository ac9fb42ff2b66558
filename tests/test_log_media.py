"""TensorBoard and W&B get more than losses: the EMA sample grids the DiT trainer writes every
train.sample_every steps, and step 8's numbers of an evaluated run folder; W&B rows carry the training step
as their own x axis, so rows re-logged after resuming an older checkpoint are kept.

Both packages are optional: each test skips when its package is not installed (`pip install tensorboard
wandb` runs them; W&B in offline mode only, nothing leaves the machine).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from repro.config import load_config
from repro.training.log_backends import WANDB_STEP, log_evaluation
from repro.training.logs import RunLogger
from steps.step7_train import main as step7
from tests.test_training import STAGE0, make_latents

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_with_grids(tmp_path: Path, *extra: str) -> Path:
    from repro.data.synthetic import local_asset

    latents = make_latents(tmp_path / "latents")
    result = step7(STAGE0, set=[f"data.data_path={latents}", f"train.output_dir={tmp_path / 'out'}",
                                "train.max_steps=4", "train.log_every=2", "train.ckpt_every=4", "train.sample_every=2",
                                "train.sample_num=4", "sample.num_sampling_steps=3",
                                f"vae.ckpt_path={local_asset('tiny-vavae')}", *extra])
    return Path(result["run_dir"])


def test_tensorboard_gets_the_ema_grids_and_evaluation_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train_with_grids(tmp_path, "train.tensorboard=true")
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["0000002.png", "0000004.png"]
    cfg = load_config(run_dir / "config.yaml")
    assert log_evaluation(cfg, run_dir, 4, {"fid": 12.5, "is": 3.0, "num_samples": 16}) == ["tensorboard"]
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    grids = acc.Images("samples/ema_grid")
    assert [e.step for e in grids] == [2, 4] and all(e.width > 0 and e.height > 0 for e in grids)
    assert [(e.step, e.value) for e in acc.Scalars("eval/fid")] == [(4, 12.5)]
    assert [e.step for e in acc.Scalars("Loss/train")] == [2, 4]  # the training curve kept (no purge)


def wandb_records(path: Path):
    """The records of a .wandb file: a 7-byte W&B header, then LevelDB's log format (32 KiB blocks of chunks,
    each a 4-byte CRC, a 2-byte little-endian length and a type: 1 full, 2 first, 3 middle, 4 last)."""
    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of every offline W&B run under run_dir/wandb, in the order they were written."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime_ns):
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_rows_keep_the_training_step_after_resuming_an_older_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(STAGE0, [f"train.output_dir={tmp_path}", "train.wandb=true"])
    run_dir = tmp_path / "run"
    grid = tmp_path / "grid.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(grid)
    # the first session logs steps 2, 4, 6 and is killed after its checkpoint at 4 ...
    log = RunLogger(run_dir, cfg=cfg)
    for step in (2, 4, 6):
        log.metrics(step, {"loss": 1.0 / step, "cos": None})
    log.image(6, "samples/ema_grid", grid)
    log.close()
    # ... the resumed session starts again from step 4: its rows for 6 and 8 are logged, not dropped
    time.sleep(1.1)  # W&B names an offline session's folder by the second: a resume is never within the same one
    log = RunLogger(run_dir, cfg=cfg, resume_step=4)
    for step in (6, 8):
        log.metrics(step, {"loss": 1.0 / step, "cos": None})
    log.close()
    rows = wandb_history(run_dir)
    assert [r[WANDB_STEP] for r in rows] == [2, 4, 6, 6, 6, 8]
    assert [r["train/loss"] for r in rows if "train/loss" in r] == pytest.approx([1 / 2, 1 / 4, 1 / 6, 1 / 6, 1 / 8])
    image = next(r for r in rows if "samples/ema_grid/_type" in r)  # a wandb.Image at the grid's training step
    assert image["samples/ema_grid/_type"] == "image-file" and image[WANDB_STEP] == 6
