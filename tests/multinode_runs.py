"""One training run for tests/test_multinode.py, started by one torchrun agent per "node" or by one agent.

    torchrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:PORT ... \
        -m tests.multinode_runs OUT DATA

Trains the tiny stage-0 config to step 6 (checkpoints at 3 and 6) into OUT, then asks every process to
find a folder only its own "node" has (OUT/node-local-RANK) as rank 0's shared folder, and writes the
error each process got to OUT/shared_check.json (rank 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from repro.config import load_config
from repro.errors import ReproError
from repro.training import train
from repro.training.saver import check_shared_folder
from repro.utils import distributed as dist


def main(out: Path, data: Path) -> None:
    dist.init()
    train(load_config("configs/train/tiny_stage_0.yaml", [
        f"data.data_path={data}", f"train.output_dir={out}", "train.micro_batch_size=4", "train.max_steps=6",
        "train.ckpt_every=3", "train.log_every=3"]))
    try:  # a folder that is not shared: each process looks at its own
        check_shared_folder(out / f"node-local-{dist.get_rank()}", timeout=1.0)
        error = None
    except ReproError as e:
        error = str(e)
    errors = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    if dist.is_main():
        (out / "shared_check.json").write_text(json.dumps(errors))
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
