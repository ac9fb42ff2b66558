"""Tokenizer training (step 9): a VA-VAE-architecture autoencoder on an image folder, on the one engine.

Upstream (hustvl/LightningDiT `vavae/`, LDM's AutoencoderKL + LPIPSWithDiscriminator) trains per step:
encode, sample z from the posterior, decode, the autoencoder loss (rec + KL + LPIPS + adaptive GAN + VF,
`repro.tokenizer.losses`) with one Adam (lr, betas (0.5, 0.9)), then the discriminator's hinge loss with
a second Adam. This trainer adds only that step and its modules to the engine (`repro.training.engine`),
which brings what step 7 has: exact resume (the draws of every sample are seeded per (seed, step,
position), `repro.tokenizer_training.data`), background checkpoint saves, DDP or FSDP2 over torchrun
(gloo on CPU), compile on CUDA, the time budget, SIGTERM/SIGINT, TensorBoard and W&B, and

- `tokenizer.safetensors` next to the checkpoints at every save: the inference weights (the EMA's when
  `train.ema_decay` is set) with their architecture in the header (`repro.tokenizer.loader`), what a DiT
  config names with `vae.model_name: custom`;
- `log.jsonl`, `log.txt`, `loss.png`: total loss, rec, KL, LPIPS, GAN, VF.

    result = train_tokenizer(load_tokenizer_config("configs/tokenizer/digits_f4.yaml"))
    result["tokenizer"], result["dit_overrides"]
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from repro import paths
from repro.errors import ConfigError, ReproError
from repro.tokenizer.loader import downsample_ratio, save_tokenizer
from repro.tokenizer.vf_loss import foundation_features
from repro.tokenizer_training.config import TokenizerConfig, save_tokenizer_config
from repro.tokenizer_training.data import TokenizerImages, build_batch
from repro.tokenizer_training.modules import build_autoencoder, build_loss
from repro.training.batches import plan_batches
from repro.training.step import lr_factor
from repro.training.engine import Trainer, run_dir_of, run_training
from repro.utils import distributed as dist
from repro.utils.hardware import autocast

TOKENIZER_FILE = "tokenizer.safetensors"
LOG_KEYS = ("rec_loss", "kl_loss", "p_loss", "g_loss", "d_weight", "vf_loss", "vf_weight", "disc_loss")


def train_tokenizer(cfg: TokenizerConfig, *, time_budget: Optional[float] = None,
                    feature_net: Optional[torch.nn.Module] = None, device: Optional[str] = None) -> dict:
    """Train until train.max_steps / max_epochs (or the time budget); returns step, checkpoint, tokenizer,
    run_dir, stopped, loss and `dit_overrides` (the DiT config lines that use this tokenizer)."""
    return run_training(TokenizerTrainer(cfg, feature_net), time_budget=time_budget, device=device)


class OptimizerSet:
    """The autoencoder's Adam and the discriminator's, saved as one {'ae', 'disc'} optimizer state."""

    def __init__(self, ae: torch.optim.Optimizer, disc: Optional[torch.optim.Optimizer]):
        self.optimizers = {"ae": ae, "disc": disc}

    @property
    def param_groups(self) -> list[dict]:
        """The autoencoder's groups as they are now (load_state_dict replaces the list: a copy taken at
        construction would show the starting lr in the log after a resume)."""
        return self.optimizers["ae"].param_groups

    def state_dict(self) -> dict:
        return {k: o.state_dict() if o is not None else {} for k, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for key, o in self.optimizers.items():
            if o is not None:
                o.load_state_dict(state[key])


class AutoencoderPass(torch.nn.Module):
    """Encode, sample z with each sample's own noise, decode: one module call, so it can be compiled."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        posterior = self.vae.encode(x)  # (N, 2C, h, w) moments
        z = posterior.mean + posterior.std * eps  # = posterior.sample(), noise drawn per sample
        return posterior, z, self.vae.decode(z)  # rec (N, 3, H, W)


