"""LightningDiT training that a notebook's death, a 16 GB GPU or eight GPUs do not change.

`train(cfg)` runs the upstream recipe (hustvl/LightningDiT train.py; see `repro.training.step`) on the
latent shards of `data.data_path`, in one process or under torchrun (DDP; gloo on CPU), and:

- resumes from the newest complete checkpoint of `train.output_dir/train.exp_name/checkpoints/`
  (upstream layout) with model, EMA, optimizer, scaler, step, data-order position and RNG states,
  so the resumed run is the uninterrupted one (bitwise on CPU in fp32 with `train.deterministic`);
- otherwise starts from `train.ckpt` (stage 1 continuing a stage-0 checkpoint: weights, EMA,
  optimizer, step, data position) or `train.weight_init` (weights only, step 0);
- splits `train.global_batch_size` into micro-batch x processes x accumulation exactly;
- stops cleanly with a checkpoint before `time_budget` seconds (`--time-budget`), and with an error
  naming the step at a non-finite loss (the last good checkpoint is kept, nothing newer is written).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch

from repro.config import Config, config_diff, config_from_dict, save_config
from repro.errors import ConfigError, ReproError
from repro.models.checkpoint import check_state_dict, load_checkpoint, strip_prefixes
from repro.models.lightningdit import build_model
from repro.training import state as ckpt
from repro.training.data_order import DataOrder, DataPosition, MicroBatchStream
from repro.training.ema import EMA
from repro.training.logs import RunLogger
from repro.training.loop import TrainLoop
from repro.training.plan import make_scaler, plan_batches, resolve_precision, set_determinism
from repro.training.samples import GridSampler
from repro.training.step import (StepRunner, make_optimizer, normalise_optimizer_state,
                                 take_over_label_dropout)
from repro.utils import distributed as dist


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / cfg.train.exp_name


_MARKERS = ("asset:", "asset-dir:", "runs:")


def check_resolved(cfg: Config) -> None:
    """Refuse path markers that step 3 fills in (`runs:REL`, `asset:NAME`), naming the key."""
    keys = {"data.data_path": cfg.data.data_path, "train.output_dir": cfg.train.output_dir,
            "train.ckpt": cfg.train.ckpt, "train.weight_init": cfg.train.weight_init}
    if cfg.train.sample_every:
        keys["vae.ckpt_path"] = cfg.vae.ckpt_path
    for key, value in keys.items():
        if isinstance(value, str) and value.startswith(_MARKERS):
            raise ConfigError(f"config key '{key}' is {value!r}, a marker that step 3 fills in: run "
                              f"`python -m steps.step3_configs --base CONFIG` and train with the resolved config it "
                              f"writes, or pass --set {key}=PATH")


def open_latents(cfg: Config):
    """The latent dataset of `data.data_path`, checked against the model it will train."""
    from repro.data.latents import LatentShardDataset

    if not cfg.data.data_path:
        raise ConfigError("data.data_path is not set: point it at the latent shards written by step 6 "
                          "(python -m steps.step6_extract --config C --source IMAGES --out FOLDER)")
    ds = LatentShardDataset(cfg.data.data_path, latent_norm=cfg.data.latent_norm,
                            latent_multiplier=cfg.data.latent_multiplier)
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
    return ds


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _choose_start(cfg: Config, ckpt_dir: Path, note) -> tuple[Optional[str], Optional[str], Optional[dict]]:
    """(kind, path, loaded state) on rank 0: 'resume' | 'ckpt' | 'weight_init' | None."""
    existing = ckpt.list_checkpoints(ckpt_dir)
    if existing and not cfg.train.resume:
        raise ConfigError(f"{ckpt_dir} already holds checkpoints up to step {existing[-1][0]} and train.resume is "
                          "false: set train.resume=true to continue this run, or a new train.exp_name to start another")
    if existing:
        found = ckpt.find_resume_checkpoint(ckpt_dir, note)
        if found is None:
            raise ReproError(f"none of the {len(existing)} checkpoint(s) in {ckpt_dir} can be read (see the notes "
                             "above): move them elsewhere to start over, or restore a good copy")
        return "resume", str(found[0]), found[1]
    ckpt.remove_stale_temps(ckpt_dir)
    if cfg.train.ckpt:
        return "ckpt", cfg.train.ckpt, ckpt.read_training_checkpoint(cfg.train.ckpt)
    if cfg.train.weight_init:
        return "weight_init", cfg.train.weight_init, None
    return None, None, None


def _apply_state(state: dict, path: str, model, ema: EMA, opt, scaler, cfg: Config, device, rank: int,
                 world: int, note) -> tuple[int, Optional[DataPosition]]:
    model_sd, ema_sd = strip_prefixes(state["model"]), strip_prefixes(state["ema"])
    check_state_dict(model, model_sd, f"{path} ['model']")
    check_state_dict(model, ema_sd, f"{path} ['ema']")
    model.load_state_dict(model_sd, strict=True)
    ema.load_state_dict(ema_sd)
    try:
        opt.load_state_dict(state["opt"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise ReproError(f"{path}: the optimizer state does not fit this model ({e}); was it saved for "
                         "another model.model_type?") from None
    normalise_optimizer_state(opt, cfg.optimizer, device)
    if scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng = state.get("rng") or []
    if rng:
        ckpt.restore_rng(rng[rank] if len(rng) == world else rng[0])
        if len(rng) != world:
            note(f"note: {path} was saved by {len(rng)} process(es), this run has {world}: every process takes "
                 "rank 0's global RNG state (the data order and per-sample draws depend only on seed and step)")
    pos = state.get("data_order")
    return int(state["step"]), (DataPosition.from_dict(pos) if pos else None)


def _describe_config_change(state: dict, cfg: Config) -> list[str]:
    try:
        old = config_from_dict(state["config"])
    except Exception:  # an upstream checkpoint's raw YAML dict, or another kit version
        return []
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in config_diff(old, cfg)
            if not k.startswith(("train.ckpt", "train.time_budget"))]


def train(cfg: Config, *, time_budget: Optional[float] = None) -> dict:
    """Train until `train.max_steps` (or the time budget); returns step, checkpoint, loss, run_dir, stopped."""
    t_start = time.monotonic()
    budget = time_budget if time_budget is not None else cfg.train.time_budget
    dist.init()
    rank, world, device, main = dist.get_rank(), dist.get_world_size(), dist.default_device(), dist.is_main()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    set_determinism(cfg.train.deterministic, device)
    try:
        return _train(cfg, budget, t_start, rank, world, device, main)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(cfg: Config, budget, t_start, rank, world, device, main) -> dict:
    precision = resolve_precision(cfg.train.precision, device)
    check_resolved(cfg)
    run_dir = run_dir_of(cfg)
    ckpt_dir = ckpt.checkpoint_dir(run_dir)
    ds = open_latents(cfg)
    latent_size = cfg.data.image_size // cfg.vae.downsample_ratio
    notes: list[str] = []

    def note(message: str) -> None:  # printed now (an error may follow), written to log.txt below
        print(message, flush=True)
        notes.append(message)

    kind, path, state = _choose_start(cfg, ckpt_dir, note) if main else (None, None, None)
    kind, path = _broadcast((kind, path))
    if not main and kind in ("resume", "ckpt"):
        state = ckpt.read_training_checkpoint(path)
    log = RunLogger(run_dir, enabled=main, resume_step=int(state["step"]) if state else None)
    for n in notes:
        log.info(n, echo=False)

    torch.manual_seed(cfg.train.global_seed)  # the same initial weights on every process
    model = build_model(cfg.model, latent_size, cfg.data.num_classes).to(device)
    ema = EMA(model, cfg.train.ema_decay, on_cpu=cfg.train.ema_on_cpu)
    dropout_prob = take_over_label_dropout(model)
    opt = make_optimizer(model, cfg.optimizer, device)
    scaler = make_scaler(device, precision)
    step, position = 0, None
    if state is not None:
        step, position = _apply_state(state, path, model, ema, opt, scaler, cfg, device, rank, world, log.info)
        what = "resumed from" if kind == "resume" else "initialised from train.ckpt"
        log.info(f"{what} {path} at step {step}")
        for line in _describe_config_change(state, cfg):
            log.info(f"  config changed since that checkpoint: {line}")
        del state
    elif kind == "weight_init":
        load_checkpoint(model, path, prefer="model")  # upstream: weight_init loads checkpoint['model']
        ema.copy_from(model)
        log.info(f"weights (not optimizer or step) initialised from train.weight_init {path}")
    plan = plan_batches(cfg.train, world, fits=_fits(cfg, latent_size, precision, device))
    order = DataOrder(len(ds), plan.global_batch, cfg.train.global_seed, position, data_dir=str(ds.data_dir))
    if order.note:
        log.info(f"note: {order.note}")

    forward_model = torch.compile(model) if cfg.train.compile else model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward_model = DDP(forward_model, device_ids=[device.index] if device.type == "cuda" else None,
                            broadcast_buffers=False, gradient_as_bucket_view=True)
    runner = StepRunner(model, forward_model, opt, scaler, ema, plan=plan, precision=precision, device=device,
                        max_grad_norm=cfg.optimizer.max_grad_norm, use_cosine_loss=cfg.transport.use_cosine_loss)
    grids = GridSampler(cfg, channels=ds.channels, latent_size=latent_size, stats=ds.stats, device=device,
                        precision=precision, note=log.info)
    if main:
        save_config(cfg, run_dir / "config.yaml", header=f"resolved config of run {run_dir} (written by step 7)")
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"run folder {run_dir}; {cfg.model.model_type} ({n_params / 1e6:.2f}M parameters) on {len(ds)} latents "
             f"{ds.channels}x{latent_size}x{latent_size} from {ds.data_dir} ({order.steps_per_epoch} steps per epoch)")
    log.info(f"{plan.describe()}; precision {precision} on {device.type}; gradient checkpointing "
             f"{'on' if cfg.model.use_checkpoint else 'off'}; EMA {cfg.train.ema_decay} on "
             f"{'cpu' if cfg.train.ema_on_cpu else device.type}; lognorm {cfg.transport.use_lognorm}")

    loop = TrainLoop(cfg, run_dir, log, runner, ema, model, opt, scaler, order, plan, grids, precision, device,
                 rank, world, main, budget, t_start)
    stream = MicroBatchStream(ds, order, plan, rank, start_step=step, end_step=cfg.train.max_steps,
                              seed=cfg.train.global_seed, lognorm=cfg.transport.use_lognorm,
                              dropout_prob=dropout_prob, null_class=cfg.data.num_classes,
                              prefetch=2 * plan.accum_steps if cfg.data.num_workers > 0 else 0,
                              pin=device.type == "cuda")
    try:
        return loop.run(step, stream)
    finally:
        stream.close()
        log.close()


def _fits(cfg: Config, latent_size: int, precision: str, device: torch.device):
    """For an "auto" micro-batch on a GPU: does the computed budget fit the card (step 3's rule)?"""
    if device.type != "cuda":
        return None
    from repro.training.budget import block_saved_fn, training_memory_budget, usable_bytes

    block_saved = block_saved_fn(cfg.model, latent_size, precision, cfg.data.num_classes)
    limit = usable_bytes(torch.cuda.get_device_properties(device).total_memory)

    def fits(micro: int) -> bool:
        return training_memory_budget(cfg.model, latent_size, micro, precision, cfg.model.use_checkpoint,
                                      ema_on_device=not cfg.train.ema_on_cpu, num_classes=cfg.data.num_classes,
                                      block_saved=block_saved(micro)).total <= limit
    return fits
