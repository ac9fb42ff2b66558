"""Notebook 04's recipe: one wall-time budget split between the tokenizer and the DiT, both sized to the data.

A new user knows how long they can wait, not how many steps an f4 autoencoder needs. `plan_own_data` takes
the budget (seconds), the image size, the number of images and classes, and measures on this machine what
one optimizer step of each model costs (a few real steps on random data, seconds in all); it then chooses

- the tokenizer: downsampling factor so the latent grid is `latent_side` square, 16x16 by default (f2 at 32 px,
  f4 at 64 px: it keeps the fine texture that an 8x8 grid blurs, benchmarks/RESULTS.md), latent channels
  (`latent_channels`, 4 by default), width 32, the preset's losses (`tokenizer/photos_no_gan`: no PatchGAN,
  which in a CPU budget costs steps and PSNR);
  steps to fill its share, a 5% linear warm-up and a cosine decay to 0 (no EMA: in a run this short the
  weights still improve fast to the end, and the decayed learning rate already averages the last steps);
- the denoiser: LightningDiT-Mini/4 on 16x16 latents, Mini/2 on 8x8 (16 tokens either way), or UNet-Mini
  (`denoiser="unet"`, whose step costs 3.5x the DiT's on 16x16 latents: timed like the DiT's, so fewer steps fill
  the same time); steps to fill the rest, an EMA decay with a horizon of about a tenth of the run (so the short
  runs of a CPU average enough steps but not stale ones);
- the fixed costs first (reading, extraction, sampling, the tokenizer's evaluation and the classifier
  check), estimated from the same measurements, so the whole notebook fits the budget;
- torch's CPU threads, unless the notebook fixes them: the denoiser's step is timed with one thread, torch's
  default and every usable CPU, and the fastest is kept (all of 2 idle cores: 1.6-1.7x the steps; one thread
  when other jobs share the cores), before the other measurements.

The plan is printed as a few lines (`plan.lines`) and carried as `--set` overrides for steps 9 and 7. Once the
tokenizer is trained, `load_or_replan` sizes the denoiser again from the time actually left: the plan's margins
are taken on the whole budget, and its timing is one moment of a machine whose speed varies by 20%.

    plan = plan_own_data(budget_s=900, image_size=32, num_images=1440, num_classes=4)
    print("\\n".join(plan.lines)); plan.tokenizer_set, plan.dit_set
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from repro.errors import ReproError
from repro.training.logs import read_log_rows
from repro.utils.io import atomic_write_json

# of the training time (tokenizer + denoiser), the rest to the denoiser: 0.5 since the f2 default (0.4 left
# textured_shapes at 25.6-25.8 dB; 0.5: 26.7 dB, recognised 0.90 -> 0.93, benchmarks/RESULTS.md 2026-12-06)
TOKENIZER_SHARE = 0.5
DIT_BATCH = 64
LATENT_SIDE = 16  # the latent grid the tokenizer's factor aims at (LightningDiT-Mini/4: 16 tokens)
MIN_TOKENIZER_STEPS, MIN_DIT_STEPS = 100, 300
GAN_STEP_COST = 1.5  # a tokenizer step with the PatchGAN (its passes, the adaptive weight): 0.31 vs 0.21 s at 32 px
# a training step in the loop over the bare step the plan times (data stream, EMA, logs, checkpoints): 1.11x (DiT)
# and 1.15x (tokenizer) in the first log rows of a 2-thread run; without it that run took 17.0 of its 15 minutes
TRAIN_OVERHEAD = 1.12
SAFETY = 0.92  # of the budget planned: the machine's other jobs come and go (step times varied 2x in one run)


@dataclass
class OwnDataPlan:
    budget_s: float
    tokenizer_set: list[str]
    dit_set: list[str]
    tokenizer_steps: int
    dit_steps: int
    step_seconds: dict
    estimate_s: dict
    lines: list[str] = field(default_factory=list)
    threads: Optional[int] = None  # torch's CPU threads the steps were timed with (None: a plan saved before them)
    made_at: Optional[float] = None  # time.time() when planning began: the re-plan counts the budget from it


def tokenizer_factor(image_size: int, latent_side: int = LATENT_SIDE) -> int:
    """The downsampling factor that brings `image_size` to a `latent_side` grid (2, 4, 8 or 16)."""
    for factor in (2, 4, 8, 16):
        if image_size // factor <= latent_side:
            return factor
    return 16


# width multipliers per factor; f2 widens its second level (bench_own_data_ablations' f2_fast)
CH_MULT = {2: [1, 2], 4: [1, 1, 2], 8: [1, 1, 2, 2], 16: [1, 1, 2, 2, 4]}


def tokenizer_overrides(image_size: int, latent_channels: int = 4, width: int = 32,
                        latent_side: int = LATENT_SIDE) -> list[str]:
    """Step 9 `--set` lines of the tokenizer's architecture for `image_size`."""
    ch_mult = CH_MULT[tokenizer_factor(image_size, latent_side)]
    return [f"model.ch={width}", f"model.ch_mult=[{','.join(map(str, ch_mult))}]", f"model.z_channels={latent_channels}",
            f"model.embed_dim={latent_channels}", f"model.resolution={image_size}", f"data.image_size={image_size}"]


