"""Any denoiser with any process: which family a `model.model_type` names, and building it for its process.

| denoiser | process | comes from |
|---|---|---|
| LightningDiT | flow matching (velocity, ODE samplers) | hustvl/LightningDiT (the upstream recipe) |
| LightningDiT | DDPM (ε, fixed variance, DDPM/DDIM) | explainingai-code/DiT-PyTorch, facebookresearch/DiT |
| UNet | DDPM (ε, DDIM 50 steps) | lightdiff's latent UNet |
| UNet | flow matching | the kit's combination |

`build_denoiser(model_cfg, input_size, num_classes, process)` is what training, sampling and the grids call. A
LightningDiT is built exactly as before (upstream's time input, whatever the process); a UNet embeds t * 1000 under
flow matching (t in [0, 1]) and the timestep index under DDPM (0..T-1), so both see the same frequencies.
`combination_overrides(denoiser, process)` are the config overrides notebook 04 and the benchmark use.
"""

from __future__ import annotations

from typing import Optional

import torch

from repro.models.lightningdit import LIGHTNINGDIT_MODELS, build_model
from repro.models.unet import UNET_MODELS
from repro.transport.ddpm import PREDICTIONS, SCHEDULES

FAMILIES = {"dit": LIGHTNINGDIT_MODELS, "unet": UNET_MODELS}
FLOW_TIME_SCALE = 1000.0  # a UNet under flow matching: t in [0, 1] -> the sinusoid's usual 0..1000 range


def family_of(model_type: str) -> str:
    """'dit' or 'unet' for a registry name (an unknown name is 'dit', whose registry names the error)."""
    return "unet" if model_type in UNET_MODELS else "dit"


def build_denoiser(model_cfg, input_size: int, num_classes: int, process: str = "flow") -> torch.nn.Module:
    """The denoiser of `model.model_type` for `transport.process` (model(x, t, y) -> ε, v or velocity)."""
    if family_of(model_cfg.model_type) == "dit":
        return build_model(model_cfg, input_size, num_classes)
    return UNET_MODELS[model_cfg.model_type](input_size=input_size, in_channels=model_cfg.in_chans,
                                             num_classes=num_classes, class_dropout_prob=model_cfg.class_dropout_prob,
                                             time_scale=FLOW_TIME_SCALE if process == "flow" else 1.0)


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """FSDP2 units in order: LightningDiT's transformer blocks or the UNet's stages, then the root."""
    return [*model.blocks, model]


# Notebook 04 and benchmarks/bench_denoisers.py: one combination as config overrides on configs/train/own_data.yaml.
SMALL_MODELS = {"dit": "LightningDiT-Mini/2", "unet": "UNet-Mini"}
DDPM_KEYS = ["transport.num_timesteps=1000", "transport.use_cosine_loss=false"]
TIMESTEPS = ("uniform", "lognorm")  # the training timestep draw: transport.use_lognorm false / true


def combination_overrides(denoiser: str, process: str, sampler: str = "ddim",
                          prediction: Optional[str] = None, schedule: Optional[str] = None,
                          timesteps: Optional[str] = None) -> list[str]:
    """Overrides that turn the own-data preset (LightningDiT-Mini/2 + flow) into `denoiser` + `process`; DDPM's
    target is `prediction`: noise (ε, lightdiff's and DiT-PyTorch's; None) or velocity (v, Salimans & Ho 2022),
    and its noise `schedule`: linear (theirs; None), cosine (Nichol & Dhariwal 2021, lightdiff's option) or
    scaled_linear. Flow matching predicts the velocity and has no β schedule: other values with it are refused.
    `timesteps` is the training draw of t: uniform (DDPM's, Ho et al.; None under DDPM) or lognorm (logit-normal,
    Esser et al. 2024; LightningDiT's flow matching, which keeps the preset's under None)."""
    if denoiser not in SMALL_MODELS:
        raise ValueError(f"denoiser must be one of {', '.join(SMALL_MODELS)}, got {denoiser!r}")
    if process not in ("flow", "ddpm"):
        raise ValueError(f"process must be flow or ddpm, got {process!r}")
    if prediction not in (None, *PREDICTIONS):
        raise ValueError(f"prediction must be noise or velocity, got {prediction!r}")
    if schedule not in (None, *SCHEDULES):
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if timesteps not in (None, *TIMESTEPS):
        raise ValueError(f"timesteps must be uniform or lognorm, got {timesteps!r}")
    if process == "flow" and prediction not in (None, "velocity"):
        raise ValueError(f"flow matching predicts the velocity; prediction={prediction} needs process=ddpm")
    if process == "flow" and schedule is not None:
        raise ValueError(f"flow matching has no noise schedule; schedule={schedule} needs process=ddpm")
    out = [f"model.model_type={SMALL_MODELS[denoiser]}"]
    draw = [f"transport.use_lognorm={str(timesteps == 'lognorm').lower()}"]
    if process == "ddpm":
        out += ["transport.process=ddpm", f"transport.prediction={prediction or 'noise'}",
                f"transport.schedule={schedule or 'linear'}", *DDPM_KEYS, *draw, f"sample.sampling_method={sampler}"]
    elif timesteps is not None:
        out += draw
    return out


# Notebook 04's choices where it departs from upstream (benchmarks/RESULTS.md): each family's own process; DDPM
# predicts v (ε's errors grow 156x at high noise) on the cosine schedule (the linear one leaves 33% of the steps
# on all but pure noise); LightningDiT's timesteps drawn logit-normal as its flow matching's are, the UNet's
# uniform (textured_shapes, 100 samples a class: LightningDiT 0.88 -> 0.93 at the same steps, UNet 0.985 -> 0.97
# retrained and 0.92 in a whole run; 2026-12-07)
OWN_DATA_PROCESS = {"dit": "flow", "unet": "ddpm"}
OWN_DATA_DDPM = {"prediction": "velocity", "schedule": "cosine"}
OWN_DATA_DDPM_TIMESTEPS = {"dit": "lognorm", "unet": "uniform"}


def own_data_overrides(denoiser: str, process: str = "", prediction: str = "", schedule: str = "",
                       timesteps: str = "") -> tuple[str, list[str]]:
    """Notebook 04's (process, its config overrides) for `denoiser`: an empty argument takes OWN_DATA_PROCESS and,
    under DDPM, OWN_DATA_DDPM and the family's OWN_DATA_DDPM_TIMESTEPS. The model type is the plan's, so it is
    left out."""
    process = process or OWN_DATA_PROCESS.get(denoiser, "flow")
    ddpm = dict(OWN_DATA_DDPM, timesteps=OWN_DATA_DDPM_TIMESTEPS.get(denoiser)) if process == "ddpm" else {}
    keys = combination_overrides(denoiser, process, prediction=prediction or ddpm.get("prediction"),
                                 schedule=schedule or ddpm.get("schedule"),
                                 timesteps=timesteps or ddpm.get("timesteps"))
    return process, [k for k in keys if not k.startswith("model.model_type=")]
