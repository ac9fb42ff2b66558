"""LightningDiT training (step 7): the upstream recipe, resumable exactly, on one GPU or many.

    from repro.training import train
    result = train(load_config("configs/train/tiny_stage_0.yaml"))   # {'step', 'checkpoint', 'loss', ...}

Modules: `engine` (run_training, the one training loop of every trainer), `dit` (train, the DiT trainer), `step` (one optimizer step), `batches` (how the global
batch is split), `data_order` (seeded order and per-sample draws), `ema`, `checkpoints`, `logs`,
`grids` (EMA sample grids through the sampling engine), `validation` (the `data.valid_path` loss).
"""

from repro.training.batches import BatchPlan, plan_batches
from repro.training.checkpoints import find_resume_checkpoint, list_checkpoints, read_training_checkpoint
from repro.training.data_order import DataOrder, DataPosition, MicroBatch, build_micro_batch
from repro.training.ema import EMA
from repro.training.dit import open_latents, train
from repro.training.engine import run_dir_of, run_training
from repro.training.step import StepRunner, make_optimizer

__all__ = [
    "BatchPlan", "DataOrder", "DataPosition", "EMA", "MicroBatch", "StepRunner", "build_micro_batch",
    "find_resume_checkpoint", "list_checkpoints", "make_optimizer", "open_latents",
    "plan_batches", "read_training_checkpoint", "run_dir_of", "run_training", "train",
]