# "auto" flips only when the denoiser sees each image this often: a short run is not short of data, and mirrored
# copies add modes the real images may lack (textured_shapes' one-way stripes; 2026-12-07, benchmarks/RESULTS.md)
FLIP_MIN_EPOCHS = 100


def planned_epochs(dit_steps: int, num_images: int) -> float:
    """How many times the denoiser's planned steps (of DIT_BATCH) show it each image: what "auto" flips weigh."""
    return dit_steps * DIT_BATCH / max(num_images, 1)


def horizontal_flip_for(setting: str, own_folder: bool, epochs: float) -> bool:
    """Notebook 04's `horizontal_flip`: "true", "false", or "auto" = mirrored latents for the user's folder when the
    denoiser's planned `epochs` (steps x batch / images) reach FLIP_MIN_EPOCHS, and none for the bundled digits (a
    mirrored 2 is not a 2). On textured_shapes flips lifted LightningDiT's dotted triangles from 0.76 to 0.88 of the
    real rate in 175 epochs, and cost the UNet's striped discs 1.00 -> 0.29 in 57 epochs (their stripes run one way:
    the mirrored way is a second mode it has no time to learn, and it paints both, a checker); upstream flips."""
    if setting not in ("auto", "true", "false"):
        raise ReproError(f"horizontal_flip={setting!r}: choose auto (flips for your folder in a run of "
                         f"{FLIP_MIN_EPOCHS}+ epochs, none for the digits), true or false")
    return own_folder and epochs >= FLIP_MIN_EPOCHS if setting == "auto" else setting == "true"


def ema_decay_for(steps: int, horizon: float = 0.1, lo: float = 0.99, hi: float = 0.9999) -> float:
    """An EMA decay averaging over about `horizon` of the run: 1 - 1 / (horizon * steps), clamped."""
    return float(min(hi, max(lo, 1.0 - 1.0 / max(horizon * steps, 1.0))))


def _time_steps(step, repeats: int = 3) -> float:
    step()  # warm-up (allocations, first-call overheads)
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t0) / repeats


