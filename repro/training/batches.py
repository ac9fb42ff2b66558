"""How a global batch is split: micro-batch x processes x accumulation steps.

Global batch = micro-batch x processes x accumulation steps, exactly `train.global_batch_size`
(upstream rounds the per-GPU batch and silently trains another batch size when it does not divide;
the kit refuses, naming the values).

    plan = plan_batches(cfg.train, world_size=8)     # BatchPlan(global_batch=1024, micro_batch=128, ...)
    plan.describe()  # 'global batch 1024 = micro-batch 128 x 8 process(es) x 1 accumulation step(s)'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from repro.errors import ConfigError


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
        base = rank * self.micro_batch * self.accum_steps
        return [(base + k * self.micro_batch, base + (k + 1) * self.micro_batch) for k in range(self.accum_steps)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batches(train_cfg, world_size: int, *, fits: Optional[Callable[[int], bool]] = None) -> BatchPlan:
    """Split `train.global_batch_size` over `world_size` processes and accumulation steps.

    `train.micro_batch_size` (an int) fixes the micro-batch; otherwise `train.grad_accum_steps` > 1
    fixes the accumulation; otherwise ("auto"/null) the largest micro-batch dividing the per-process
    batch for which `fits(micro)` is true is used (all of it when `fits` is None).
    """
    # The global batch must split evenly over the processes.
    g = int(train_cfg.global_batch_size)
    if g % world_size:
        raise ConfigError(
            f"train.global_batch_size={g} cannot be split over {world_size} processes ({g} / {world_size} is not "
            f"a whole number): use a multiple of {world_size} or another process count")
    per_proc = g // world_size
    # The micro-batch: as set, else from grad_accum_steps, else the largest that fits ("auto").
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
            micro = max((d for d in _divisors(per_proc) if fits is None or fits(d)), default=1)
    # It must divide the per-process batch, and agree with grad_accum_steps when both are set.
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
