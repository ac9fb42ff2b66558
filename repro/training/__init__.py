"""LightningDiT training (step 7): the upstream recipe, resumable exactly, on one GPU or many.

    from repro.training import train
    result = train(load_config("configs/train/tiny_stage_0.yaml"))   # {'step', 'checkpoint', 'loss', ...}
"""

from repro.training.budget import forward_flops, step_flops, training_memory_budget
from repro.training.data_order import DataOrder, DataPosition, MicroBatch, build_micro_batch, derived_seed
from repro.training.ema import EMA
from repro.training.plan import BatchPlan, plan_batches, resolve_precision
from repro.training.state import find_resume_checkpoint, list_checkpoints, read_training_checkpoint
from repro.training.step import StepRunner, make_optimizer
from repro.training.trainer import open_latents, run_dir_of, train

__all__ = [
    "BatchPlan", "DataOrder", "DataPosition", "EMA", "MicroBatch", "StepRunner", "build_micro_batch",
    "derived_seed", "find_resume_checkpoint", "forward_flops", "list_checkpoints", "make_optimizer",
    "open_latents", "plan_batches", "read_training_checkpoint", "resolve_precision", "run_dir_of",
    "step_flops", "train", "training_memory_budget",
]