def measure_tokenizer_step(tokenizer_config: str, overrides: list[str], image_size: int) -> float:
    """Seconds per optimizer step (the preset's batch, fp32, this process's threads) of the tokenizer the overrides give."""
    from repro.resources import find_config
    from repro.tokenizer_training.config import load_tokenizer_config
    from repro.tokenizer_training.modules import build_autoencoder

    cfg = load_tokenizer_config(find_config(tokenizer_config), overrides)
    vae = build_autoencoder(cfg, note=lambda m: None)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-4)
    x = torch.rand(cfg.train.global_batch_size, 3, image_size, image_size) * 2 - 1

    def step():
        post = vae.encode(x)
        loss = (vae.decode(post.mean + post.std * torch.randn_like(post.std)) - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _time_steps(step)


def measure_dit_step(model_type: str, latent_channels: int, latent_side: int, num_classes: int) -> tuple[float, float]:
    """(seconds per optimizer step at batch 64, seconds per forward pass of a batch of 100) of the denoiser
    `model_type` names (a LightningDiT or a UNet of repro.models.unet's registry)."""
    from repro.models.denoisers import FAMILIES, family_of
    from repro.models.lightningdit import create_model

    torch.manual_seed(0)
    if family_of(model_type) == "unet":
        model = FAMILIES["unet"][model_type](input_size=latent_side, in_channels=latent_channels,
                                             num_classes=max(num_classes, 1))
    else:
        model = create_model(model_type, input_size=latent_side, in_channels=latent_channels,
                             num_classes=max(num_classes, 1), use_swiglu=True, use_rope=True, use_rmsnorm=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(DIT_BATCH, latent_channels, latent_side, latent_side)
    t, y = torch.rand(DIT_BATCH), torch.randint(0, max(num_classes, 1), (DIT_BATCH,))

    def step():
        loss = (model(x, t, y) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train = _time_steps(step)
    xs, ts, ys = torch.randn(100, latent_channels, latent_side, latent_side), torch.rand(100), torch.zeros(100).long()
    with torch.inference_mode():
        forward = _time_steps(lambda: model(xs, ts, ys), repeats=2)
    return train, forward


def fastest_threads(time_step, candidates: Optional[list[int]] = None, rounds: int = 2) -> tuple[int, dict]:
    """The thread count whose `time_step()` is fastest, and every timing; leaves torch at that count. By default
    1, torch's current count and the CPUs this process may use (a rerun in a kernel left at 1 still tries all).
    Each count is timed `rounds` times, interleaved, and keeps its fastest: a moment of load on one core slows 2
    threads 30x (measured), and one such moment must not decide the whole run."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    candidates = sorted(set(candidates or [1, torch.get_num_threads(), usable]))
    timings: dict[int, float] = {}
    for _ in range(rounds):
        for n in candidates:
            torch.set_num_threads(n)
            timings[n] = min(timings.get(n, float("inf")), time_step())
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    return best, timings


def measure_check_step(image_size: int, num_classes: int) -> float:
    """Seconds per training step of the check's classifier (repro.evaluation.feature_classifier, batch 64)."""
    from repro.evaluation.feature_classifier import SmallConvNet

    torch.manual_seed(0)
    net = SmallConvNet(max(num_classes, 4))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x, y = torch.randn(64, 3, image_size, image_size), torch.randint(0, max(num_classes, 4), (64,))

    def step():
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _time_steps(step)


def plan_own_data(*, budget_s: float, image_size: int, num_images: int, num_classes: int,
                  tokenizer_config: str = "tokenizer/photos_no_gan", denoiser: str = "dit",
                  model_type: Optional[str] = None,
                  latent_channels: int = 4, latent_side: int = LATENT_SIDE, samples_per_class: int = 20, sampling_steps: int = 50,
                  cfg_scale: float = 3.0, check_steps: int = 400, tokenizer_share: float = TOKENIZER_SHARE,
                  tokenizer_steps: Optional[int] = None, dit_steps: Optional[int] = None,
                  step_seconds: Optional[dict] = None, threads: Optional[int] = None) -> OwnDataPlan:
    """The recipe for a folder of `num_images` images of `num_classes` classes at `image_size` px in
    `budget_s` seconds, for a `denoiser` of that family ("dit" or "unet"); explicit `tokenizer_steps` /
    `dit_steps` are kept; `step_seconds` skips measuring; `threads` fixes torch's CPU threads (None: the
    fastest count `fastest_threads` times with the denoiser's step; torch is left at the plan's `threads`)."""
    if budget_s <= 0:
        raise ReproError(f"time budget {budget_s} s: give the notebook a positive budget in minutes")
    made_at = time.time()
    from repro.resources import find_config
    from repro.tokenizer_training.config import load_tokenizer_config

    preset = load_tokenizer_config(find_config(tokenizer_config))
    gan, batch = preset.loss.disc_start is not None, preset.train.global_batch_size
    factor = tokenizer_factor(image_size, latent_side)
    if image_size % factor:
        raise ReproError(f"image_size {image_size} is not a multiple of the tokenizer's factor {factor}")
    side = image_size // factor
    tok_set = tokenizer_overrides(image_size, latent_channels, latent_side=latent_side)
    from repro.models.denoisers import SMALL_MODELS

    if denoiser not in SMALL_MODELS:
        raise ReproError(f"denoiser {denoiser!r}: dit (LightningDiT) or unet")
    # LightningDiT-Mini with the patch that makes a 4x4 token grid (Mini/2 on 8x8, Mini/4 on 16x16 latents); the
    # UNet family's small size otherwise: its steps are timed, so the plan's step count fits whichever it is
    model_type = model_type or (f"LightningDiT-Mini/{max(1, side // 4)}" if denoiser == "dit" else SMALL_MODELS["unet"])
    # 1. what a step costs here, now (measured unless given), with the threads that make it cheapest
    thread_seconds = {}
    if threads is not None:
        torch.set_num_threads(threads)
    elif step_seconds is None:
        threads, thread_seconds = fastest_threads(lambda: measure_dit_step(model_type, latent_channels, side,
                                                                           num_classes)[0])
    threads = threads or torch.get_num_threads()
    if step_seconds is None:
        dit_train, dit_forward = measure_dit_step(model_type, latent_channels, side, num_classes)
        step_seconds = {"tokenizer": measure_tokenizer_step(tokenizer_config, tok_set, image_size),
                        "dit": dit_train, "dit_forward_100": dit_forward,
                        "check": measure_check_step(image_size, num_classes)}
    # the PatchGAN's steps (from 60% of the run on) cost about GAN_STEP_COST of a plain step
    tok_s = step_seconds["tokenizer"] * TRAIN_OVERHEAD * (1 + 0.4 * (GAN_STEP_COST - 1) if gan else 1.0)
    dit_s = step_seconds["dit"] * TRAIN_OVERHEAD
    # 2. the fixed costs: the classifier check, sampling (guided: two rows per image), extraction, evaluation
    num_samples = samples_per_class * max(num_classes, 1)
    guided = 2 if num_classes > 1 and cfg_scale != 1.0 else 1
    fixed = {"check": check_steps * step_seconds["check"] + 10,
             "sampling": step_seconds["dit_forward_100"] * num_samples / 100 * sampling_steps * guided,
             "extract_and_eval": (num_images + 200) / batch * tok_s / 3 + 15}
    train_s = SAFETY * budget_s - sum(fixed.values())
    # 3. the training time split, steps from the measured step times
    if tokenizer_steps is None:
        tokenizer_steps = max(MIN_TOKENIZER_STEPS, int(train_s * tokenizer_share / tok_s))
    if dit_steps is None:
        dit_steps = max(MIN_DIT_STEPS, int((train_s - tokenizer_steps * tok_s) / dit_s))
    estimate = {"tokenizer": tokenizer_steps * tok_s, "dit": dit_steps * dit_s, **fixed}
    tok_set += [f"train.max_steps={tokenizer_steps}", f"train.warmup_steps={max(10, tokenizer_steps // 20)}",
                "train.lr_schedule=cosine",
                f"train.ckpt_every={max(100, tokenizer_steps // 4)}"]
    if gan:  # the adversarial term refines a tokenizer that already reconstructs: the last 40% of the run
        tok_set.append(f"loss.disc_start={int(0.6 * tokenizer_steps)}")
    dit_ema = ema_decay_for(dit_steps)
    dit_set = _dit_set(model_type, dit_steps)
    lines = [f"plan for {num_images} images, {num_classes} class(es), {image_size} px, budget {budget_s / 60:.1f} min "
             f"(measured here with {threads} torch thread(s): tokenizer {step_seconds['tokenizer']:.2f} s/step, "
             f"{model_type} {step_seconds['dit']:.2f} s/step; planned with {TRAIN_OVERHEAD}x for the loop's "
             "own work):",
             f"  tokenizer f{factor}, {latent_channels} latent channels ({side}x{side}x{latent_channels} latents), width 32: "
             f"{tokenizer_steps} steps of {batch}, cosine learning rate, ~{estimate['tokenizer'] / 60:.1f} min",
             f"  {'DiT' if denoiser == 'dit' else 'UNet'} {model_type} on {side}x{side} latents: {dit_steps} steps of "
             f"{DIT_BATCH}, EMA decay {dit_ema:.4f}, "
             f"~{estimate['dit'] / 60:.1f} min",
             f"  fixed: sampling {num_samples} images ~{fixed['sampling'] / 60:.1f} min, check ~{fixed['check'] / 60:.1f} "
             f"min, extraction and evaluation ~{fixed['extract_and_eval'] / 60:.1f} min; total "
             f"~{sum(estimate.values()) / 60:.1f} min"]
    if len(thread_seconds) > 1:
        lines.append("  torch threads timed (denoiser step): " + ", ".join(
            f"{n}: {v:.3f} s" for n, v in sorted(thread_seconds.items())) + f"; {threads} kept")
    if train_s < (MIN_TOKENIZER_STEPS * tok_s + MIN_DIT_STEPS * dit_s):
        lines.append(f"  the budget is too short for these images: the minimum run takes ~{sum(estimate.values()) / 60:.0f}"
                     " min; quality will be low (raise the budget)")
    return OwnDataPlan(budget_s, tok_set, dit_set, tokenizer_steps, dit_steps, step_seconds, estimate, lines, threads,
                       made_at)


def _dit_set(model_type: str, dit_steps: int) -> list[str]:
    return [f"model.model_type={model_type}", f"train.max_steps={dit_steps}", f"train.ema_decay={ema_decay_for(dit_steps)}",
            f"train.ckpt_every={max(500, dit_steps // 4)}", f"train.global_batch_size={DIT_BATCH}"]


def loop_ratio(plan: OwnDataPlan, tokenizer_log) -> float:
    """What a denoiser step costs in the loop over the bare step the plan timed: the tokenizer's loop ratio in this
    run (its log's mean seconds_per_step, the first window with its warm-up left out, over the plan's step) where
    it exceeds TRAIN_OVERHEAD (a machine loaded since the plan: 1.15 against the denoiser's 1.11 in one run), else
    TRAIN_OVERHEAD (the denoiser's loop ran 0.99-1.14x its bare step where the tokenizer's ran 0.93-1.08x: the bare
    timing itself varies that much, 2026-12-07)."""
    rows = read_log_rows(Path(tokenizer_log), last_step=plan.tokenizer_steps)  # a torn last line (a kill) is skipped
    seconds = [r["seconds_per_step"] for r in rows[1:] if "seconds_per_step" in r]
    if not seconds:
        return TRAIN_OVERHEAD
    planned = plan.estimate_s["tokenizer"] / max(plan.tokenizer_steps, 1) / TRAIN_OVERHEAD  # bare (a PatchGAN included)
    return max(TRAIN_OVERHEAD, sum(seconds) / len(seconds) / planned)


def replan_denoiser(plan: OwnDataPlan, *, elapsed_s: float, ratio: float) -> OwnDataPlan:
    """`plan` with the denoiser's steps re-planned, once the tokenizer is trained, from the time actually left:
    SAFETY of (budget - `elapsed_s`), less the fixed costs still ahead, at the plan's step x `ratio` (`loop_ratio`:
    TRAIN_OVERHEAD, or more where the tokenizer's loop ran slower in this run), at least MIN_DIT_STEPS. The plan's
    margins are taken on the whole budget and its timing is one moment of the machine: one LightningDiT + DDPM run
    took 11.7 of its 15 minutes, another, planned in a fast moment (its loops then ran 1.24x and 1.41x the steps
    timed), 16.4 (2026-12-07): the re-plan gives the first more steps and would have given the second fewer."""
    step_s = plan.step_seconds["dit"] * ratio
    fixed = sum(plan.estimate_s[k] for k in ("check", "sampling", "extract_and_eval"))
    dit_steps = max(MIN_DIT_STEPS, int((SAFETY * (plan.budget_s - elapsed_s) - fixed) / step_s))
    model_type = next(s.split("=", 1)[1] for s in plan.dit_set if s.startswith("model.model_type="))
    line = (f"  re-planned after the tokenizer: {(plan.budget_s - elapsed_s) / 60:.1f} min of the budget left, a step "
            f"at {ratio:.2f}x the one timed: {dit_steps} denoiser steps (planned {plan.dit_steps}), EMA decay "
            f"{ema_decay_for(dit_steps):.4f}, ~{dit_steps * step_s / 60:.1f} min")
    return OwnDataPlan(**dict(plan.__dict__, dit_steps=dit_steps, dit_set=_dit_set(model_type, dit_steps),
                              estimate_s=dict(plan.estimate_s, dit=dit_steps * step_s), lines=[*plan.lines, line]))


def _saved_or_made(path, key: dict, make) -> tuple[OwnDataPlan, bool]:
    """The plan saved at `path` with `key` (a rerun resumes with the same steps and schedules), else `make()`,
    saved there with it; and whether it was the saved one."""
    path = Path(path)
    if path.is_file():
        saved = json.loads(path.read_text())
        if all(saved.get(k) == v for k, v in key.items()):
            return OwnDataPlan(**saved["plan"]), True
    plan = make()
    atomic_write_json(path, {**key, "plan": plan.__dict__})
    return plan, False


def load_or_replan(path, plan: OwnDataPlan, tokenizer_log) -> OwnDataPlan:
    """The re-planned denoiser saved at `path` for this `plan`, else `replan_denoiser` with the time since the plan
    began and the tokenizer's `loop_ratio` (its log.jsonl), saved there. A plan saved before the re-plan existed is
    kept as it is."""
    if plan.made_at is None:
        return OwnDataPlan(**dict(plan.__dict__, lines=[*plan.lines, "  not re-planned (a plan saved before the "
                                                                     "re-plan): the planned steps"]))
    return _saved_or_made(path, {"plan_made_at": plan.made_at}, lambda: replan_denoiser(
        plan, elapsed_s=time.time() - plan.made_at, ratio=loop_ratio(plan, tokenizer_log)))[0]


def load_or_plan(path, **inputs) -> OwnDataPlan:
    """The plan saved at `path` when it was made for the same inputs, else a new one, saved there."""
    plan, reused = _saved_or_made(path, {"inputs": inputs}, lambda: plan_own_data(**inputs))
    if reused:
        plan.lines = [plan.lines[0].replace("plan for", "plan (saved, reused) for", 1), *plan.lines[1:]]
    return plan
