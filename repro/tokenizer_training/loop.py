"""Tokenizer training (step 9): a VA-VAE-architecture autoencoder on an image folder, resumable exactly.

Upstream (hustvl/LightningDiT `vavae/`, LDM's AutoencoderKL + LPIPSWithDiscriminator) trains per step:
encode, sample z from the posterior, decode, the autoencoder loss (rec + KL + LPIPS + adaptive GAN + VF,
`repro.tokenizer.losses`) with one Adam (lr, betas (0.5, 0.9)), then the discriminator's hinge loss with
a second Adam. The kit runs the same step and adds what the DiT trainer has (`repro.training`):

- checkpoints `output_dir/exp_name/checkpoints/{step:07d}.pt` (`repro.training.checkpoints`: atomic,
  newest complete one found on restart) with the autoencoder, discriminator and VF projection, the EMA,
  both optimizers, the scaler, the data position and RNG states; the draws of every sample are seeded
  per (seed, step, position) (`repro.tokenizer_training.data`), so a killed run resumes bitwise (CPU, fp32);
- `tokenizer.safetensors` next to them at every checkpoint: the inference weights (the EMA's when
  `train.ema_decay` is set) with their architecture in the header (`repro.tokenizer.files`), what a DiT
  config names with `vae.model_name: custom`;
- several processes (torchrun; gloo on CPU): each takes its slice of the global batch and gradients are
  averaged over processes after the backward pass (what DDP does), so the result does not depend on the
  split; `train.time_budget`, SIGTERM/SIGINT (save, then `Preempted`), fp32/bf16/fp16 (with a scaler);
- `log.jsonl`, `log.txt`, `loss.png` (`repro.training.logs.RunLogger`): total loss, rec, KL, LPIPS, GAN, VF.

    result = train_tokenizer(load_tokenizer_config("configs/tokenizer/digits.yaml"))
    result["tokenizer"], result["dit_overrides"]
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from repro import paths
from repro.errors import Preempted, ReproError
from repro.tokenizer.loader import downsample_ratio, save_tokenizer
from repro.tokenizer.vf_loss import foundation_features
from repro.tokenizer_training.config import TokenizerConfig, save_tokenizer_config
from repro.tokenizer_training.data import TokenizerImages, build_batch
from repro.tokenizer_training.modules import build_autoencoder, build_loss
from repro.training import checkpoints as ckpt
from repro.training.batches import plan_batches
from repro.training.data_order import DataOrder, DataPosition
from repro.training.ema import EMA
from repro.training.logs import RunLogger
from repro.training.saver import check_shared_folder
from repro.training.step import lr_factor
from repro.utils import distributed as dist
from repro.utils.hardware import autocast, default_device, make_scaler, resolve_precision
from repro.utils.preemption import StopSignals, signal_name

TOKENIZER_FILE = "tokenizer.safetensors"
LOG_KEYS = ("rec_loss", "kl_loss", "p_loss", "g_loss", "d_weight", "vf_loss", "vf_weight", "disc_loss")


def run_dir_of(cfg: TokenizerConfig) -> Path:
    return paths.runs_path(cfg.train.output_dir) / cfg.train.exp_name


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Mean of every gradient over the processes (DDP's all-reduce, done once after the backward pass)."""
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # one collective per dtype over a flat copy, not one per tensor (hundreds of small all-reduces a step)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat.div_(world)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def train_tokenizer(cfg: TokenizerConfig, *, time_budget: Optional[float] = None,
                    feature_net: Optional[torch.nn.Module] = None, device: Optional[str] = None) -> dict:
    """Train until train.max_steps / max_epochs (or the time budget); returns step, checkpoint, tokenizer,
    run_dir, stopped, loss and `dit_overrides` (the DiT config lines that use this tokenizer)."""
    t_start = time.monotonic()
    dist.init(device)
    dev = torch.device(device) if device else default_device()
    budget = time_budget if time_budget is not None else cfg.train.time_budget
    with StopSignals("finishing this optimizer step, then writing a checkpoint") as stops:
        return _loop(cfg, dev, budget, t_start, stops, feature_net)


