"""The sampling engine: model + VA-VAE + latent statistics from a resolved Config, precision for the
hardware, one batch of latents, decoding to pixels, batch size from free memory, peak memory.

    setup = build_sampler(cfg)                       # checks every path first, loads strictly
    x = sample_latents(setup, noise, labels)         # the core ODE sampler, under autocast
    pixels = decode_to_uint8(setup, x)               # (B, H, W, 3) uint8, as upstream decode_to_images

Precision: the transformer runs in `sample.precision`: fp32 by default, as upstream inference.py
(issue 12); `auto` (an opt-in) is bf16 autocast where the GPU has native bf16, else fp16, fp32 on CPU;
--precision overrides. The ODE state stays fp32. The VA-VAE
decodes in `vae.precision` (fp32 by default: the images then match an fp32 decode within 1 level).
TF32 matmuls are enabled on Ampere and newer, as upstream inference.py does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from repro.config import Config
from repro.data.stats import GLOBAL_SCALINGS, SCALE_NAME, STATS_NAME, load_latent_stats, read_scale_file, scale_of
from repro.errors import ReproError
from repro.tokenizer.loader import VFM_VAE
from repro.transport import DDPM_METHODS, METHODS, is_ddpm, sample_ode
from repro.transport import process
from repro.utils.hardware import (CompiledOrEager, GiB, autocast, compile_mode, configure_backends, default_device,
                                  resolve_precision, use_compile_cache)

DECODE_CHUNK = 16  # VA-VAE decode sub-batch: bounds decoder activations (~0.2 GB per 256 px image in fp32)
MAX_AUTO_BATCH = 1024


@dataclass
class SamplerSetup:
    cfg: Config
    model: torch.nn.Module  # what sampling calls (compiled when asked)
    eager_model: torch.nn.Module
    vae: Optional[torch.nn.Module]  # None: latents only (training grids without a VA-VAE)
    mean: Optional[torch.Tensor]  # (1, C, 1, 1) on device; None when latent_norm is off
    std: Optional[torch.Tensor]
    device: torch.device
    precision: str  # transformer autocast: fp32 | bf16 | fp16
    vae_precision: str
    latent_shape: tuple[int, int, int]  # (C, h, w)
    num_classes: int
    scale: Optional[float] = None  # kit (issue 23): data.latent_scaling global(_means)'s factor 1/sigma


# ---------------------------------------------------------------------------------------------
# Compilation


def compile_for_sampling(model: torch.nn.Module, compile, device: torch.device):
    """The model sampling calls: compiled with CUDA graphs on a GPU by default (`compile` None/"auto":
    the step's shapes are fixed, so `reduce-overhead` captures each as a graph), eager on the CPU; or as
    asked (False/"none" eager, True/"default", a torch.compile mode). Falls back to eager with one line
    if compiling fails (`repro.utils.hardware.CompiledOrEager`)."""
    mode = compile_mode(compile, device, auto="reduce-overhead")
    if mode is None:
        return model
    from repro.utils.distributed import print0
    from repro.paths import runs_dir

    use_compile_cache(runs_dir() / "compile_cache")
    return CompiledOrEager(model, mode, "sampling", note=print0)


def warm_up(setup: SamplerSetup, batch_size: int) -> Optional[float]:
    """Compile (or capture) the model at the run's shapes before the timed loop; returns the seconds it
    took, or None for an eager model. Shapes: B rows where guidance is off, 2B rows where it is on."""
    if not isinstance(setup.model, CompiledOrEager):
        return None
    import time

    from repro.utils.distributed import print0

    c, h, w = setup.latent_shape
    rows = [batch_size] + ([2 * batch_size] if setup.cfg.sample.cfg_scale > 1.0 else [])
    start = time.perf_counter()
    with torch.inference_mode(), autocast(setup.device, setup.precision):
        for n in rows:
            for _ in range(3):  # CUDA graphs are recorded after a warm-up call, then replayed
                setup.model(torch.zeros(n, c, h, w, device=setup.device), torch.zeros(n, device=setup.device),
                            torch.zeros(n, dtype=torch.int64, device=setup.device))
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
    seconds = time.perf_counter() - start
    state = "eager after a compile failure" if setup.model.failed else "compiled"
    print0(f"sampling model {state} at batch {batch_size} in {seconds:.1f}s (cache: "
           f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'torch default')}); this is paid once per process")
    return seconds


# ---------------------------------------------------------------------------------------------
# Inputs


def stats_path(cfg: Config) -> Path:
    """`data.data_path/latents_stats.pt` (upstream), or data.data_path itself if it names a .pt file."""
    if not cfg.data.data_path:
        raise ReproError("config key 'data.data_path' is not set: point it at the folder holding "
                         f"{STATS_NAME} (python -m steps.step2_download --only latents-stats)")
    p = Path(cfg.data.data_path).expanduser()
    return p if p.suffix == ".pt" else p / STATS_NAME

# VFM-VAE's LightningDiT checkpoints are on the Hub, but upstream names no file, so no asset lists them (not guessed).
VFM_DIT_HINT = ("download a LightningDiT checkpoint trained on VFM-VAE latents from https://huggingface.co/tiancibi/"
                "VFM-VAE/tree/main/checkpoints_imagenet256/diffusions/lightningdit_with_vfm_vae (or train one with "
                "configs/train/vfm_vae_lightningdit_xl_stage_0.yaml) and set ckpt_path to it")


def check_inputs(cfg: Config) -> None:
    """Every file and sampler setting the run needs, checked before anything heavy is loaded."""
    # The three input files, each missing one named with the step-2 asset that provides it.
    files = {"ckpt_path": cfg.ckpt_path, "vae.ckpt_path": cfg.vae.ckpt_path}
    vfm = cfg.vae.model_name == VFM_VAE
    hints = {"ckpt_path": VFM_DIT_HINT if vfm else "run `python -m steps.step2_download --only lightningdit-xl-800ep`",
             "vae.ckpt_path": f"run `python -m steps.step2_download --only {'vfm-vae' if vfm else 'vavae-f16d32'}`"}
    for key, value in files.items():
        if not value:
            raise ReproError(f"config key '{key}' is not set: give the file, or {hints[key]} and step 3")
        if not Path(value).expanduser().is_file():
            raise ReproError(f"{key} not found: {value} (config key '{key}'); fix the path or {hints[key]}")
    if cfg.data.latent_scaling in GLOBAL_SCALINGS:  # kit (issue 23): one factor, no per-channel statistics
        latent_scale_of(cfg)
    elif not (sp := stats_path(cfg)).is_file():
        raise ReproError(f"latent statistics not found: {sp} (config key 'data.data_path'); run "
                         "`python -m steps.step2_download --only latents-stats` or step 5 to compute them")
    # Sampler settings the kit does not implement are refused, never ignored.
    s = cfg.sample
    if s.mode != "ODE":
        raise ReproError(f"config key 'sample.mode' is {s.mode!r}: only 'ODE' sampling exists (as upstream)")
    methods = DDPM_METHODS if is_ddpm(cfg.transport) else METHODS  # kit (issue 23): the process's samplers
    if s.sampling_method not in methods:
        raise ReproError(f"config key 'sample.sampling_method' is {s.sampling_method!r}; choose one of "
                         f"{', '.join(methods)}")
    if s.reverse or s.likelihood:
        raise ReproError("config keys 'sample.reverse' / 'sample.likelihood' must be false to generate images")
    if s.sampling_method not in ("dopri5", *DDPM_METHODS) and s.num_sampling_steps < 2:
        raise ReproError(f"config key 'sample.num_sampling_steps' must be >= 2, got {s.num_sampling_steps}")
    if s.cfg_channels is not None and not 1 <= s.cfg_channels <= cfg.model.in_chans:
        raise ReproError(f"config key 'sample.cfg_channels' must be in [1, {cfg.model.in_chans}] or null, "
                         f"got {s.cfg_channels}")


def latent_scale_of(cfg: Config) -> Optional[float]:
    """kit (issue 23): the global factor of `data.latent_scaling` global(_means): `data.latent_scale` (a
    training run's config.yaml records it), else `latents_scale.json` beside the statistics; None for channel."""
    d = cfg.data
    if d.latent_scaling not in GLOBAL_SCALINGS:
        return None
    if d.latent_scale is not None:
        return float(d.latent_scale)
    path = stats_path(cfg).parent / SCALE_NAME
    record = read_scale_file(path)
    if record is None:
        raise ReproError(f"data.latent_scaling is {d.latent_scaling} and data.latent_scale is null, but {path} does not "
                         "exist: set data.latent_scale to the factor the model was trained with (its run's "
                         "config.yaml records it), or write the file with step 5 --recompute on the latent shards")
    return scale_of(record, d.latent_scaling, str(path))


def build_sampler(cfg: Config, device: Optional[str | torch.device] = None, precision: Optional[str] = None,
                  compile: Optional[str | bool] = None) -> SamplerSetup:
    """Load the LightningDiT checkpoint (EMA, strict), the VA-VAE and the latent statistics."""
    from repro.models.checkpoint import load_checkpoint
    from repro.models.denoisers import build_denoiser
    from repro.tokenizer.loader import load_vae

    # Every path and setting checked before anything heavy loads; precisions refused now if impossible.
    check_inputs(cfg)
    device = torch.device(device) if device is not None else default_device()
    prec = resolve_precision(precision or cfg.sample.precision, device,
                             "--precision" if precision else "sample.precision")
    resolve_precision(cfg.vae.precision, device, "vae.precision")  # refused now, before anything loads
    configure_backends(device)
    # Statistics, the DiT (EMA weights, strict) and the VA-VAE, which must agree on the channel count.
    latent = cfg.data.image_size // cfg.vae.downsample_ratio
    scale = latent_scale_of(cfg)  # kit (issue 23): global scaling reads no latents_stats.pt
    mean, std = load_latent_stats(stats_path(cfg), cfg.model.in_chans) if scale is None else (None, None)
    model = build_denoiser(cfg.model, latent, cfg.data.num_classes, cfg.transport.process)
    load_checkpoint(model, cfg.ckpt_path)
    model = model.eval().requires_grad_(False).to(device)
    vae = load_vae(cfg.vae, device=device, encoder=False)  # decodes only (VFM-VAE: no SigLIP2 tower)
    if getattr(vae, "embed_dim", cfg.model.in_chans) != cfg.model.in_chans:
        raise ReproError(f"the tokenizer {cfg.vae.ckpt_path} makes {vae.embed_dim}-channel latents but "
                         f"model.in_chans is {cfg.model.in_chans}: set model.in_chans={vae.embed_dim}")
    # The sampler calls the compiled model when asked; the eager one stays for memory probes.
    setup = sampler_from_parts(cfg, compile_for_sampling(model, compile, device), device=device, precision=prec,
                               vae=vae, stats=(mean, std) if scale is None else None, scale=scale)
    setup.eager_model = model
    return setup


def sampler_from_parts(cfg: Config, model: torch.nn.Module, *, device: torch.device, precision: str = "fp32",
                       vae: Optional[torch.nn.Module] = None,
                       stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                       scale: Optional[float] = None) -> SamplerSetup:
    """A SamplerSetup around a model already in memory (training's EMA grids): no files are read.

    `stats` (mean, std) de-normalise latents for `vae`; without a VA-VAE only latents can be sampled. A
    global `data.latent_scaling` needs its factor: `scale`, else `data.latent_scale` (step 7 fills it in)."""
    if cfg.data.latent_scaling in GLOBAL_SCALINGS and scale is None:
        if cfg.data.latent_scale is None:
            raise ReproError(f"data.latent_scaling is {cfg.data.latent_scaling} but data.latent_scale is null: "
                             "give the factor the model was trained with")
        scale = float(cfg.data.latent_scale)
    latent = cfg.data.image_size // cfg.vae.downsample_ratio
    mean, std = (s.to(device) for s in stats) if stats is not None else (None, None)
    vae_prec = resolve_precision(cfg.vae.precision, device, "vae.precision")
    return SamplerSetup(cfg=cfg, model=model, eager_model=model, vae=vae, mean=mean, std=std, device=device,
                        precision=precision, vae_precision=vae_prec, latent_shape=(cfg.model.in_chans, latent, latent),
                        num_classes=cfg.data.num_classes,
                        scale=scale if cfg.data.latent_scaling in GLOBAL_SCALINGS else None)


# ---------------------------------------------------------------------------------------------
# Sampling and decoding


def sample_latents(setup: SamplerSetup, noise: torch.Tensor, labels: torch.Tensor,
                   stats: Optional[dict] = None, model: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """Run the config's ODE sampler from `noise` (B, C, h, w) with `labels` (B,); fp32 latents on device."""
    s = setup.cfg.sample
    z = noise.to(setup.device, torch.float32, non_blocking=True)
    y = labels.to(setup.device, torch.int64, non_blocking=True)
    if is_ddpm(setup.cfg.transport):
        return _sample_ddpm(setup, noise, z, y, stats, model)
    with torch.inference_mode(), autocast(setup.device, setup.precision):
        x = sample_ode(model or setup.model, z, y, method=s.sampling_method, num_steps=s.num_sampling_steps,
                       timestep_shift=s.timestep_shift, cfg_scale=s.cfg_scale,
                       cfg_interval_start=s.cfg_interval_start, null_class=setup.num_classes,
                       cfg_channels=s.cfg_channels, atol=s.atol, rtol=s.rtol, stats=stats)
    return x.float()


def step_generators(noise: torch.Tensor) -> list[torch.Generator]:
    """kit (issue 23): one generator per image for a stochastic sampler's step noise, seeded from the image's own
    starting noise (itself a function of (seed, index) only), so an image never depends on its batch."""
    import hashlib

    from repro.utils.seeding import seed_from

    rows = noise.detach().to("cpu", torch.float32).contiguous().numpy()
    return [torch.Generator().manual_seed(seed_from("repro-ddpm-steps", hashlib.sha256(r.tobytes()).hexdigest()))
            for r in rows]


def _sample_ddpm(setup: SamplerSetup, noise, z, y, stats, model, on_clean=None) -> torch.Tensor:
    s = setup.cfg.sample
    stochastic = s.sampling_method == "ddpm" or s.eta > 0
    with torch.inference_mode(), autocast(setup.device, setup.precision):
        x = process.sample(model or setup.model, z, y, setup.cfg.transport, s, null_class=setup.num_classes,
                           stats=stats, generators=step_generators(noise) if stochastic else None, on_clean=on_clean)
    return x.float()


# kit (issue 13): x0 trajectories. The kit's convention: t = 0 is noise, t = 1 data, x_t = t x1 + (1 - t) x0 and
# v = x1 - x0, so the model's prediction of the clean sample at (x_t, t) is x1_hat = x_t + (1 - t) v.


def trajectory_steps(num_steps: int, k: int, method: str = "euler") -> list[int]:
    """K grid points (indices of the sampler's steps, evenly spread from the first to the last) at which a
    trajectory strip shows the predicted clean sample. The grid has num_steps points and num_steps - 1 steps."""
    from repro.transport.ode import FIXED_METHODS

    if method in DDPM_METHODS:  # kit (issue 23): DDIM/DDPM take num_steps steps, each with its own x̂
        num_steps += 1
    elif method not in FIXED_METHODS:
        raise ReproError(f"--trajectory reads the predicted sample at the grid points of a fixed-step sampler "
                         f"({', '.join(FIXED_METHODS)}); sample.sampling_method is {method!r}")
    total = num_steps - 1
    if not 1 <= k <= total:
        raise ReproError(f"--trajectory {k}: choose 1 to {total} (the sampler takes {total} steps)")
    return sorted({round(i * (total - 1) / max(k - 1, 1)) for i in range(k)}) if k > 1 else [total - 1]


class _CleanPredictions:
    """Wraps the model for one batch: at the first model call of each chosen step it keeps x + (1 - t) v,
    v being the velocity the sampler integrates (guided where guidance is on, as `guided_velocity`)."""

    def __init__(self, model, steps: list[int], calls_per_step: int, batch: int, sample_cfg):
        self.model, self.steps, self.calls_per_step, self.batch, self.s = model, set(steps), calls_per_step, batch, sample_cfg
        self.calls, self.kept = 0, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from repro.transport import combine_cfg

        out = self.model(x, t, y)
        call, self.calls = self.calls, self.calls + 1
        if call % self.calls_per_step == 0 and call // self.calls_per_step in self.steps:
            if x.shape[0] == 2 * self.batch:  # guided: (cond, uncond) halves, combined as the sampler does
                cond, uncond = out.float().chunk(2)
                v = combine_cfg(cond, uncond, self.s.cfg_scale, self.s.cfg_channels)
            else:
                v = out.float()
            self.kept.append((x[:self.batch].float() + (1.0 - float(t[0])) * v).clone())
        return out


def sample_latents_with_trajectory(setup: SamplerSetup, noise: torch.Tensor, labels: torch.Tensor,
                                   steps: list[int], stats: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(final latents (B, C, h, w), predicted clean latents (B, K, C, h, w) at the grid steps `steps`): the same
    sampler run as `sample_latents`, so the final latents are the ones it returns."""
    from repro.transport import model_rows_per_sample

    s = setup.cfg.sample
    if is_ddpm(setup.cfg.transport):  # the sampler's own x̂ of each chosen step (kit: issue 23)
        kept, wanted = [], set(steps)
        keep = lambda i, x_hat: kept.append(x_hat[:noise.shape[0]].float().clone()) if i in wanted else None  # noqa: E731
        z = noise.to(setup.device, torch.float32)
        x = _sample_ddpm(setup, noise, z, labels.to(setup.device, torch.int64), stats, None, on_clean=keep)
        return x, torch.stack(kept, dim=1)
    calls_per_step = model_rows_per_sample(2, s.sampling_method)[0]  # model calls of one step, guidance off
    recorder = _CleanPredictions(setup.model, steps, calls_per_step, noise.shape[0], s)
    x = sample_latents(setup, noise, labels, stats, model=recorder)
    return x, torch.stack(recorder.kept, dim=1)


def decode_strips(setup: SamplerSetup, predictions: torch.Tensor, first_index: int = 0) -> np.ndarray:
    """(B, K, C, h, w) predicted latents -> (B, H, K * W, 3) uint8 strips, left = noisiest step."""
    b, k = predictions.shape[:2]
    check_finite_latents(setup, predictions, first_index)  # per image: rows of the flattened (B*K) are not images
    pixels = decode_to_uint8(setup, predictions.flatten(0, 1), first_index=first_index)  # (B*K, H, W, 3)
    h, w = pixels.shape[1:3]
    return pixels.reshape(b, k, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(b, h, k * w, 3)


def denormalize(setup: SamplerSetup, x: torch.Tensor) -> torch.Tensor:
    """Model latents -> VA-VAE latents: upstream `(x * std) / latent_multiplier + mean`; kit (issue 23): a
    global scaling's `x / latent_multiplier / scale` (the dataset's `x * scale * latent_multiplier` undone)."""
    d = setup.cfg.data
    if d.latent_norm:
        return (x * setup.std) / d.latent_multiplier + setup.mean
    if setup.scale is not None:
        return x / d.latent_multiplier / setup.scale
    return x / d.latent_multiplier  # training scaled by the multiplier only


_NON_FINITE_HINTS = {
    "fp16": "fp16 overflowed (GPUs without bf16, e.g. T4/P100): sample with --precision fp32 into a new --out",
    "bf16": "sample with --precision fp32 into a new --out; if fp32 fails too, ckpt_path or the latent statistics "
            "in data.data_path hold NaN/inf",
    "fp32": "ckpt_path or the latent statistics in data.data_path hold NaN/inf values, or the sampler settings "
            "diverge (sample.cfg_scale, sample.timestep_shift)",
}


def check_finite_latents(setup: SamplerSetup, x: torch.Tensor, first_index: int = 0) -> None:
    """A ReproError naming the images whose latents hold NaN/inf (they would decode to garbage silently)."""
    ok = torch.isfinite(x).flatten(1).all(dim=1)
    if bool(ok.all()):
        return
    bad = [first_index + int(i) for i in (~ok).nonzero().flatten().tolist()]
    shown = ", ".join(map(str, bad[:8])) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
    raise ReproError(f"the sampler produced NaN/inf latents for image(s) {shown} ({setup.precision} transformer); "
                     f"nothing was written for them: {_NON_FINITE_HINTS.get(setup.precision, '')}")


def decode_to_uint8(setup: SamplerSetup, x: torch.Tensor, chunk: int = DECODE_CHUNK, first_index: int = 0) -> np.ndarray:
    """Latents (B, C, h, w) -> (B, H, W, 3) uint8 pixels (upstream decode_to_images), `chunk` at a time.

    Non-finite latents are refused first (`first_index` numbers the batch's images in the message)."""
    from repro.tokenizer.images import to_uint8

    check_finite_latents(setup, x, first_index)
    out = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], chunk):
            z = denormalize(setup, x[start:start + chunk].to(setup.device, torch.float32))
            with autocast(setup.device, setup.vae_precision):
                images = setup.vae.decode(z)
            out.append(to_uint8(images).numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# Memory


def oom_error(batch_size: int, setup: SamplerSetup, exc: BaseException) -> ReproError:
    where = "GPU" if setup.device.type == "cuda" else "CPU RAM"
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    lower = max(1, batch_size // 2)
    extra = "" if setup.precision != "fp32" or setup.device.type != "cuda" else ", or --precision bf16/fp16"
    return ReproError(f"a batch of {batch_size} images per process does not fit in {where} ({first}): "
                      f"lower --batch-size (e.g. --batch-size {lower}){extra}")


def auto_batch_size(setup: SamplerSetup, limit: int) -> tuple[int, str]:
    """The largest batch that fits the GPU's free memory (measured with a probe), capped at `limit`."""
    if setup.device.type != "cuda":
        return max(1, min(4, limit)), "CPU: upstream's per-process batch 4"
    dev = setup.device
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(dev)
    c, h, w = setup.latent_shape
    rows = 8
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode(), autocast(dev, setup.precision):
        setup.eager_model(torch.zeros(rows, c, h, w, device=dev), torch.zeros(rows, device=dev),
                          torch.zeros(rows, dtype=torch.int64, device=dev))
    per_row = (torch.cuda.max_memory_allocated(dev) - base) / rows
    torch.cuda.reset_peak_memory_stats(dev)
    decode_to_uint8(setup, torch.zeros(1, c, h, w, device=dev))
    decode = (torch.cuda.max_memory_allocated(dev) - base) * DECODE_CHUNK  # one decode chunk runs alongside
    torch.cuda.empty_cache()
    return batch_that_fits(free, per_row, decode, setup.cfg.sample.cfg_scale > 1.0, limit)


def batch_that_fits(free: float, per_row: float, decode: float, guided: bool, limit: int) -> tuple[int, str]:
    """The batch for `free` bytes: each image takes `per_row` bytes of activations (twice that with guidance,
    which doubles the rows), one decode chunk (`decode` bytes) runs beside it; a multiple of 8 from 16 up."""
    per_image = per_row * (2 if guided else 1)
    budget = 0.85 * free - decode  # headroom for fragmentation and the writer's queued latents
    batch = int(budget // max(per_image, 1))
    batch = max(1, min(batch, MAX_AUTO_BATCH))
    if batch >= 16:
        batch = batch // 8 * 8
    why = f"{free / GiB:.1f} GiB free: {per_image / 2**20:.0f} MiB per image, decode {decode / GiB:.1f} GiB"
    return max(1, min(batch, limit)), why
