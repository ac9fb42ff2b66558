"""What each config key means upstream, and the values the kit refuses (docs/config_keys.md is the table).

Two rules, applied by `repro.config.load_config`:

1. A key missing from a YAML file means what upstream train.py / inference.py make of it
   (`UPSTREAM_WHEN_MISSING`: `'use_swiglu' in cfg['model'] ... else False`, and so on). The dataclass
   defaults of repro/config.py are the values every official config file writes out; they apply to a
   Config built in code, not to a file that leaves a key out.
2. A value that upstream accepts but the kit does not implement, or that upstream reads and then
   ignores, is refused with a one-line ConfigError naming the key, the values the kit supports and,
   for a near miss, the one meant (`check_supported`). Nothing is accepted and silently ignored.

This module sits below the numerics (repro/models, repro/transport) and cannot import them: the
enumerations here are checked against `LIGHTNINGDIT_MODELS` and `repro.transport.METHODS` by
tests/test_config_keys.py.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable, Optional

from repro.errors import ConfigError

# A key absent from an official-schema YAML -> the value upstream uses then, where it differs from the
# value the official configs write (hustvl/LightningDiT train.py / inference.py at 2725fed).
UPSTREAM_WHEN_MISSING: dict[str, Any] = {
    "data.latent_norm": False,  # ImgLatentDataset(latent_norm=... if 'latent_norm' in data else False)
    "data.latent_multiplier": 0.18215,  # ... else 0.18215 (the SD-VAE scale), also used to denormalise samples
    "model.use_swiglu": False,
    "model.use_rope": False,
    "model.use_rmsnorm": False,
    "model.in_chans": 4,  # in_channels=... else 4 (an SD-VAE latent)
    "train.resume": False,  # train_config['train']['resume'] = ... if 'resume' in train else False
    "transport.use_cosine_loss": False,
    "transport.use_lognorm": False,
}

# Enumerated keys: what the kit implements, and what upstream also accepts (refused with that said).
MODEL_TYPES = ("LightningDiT-B/1", "LightningDiT-B/2", "LightningDiT-L/2", "LightningDiT-XL/1",
               "LightningDiT-XL/2", "LightningDiT-1p0B/1", "LightningDiT-1p0B/2", "LightningDiT-1p6B/1",
               "LightningDiT-1p6B/2", "LightningDiT-T/1",
               "LightningDiT-Mini/2", "LightningDiT-Mini/4",  # = repro.models.lightningdit.LIGHTNINGDIT_MODELS
               "UNet-T", "UNet-Mini", "UNet-S", "UNet-B", "UNet-L")  # kit (issue 23): repro.models.unet.UNET_MODELS
SAMPLING_METHODS = ("euler", "midpoint", "heun2", "rk4", "dopri5")  # = repro.transport.METHODS
# upstream passes sample.sampling_method to torchdiffeq.odeint, which also knows these
TORCHDIFFEQ_ONLY_METHODS = ("dopri8", "bosh3", "fehlberg2", "adaptive_heun", "heun3", "explicit_adams",
                            "implicit_adams", "fixed_adams", "scipy_solver")
# kit (issue 23): the DDPM process (repro.transport.ddpm)
PROCESSES = ("flow", "ddpm")
DDPM_SAMPLING_METHODS = ("ddim", "ddpm")  # = repro.transport.DDPM_METHODS
DDPM_SCHEDULES = ("linear", "scaled_linear", "cosine")  # = repro.transport.SCHEDULES
DDPM_PREDICTIONS = ("noise", "velocity")  # = repro.transport.PREDICTIONS
DDPM_VARIANCES = ("beta", "beta_tilde")  # = repro.transport.VARIANCES
LATENT_SCALINGS = ("channel", "global", "global_means")  # kit (issue 23): data.latent_scaling
VAE_MODELS = ("vavae_f16d32", "custom", "vfm_vae_f16d32")  # vfm_vae: repro.tokenizer.vfm_vae  # custom: repro.tokenizer.loader (step 9)


def _suggest(value: Any, choices: Iterable[str]) -> str:
    """"; did you mean 'X'?" for a near miss among `choices` (case first, then spelling), else ""."""
    lowered = {c.lower(): c for c in choices}
    text = str(value).lower()
    close = [text] if text in lowered else difflib.get_close_matches(text, list(lowered), n=1, cutoff=0.6)
    return f"; did you mean '{lowered[close[0]]}'?" if close else ""


def _one_of(key: str, value: Any, supported: tuple[str, ...], upstream_also: tuple[str, ...] = (),
            why: str = "") -> None:
    """Refuse `value` unless it is one of `supported`; say so when upstream knows it."""
    if value in supported:
        return
    listing = ", ".join(supported)
    if value in upstream_also:
        raise ConfigError(f"config key '{key}' is {value!r}: upstream accepts it but the kit implements only "
                          f"{listing}{why}; set {key}: {supported[0]}")
    raise ConfigError(f"config key '{key}' is {value!r}, not one of {listing}{_suggest(value, supported)}")


def _refuse(key: str, value: Any, why: str, fix: str, when: Any = True) -> None:
    """Raise "config key 'KEY' is VALUE: WHY; FIX" when `when` holds (the checks below pass their condition)."""
    if when:
        raise ConfigError(f"config key '{key}' is {value!r}: {why}; {fix}")


DIT_ONLY_KEYS = ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift")


def check_supported(cfg) -> None:
    """Raise a ConfigError for the first value the kit does not implement (see docs/config_keys.md)."""
    m, s, t, v, tr, d = cfg.model, cfg.sample, cfg.transport, cfg.vae, cfg.train, cfg.data

    # Model and tokenizer: the sizes of the registry, velocity output, the f16d32 VA-VAE.
    _one_of("model.model_type", m.model_type, MODEL_TYPES)
    _refuse("model.learn_sigma", True, "the flow-matching LightningDiT predicts velocity only (upstream "
            "train.py never passes learn_sigma, so no released checkpoint has the doubled output)",
            "remove the key or set model.learn_sigma: false", when=m.learn_sigma)
    if m.model_type.startswith("UNet-"):  # kit (issue 23): LightningDiT's switches mean nothing to a UNet
        _refuse("model.use_checkpoint", True, "gradient checkpointing is LightningDiT's (per transformer block); "
                "the UNet does not implement it", "set model.use_checkpoint: false", when=m.use_checkpoint)
        dit = type(m)()  # LightningDiT's defaults
        for key in DIT_ONLY_KEYS:  # at their defaults they are simply not read; another value would be ignored
            value = getattr(m, key)
            _refuse(f"model.{key}", value, f"{m.model_type} is a UNet and model.{key} is a LightningDiT switch "
                    "(the UNet has no such part)", f"remove the key or set model.{key}: {getattr(dit, key)}"
                    .replace("True", "true").replace("False", "false"), when=value != getattr(dit, key))
    # upstream loads tokenizer/configs/<model_name>.yaml
    _refuse("vae.model_name", v.model_name, "the kit's tokenizers are the official VA-VAE f16d32 ('vavae_f16d32') "
            "and one trained by step 9 ('custom'); another tokenizer's latents would be decoded by the wrong VAE",
            "set vae.model_name: vavae_f16d32 with VA-VAE f16d32 weights (vae.ckpt_path) and latents, or "
            "vae.model_name: custom with a tokenizer of step 9", when=v.model_name not in VAE_MODELS)
    _refuse("vae.downsample_ratio", v.downsample_ratio, f"vae.model_name {v.model_name} downsamples by 16",
            "set vae.downsample_ratio: 16" + (" (or vae.model_name: custom for a tokenizer of step 9)"
                                              if v.model_name == "vavae_f16d32" else ""),
            when=v.model_name in ("vfm_vae_f16d32", "vavae_f16d32") and v.downsample_ratio != 16)
    _refuse("vae.downsample_ratio", v.downsample_ratio, "a tokenizer of step 9 downsamples by a power of two "
            "(2^(len(ch_mult) - 1): f4, f8, f16)", "set the ratio of the tokenizer in vae.ckpt_path",
            when=v.model_name == "custom" and v.downsample_ratio & (v.downsample_ratio - 1))

    # kit: a model of one class is unconditional; guidance towards the null label would mean nothing
    _refuse("sample.cfg_scale", s.cfg_scale, "data.num_classes is 1 (an unconditional model): there is no class "
            "to guide towards", "set sample.cfg_scale: 1.0", when=d.num_classes == 1 and s.cfg_scale > 1.0)

    # kit (issue 23): data.latent_scaling / data.latent_scale and the keys they exclude
    _one_of("data.latent_scaling", d.latent_scaling, LATENT_SCALINGS)
    _refuse("data.latent_norm", True, f"data.latent_scaling {d.latent_scaling} scales by one global factor "
            "instead of the per-channel statistics of latents_stats.pt", "set data.latent_norm: false, or "
            "data.latent_scaling: channel", when=d.latent_scaling != "channel" and d.latent_norm)
    if d.latent_scale is not None:
        _refuse("data.latent_scale", d.latent_scale, "data.latent_scaling is channel, which never uses a global "
                "factor", "remove data.latent_scale, or set data.latent_scaling: global",
                when=d.latent_scaling == "channel")
        _refuse("data.latent_scale", d.latent_scale, "the factor multiplies every latent and is divided out "
                "before decoding", "give a finite number > 0 (1/sigma), or null to read latents_scale.json",
                when=not math.isfinite(d.latent_scale) or d.latent_scale <= 0)

    # Transport: the linear path with velocity prediction, the only one the released models use.
    _one_of("transport.path_type", t.path_type, ("Linear",), ("GVP", "VP"),
            why=" (the rectified-flow path of every released LightningDiT)")
    _one_of("transport.process", t.process, PROCESSES)
    if t.process == "ddpm":
        check_ddpm(cfg)
    else:
        _one_of("transport.prediction", t.prediction, ("velocity",), ("noise", "score"),
                why=" (every released LightningDiT predicts velocity)")
        _refuse("sample.sampling_method", s.sampling_method, "DDIM and DDPM sample the DDPM process, and "
                "transport.process is flow", "set transport.process: ddpm, or an ODE method (euler, ...)",
                when=s.sampling_method in DDPM_SAMPLING_METHODS)
    _refuse("transport.loss_weight", t.loss_weight, "upstream weights the loss only for noise/score "
            "prediction; with velocity prediction it has no effect", "set transport.loss_weight: null",
            when=t.loss_weight is not None)
    for key, eps in (("transport.train_eps", t.train_eps), ("transport.sample_eps", t.sample_eps)):
        _refuse(key, eps, "upstream's create_transport sets it to 0 for the Linear path with velocity "
                "prediction, whatever the config says", f"set {key}: null", when=eps not in (None, 0.0))

    # Sampling: ODE only (as upstream inference.py), the kit's integrators, images not likelihoods.
    _refuse("sample.mode", "SDE", "upstream's Sampler has an SDE integrator but inference.py raises "
            "NotImplementedError for any mode but ODE, and the kit samples ODE only", "set sample.mode: ODE",
            when=s.mode == "SDE")
    _one_of("sample.mode", s.mode, ("ODE",))
    if t.process == "flow":
        _one_of("sample.sampling_method", s.sampling_method, SAMPLING_METHODS, TORCHDIFFEQ_ONLY_METHODS)
    _refuse("sample.reverse", True, "it integrates from data to noise, which makes no images",
            "set sample.reverse: false", when=s.reverse)
    _refuse("sample.likelihood", True, "upstream inference.py never reads it and the kit computes no "
            "likelihoods", "set sample.likelihood: false", when=s.likelihood)

    # Training keys upstream reads without acting on them.
    _refuse("train.use_checkpoint", False, "upstream train.py only logs it ('Using checkpointing'); "
            "checkpoints are saved every train.ckpt_every and gradient checkpointing is model.use_checkpoint",
            "remove the key, or set model.use_checkpoint: true for gradient checkpointing",
            when=not tr.use_checkpoint)
    _refuse("data.valid_path", d.valid_path, "an empty path", "set a latent folder or null",
            when=d.valid_path is not None and not str(d.valid_path).strip())


def check_ddpm(cfg) -> None:
    """kit (issue 23): transport.process ddpm: its own keys, and the flow-only values that would mean nothing."""
    t, s = cfg.transport, cfg.sample
    _one_of("transport.prediction", t.prediction, DDPM_PREDICTIONS, ("score",),
            why=" with transport.process ddpm (noise = ε, Ho et al.; velocity = v, Salimans & Ho)")
    _one_of("transport.schedule", t.schedule, DDPM_SCHEDULES)
    _refuse("transport.num_timesteps", t.num_timesteps, "the DDPM process needs at least 2 timesteps",
            "set transport.num_timesteps: 1000", when=t.num_timesteps < 2)
    _refuse("transport.beta_start", t.beta_start, f"β must rise within (0, 1), and beta_end is {t.beta_end}",
            "set transport.beta_start: 1.0e-4 and transport.beta_end: 0.02 (Ho et al.)",
            when=t.schedule != "cosine" and not 0 < t.beta_start < t.beta_end < 1)
    # transport.use_lognorm is kept: the DDPM timestep index is floor(t T) of the trainer's t, uniform or logit-normal
    _refuse("transport.use_cosine_loss", True, "it belongs to flow matching; the DDPM loss is the MSE on ε (or v) "
            "(Ho et al.)", "set transport.use_cosine_loss: false", when=t.use_cosine_loss)
    if s.sampling_method not in DDPM_SAMPLING_METHODS:
        why = ("an ODE solver of flow matching" if s.sampling_method in SAMPLING_METHODS + TORCHDIFFEQ_ONLY_METHODS
               else "not a sampler of the DDPM process")
        _refuse("sample.sampling_method", s.sampling_method, f"{why}, and transport.process is ddpm",
                "set sample.sampling_method: ddim (or ddpm)" + _suggest(s.sampling_method, DDPM_SAMPLING_METHODS))
    _refuse("sample.num_sampling_steps", s.num_sampling_steps, f"the process has {t.num_timesteps} timesteps",
            f"set at most {t.num_timesteps}", when=s.num_sampling_steps > t.num_timesteps)
    _refuse("sample.eta", s.eta, "η is DDIM's noise level (>= 0; 0 deterministic)",
            "set sample.eta: 0.0, or sample.sampling_method: ddim",
            when=s.eta < 0 or (s.eta > 0 and s.sampling_method != "ddim"))
    _one_of("sample.ddpm_variance", s.ddpm_variance, DDPM_VARIANCES)
    for key, value in (("sample.timestep_shift", s.timestep_shift), ("sample.cfg_interval_start", s.cfg_interval_start)):
        _refuse(key, value, "it is defined on flow matching's time grid; the DDPM samplers do not implement it",
                f"set {key}: 0.0", when=value)


def tokenizer_config_reason(raw: dict[str, Any]) -> Optional[str]:
    """Why a parsed YAML is a tokenizer training config (step 9), not a DiT config; None when it is not one.

    Upstream's VA-VAE configs (vavae/configs/*.yaml, tokenizer/configs/*.yaml) are LDM-style: `model:
    {base_learning_rate, target, params: {ddconfig, lossconfig, ...}}`, `lightning:`; the kit's own
    tokenizer configs have a `loss` section, which no DiT config has.
    """
    model = raw.get("model")
    if isinstance(model, dict) and ("target" in model or "params" in model or "base_learning_rate" in model):
        return "an LDM-style VA-VAE training config (model.target / model.params)"
    if "lightning" in raw:
        return "a PyTorch Lightning training config (a 'lightning' section)"
    if "loss" in raw:
        return "a kit tokenizer config (a 'loss' section)"
    return None


def missing_upstream_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """{dotted key: upstream value} for each UPSTREAM_WHEN_MISSING key that `raw` (a parsed YAML mapping) lacks."""
    out: dict[str, Any] = {}
    for dotted, value in UPSTREAM_WHEN_MISSING.items():
        section, key = dotted.split(".")
        if not isinstance(raw.get(section), dict) or key not in raw[section]:
            out[dotted] = value
    return out


def with_upstream_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of `raw` with every missing UPSTREAM_WHEN_MISSING key filled in (sections created as needed)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dotted, value in missing_upstream_defaults(raw).items():
        section, key = dotted.split(".")
        if out.get(section) is None:
            out[section] = {}
        if isinstance(out[section], dict):
            out[section][key] = value
    return out


def describe_missing(filled: dict[str, Any], source: str) -> list[str]:
    """Step 3's lines for keys filled with upstream's missing-key values (absent in the file `source`)."""
    return [f"{key}: absent in {source} -> {value!r} (what upstream train.py/inference.py use when the key is "
            f"missing; write it out to choose)" for key, value in filled.items()]
