"""LightningDiT training (step 7): the DiT trainer of the one engine (`repro.training.engine`).

`train(cfg)` runs the upstream recipe (hustvl/LightningDiT train.py; the step itself is
`repro.training.step`) on the latent shards of `data.data_path`, in one process or under torchrun
(DDP or FSDP2; gloo on CPU). The engine runs the loop; this trainer adds the model, its flow-matching
loss, the label dropout, the validation loss and the EMA sample grids. A run:

- resumes from the newest complete checkpoint of `train.output_dir/train.exp_name/checkpoints/`
  (upstream layout) with model, EMA, optimizer, scaler, step, data-order position and RNG states,
  so the resumed run is the uninterrupted one (bitwise on CPU in fp32 with `train.deterministic`);
- otherwise starts from `train.ckpt` (stage 1 continuing a stage-0 checkpoint) or
  `train.weight_init` (weights only, step 0);
- splits `train.global_batch_size` into micro-batch x processes x accumulation exactly;
- with `data.valid_path`, scores upstream's validation loss at each checkpoint step (all processes;
  `repro.training.validation`) and logs it in that step's row;
- logs every `log_every` and saves every `ckpt_every` steps as upstream, and also at `max_steps` and
  when the time budget is nearly used (so the next session continues from there);
- stops with an error naming the step at a non-finite loss (checked before every log and save, on
  the device in between: no host synchronisation per step); the last good checkpoint is kept.

    from repro.training import train
    result = train(load_config("configs/train/tiny_stage_0.yaml"))   # {'step', 'checkpoint', 'loss', ...}
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Optional

import torch

from repro import paths
from repro.config import Config, save_config
from repro.errors import ConfigError, ReproError
from repro.models.denoisers import build_denoiser, family_of
from repro.training import checkpoints as ckpt
from repro.transport import is_ddpm
from repro.training.batches import plan_batches
from repro.training.data_order import MicroBatchStream
from repro.training.engine import Trainer, run_dir_of, run_training
from repro.training.grids import GridSampler
from repro.training.step import StepRunner, make_optimizer, normalise_optimizer_state, take_over_label_dropout
from repro.training.validation import make_validation
from repro.utils import distributed as dist


def open_latents(cfg: Config):
    """The latent dataset of `data.data_path`, checked against the model it will train."""
    from repro.data.extract import report_class_names
    from repro.data.latents import LatentShardDataset
    from repro.data.official_latents import find_shard_folder
    from repro.data.stats import GLOBAL_SCALINGS, global_scale_factor
    from repro.data.stats_recompute import global_scale

    if not cfg.data.data_path:
        raise ConfigError("data.data_path is not set: point it at the latent shards written by step 6 "
                          "(python -m steps.step6_extract --config C --source IMAGES --out FOLDER)")
    # kit (issue 16): upstream's unpacked latents (step 6 --official) too, whose shards sit folders down
    folder, stats_path = find_shard_folder(cfg.data.data_path)
    # kit (issue 23): a global scaling's factor, from latents_scale.json (computed once if missing) unless
    # data.latent_scale gives it; kept in cfg, so the run's config.yaml records what sampling must undo
    if cfg.data.latent_scaling in GLOBAL_SCALINGS and cfg.data.latent_scale is None:
        cfg.data.latent_scale = dist.run_on_main(global_scale, folder, cfg.data.latent_scaling,
                                                 subset=cfg.data.stats_subset, note=dist.print0)
    ds = LatentShardDataset(folder, latent_norm=cfg.data.latent_norm, latent_multiplier=cfg.data.latent_multiplier,
                            stats_path=stats_path, global_scale=global_scale_factor(cfg.data))
    if ds.channels != cfg.model.in_chans:
        raise ReproError(f"latent shards in {ds.data_dir} have {ds.channels} channels but model.in_chans is "
                         f"{cfg.model.in_chans}: they come from another tokenizer; re-extract with the VA-VAE "
                         f"f16d32 (32 channels) or set model.in_chans={ds.channels}")
    size = cfg.data.image_size // cfg.vae.downsample_ratio
    if ds.latent_size != size:
        raise ReproError(f"latent shards in {ds.data_dir} are {ds.latent_size}x{ds.latent_size} but data.image_size "
                         f"{cfg.data.image_size} / vae.downsample_ratio {cfg.vae.downsample_ratio} = {size}: fix "
                         "data.image_size or re-extract at that size")
    if ds.num_classes_seen > cfg.data.num_classes:
        raise ReproError(f"latent shards in {ds.data_dir} have labels up to {ds.num_classes_seen - 1} but "
                         f"data.num_classes is {cfg.data.num_classes}: set data.num_classes={ds.num_classes_seen}")
    # kit (issue 13): step 6's report names the class folders; the model must have exactly that many classes
    names = report_class_names(ds.data_dir)
    if names is not None and len(names) != cfg.data.num_classes:
        raise ReproError(f"data.num_classes is {cfg.data.num_classes} but the image folder of {ds.data_dir} has "
                         f"{len(names)} class folder(s) (its extract_report.json): set data.num_classes={len(names)}")
    return ds


def train(cfg: Config, *, time_budget: Optional[float] = None) -> dict:
    """Train until `train.max_steps` (or the time budget); returns step, checkpoint, loss, run_dir, stopped."""
    return run_training(DiTTrainer(cfg), time_budget=time_budget)


class DiTTrainer(Trainer):
    """LightningDiT + flow matching on latent shards: what the engine needs from step 7."""

    nan_advice = ("Lower optimizer.lr, set optimizer.max_grad_norm (e.g. 1.0) or model.use_qknorm=true (upstream's "
                  "advice for NaN losses), or train in fp32")

    def __init__(self, cfg: Config):
        # A copy of `cfg` with `runs:REL` paths under the runs folder (the meaning every step gives them); an
        # `asset:NAME` marker, which only step 3 can fill in, is refused naming the key.
        # kit (issue 12): one meaning of runs: in every step (repro.paths), no longer refused here
        self.cfg = cfg = copy.deepcopy(cfg)
        paths.resolve_runs_markers(cfg)
        keys = ["data.data_path", "data.valid_path", "train.output_dir", "train.ckpt", "train.weight_init"]
        paths.refuse_asset_markers(cfg, keys + (["vae.ckpt_path"] if cfg.train.sample_every else []))
        self.what = "UNet" if family_of(cfg.model.model_type) == "unet" else "LightningDiT"
        self.run_dir = run_dir_of(cfg)
        self.seed = cfg.train.global_seed
        self.max_steps = cfg.train.max_steps
        self.stream = None

    # --- The data, the batch plan -----------------------------------------------------------------
    def open(self, ctx) -> None:
        cfg = self.cfg
        self.ds = open_latents(cfg)
        self.validation = make_validation(cfg, rank=ctx.rank, world=ctx.world, device=ctx.device,
                                          precision=ctx.precision)  # data.valid_path
        self.latent_size = cfg.data.image_size // cfg.vae.downsample_ratio
        self.plan = plan_batches(cfg.train, ctx.world, fits=_fits_gpu(cfg, self.latent_size, ctx.precision, ctx.device))
        self.num_items, self.data_dir = len(self.ds), self.ds.data_dir

    def build_denoiser(self):
        cfg = self.cfg
        return build_denoiser(cfg.model, self.latent_size, cfg.data.num_classes, cfg.transport.process)

    def choose_start(self, ckpt_dir: Path, note):
        return ckpt.choose_start(self.cfg, ckpt_dir, note)  # this run's newest, train.ckpt or train.weight_init

    # --- Model, EMA, optimizer, the step runner and the grid sampler ------------------------------
    def build(self, ctx, strategy, kind) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.global_seed)
        # kit (issue 23): the denoiser of model.model_type (LightningDiT or UNet) for transport.process
        self.model = model = self.ema_source = self.build_denoiser().to(ctx.device)
        strategy.shard(model, [*model.blocks, model])  # fsdp: one unit per transformer block (UNet stage), then the root
        self.ema = strategy.make_ema(model, cfg.train.ema_decay, on_cpu=cfg.train.ema_on_cpu)
        self.dropout_prob = take_over_label_dropout(model)
        self.opt = make_optimizer(model, cfg.optimizer, strategy.param_device)
        # The forward compiled by default on CUDA (`compiled`); DDP with several processes (FSDP needs no wrapper).
        self.runner = StepRunner(model, strategy.wrap(self.compiled(model, ctx, "training")), self.opt,
                                 self.scaler, self.ema, self.plan, cfg, precision=ctx.precision, device=ctx.device)
        self.grids = GridSampler(cfg, stats=self.ds.stats, device=ctx.device, precision=ctx.precision, note=ctx.note)

    def after_restore(self, ctx, kind, path, state, strategy) -> None:
        if state is not None:
            normalise_optimizer_state(self.opt, self.cfg.optimizer, strategy.param_device)
            for line in ckpt.config_changes(state, self.cfg):
                ctx.note(f"  config changed since that checkpoint: {line}")
        elif kind == "weight_init":
            strategy.load_weights(self.model, path, prefer="model")  # upstream: weight_init loads checkpoint['model']
            self.ema.copy_from(self.model)
            ctx.note(f"weights (not optimizer or step) initialised from train.weight_init {path}")

    def save_config(self, path: Path) -> None:
        save_config(self.cfg, path, header=f"resolved config of run {self.run_dir} (written by step 7)")

    def describe(self, ctx, order) -> list[str]:
        cfg, ds, size = self.cfg, self.ds, self.latent_size
        n_params = sum(p.numel() for p in self.model.parameters())
        return [f"run folder {self.run_dir}; {cfg.model.model_type} ({n_params / 1e6:.2f}M parameters) on {len(ds)} "
                f"latents {ds.channels}x{size}x{size} from {ds.data_dir} ({order.steps_per_epoch} steps per epoch)",
                f"gradient checkpointing {'on' if cfg.model.use_checkpoint else 'off'}; EMA {cfg.train.ema_decay} on "
                f"{'cpu' if cfg.train.ema_on_cpu else ctx.device.type}; lognorm {cfg.transport.use_lognorm}"
                + (f"; process ddpm ({cfg.transport.schedule} schedule, T {cfg.transport.num_timesteps}, predicts "
                   f"{cfg.transport.prediction})" if is_ddpm(cfg.transport) else "")]

    # --- The steps ----------------------------------------------------------------------------------
    def start(self, ctx, step: int, order) -> None:
        self.stream = MicroBatchStream(self.ds, order, self.plan, ctx.rank, self.cfg, start_step=step,
                                       end_step=self.max_steps, dropout_prob=self.dropout_prob,
                                       pin=ctx.device.type == "cuda")
        self.batches = iter(self.stream)

    def train_step(self, step: int, order) -> None:
        """One optimizer step over this process's micro-batches (the stream runs ahead of the loop)."""
        micro_batches, position = [], None
        for _ in range(self.plan.accum_steps):
            s, _k, mb, position = next(self.batches)
            if s != step:
                raise RuntimeError(f"data stream is at step {s}, the loop at step {step}")
            micro_batches.append(mb)
        self.runner.step(step, micro_batches)
        order.position = position

    @property
    def first_bad(self) -> torch.Tensor:
        return self.runner.first_bad

    def log_values(self, ctx) -> dict:
        runner = self.runner
        sums = dist.all_reduce_values(runner.sums.tolist())  # float64, as the device sums
        loss, mse, cos = (v / max(runner.samples * ctx.world, 1) for v in sums)
        runner.reset_sums()
        return {"loss": loss, "mse": mse, "cos": cos if self.cfg.transport.use_cosine_loss else None,
                "grad_norm": float(runner.grad_norm)}

    def after_step(self, ctx, step: int, strategy) -> tuple[Optional[dict], float]:
        cfg, row, seconds = self.cfg, None, 0.0
        # Validation loss at each checkpoint step (upstream, data.valid_path), logged in this step's row.
        if self.validation is not None and (step % cfg.train.ckpt_every == 0 or step == self.max_steps):
            t0 = time.perf_counter()
            row = self.validation(self.model, self.plan.micro_batch)
            seconds = time.perf_counter() - t0
            ctx.note(self.validation.describe(step, row))
        # EMA sample grid (rank 0): a host-memory EMA is swapped into the model, a sharded one gathered.
        if cfg.train.sample_every and step % cfg.train.sample_every == 0:
            t0 = time.perf_counter()
            with strategy.ema_for_grid(self.ema, self.model, lambda: self.build_denoiser().to(ctx.device)) as m:
                if ctx.main:
                    grid = self.grids(m, step, self.run_dir)
                    ctx.note(f"EMA sample grid {grid} ({time.perf_counter() - t0:.1f}s)")
                    ctx.image(step, "samples/ema_grid", grid)  # kit (issue 22): the grid in TensorBoard / W&B too
            dist.barrier()
        return row, seconds

    # --- The result -----------------------------------------------------------------------------------
    def final_loss(self, ctx) -> Optional[float]:
        if not self.runner.steps_done:
            return None
        return dist.all_reduce_values([float(self.runner.last_loss_sum)])[0] / self.plan.global_batch

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def _fits_gpu(cfg: Config, latent_size: int, precision: str, device: torch.device):
    """For an "auto" micro-batch on a GPU: does the computed budget fit the card (step 3's rule)?"""
    if device.type != "cuda" or family_of(cfg.model.model_type) == "unet":
        return None  # the computed budget is LightningDiT's; a UNet's "auto" micro-batch is the global one
    from repro.models.cost import block_saved_fn, fits_on_card

    block_saved = block_saved_fn(cfg.model, latent_size, precision, cfg.data.num_classes)
    total = torch.cuda.get_device_properties(device).total_memory
    shards = dist.get_world_size() if cfg.train.strategy == "fsdp" else 1
    return lambda micro: fits_on_card(cfg.model, latent_size, micro, precision, total,
                                      checkpointing=cfg.model.use_checkpoint,
                                      ema_on_device=not cfg.train.ema_on_cpu,
                                      num_classes=cfg.data.num_classes, block_saved=block_saved,
                                      shards=shards, offload=cfg.train.fsdp_offload)
