"""Writing checkpoints without stalling the step loop, and checking every process sees the run folder.

`CheckpointWriter` (rank 0): a save copies the state into host buffers (pinned on CUDA, allocated at
the first save and reused), hands the copy to one background thread that runs the usual atomic write
(temp file, fsync, rename; `repro.training.checkpoints`) and pruning, and returns. The step loop
waits only for the copy; the next save, and the end of the run, first wait for the previous write
(re-raising its error, if any). `train.async_save=false` writes in the loop as before. The cost:
host memory for one copy of the checkpoint (~10.8 GB for XL/1) while the run lasts.

`RunSaver`: a run's checkpoints (the engine's): refuses to save non-finite weights, writes checkpoint N
through the writer with everything a resume needs, prunes, and lets the trainer write its files beside it.

`check_shared_folder`: with several processes only rank 0 writes checkpoints, logs and the config, and
every rank later resumes from those files, so the run folder must be on a filesystem all nodes share.
Rank 0 writes a probe file there and every rank must read it back; otherwise the run stops at its
start with an error naming the folder, not after hours at the first resume.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from repro.errors import ReproError
from repro.training import checkpoints as ckpt
from repro.utils import distributed as dist


class CheckpointWriter:
    def __init__(self, background: bool = True):
        self.background = bool(background)
        self._buffers: list[torch.Tensor] = []
        self._future: Optional[Future] = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="repro-ckpt") if self.background else None
        self.last_write_seconds: Optional[float] = None

    # -- the host copy ----------------------------------------------------------------------------

    def snapshot(self, tree: Any) -> Any:
        """`tree` with every tensor copied to host memory (buffers reused when the layout repeats)."""
        tensors = list(ckpt.iter_tensors(tree))
        cuda = any(t.is_cuda for t in tensors)
        if len(tensors) != len(self._buffers) or any(
                b.shape != t.shape or b.dtype != t.dtype for b, t in zip(self._buffers, tensors)):
            pin = cuda and torch.cuda.is_available()
            self._buffers = [torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin) for t in tensors]
        for b, t in zip(self._buffers, tensors):
            b.copy_(t.detach(), non_blocking=True)
        if cuda:
            torch.cuda.synchronize()  # the device-to-host copies have landed before the loop moves on
        return _rebuild(tree, iter(self._buffers))

    # -- the write ---------------------------------------------------------------------------------

    def submit(self, write: Callable[[], Any]) -> None:
        """Run `write` (after the previous one finished): in the background, or now when not async."""
        self.wait()
        if self._pool is None:
            self._timed(write)
        else:
            self._future = self._pool.submit(self._timed, write)

    def _timed(self, write: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return write()
        finally:
            self.last_write_seconds = time.perf_counter() - t0

    def busy(self) -> bool:
        return self._future is not None and not self._future.done()

    def wait(self) -> None:
        """Block until the pending write is done; its exception, if any, is raised here."""
        if self._future is not None:
            future, self._future = self._future, None
            future.result()

    def close(self) -> None:
        """Wait for the pending write (errors re-raised) and stop the thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


