"""Distributed helpers that degrade to one process (after NVlabs/edm2 torch_utils/distributed.py).

The same `main()` runs in a notebook kernel (no env vars: world size 1) and
under `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK set: a process group is started,
NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist


def init(device: str | torch.device | None = None) -> None:
    """Start the process group if launched by torchrun; a no-op otherwise (or if already started)."""
    if dist.is_available() and dist.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    dev = torch.device(device) if device is not None else default_device()
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when a GPU is present, else cpu. Never hard-codes `.cuda()`."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (flushes, so papermill and torchrun logs stay ordered)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= get_world_size()
    return t


def shutdown() -> None:
    """Destroy the process group if this process started one (safe to call always).

    Garbage is collected first: a DDP wrapper left in a reference cycle would otherwise be freed
    during interpreter exit, after the group is gone, and gloo's worker threads then abort the
    process ("terminate called without an active exception", pytorch/pytorch#179291).
    """
    if is_initialized():
        gc.collect()
        dist.destroy_process_group()
