"""The training data order and every random draw of a step, as pure functions of (seed, step).

Upstream (hustvl/LightningDiT train.py) shuffles with a DataLoader (`shuffle=True, drop_last=True`),
flips inside the dataset with probability 0.5 (`latents_flip`), drops labels with probability 0.1
inside the model, and draws t and noise from the global RNG. None of that can be replayed after a
crash, and all of it depends on the process count. Here:

- epoch e visits the images in the order of a permutation seeded by (global_seed, e); batches never
  cross an epoch (the last partial batch is dropped, as upstream's `drop_last=True`);
- the position in that order (epoch, offset) is saved in every checkpoint;
- sample i of the global batch of step s draws its flip, its label drop, its t, its noise (and the
  posterior sample of a moment shard) from its own generator seeded by (global_seed, s, i). With
  `data.horizontal_flip: false` (kit) the flip coin is still drawn but never taken, so every other draw
  is the one a flipping run makes.

So a resumed run sees exactly the batches, flips, timesteps and noise the uninterrupted one would,
and any split of the global batch over processes and accumulation steps trains on the same samples.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch

from repro.errors import ReproError
from repro.transport import sample_timesteps
from repro.utils.prefetch import prefetch
from repro.utils.seeding import seed_from

SEED_TAG = "repro-train"


@dataclass
class DataPosition:
    """Where the data order stands after the last completed step."""

    epoch: int = 0
    offset: int = 0  # images of this epoch's permutation already used
    num_images: int = 0  # dataset size the order was made for

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        return cls(epoch=int(d["epoch"]), offset=int(d["offset"]), num_images=int(d["num_images"]))


class DataOrder:
    """Global batches of image indices, one epoch permutation after another."""

    def __init__(self, num_images: int, global_batch: int, seed: int, position: Optional[DataPosition] = None,
                 data_dir: str = "the latent folder"):
        if num_images < global_batch:
            raise ReproError(
                f"{data_dir} holds {num_images} latents, fewer than train.global_batch_size={global_batch}: one "
                f"batch needs {global_batch} distinct images (extract more, or lower train.global_batch_size)")
        self.n, self.global_batch, self.seed = num_images, global_batch, seed
        self.note: Optional[str] = None
        pos = self.position = position or DataPosition(num_images=num_images)
        if pos.num_images != num_images:
            self.note = (f"the checkpoint's data order was made for {pos.num_images} latents, {data_dir} now holds "
                         f"{num_images}: continuing with epoch {pos.epoch + 1} of a fresh order")
            self.position = DataPosition(epoch=pos.epoch + 1, offset=0, num_images=num_images)
        self._perm: tuple[int, torch.Tensor] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def _permutation(self, epoch: int) -> torch.Tensor:
        """Epoch `epoch`'s order of the images, seeded by (global_seed, epoch); the last one is kept."""
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(seed_from(SEED_TAG, self.seed, "epoch", epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def peek(self, position: DataPosition) -> tuple[torch.Tensor, DataPosition]:
        """(indices of the next global batch, the position after it) without moving."""
        epoch, offset = position.epoch, position.offset
        if offset + self.global_batch > self.n:
            epoch, offset = epoch + 1, 0
        idx = self._permutation(epoch)[offset:offset + self.global_batch]
        return idx, DataPosition(epoch=epoch, offset=offset + self.global_batch, num_images=self.n)


@dataclass
class MicroBatch:
    x1: torch.Tensor  # (m, C, h, w) normalised latents (data, t = 1)
    y: torch.Tensor  # (m,) labels, dropped ones replaced by the null class
    t: torch.Tensor  # (m,) timesteps
    x0: torch.Tensor  # (m, C, h, w) noise (t = 0)

    def to(self, device: torch.device, non_blocking: bool = False) -> "MicroBatch":
        return MicroBatch(*(v.to(device, non_blocking=non_blocking) for v in (self.x1, self.y, self.t, self.x0)))

    def pin_memory(self) -> "MicroBatch":
        return MicroBatch(*(v.pin_memory() for v in (self.x1, self.y, self.t, self.x0)))


def build_micro_batch(dataset, indices: torch.Tensor, step: int, first_position: int, *, seed: int, lognorm: bool,
                      dropout_prob: float, null_class: int, horizontal_flip: bool = True) -> MicroBatch:
    """Read and randomise the images `indices` (global-batch positions first_position, +1, ...) of `step`.

    Per sample, from its own generator: flip (p = 0.5, upstream's latents_flip; never without
    `horizontal_flip`), label drop
    (p = model.class_dropout_prob, upstream's LabelEmbedder), t (logit-normal or uniform), the
    posterior draw of a moment shard, then the noise.
    """
    xs, ys, ts, noise = [], [], [], []
    for j, index in enumerate(indices.tolist()):
        g = torch.Generator().manual_seed(seed_from(SEED_TAG, seed, "sample", step, first_position + j))
        u = torch.rand(2, generator=g)
        x, y = dataset.get(index, horizontal_flip and bool(u[0] < 0.5), generator=g)
        ts.append(sample_timesteps(1, lognorm, g))
        noise.append(torch.randn(x.shape, generator=g, dtype=torch.float32))
        xs.append(x)
        ys.append(null_class if bool(u[1] < dropout_prob) else y)
    return MicroBatch(torch.stack(xs), torch.tensor(ys, dtype=torch.int64), torch.cat(ts), torch.stack(noise))


class MicroBatchStream:
    """This process's micro-batches for steps start+1, start+2, ..., read ahead by a thread.

    Yields (step, k, MicroBatch) with k = 0..accum-1. Everything is a function of the starting
    position and the step number, so reading ahead never changes what is trained on.
    """

    def __init__(self, dataset, order: DataOrder, plan, rank: int, cfg, *, start_step: int, end_step: int,
                 dropout_prob: float, pin: bool = False):
        self.ds, self.order, self.plan, self.rank = dataset, order, plan, rank
        self.start_step, self.end_step = start_step, end_step
        # the draws of each sample: train.global_seed, transport.use_lognorm, the null label, data.horizontal_flip
        self.kw = dict(seed=cfg.train.global_seed, lognorm=cfg.transport.use_lognorm, dropout_prob=dropout_prob,
                       null_class=cfg.data.num_classes, horizontal_flip=cfg.data.horizontal_flip)
        # data.num_workers > 0: a thread reads two optimizer steps ahead
        self.prefetch, self.pin = 2 * plan.accum_steps if cfg.data.num_workers > 0 else 0, pin
        self._stop = threading.Event()

    def _produce(self) -> Iterator[tuple[int, int, MicroBatch, DataPosition]]:
        pos = self.order.position
        for step in range(self.start_step + 1, self.end_step + 1):
            indices, pos = self.order.peek(pos)
            for k, (lo, hi) in enumerate(self.plan.micro_slices(self.rank)):
                mb = build_micro_batch(self.ds, indices[lo:hi], step, lo, **self.kw)
                yield step, k, (mb.pin_memory() if self.pin else mb), pos
                if self._stop.is_set():
                    return

    def __iter__(self) -> Iterator[tuple[int, int, MicroBatch, DataPosition]]:
        try:
            yield from prefetch(self._produce(), self.prefetch) if self.prefetch > 0 else self._produce()
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