class RunSaver:
    """Checkpoints of one run: `save(step)` on every rank (rank 0 writes), `check_finite()` at each log."""

    def __init__(self, trainer, strategy, ctx, log, *, step: int, order, kit: dict):
        self.trainer, self.strategy, self.ctx, self.log, self.order, self.kit = trainer, strategy, ctx, log, order, kit
        self.t = trainer.cfg.train
        self.ckpt_dir = ckpt.checkpoint_dir(trainer.run_dir)
        self.existing = ckpt.list_checkpoints(self.ckpt_dir)
        found = self.existing and self.existing[-1][0] == step  # the run resumed from its newest checkpoint
        self.last_saved, self.last_saved_step = (self.existing[-1][1], step) if found else (None, None)
        # model + EMA (every parameter) + Adam's two moments (the trained ones)
        self.checkpoint_bytes = sum(p.numel() * p.element_size() * (4 if p.requires_grad else 2)
                                    for p in trainer.model.parameters())
        self.estimate = self.checkpoint_bytes / 100e6 + 0.5  # seconds at ~100 MB/s, until a save is measured
        self.writer = CheckpointWriter(background=self.t.async_save)

    @property
    def newest(self) -> Optional[Path]:
        found = [] if self.last_saved else ckpt.list_checkpoints(self.ckpt_dir)
        return self.last_saved or (found[-1][1] if found else None)

    def disk_room_note(self, step: int) -> Optional[str]:
        """A note for the start of a run (not after hours) when the disk cannot hold the checkpoints it keeps."""
        ckpt_dir, existing, every, keep = self.ckpt_dir, self.existing, self.t.ckpt_every, self.t.keep_last
        saves_left = len(range(step // every + 1, self.trainer.max_steps // every + 1)) + 1  # + the final save
        # the newest is written before older ones are removed: keep_last + 1 files at once
        wanted = min(keep + 1, len(existing) + saves_left) if keep > 0 else len(existing) + saves_left
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        room = shutil.disk_usage(ckpt_dir).free + sum(p.stat().st_size for _, p in existing if p.exists())
        fits = int(room // self.checkpoint_bytes)
        if fits >= wanted:
            return None
        return (f"note: {ckpt_dir} has room for ~{fits} checkpoint(s) of ~{self.checkpoint_bytes / 1e9:.1f} GB, "
                f"this run wants {wanted} on disk at once (train.keep_last={keep}): lower "
                f"train.keep_last or set train.output_dir on a larger disk, or a save will stop the run")

    def check_finite(self) -> None:
        """Raise, on every process alike, when any process saw a non-finite loss (the last good checkpoint kept)."""
        bad = int(self.trainer.first_bad)
        if self.ctx.world > 1:  # the earliest bad step over the processes; -1 (none) must not win the minimum
            earliest = dist.all_reduce_values([bad if bad >= 0 else math.inf], "min")[0]
            bad = int(earliest) if earliest < math.inf else -1
        if bad >= 0:
            last = (f"{self.last_saved} (step {self.last_saved_step})" if self.last_saved
                    else "none yet (no checkpoint was written)")
            raise ReproError(f"non-finite loss (NaN/inf) at step {bad} in {self.trainer.what} run "
                             f"{self.trainer.run_dir}: training stopped without saving; the last good checkpoint is "
                             f"{last}. {self.trainer.nan_advice}, then run again")

    def save(self, at_step: int) -> float:
        """Write checkpoint `at_step` (rank 0; on a background thread from a host copy with
        train.async_save), prune old ones; returns the seconds a save costs the loop (copy + write)."""
        self.check_finite()
        self.writer.wait()  # the previous write is complete (its error is raised here)
        t0 = time.perf_counter()
        trainer = self.trainer
        # Gathered to rank 0's host memory under fsdp, and every process's RNG states: collectives
        state = self.strategy.full_state(trainer.model, trainer.ema, trainer.opt)
        rng = ckpt.rng_states_of_all_processes(self.ctx.world)
        target = ckpt.checkpoint_path(trainer.run_dir, at_step)
        if self.ctx.main:
            last_good = self.newest
            ckpt.ensure_room(self.ckpt_dir, ckpt.tensor_bytes(state), self.t.keep_last, last_good)
            trainer.export(state, at_step)  # before the copy: what it writes is read from the live state now
            state = state if self.strategy.gathers_copies else self.writer.snapshot(state)
            # everything the write reads is taken now: the loop moves on while it runs
            fixed = {"config": trainer.cfg.to_dict(), "scaler": trainer.scaler.state_dict(), "step": at_step,
                     "data_order": self.order.position.to_dict(), "rng": rng, "kit": self.kit}
            stall = time.perf_counter() - t0
            self.writer.submit(lambda: self._write(target, {**state, **fixed}, stall, last_good))
        dist.barrier()
        self.last_saved, self.last_saved_step = target, at_step
        last = self.writer.last_write_seconds
        return time.perf_counter() - t0 + (last if last is not None else self.estimate)

    def _write(self, target: Path, state: dict, stall: float, last_good: Optional[Path]) -> None:
        """Rank 0 (a background thread with train.async_save): the atomic write, then pruning."""
        t0 = time.perf_counter()
        ckpt.save_training_checkpoint(target, state, keep_last=self.t.keep_last, last_good=last_good)
        removed = ckpt.prune_checkpoints(self.ckpt_dir, self.t.keep_last)
        extra = f"; removed {len(removed)} older (train.keep_last={self.t.keep_last})" if removed else ""
        how = (f"; written in the background; the step loop waited {stall:.2f}s for the copy"
               if self.writer.background else "")
        self.log.info(f"saved checkpoint {target} ({time.perf_counter() - t0:.1f}s{how}){extra}")


def _rebuild(obj: Any, buffers) -> Any:
    if torch.is_tensor(obj):
        return next(buffers)
    if isinstance(obj, dict):
        return {k: _rebuild(v, buffers) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rebuild(v, buffers) for v in obj)
    return obj


# ----------------------------------------------------------------------------------------------
# Every process must see what rank 0 writes


def check_shared_folder(folder: str | Path, what: str = "train.output_dir", timeout: float = 10.0) -> None:
    """Rank 0 writes a probe file in `folder`; every rank must read it back within `timeout` seconds
    (network filesystems may take a moment). A collective; the identity with one process."""
    if dist.get_world_size() == 1:
        return
    folder = Path(folder)
    token, shown = dist.broadcast_object((secrets.token_hex(8), str(folder)) if dist.is_main() else None)
    probe = folder / f".repro-shared-probe-{token}"
    if dist.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    dist.barrier()
    deadline, seen = time.monotonic() + timeout, False
    while True:
        with contextlib.suppress(OSError):  # not there yet, or not readable yet
            seen = probe.read_text() == token
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    rank, world = dist.get_rank(), dist.get_world_size()
    # the sum waits for every rank's read, so rank 0 removes the probe only after all have looked
    blind = [r for r, b in enumerate(dist.all_reduce_values([r == rank and not seen for r in range(world)])) if b]
    if dist.is_main():
        probe.unlink(missing_ok=True)
    if blind:
        raise ReproError(
            f"process(es) of rank {', '.join(map(str, blind))} ({len(blind)} of {world}) cannot see {shown} "
            f"({what}) as rank 0 wrote it: with several nodes, {what} must be on a filesystem every node mounts at "
            f"the same path (NFS, Lustre, a shared bucket mount); rank 0 writes the checkpoints there and every "
            f"rank resumes from them. Set {what} to such a folder")
