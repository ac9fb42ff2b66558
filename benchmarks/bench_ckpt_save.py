"""How long a checkpoint save stalls the step loop: a write in the loop vs train.async_save (issue 16).

    python benchmarks/bench_ckpt_save.py                                   # B/1 (~2.1 GB checkpoint)
    python benchmarks/bench_ckpt_save.py --model LightningDiT-XL/1 --device cuda --out /local/disk

The state has the shapes a real training checkpoint of `--model` has (weights, EMA, AdamW's two
moments; random values, on `--device`). Measured with the kit's own code
(repro.training.saver.CheckpointWriter, repro.training.checkpoints.save_training_checkpoint):

- in the loop: the whole atomic write (temp file, fsync, rename) is the stall;
- background: the stall is the copy into the (reused, pinned on CUDA) host buffers; the write runs
  on a thread meanwhile. The first save also allocates the buffers, so the second is reported too.

Prints a table and appends it to benchmarks/RESULTS.md with the device, torch version and date.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import append_results  # noqa: E402
from repro.config import ModelConfig  # noqa: E402
from repro.models.lightningdit import build_model  # noqa: E402
from repro.training import checkpoints as ckpt  # noqa: E402
from repro.training.saver import CheckpointWriter  # noqa: E402
from repro.utils.hardware import describe_device  # noqa: E402


def fake_state(name: str, device: torch.device) -> dict:
    with torch.device("meta"):
        shapes = {k: (v.shape, v.requires_grad) for k, v in build_model(ModelConfig(model_type=name), 16, 1000)
                  .named_parameters()}
    g = torch.Generator(device=device).manual_seed(0)

    def rand(shape):
        return torch.randn(shape, generator=g, device=device)

    model = {k: rand(s) for k, (s, _) in shapes.items()}
    ema = {k: rand(s) for k, (s, _) in shapes.items()}
    opt = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": rand(s), "exp_avg_sq": rand(s).abs()}
                     for i, (_, (s, trained)) in enumerate(shapes.items()) if trained},
           "param_groups": [{"lr": 2e-4, "params": list(range(len(shapes)))}]}
    return {"model": model, "ema": ema, "opt": opt}


def write(path: Path, state: dict) -> None:
    ckpt.save_training_checkpoint(path, dict(state, config={}, scaler={}, step=1, data_order={}, rng=[], kit={}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="LightningDiT-B/1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="folder to write into (default: a temp folder)")
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    device = torch.device(a.device)
    state = fake_state(a.model, device)
    size = ckpt.tensor_bytes(state)
    folder = Path(tempfile.mkdtemp(dir=a.out))
    try:
        t0 = time.perf_counter()
        write(folder / "sync.pt", state)
        sync = time.perf_counter() - t0
        writer = CheckpointWriter(background=True)
        stalls, writes = [], []
        for i in range(2):
            t0 = time.perf_counter()
            snap = writer.snapshot(state)
            writer.submit(lambda snap=snap, i=i: write(folder / f"async{i}.pt", snap))
            stalls.append(time.perf_counter() - t0)
            writer.wait()
            writes.append(writer.last_write_seconds)
        writer.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    head = (f"## bench_ckpt_save {time.strftime('%Y-%m-%d')}: {a.model} checkpoint ({size / 1e9:.2f} GB) from "
            f"{describe_device(device)}, torch {torch.__version__}")
    rows = ["| save | step loop stalled | write (background) |", "|---|---|---|",
            f"| in the loop (train.async_save=false) | {sync:.2f} s | - |",
            f"| background, first save (allocates the host buffers) | {stalls[0]:.2f} s | {writes[0]:.2f} s |",
            f"| background, later saves (buffers reused) | {stalls[1]:.2f} s | {writes[1]:.2f} s |"]
    print("\n".join([head, "", *rows]))
    if not a.no_record:
        append_results(["", head, "", *rows])


if __name__ == "__main__":
    main()
