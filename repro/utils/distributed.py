"""Distributed helpers that degrade to one process (after NVlabs/edm2 torch_utils/distributed.py).

The same `main()` runs in a notebook kernel (no env vars: world size 1) and
under `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK set: a process group is started,
NCCL on CUDA, gloo on CPU). Every collective here is the identity with one process.
"""

from __future__ import annotations

import gc
import os
import pickle
import time
from typing import Any, Sequence

import torch
import torch.distributed as dist

from repro import errors
from repro.errors import ReproError
from repro.utils.hardware import default_device


def init(device: str | torch.device | None = None) -> None:
    """Start the process group if launched by torchrun; a no-op otherwise (or if already started)."""
    if is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (flushes, so papermill and torchrun logs stay ordered)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def comm_device() -> torch.device:
    """Where collective tensors must live: this process's GPU under NCCL, the CPU under gloo."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank, so all processes take the same branch (identity with one process).

    Rank 0 pickles `obj` itself before the collective: an object that cannot be pickled (a lambda, an
    open file) then fails on every rank with one message instead of failing on rank 0 alone while the
    others wait for a broadcast that never comes.
    """
    if not is_initialized():
        return obj
    # Rank 0: the bytes, or why there are none (bytes always pickle, so the collective itself cannot fail
    # on one rank only).
    payload, cause = (None, None), None  # (bytes, None) or (None, why); the pickling error
    if is_main():
        try:
            payload = (pickle.dumps(obj), None)
        except Exception as e:  # noqa: BLE001 - any pickling failure must reach every rank
            cause, payload = e, (None, f"a {type(obj).__name__} ({type(e).__name__}: {e})")
    box = [payload]
    dist.broadcast_object_list(box, src=0, device=comm_device())
    data, error = box[0]
    # Every rank: the same object, or one error naming what rank 0 could not send (rank 0 chains the cause).
    if error is not None:
        raise ReproError(f"rank 0 could not send {error} to the other ranks: broadcast_object takes picklable "
                         "values only") from cause
    return obj if is_main() else pickle.loads(data)


def all_reduce_values(values: Sequence[float], op: str = "sum", cpu: bool = False) -> list[float]:
    """Reduce a few host numbers over processes ('sum', 'min' or 'max'), in float64.

    cpu=True reduces over a gloo group even under NCCL, so a per-step check never waits for the GPU.
    """
    if not is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device="cpu" if cpu else comm_device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op],
                    group=cpu_group() if cpu else None)
    return t.tolist()


_cpu_group = None


def cpu_group():
    """The default group when it is gloo; under NCCL one gloo group over the same processes, made once
    (a collective: every process reaches the first call at the same point)."""
    global _cpu_group
    if dist.get_backend() == "gloo":
        return None
    if _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo")
    return _cpu_group


def run_on_main(fn, *args, **kwargs):
    """Run `fn` on rank 0 only and give its result to every rank.

    Whatever `fn` raises on rank 0 reaches every rank, so no rank waits forever in a collective after
    rank 0 failed: rank 0 re-raises its own exception (type and traceback kept). The others raise the
    same kit error (repro.errors type, one-line message, a Preempted's signal) for a ReproError, and for
    anything else (a bug) a ReproError naming rank 0's exception type and message.
    """
    # Rank 0 runs `fn`, keeping what it raised instead of leaving before the broadcast.
    result, failure, raised = None, None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt and bugs too: the others must not hang
            raised, failure = e, _describe_failure(e)
    # One broadcast: the result, or the failure every rank raises (rank 0 re-raises its own).
    result, failure = broadcast_object((result, failure))
    if raised is not None:
        raise raised
    if failure is None:
        return result
    # The other ranks: rank 0's kit error as it was, or a bug reported with its type name.
    kit_name, message, signum = failure
    if kit_name == "Preempted":
        raise errors.Preempted(message, signum)
    if kit_name is not None:
        raise getattr(errors, kit_name)(message)
    raise ReproError(f"rank 0 failed in {getattr(fn, '__name__', 'run_on_main')}: {message} "
                     "(the traceback is in rank 0's output)")


def _describe_failure(error: BaseException) -> tuple[str | None, str, int | None]:
    """(kit error class name or None, message, signal number of a Preempted) for the other ranks: a
    repro.errors type is raised again there from its message; anything else is named with its type."""
    cls = type(error)
    if isinstance(error, ReproError) and getattr(errors, cls.__name__, None) is cls:
        return cls.__name__, str(error), getattr(error, "signum", None)
    return None, f"{cls.__name__}: {error}", None


_GLOO_DRAIN_S = 0.2  # seconds; scheduling delays on a loaded 2-core machine stay well below this


def shutdown() -> None:
    """Destroy the process group if this process started one (safe to call always).

    gloo's worker threads let go of a finished collective's tensors after the caller has moved on, and
    need the GIL to do it; a thread still waiting for it when the interpreter exits aborts the process
    ("terminate called without an active exception", pytorch/pytorch#179291) after the run is saved.
    destroy_process_group cannot join those threads (DDP keeps references to the group), so the GIL
    is released for a moment here instead; garbage is collected first so that a DDP wrapper left in
    a reference cycle is not freed during interpreter exit either.
    """
    if is_initialized():
        gc.collect()
        dist.destroy_process_group()
        time.sleep(_GLOO_DRAIN_S)