class TokenizerTrainer(Trainer):
    """The autoencoder, its loss parts and its two optimizers: what the engine needs from step 9."""

    what = "tokenizer"
    kit_info = {"kind": "tokenizer"}
    nan_advice = "Lower train.lr, set train.max_grad_norm, or train in fp32"

    def __init__(self, cfg: TokenizerConfig, feature_net: Optional[torch.nn.Module] = None):
        self.cfg, self.feature_net = cfg, feature_net
        self.run_dir = run_dir_of(cfg)
        self.seed = cfg.train.seed
        self.tokenizer_path = self.run_dir / TOKENIZER_FILE
        self.window: dict[str, float] = {}
        self.window_steps, self.last_loss = 0, None

    # --- The images, the batch plan, how long ------------------------------------------------------
    def open(self, ctx) -> None:
        cfg, t = self.cfg, self.cfg.train
        if not cfg.data.image_folder:
            raise ReproError("tokenizer config key 'data.image_folder' is not set: pass --set data.image_folder=DIR "
                             "(one sub-folder per class, as step 6 reads)")
        if t.strategy == "fsdp" and (cfg.loss.disc_start is not None or (cfg.loss.vf is not None and cfg.loss.adaptive_vf)):
            # the adaptive weights differentiate w.r.t. one layer's weight, which FSDP2 frees after its forward
            raise ConfigError("train.strategy=fsdp trains the tokenizer without the PatchGAN and the adaptive VF weight "
                              "(both take gradients of a single layer's weight): set loss.disc_start=null and "
                              "loss.adaptive_vf=false, or train.strategy=ddp")
        self.images = TokenizerImages(paths.runs_path(cfg.data.image_folder), cfg.data.image_size, cfg.data.crop,
                                      cfg.data.random_flip, note=lambda m: ctx.note(m) if ctx.main
                                      else print(f"[rank {ctx.rank}] {m}", flush=True))
        self.plan = plan_batches(SimpleNamespace(global_batch_size=t.global_batch_size,
                                                 micro_batch_size=t.micro_batch_size, grad_accum_steps=1), ctx.world)
        if len(self.images) < self.plan.global_batch:
            raise ReproError(f"{self.images.src.root} holds {len(self.images)} images, fewer than "
                             f"train.global_batch_size={self.plan.global_batch}: add images or lower "
                             "train.global_batch_size")
        order_steps = len(self.images) // self.plan.global_batch
        self.max_steps = t.max_steps if t.max_steps is not None else (t.max_epochs or 0) * order_steps
        if self.max_steps < 1:
            raise ReproError("set tokenizer config key 'train.max_steps' (or train.max_epochs): how long to train")
        self.num_items, self.data_dir = len(self.images), self.images.src.root

    # --- Modules, loss parts, optimizers, EMA (the same initial weights on every process) ----------
    def build(self, ctx, strategy, kind) -> None:
        cfg, t, device = self.cfg, self.cfg.train, ctx.device
        vae = build_autoencoder(cfg, note=ctx.note, initial=kind is None).to(device)  # a resume loads its checkpoint
        self.loss_fn, self.feature_net, self.feature_input = build_loss(cfg, device, self.feature_net, note=ctx.note)
        disc, vf = self.loss_fn.discriminator, self.loss_fn.vf
        # what a tokenizer checkpoint's 'model' holds: `vae.*`, `disc.*` (PatchGAN), `vf.*` (VF projection)
        parts = {"vae": vae, "disc": disc, "vf": vf}
        self.model = torch.nn.ModuleDict({k: m for k, m in parts.items() if m is not None})
        # fsdp: every trained module a unit whose forward runs (encode/decode call these, not vae.forward)
        strategy.shard(self.model, [m for m in (vae.encoder, vae.quant_conv, vae.post_quant_conv, vae.decoder, disc, vf)
                                    if m is not None])
        self.vae = self.ema_source = vae
        self.ae_params = list(vae.parameters()) + (list(vf.parameters()) if vf is not None else [])
        opt_ae = torch.optim.Adam(self.ae_params, lr=t.lr, betas=(t.beta1, t.beta2))
        opt_d = torch.optim.Adam(disc.parameters(), lr=t.lr, betas=(t.beta1, t.beta2)) if disc is not None else None
        self.opt = OptimizerSet(opt_ae, opt_d)
        self.ema = strategy.make_ema(vae, t.ema_decay, on_cpu=t.ema_on_cpu) if t.ema_decay is not None else None
        with torch.no_grad():
            size = cfg.data.image_size
            self.latent_shape = tuple(vae.encode(torch.zeros(1, 3, size, size, device=device)).mean.shape[1:])
        self.encode_decode = self.compiled(AutoencoderPass(vae), ctx, "tokenizer training")
        self.strategy, self.ctx = strategy, ctx
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def save_config(self, path: Path) -> None:
        save_tokenizer_config(self.cfg, path, header=f"resolved tokenizer config of {self.run_dir} (step 9)")

    def describe(self, ctx, order) -> list[str]:
        cfg, fn = self.cfg, self.loss_fn
        n_params = sum(p.numel() for p in self.vae.parameters())
        parts = (("LPIPS", fn.lpips), ("PatchGAN", fn.discriminator), ("VF", fn.vf))
        return [f"run folder {self.run_dir}; autoencoder f{downsample_ratio(cfg.arch())} with {cfg.model.embed_dim} "
                f"latent channels ({n_params / 1e6:.2f}M parameters) on {self.images.describe()}; latents "
                f"{self.latent_shape}; {self.max_steps} steps ({order.steps_per_epoch} per epoch); loss rec "
                f"({cfg.loss.rec_loss}) + KL{''.join(' + ' + p for p, m in parts if m is not None)}"]

    # --- The steps ----------------------------------------------------------------------------------
    def train_step(self, step: int, order) -> None:
        """One autoencoder step and one discriminator step over this process's micro-batches, then the EMA."""
        ctx, plan, fn, scaler, t = self.ctx, self.plan, self.loss_fn, self.scaler, self.cfg.train
        factor = lr_factor(step, self.max_steps, t.warmup_steps, t.lr_schedule)
        for opt in self.opt.optimizers.values():
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = t.lr * factor
        indices, next_position = order.peek(order.position)
        opt_ae, opt_d = self.opt.optimizers["ae"], self.opt.optimizers["disc"]
        logs: dict[str, float] = {}
        per_process = plan.micro_batch * plan.accum_steps
        batches = []
        # The discriminator is frozen during the autoencoder's pass: the generator term -D(rec) must reach the
        # decoder only, never D's own gradients (upstream: Lightning's toggle_optimizer does the same).
        if fn.discriminator is not None:
            fn.discriminator.requires_grad_(False)
        # Autoencoder: encode, sample z with the sample's own noise, decode, the loss; gradients accumulate.
        for lo, hi in plan.micro_slices(ctx.rank):
            x, eps = (v.to(ctx.device) for v in build_batch(self.images, indices[lo:hi].tolist(), step, lo,
                                                            seed=self.seed, latent_shape=self.latent_shape))
            with autocast(ctx.device, ctx.precision):
                posterior, z, rec = self.encode_decode(x, eps)
                feats = (foundation_features(self.feature_net, x, grid=z.shape[-2:], input_size=self.feature_input)
                         if fn.vf is not None else None)
                loss, log = fn.autoencoder_loss(x, rec.float(), posterior, step, self.vae.decoder.conv_out.weight, z=z,
                                                features=feats, encoder_last_layer=self.vae.encoder.conv_out.weight)
            scaler.scale(loss * ((hi - lo) / per_process)).backward()
            batches.append((x, rec.detach()))
            for key in ("total_loss", *LOG_KEYS):
                if key in log:
                    name = "loss" if key == "total_loss" else key
                    logs[name] = logs.get(name, 0.0) + float(log[key]) * (hi - lo) / per_process
        self.strategy.reduce_gradients(self.ae_params)
        scaler.unscale_(opt_ae)
        if t.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.ae_params, t.max_grad_norm)
        scaler.step(opt_ae)
        opt_ae.zero_grad(set_to_none=True)
        # Discriminator: its hinge loss from disc_start on; before, upstream steps its Adam on a zero loss.
        if opt_d is not None:
            fn.discriminator.requires_grad_(True)
            if fn.gan_active(step):
                for x, rec in batches:
                    with autocast(ctx.device, ctx.precision):
                        d_loss, d_log = fn.discriminator_loss(x, rec, step)
                    scaler.scale(d_loss * (x.shape[0] / per_process)).backward()
                    logs["disc_loss"] = logs.get("disc_loss", 0.0) + float(d_log["disc_loss"]) * x.shape[0] / per_process
                self.strategy.reduce_gradients(list(fn.discriminator.parameters()))
            else:
                for p in fn.discriminator.parameters():
                    p.grad = torch.zeros_like(p)
            scaler.step(opt_d)
            opt_d.zero_grad(set_to_none=True)
        scaler.update()
        order.position = next_position
        if self.ema is not None:
            self.ema.update()
        for key, value in logs.items():
            self.window[key] = self.window.get(key, 0.0) + value
        self.window_steps += 1
        # the first step with a non-finite loss (read on the device only then)
        if not all(math.isfinite(v) for v in logs.values()) and self.first_bad < 0:
            self.first_bad.fill_(step)

    def log_values(self, ctx) -> dict:
        keys = sorted(self.window)
        means = dist.all_reduce_values([self.window[k] / self.window_steps for k in keys], "sum")
        row = {k: v / ctx.world for k, v in zip(keys, means)}
        self.last_loss = row["loss"]
        self.window, self.window_steps = {}, 0
        return row

    def export(self, state: dict, step: int) -> None:
        """`tokenizer.safetensors` (rank 0, at every save): the EMA's weights when there is one."""
        weights = state["ema"] if self.ema is not None else {k[len("vae."):]: v for k, v in state["model"].items()
                                                              if k.startswith("vae.")}
        save_tokenizer(weights, self.cfg.arch(), self.tokenizer_path,
                       info={"step": step, "weights": "ema" if self.ema is not None else "model",
                             "image_size": self.cfg.data.image_size, "class_names": self.images.src.class_names})
        self.ctx.note(f"wrote {self.tokenizer_path} (step {step})")

    # --- The result -----------------------------------------------------------------------------------
    def final_loss(self, ctx) -> Optional[float]:
        return self.last_loss

    def done_line(self, result: dict) -> str:
        return (f"done: step {result['step']} ({result['stopped']}); tokenizer {result['tokenizer']}; use it in a DiT "
                f"config with --set {' '.join(result['dit_overrides'])}")

    def written(self, result: dict) -> list:
        return [*super().written(result), result["tokenizer"]]

    def result(self, out: dict) -> dict:
        cfg, path = self.cfg, self.tokenizer_path
        overrides = ["vae.model_name=custom", f"vae.ckpt_path={path}", f"vae.downsample_ratio={downsample_ratio(cfg.arch())}",
                     f"vae.ch={cfg.model.ch}", f"model.in_chans={cfg.model.embed_dim}",
                     f"data.image_size={cfg.data.image_size}"]
        return {**out, "tokenizer": str(path) if path.is_file() else None, "loss_plot": str(self.run_dir / "loss.png"),
                "dit_overrides": overrides, "latent_shape": list(getattr(self, "latent_shape", ())),
                "class_names": self.images.src.class_names}
