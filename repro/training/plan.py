"""How a training step is laid out on this hardware: batch decomposition and numeric precision.

Global batch = micro-batch x processes x accumulation steps, exactly `train.global_batch_size`
(upstream rounds the per-GPU batch and silently trains another batch size when it does not divide;
the kit refuses, naming the values). Precision follows the hardware: bf16 autocast where the GPU has
native bf16 (Ampere and later), fp16 with a gradient scaler on GPUs without it (T4, P100, V100),
fp32 on CPU; `train.precision` overrides.

    plan = plan_batches(cfg.train, world_size=8)     # BatchPlan(global_batch=1024, micro_batch=128, ...)
    plan.describe()  # 'global batch 1024 = micro-batch 128 x 8 process(es) x 1 accumulation step(s)'
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from repro.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int
    world_size: int
    accum_steps: int

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = micro-batch {self.micro_batch} x {self.world_size} "
                f"process(es) x {self.accum_steps} accumulation step(s)")

    def micro_slices(self, rank: int) -> list[tuple[int, int]]:
        """Positions [lo, hi) inside the global batch of this rank's micro-batches, in order.

        Rank r owns the fixed slice [r*m*A, (r+1)*m*A): a 2-process run with accumulation A feeds
        the same samples, split the same way, as a 1-process run with accumulation 2A.
        """
        per_rank = self.micro_batch * self.accum_steps
        base = rank * per_rank
        return [(base + k * self.micro_batch, base + (k + 1) * self.micro_batch) for k in range(self.accum_steps)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batches(train_cfg, world_size: int, *, fits: Optional[Callable[[int], bool]] = None) -> BatchPlan:
    """Split `train.global_batch_size` over `world_size` processes and accumulation steps.

    `train.micro_batch_size` (an int) fixes the micro-batch; otherwise `train.grad_accum_steps` > 1
    fixes the accumulation; otherwise ("auto"/null) the largest micro-batch dividing the per-process
    batch for which `fits(micro)` is true is used (all of it when `fits` is None).
    """
    g = int(train_cfg.global_batch_size)
    if g % world_size:
        raise ConfigError(
            f"train.global_batch_size={g} cannot be split over {world_size} processes ({g} / {world_size} is not "
            f"a whole number): use a multiple of {world_size} or another process count")
    per_proc = g // world_size
    micro = train_cfg.micro_batch_size
    accum_cfg = int(train_cfg.grad_accum_steps)
    if micro is None or micro == "auto":
        if accum_cfg > 1:
            if per_proc % accum_cfg:
                raise ConfigError(
                    f"train.global_batch_size={g} over {world_size} process(es) gives {per_proc} per process, which "
                    f"train.grad_accum_steps={accum_cfg} does not divide: choose one of {_divisors(per_proc)}")
            micro = per_proc // accum_cfg
        else:
            fitting = [d for d in _divisors(per_proc) if fits is None or fits(d)]
            micro = fitting[-1] if fitting else 1
    micro = int(micro)
    if per_proc % micro:
        ok = [d for d in _divisors(per_proc) if d <= micro][-4:]
        raise ConfigError(
            f"train.global_batch_size={g} cannot be made of micro-batches of train.micro_batch_size={micro} on "
            f"{world_size} process(es): {g} / ({micro} x {world_size}) = {g / (micro * world_size):.4g} accumulation "
            f"steps is not a whole number; use a micro-batch that divides {per_proc}, e.g. {ok}")
    accum = per_proc // micro
    if accum_cfg > 1 and accum != accum_cfg:
        raise ConfigError(
            f"train.micro_batch_size={micro} x {world_size} process(es) x train.grad_accum_steps={accum_cfg} = "
            f"{micro * world_size * accum_cfg}, not train.global_batch_size={g}: set only one of micro_batch_size "
            f"and grad_accum_steps (the other follows)")
    return BatchPlan(global_batch=g, micro_batch=micro, world_size=world_size, accum_steps=accum)


# ----------------------------------------------------------------------------------------------
# Precision


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' -> bf16 where the GPU has native bf16, fp16 on older GPUs (T4, P100), fp32 on CPU;
    explicit values are checked (the sampling engine's rule, so both steps pick the same)."""
    from repro.sampling.generate import resolve_precision as engine_rule

    return engine_rule(requested, device, key="train.precision")


def autocast(device: torch.device, precision: str):
    """The forward's autocast context (a no-op for fp32).

    cache_enabled=False: each DiT weight is used once per forward, so the cast cache saves no work,
    and with gradient checkpointing it would hold a low-precision copy of every weight until the
    forward ends (1.35 GB for XL/1).
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision], cache_enabled=False)


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 (bf16 has fp32's exponent range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))


def set_determinism(enabled: bool, device: torch.device) -> None:
    """Bitwise-repeatable kernels: `torch.use_deterministic_algorithms` (+ the cuBLAS workspace it needs).

    A resumed run then recomputes exactly what the uninterrupted one would (same kernels, same
    reduction order); the thread count must also be the same on both sides (OMP_NUM_THREADS).
    """
    if not enabled:
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)