def _loop(cfg: TokenizerConfig, device: torch.device, budget: Optional[float], t_start: float, stops: StopSignals,
          feature_net: Optional[torch.nn.Module]) -> dict:
    # --- Processes, precision, the run folder and the images ---------------------------------------
    rank, world, main = dist.get_rank(), dist.get_world_size(), dist.is_main()
    t = cfg.train
    precision = resolve_precision(t.precision, device, "train.precision")
    run_dir = run_dir_of(cfg)
    ckpt_dir = ckpt.checkpoint_dir(run_dir)
    if not cfg.data.image_folder:
        raise ReproError("tokenizer config key 'data.image_folder' is not set: pass --set data.image_folder=DIR "
                         "(one sub-folder per class, as step 6 reads)")
    log = None

    def note(message: str) -> None:
        if log is not None:
            log.info(message)
        elif main:
            print(message, flush=True)

    images = TokenizerImages(paths.runs_path(cfg.data.image_folder), cfg.data.image_size, cfg.data.crop,
                             cfg.data.random_flip,
                             note=lambda m: note(m) if main else print(f"[rank {rank}] {m}", flush=True))
    plan = plan_batches(SimpleNamespace(global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                                        grad_accum_steps=1), world)
    if len(images) < plan.global_batch:
        raise ReproError(f"{images.src.root} holds {len(images)} images, fewer than train.global_batch_size="
                         f"{plan.global_batch}: add images or lower train.global_batch_size")
    order_steps = len(images) // plan.global_batch
    max_steps = t.max_steps if t.max_steps is not None else (t.max_epochs or 0) * order_steps
    if max_steps < 1:
        raise ReproError("set tokenizer config key 'train.max_steps' (or train.max_epochs): how long to train")

    # --- Where to start: this run's newest checkpoint ------------------------------------------------
    # rank 0 chooses and the others read the same file: on several machines each must see rank 0's folder
    found = ckpt.resume_point(ckpt_dir, t.resume, note) if main else None
    path = dist.broadcast_object(str(found[0]) if found else None)
    if path is not None and not main:
        found = (Path(path), ckpt.read_training_checkpoint(path))
    check_shared_folder(run_dir, "train.output_dir")
    state = found[1] if found else None
    log = RunLogger(run_dir, enabled=main, resume_step=int(state["step"]) if state else None)

    # --- Model, loss parts, optimizers, EMA, scaler (the same initial weights on every process) -------
    vae = build_autoencoder(cfg, note=log.info, initial=state is None).to(device)  # a resume loads its checkpoint
    loss_fn, feature_net, feature_input = build_loss(cfg, device, feature_net, note=log.info)
    ae_params = list(vae.parameters()) + (list(loss_fn.vf.parameters()) if loss_fn.vf is not None else [])
    opt_ae = torch.optim.Adam(ae_params, lr=t.lr, betas=(t.beta1, t.beta2))
    disc = loss_fn.discriminator
    opt_d = torch.optim.Adam(disc.parameters(), lr=t.lr, betas=(t.beta1, t.beta2)) if disc is not None else None
    ema = EMA(vae, t.ema_decay) if t.ema_decay is not None else None
    scaler = make_scaler(device, precision)
    latent_shape = tuple(vae.encode(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size,
                                                device=device)).mean.shape[1:])

    def trained_state() -> dict:
        out = {f"vae.{k}": v for k, v in vae.state_dict().items()}
        if disc is not None:
            out.update({f"disc.{k}": v for k, v in disc.state_dict().items()})
        if loss_fn.vf is not None:
            out.update({f"vf.{k}": v for k, v in loss_fn.vf.state_dict().items()})
        return out

    step, position = 0, None
    if state is not None:
        parts = {"vae": vae, "disc": disc, "vf": loss_fn.vf}
        for prefix, module in parts.items():
            own = {k[len(prefix) + 1:]: v for k, v in state["model"].items() if k.startswith(prefix + ".")}
            if module is not None:
                module.load_state_dict(own, strict=True)
            elif own:
                raise ReproError(f"{found[0]} holds {prefix} weights this config does not train: restore the config "
                                 f"it was written with, or start a new train.exp_name")
        if ema is not None and state["ema"]:
            ema.load_state_dict(state["ema"])
        elif ema is not None:  # EMA switched on since that checkpoint: it starts from the weights
            ema.copy_from(vae)
        opt_ae.load_state_dict(state["opt"]["ae"])
        if opt_d is not None:
            opt_d.load_state_dict(state["opt"]["disc"])
        ckpt.restore_scaler_and_rng(state, str(found[0]), scaler, rank=rank, world=world, note=note)
        step = int(state["step"])
        position = DataPosition.from_dict(state["data_order"])
        log.info(f"resumed from {found[0]} at step {step}")
        del state
    order = DataOrder(len(images), plan.global_batch, t.seed, position, data_dir=str(images.src.root))

    # --- Record the run ----------------------------------------------------------------------------
    if main:
        save_tokenizer_config(cfg, run_dir / "config.yaml", header=f"resolved tokenizer config of {run_dir} (step 9)")
    n_params = sum(p.numel() for p in vae.parameters())
    parts_on = [name for name, on in (("LPIPS", loss_fn.lpips is not None), ("PatchGAN", disc is not None),
                                      ("VF", loss_fn.vf is not None)) if on]
    log.info(f"run folder {run_dir}; autoencoder f{downsample_ratio(cfg.arch())} with {cfg.model.embed_dim} latent "
             f"channels ({n_params / 1e6:.2f}M parameters) on {images.describe()}; latents {latent_shape}; "
             f"{plan.describe()}; {max_steps} steps ({order.steps_per_epoch} per epoch); precision {precision}; "
             f"loss rec ({cfg.loss.rec_loss}) + KL{''.join(' + ' + p for p in parts_on)}")

    tokenizer_path = run_dir / TOKENIZER_FILE
    last_saved = {"step": step, "path": found[0] if found else None}

    def refuse_non_finite(at_step: int, values) -> None:  # a collective: every process raises together
        bad = any(not math.isfinite(v) for v in values)
        if dist.all_reduce_values([float(bad)], "max", cpu=True)[0]:
            raise ReproError(f"non-finite tokenizer loss at step {at_step} in {run_dir}: lower train.lr, set "
                             f"train.max_grad_norm, or train in fp32; the last checkpoint is {last_saved['path']}")

    def save(at_step: int) -> None:
        refuse_non_finite(at_step, window.values())  # losses since the last log step: never save NaN weights
        rng = ckpt.rng_states_of_all_processes(world)
        if main:
            opt = {"ae": opt_ae.state_dict(), "disc": opt_d.state_dict() if opt_d is not None else {}}
            target = ckpt.checkpoint_path(run_dir, at_step)
            ckpt.save_training_checkpoint(
                target, model_state=trained_state(), ema_state=ema.state_dict() if ema is not None else {},
                opt_state=opt, scaler_state=scaler.state_dict(), step=at_step, data_order=order.position.to_dict(),
                rng=rng, config=cfg.to_dict(), kit={"kind": "tokenizer", "world_size": world, "precision": precision},
                keep_last=t.keep_last, last_good=last_saved["path"])
            ckpt.prune_checkpoints(ckpt_dir, t.keep_last)
            weights = ema.module if ema is not None else vae
            save_tokenizer(weights, cfg.arch(), tokenizer_path,
                           info={"step": at_step, "weights": "ema" if ema is not None else "model",
                                 "image_size": cfg.data.image_size, "class_names": images.src.class_names})
            log.info(f"saved checkpoint {target} and {tokenizer_path} (step {at_step})")
            last_saved.update(step=at_step, path=target)
        dist.barrier()

    def result(stopped: str, loss: Optional[float]) -> dict:
        ratio = downsample_ratio(cfg.arch())
        overrides = ["vae.model_name=custom", f"vae.ckpt_path={tokenizer_path}", f"vae.downsample_ratio={ratio}",
                     f"vae.ch={cfg.model.ch}", f"model.in_chans={cfg.model.embed_dim}",
                     f"data.image_size={cfg.data.image_size}"]
        return {"step": step, "checkpoint": str(last_saved["path"]) if last_saved["path"] else None,
                "tokenizer": str(tokenizer_path) if tokenizer_path.is_file() else None, "run_dir": str(run_dir),
                "stopped": stopped, "loss": loss, "loss_plot": str(run_dir / "loss.png"), "dit_overrides": overrides,
                "latent_shape": list(latent_shape), "class_names": images.src.class_names}

    if step >= max_steps:
        log.info(f"nothing to do: step {step} already reaches {max_steps} steps")
        log.close()
        return result("already_done", None)

    # --- The step loop ---------------------------------------------------------------------------
    stopped, step_time, last_loss = "max_steps", None, None
    window: dict[str, float] = {}
    window_steps, window_start = 0, time.perf_counter()
    save_time = 1.0
    try:
        while step < max_steps:
            out_of_time = budget is not None and (
                time.monotonic() - t_start + 2.0 * (step_time or 0.0) + save_time >= budget)
            signum, out_of_time = (int(v) for v in dist.all_reduce_values(
                [float(stops.signum or 0), float(out_of_time)], "max", cpu=True))
            if signum or out_of_time:
                stopped = f"signal:{signum}" if signum else "time_budget"
                break
            t0 = time.perf_counter()
            step += 1
            factor = lr_factor(step, max_steps, t.warmup_steps, t.lr_schedule)
            for opt in (opt_ae, opt_d):
                if opt is not None:
                    for group in opt.param_groups:
                        group["lr"] = t.lr * factor
            indices, next_position = order.peek(order.position)
            logs = _optimizer_step(cfg, step, indices, plan, rank, world, images, vae, loss_fn, opt_ae, opt_d, scaler,
                                   ae_params, latent_shape, precision, device, feature_net, feature_input)
            order.position = next_position
            if ema is not None:
                ema.update()
            for key, value in logs.items():
                window[key] = window.get(key, 0.0) + value
            window_steps += 1
            step_time = time.perf_counter() - t0 if step_time is None else 0.8 * step_time + 0.2 * (time.perf_counter() - t0)

            if step % t.log_every == 0 or step == max_steps:
                keys = sorted(window)
                means = dist.all_reduce_values([window[k] / window_steps for k in keys], "sum")
                row = {k: v / world for k, v in zip(keys, means)}
                refuse_non_finite(step, row.values())
                seconds = time.perf_counter() - window_start
                row.update(images_per_sec=window_steps * plan.global_batch / seconds, lr=t.lr * factor,
                           seconds_per_step=seconds / window_steps, eta_seconds=(max_steps - step) * seconds / window_steps)
                last_loss = row["loss"]
                log.metrics(step, row)
                window, window_steps, window_start = {}, 0, time.perf_counter()
            if step % t.ckpt_every == 0 or step == max_steps:
                t0 = time.perf_counter()
                save(step)
                save_time = time.perf_counter() - t0

        # --- A signal or the time budget: save where it stands ---------------------------------------
        if stopped != "max_steps" and step > last_saved["step"]:
            save(step)
        if stopped.startswith("signal:"):
            signum = int(stopped.split(":")[1])
            message = (f"stopped by {signal_name(signum)} at step {step} of {run_dir}; checkpoint "
                       f"{last_saved['path']}; resume with the same command")
            log.info(message, echo=False)
            raise Preempted(message, signum)
        if stopped == "time_budget":
            log.info(f"time budget of {budget:.0f}s nearly used at step {step} of {max_steps}: saved; run the same "
                     "command again to continue")
        return result(stopped, last_loss)
    finally:
        log.close()


