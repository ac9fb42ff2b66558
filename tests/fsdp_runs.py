"""Training runs for tests/test_fsdp.py, under one torchrun (one start-up for several runs).

    torchrun --standalone --nproc_per_node=2 -m tests.fsdp_runs OUT DATA

A: DDP to step 6 (checkpoints at 3 and 6); B: FSDP to step 6 (and an EMA sample grid at step 6, the
EMA gathered for it); C: A's run folder cut back to its step-3
checkpoint, continued under FSDP (a DDP run resumed by FSDP). Writes OUT/report.json (rank 0) with
what only a live process can see: the size of each process's EMA shard, and the gathered EMA.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from repro.config import load_config
from repro.models.lightningdit import build_model
from repro.training import train
from repro.training.strategy import make_strategy
from repro.utils import distributed as dist

STAGE0 = "configs/train/tiny_stage_0.yaml"
COMMON = ["train.micro_batch_size=4", "train.max_steps=6", "train.ckpt_every=3", "train.log_every=3"]


def cut_back(src: Path, dst: Path, keep_step: int) -> None:
    """Copy a run folder and drop its checkpoints after `keep_step` (as if killed right after it)."""
    if dist.is_main():
        shutil.copytree(src, dst)
        for p in (dst / "tiny_two_stage" / "checkpoints").glob("*.pt"):
            if int(p.stem) > keep_step:
                p.unlink()
    dist.barrier()


def main(out: Path, data: Path) -> None:
    dist.init()
    sets = [f"data.data_path={data}", *COMMON]
    train(load_config(STAGE0, [*sets, f"train.output_dir={out / 'A'}"]))
    train(load_config(STAGE0, [*sets, f"train.output_dir={out / 'B'}", "train.strategy=fsdp", "train.sample_every=6"]))
    cut_back(out / "A", out / "C", 3)
    train(load_config(STAGE0, [*sets, f"train.output_dir={out / 'C'}", "train.strategy=fsdp"]))
    # The EMA of a sharded model: this process's share of the parameters, gathered whole on rank 0.
    cfg = load_config(STAGE0, [*sets, "train.strategy=fsdp"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 4, cfg.data.num_classes)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = make_strategy(cfg.train, torch.device("cpu"), dist.get_world_size())
    strategy.shard(model, [*model.blocks, model])
    ema = strategy.make_ema(model, 0.99, on_cpu=False)
    gathered_ema = ema.state_dict()
    seen = {"ema_local": sum(t.numel() for t in ema.ema_params), "params": sum(p.numel() for p in model.parameters()),
            "ema_equals_model": all(torch.equal(gathered_ema[k], full[k]) for k in full) if gathered_ema else None,
            "ema_keys": list(gathered_ema) == list(full) if gathered_ema else None}
    gathered = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(gathered, seen)
    if dist.is_main():
        (out / "report.json").write_text(json.dumps({"ranks": gathered}))
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
