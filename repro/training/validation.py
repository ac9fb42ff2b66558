"""Upstream's validation loss (`data.valid_path`), deterministic and exact under any process count.

Upstream (hustvl/LightningDiT train.py): with `data.valid_path` set, after each checkpoint save
(every `train.ckpt_every` steps) it calls `evaluate(model, valid_loader, device, transport, (0.0, 1.0))`,
all-reduces the result, divides by the world size and logs it as `Loss/validation`. `evaluate` is
not defined in the released train.py (the first checkpoint of such a run stops with a NameError);
its arguments say what it computes: the training objective of the training model (not the EMA) on
the validation latents in eval mode (no label dropout), with t uniform in [0, 1] (`sp_timesteps=(0, 1)`
replaces the logit-normal draw in Transport.sample). Its loader reads `valid_path` with its own
`latents_stats.pt`, shuffled, drop_last, a random flip and random noise/t per call, the whole set
on every rank.

Here the same quantity, made repeatable:
- every validation latent exactly once, rank r taking indices r, r + world, ...; per-sample sums in
  float64, all-reduced, so the mean is over the whole folder whatever the process count (each rank
  runs the same number of equal batches, padded with zero-weight repeats: collectives stay in step);
- latent i draws its flip, its t ~ U[0, 1] and its noise from its own generator seeded by
  (train.global_seed, i): the same draws at every evaluation, so successive values differ only
  because the model changed;
- under the training precision's autocast, without gradients; normalised by `valid_path`'s own
  latents_stats.pt (as upstream's `ImgLatentDataset(valid_path)`).

It returns (and the loop logs in log.jsonl) `val_mse` (upstream's `Loss/validation`: the MSE term,
the same term upstream logs as its train loss), `val_cos` and `val_loss` = mse + cos (the kit's `loss`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from repro.data.latents import LatentShardDataset, list_shards
from repro.data.stats import STATS_NAME, global_scale_factor
from repro.errors import ReproError
from repro.transport import loss_function
from repro.utils import distributed as dist
from repro.utils.hardware import autocast
from repro.utils.seeding import seed_from

SEED_TAG = "repro-valid"


def open_validation_latents(cfg) -> LatentShardDataset:
    """The latent folder of `data.valid_path`, checked against the model it will score."""
    folder = Path(cfg.data.valid_path)
    fix = (f"extract the validation images there with step 6 (python -m steps.step6_extract --config C "
           f"--source VAL_IMAGES --out {folder}) or set data.valid_path: null")
    if not list_shards(folder):
        where = "does not exist" if not folder.is_dir() else "holds no *.safetensors latent shards"
        raise ReproError(f"data.valid_path {folder} {where}: {fix}")
    if cfg.data.latent_norm and not (folder / STATS_NAME).is_file():
        raise ReproError(f"data.valid_path {folder} has no {STATS_NAME} (upstream normalises validation latents with "
                         f"the folder's own statistics): run `python -m steps.step5_fix_stats --config C --recompute "
                         f"--set data.data_path={folder}`, or {fix}")
    # kit (issue 23): a global scaling uses the training set's factor (step 7 has filled data.latent_scale)
    ds = LatentShardDataset(folder, latent_norm=cfg.data.latent_norm, latent_multiplier=cfg.data.latent_multiplier,
                            global_scale=global_scale_factor(cfg.data))
    size = cfg.data.image_size // cfg.vae.downsample_ratio
    if ds.channels != cfg.model.in_chans or ds.latent_size != size:
        raise ReproError(f"data.valid_path {folder} holds {ds.channels}x{ds.latent_size} latents but the model takes "
                         f"{cfg.model.in_chans}x{size} (model.in_chans, data.image_size / vae.downsample_ratio): "
                         f"re-extract the validation set with the training set's tokenizer and image size")
    if ds.num_classes_seen > cfg.data.num_classes:
        raise ReproError(f"data.valid_path {folder} has labels up to {ds.num_classes_seen - 1} but data.num_classes is "
                         f"{cfg.data.num_classes}: the validation set must use the training set's classes")
    return ds


def _draw(ds: LatentShardDataset, index: int, seed: int,
          horizontal_flip: bool = True) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """(x1, y, t, noise) of validation latent `index`: the same at every evaluation."""
    g = torch.Generator().manual_seed(seed_from(SEED_TAG, seed, index))
    # upstream's latents / latents_flip coin, drawn either way (data.horizontal_flip false keeps the other draws)
    flip = bool(torch.rand(1, generator=g) < 0.5) and horizontal_flip
    x, y = ds.get(index, flip, generator=g)
    t = torch.rand(1, generator=g)  # sp_timesteps = (0, 1): uniform, whatever use_lognorm says
    return x, y, t, torch.randn(x.shape, generator=g, dtype=torch.float32)


class ValidationLoss:
    """`data.valid_path`'s loss, called by every process with the training model at each checkpoint."""

    def __init__(self, cfg, *, rank: int, world: int, device: torch.device, precision: str):
        self.ds = open_validation_latents(cfg)
        self.rank, self.world, self.device, self.precision = rank, world, device, precision
        self.seed = int(cfg.train.global_seed)
        self.horizontal_flip = bool(cfg.data.horizontal_flip)
        self.use_cosine_loss = bool(cfg.transport.use_cosine_loss)
        self.loss_fn = loss_function(cfg.transport)  # kit (issue 23): flow matching's or DDPM's

    def __len__(self) -> int:
        return len(self.ds)

    def _batches(self, batch_size: int):
        """This rank's (indices, weights) batches; every rank gets the same number of the same size."""
        n, world = len(self.ds), self.world
        per_rank = math.ceil(n / world)
        mine = [self.rank + k * world for k in range(per_rank)]
        for lo in range(0, per_rank, batch_size):
            part = mine[lo:lo + batch_size]
            yield [i if i < n else n - 1 for i in part], [1.0 if i < n else 0.0 for i in part]

    @torch.no_grad()
    def local_sums(self, model: torch.nn.Module, batch_size: int) -> torch.Tensor:
        """(sum of mse, sum of cos, latents) over this rank's share, float64 on the CPU."""
        was_training = model.training
        model.eval()  # upstream evaluates in eval mode: no label dropout
        sums = torch.zeros(3, dtype=torch.float64)
        try:
            for indices, weights in self._batches(max(1, int(batch_size))):
                draws = [_draw(self.ds, i, self.seed, self.horizontal_flip) for i in indices]
                x1 = torch.stack([d[0] for d in draws]).to(self.device)
                y = torch.tensor([d[1] for d in draws], dtype=torch.int64, device=self.device)
                t = torch.cat([d[2] for d in draws]).to(self.device)
                x0 = torch.stack([d[3] for d in draws]).to(self.device)
                w = torch.tensor(weights, dtype=torch.float64)
                with autocast(self.device, self.precision):
                    out = self.loss_fn(model, x1, y, t=t, x0=x0)
                sums[0] += (out["mse"].double().cpu() * w).sum()
                if out["cos"] is not None:
                    sums[1] += (out["cos"].double().cpu() * w).sum()
                sums[2] += w.sum()
        finally:
            model.train(was_training)
        return sums

    def __call__(self, model: torch.nn.Module, batch_size: int) -> dict:
        """{'val_loss', 'val_mse', 'val_cos' (None without the cosine loss), 'val_images'} over the whole set,
        `batch_size` latents per forward on each process (the training micro-batch fits). Every process calls it."""
        sums = self.local_sums(model, batch_size)
        if self.world > 1:  # the sums over every process
            sums = torch.tensor(dist.all_reduce_values(sums.tolist()), dtype=torch.float64)
        return summarise(sums, self.use_cosine_loss)

    def describe(self, step: int, row: dict) -> str:
        cos = f" (mse {row['val_mse']:.4f} + cos {row['val_cos']:.4f})" if row["val_cos"] is not None else ""
        return (f"(step={step:07d}) validation loss {row['val_loss']:.4f}{cos} on {row['val_images']} latents of "
                f"{self.ds.data_dir} (t ~ U[0, 1], fixed draws)")


def summarise(sums: torch.Tensor, use_cosine_loss: bool) -> dict:
    """The logged values from (sum of mse, sum of cos, latents) over all processes."""
    mse, cos = (sums[:2] / sums[2]).tolist()
    return {"val_loss": mse + (cos if use_cosine_loss else 0.0), "val_mse": mse,
            "val_cos": cos if use_cosine_loss else None, "val_images": int(sums[2])}


def make_validation(cfg, *, rank: int, world: int, device: torch.device, precision: str) -> Optional[ValidationLoss]:
    """A ValidationLoss when `data.valid_path` is set (its folder checked now, before training starts), else None."""
    if cfg.data.valid_path is None:
        return None
    return ValidationLoss(cfg, rank=rank, world=world, device=device, precision=precision)