def _optimizer_step(cfg, step, indices, plan, rank, world, images, vae, loss_fn, opt_ae, opt_d, scaler, ae_params,
                    latent_shape, precision, device, feature_net, feature_input) -> dict[str, float]:
    """One autoencoder step and one discriminator step over this process's micro-batches; the step's log."""
    logs: dict[str, float] = {}
    micro = [(lo, hi) for lo, hi in plan.micro_slices(rank)]
    per_process = plan.micro_batch * plan.accum_steps
    batches = []
    # Autoencoder: encode, sample z with the sample's own noise, decode, the loss; gradients accumulate.
    for lo, hi in micro:
        x, eps = build_batch(images, indices[lo:hi].tolist(), step, lo, seed=cfg.train.seed, latent_shape=latent_shape)
        x, eps = x.to(device), eps.to(device)
        with autocast(device, precision):
            posterior = vae.encode(x)
            z = posterior.mean + posterior.std * eps  # = posterior.sample(), noise drawn per sample
            rec = vae.decode(z)
            feats = (foundation_features(feature_net, x, grid=z.shape[-2:], input_size=feature_input)
                     if loss_fn.vf is not None else None)
            loss, log = loss_fn.autoencoder_loss(x, rec.float(), posterior, step, vae.decoder.conv_out.weight, z=z,
                                                 features=feats, encoder_last_layer=vae.encoder.conv_out.weight)
        scaler.scale(loss * ((hi - lo) / per_process)).backward()
        batches.append((x, rec.detach()))
        for key in ("total_loss", *LOG_KEYS):
            if key in log:
                logs["loss" if key == "total_loss" else key] = logs.get(
                    "loss" if key == "total_loss" else key, 0.0) + float(log[key]) * (hi - lo) / per_process
    _average_gradients(ae_params, world)
    scaler.unscale_(opt_ae)
    if cfg.train.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(ae_params, cfg.train.max_grad_norm)
    scaler.step(opt_ae)
    opt_ae.zero_grad(set_to_none=True)
    # Discriminator: its hinge loss from disc_start on; before, upstream steps its Adam on a zero loss.
    if opt_d is not None:
        if loss_fn.gan_active(step):
            for x, rec in batches:
                with autocast(device, precision):
                    d_loss, d_log = loss_fn.discriminator_loss(x, rec, step)
                scaler.scale(d_loss * (x.shape[0] / per_process)).backward()
                logs["disc_loss"] = logs.get("disc_loss", 0.0) + float(d_log["disc_loss"]) * x.shape[0] / per_process
            _average_gradients(list(loss_fn.discriminator.parameters()), world)
        else:
            for p in loss_fn.discriminator.parameters():
                p.grad = torch.zeros_like(p)
        scaler.step(opt_d)
        opt_d.zero_grad(set_to_none=True)
    scaler.update()
    return logs
