"""Upstream's VA-VAE training YAMLs (LDM style) -> the kit's tokenizer schema, key by key.

hustvl/LightningDiT trains VA-VAE with `vavae/main.py --base CONFIG` (PyTorch Lightning): `model`
instantiates `ldm.models.autoencoder.AutoencoderKL(ddconfig, lossconfig, embed_dim, use_vf, reverse_proj)`
with `LPIPSWithDiscriminator` as its loss, `data` a `DataModuleFromConfig` over ImageNet, `lightning.trainer`
the Trainer. What main.py and those classes do with each key, and what the kit makes of it:

- `model.base_learning_rate` -> `train.lr` (main.py does not scale it: "NOT USING LR SCALING");
- `model.params.ddconfig` -> `model.*` (double_z, in_channels 3, out_ch 3, dropout 0 and vanilla attention
  are the only values the kit builds); `embed_dim` -> `model.embed_dim`;
- `lossconfig.params` -> `loss.*`, with upstream's class defaults for absent keys (kl_weight 1.0,
  disc_weight 1.0, vf_weight 100, adaptive_vf false, margins 0: the config files write the f16d32 values);
- `use_vf: dinov2` + `reverse_proj: true` -> `loss.vf: dinov2` (the only combination the kit implements);
- `init_weight` (main.py loads it before training; `weight_init` in the files' comments) -> `model.init_from`;
- `data.params.batch_size` (per GPU) x `lightning.trainer.devices` x `num_nodes` -> `train.global_batch_size`;
  `train`/`validation` ImageNetTrain/ImageNetValidation `data_root` -> `data.image_folder` =
  `<data_root>/ILSVRC2012_train/data` (where ImageNetTrain reads the class folders), `data.valid_folder`;
- `lightning.trainer.max_epochs` -> `train.max_epochs`, `precision` 32/16/bf16 -> `train.precision`.

Values the kit does not implement are refused naming the key; keys upstream reads and ignores
(`pixelloss_weight`, Trainer keys main.py drops) are refused unless they hold the value that does
nothing; a placeholder left empty in upstream's file (`disc_start:` in f16d32_vfdinov2_long.yaml) is an
error naming it unless a `--set` of the kit key fills it. `monitor` and `wrap` change no weights: noted, not refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from repro.errors import ConfigError

AE_TARGET = "ldm.models.autoencoder.AutoencoderKL"
LOSS_TARGET = "ldm.modules.losses.LPIPSWithDiscriminator"
DATA_TARGET = "main.DataModuleFromConfig"
DATASETS = {"train": ("ldm.data.imagenet.ImageNetTrain", "ILSVRC2012_train"),
            "validation": ("ldm.data.imagenet.ImageNetValidation", "ILSVRC2012_validation")}
# LPIPSWithDiscriminator's own defaults (upstream contperceptual.py), used where a file leaves a key out
LOSS_DEFAULTS = {"kl_weight": 1.0, "disc_weight": 1.0, "disc_factor": 1.0, "perceptual_weight": 1.0,
                 "disc_num_layers": 3, "disc_loss": "hinge", "vf_weight": 1e2, "adaptive_vf": False,
                 "cos_margin": 0.0, "distmat_margin": 0.0}
# keys whose only accepted value is the one upstream's code makes harmless (key -> (value, why other values are refused))
LOSS_FIXED = {"logvar_init": (0.0, "the kit's loss has no log-variance (upstream never optimises it; 0 makes it vanish)"),
              "pixelloss_weight": (1.0, "upstream stores it and never uses it"),
              "disc_in_channels": (3, "the discriminator sees RGB images"),
              "use_actnorm": (False, "the kit's PatchGAN uses BatchNorm, as upstream's default"),
              "disc_conditional": (False, "no conditional discriminator"),
              "pp_style": (False, "the per-pixel-mean reductions are not implemented"),
              "distmat_weight": (1.0, "the VF terms are weighted 1:1 as upstream's default"),
              "cos_weight": (1.0, "the VF terms are weighted 1:1 as upstream's default")}
DD_FIXED = {"double_z": (True, "upstream asserts it"), "in_channels": (3, "RGB images"), "out_ch": (3, "RGB images"),
            "dropout": (0.0, "the kit's blocks have no dropout (0.0 in every upstream config)"),
            "resamp_with_conv": (True, "strided/interpolated convolutions, as upstream's default"),
            "use_linear_attn": (False, "vanilla attention only"), "attn_type": ("vanilla", "vanilla attention only"),
            "give_pre_end": (False, "the decoder's full output"), "tanh_out": (False, "no tanh on the output")}
DD_KEYS = ("z_channels", "resolution", "ch", "ch_mult", "num_res_blocks", "attn_resolutions")
TRAINER_KEYS = ("devices", "num_nodes", "strategy", "accelerator", "max_epochs", "precision")  # what main.py passes on
PRECISIONS = {32: "fp32", "32": "fp32", "32-true": "fp32", 16: "fp16", "16": "fp16", "16-mixed": "fp16",
              "bf16": "bf16", "bf16-mixed": "bf16"}


def is_upstream_config(raw: Any) -> bool:
    """An LDM-style config: `model.target` / `model.params` / `model.base_learning_rate`, or a `lightning` section."""
    model = raw.get("model") if isinstance(raw, dict) else None
    return isinstance(raw, dict) and ("lightning" in raw or (isinstance(model, dict) and any(
        k in model for k in ("target", "params", "base_learning_rate"))))


def _section(raw: Any, where: str, known: Optional[Sequence[str]] = None, fixed: Optional[dict] = None) -> dict:
    """`raw` as a mapping ({} for None), its keys checked against `known` and the values of `fixed` (key ->
    (the only value accepted, why other values are refused)) when given."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"upstream config key '{where}' must be a mapping, got {raw!r}")
    extra = [k for k in raw if known is not None and k not in known]
    if extra:
        raise ConfigError(f"upstream config key '{where}.{extra[0]}' is not read by upstream's VA-VAE training "
                          f"(known here: {', '.join(known)}); remove it")
    for key, (value, why) in (fixed or {}).items():
        if key in raw and raw[key] != value:
            raise ConfigError(f"upstream config key '{where}.{key}' is {raw[key]!r}: {why}; the kit implements "
                              f"only {value!r}")
    return raw


HOLES = "_holes"  # kit key -> upstream key left empty in the file: a --set must fill it (load_tokenizer_config)


def _required(block: dict, key: str, where: str, out: Optional[dict] = None, kit_key: str = "") -> Any:
    """block[key]; an empty value is an error, or (with `out`) a hole that `--set kit_key=...` must fill."""
    if block.get(key) is None:
        if out is not None and key in block:
            out.setdefault(HOLES, {})[kit_key] = f"{where}.{key}"
            return None
        raise ConfigError(f"upstream config key '{where}.{key}' is empty or missing: upstream needs a value here; "
                          "write it in")
    return block[key]


def translate_upstream(raw: dict, source: str = "<config>", notes: Optional[list[str]] = None) -> dict:
    """The kit-schema mapping (model, loss, data, train, ckpt_path) of an upstream VA-VAE config."""
    notes = notes if notes is not None else []
    # Top level: the tokenizer to test (step 10) and the weights to start from (two upstream spellings)
    _section(raw, "top", ("ckpt_path", "init_weight", "weight_init", "model", "data", "lightning"))
    out: dict[str, Any] = {"model": {}, "loss": {}, "data": {}, "train": {}}
    if raw.get("ckpt_path") is not None:
        out["ckpt_path"] = str(raw["ckpt_path"])  # "used for testing only": step 10's tokenizer
    init = [k for k in ("init_weight", "weight_init") if raw.get(k) is not None]
    if len(init) == 2:
        raise ConfigError("upstream config keys 'init_weight' and 'weight_init' are both set: keep init_weight")
    if init:
        out["model"]["init_from"] = str(raw[init[0]])
        if init[0] == "weight_init":
            notes.append("weight_init: upstream main.py reads `init_weight` (the files' comment says weight_init); "
                         "the kit takes either as model.init_from")

    # model: the autoencoder and its loss
    model = _section(raw.get("model"), "model", ("base_learning_rate", "target", "params"))
    if model.get("target", AE_TARGET) != AE_TARGET:
        raise ConfigError(f"upstream config key 'model.target' is {model['target']!r}: the kit trains {AE_TARGET} "
                          "(the KL autoencoder VA-VAE is) only")
    if "base_learning_rate" in model:
        out["train"]["lr"] = model["base_learning_rate"]
    params = _section(model.get("params"), "model.params",
                      ("monitor", "embed_dim", "use_vf", "reverse_proj", "proj_fix", "lossconfig", "ddconfig",
                       "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels"),
                      {"proj_fix": (False, "the VF projection trains with the autoencoder, as upstream's default"),
                       "ignore_keys": ([], "weights are loaded strictly"), "image_key": ("image", "RGB images"),
                       "colorize_nlabels": (None, "RGB images")})
    if params.get("ckpt_path") is not None:
        if "init_from" in out["model"]:
            raise ConfigError("upstream config keys 'model.params.ckpt_path' and 'init_weight' both give start weights: "
                              "keep one")
        out["model"]["init_from"] = str(params["ckpt_path"])
    if "monitor" in params:
        notes.append(f"model.params.monitor ({params['monitor']}): Lightning's checkpoint metric; the kit keeps the "
                     "newest train.keep_last checkpoints and step 10 reports the held-out reconstruction")
    out["model"]["embed_dim"] = _required(params, "embed_dim", "model.params")
    # The VF alignment: DINOv2 with the latent -> DINOv2 projection, as VA-VAE's released configs
    use_vf = params.get("use_vf")
    if use_vf is not None:
        if use_vf != "dinov2":
            raise ConfigError(f"upstream config key 'model.params.use_vf' is {use_vf!r}: the kit aligns with DINOv2 "
                              "only (set use_vf: dinov2, or remove it)")
        if params.get("reverse_proj") is not True:
            raise ConfigError(f"upstream config key 'model.params.reverse_proj' is {params.get('reverse_proj')!r} "
                              "(absent means false upstream): the kit implements the latent -> DINOv2 projection "
                              "of VA-VAE's configs only; set reverse_proj: true")
        out["loss"]["vf"] = "dinov2"
    elif params.get("reverse_proj"):
        notes.append("model.params.reverse_proj: true without use_vf has no effect upstream")

    # ddconfig: the encoder/decoder layout, key for key
    dd = _section(_required(params, "ddconfig", "model.params"), "model.params.ddconfig",
                  DD_KEYS + tuple(DD_FIXED), DD_FIXED)
    if dd.get("double_z") is not True:
        raise ConfigError("upstream config key 'model.params.ddconfig.double_z' must be true (upstream asserts it)")
    for key in DD_KEYS:
        out["model"][key] = _required(dd, key, "model.params.ddconfig")
    if out["model"]["z_channels"] != out["model"]["embed_dim"]:
        notes.append(f"ddconfig.z_channels {out['model']['z_channels']} != embed_dim {out['model']['embed_dim']}: the "
                     "latent has embed_dim channels (quant_conv maps between them), as upstream")

    # lossconfig: LPIPSWithDiscriminator's weights and the PatchGAN start; fixed values checked, not ignored
    loss_cfg = _section(_required(params, "lossconfig", "model.params"), "model.params.lossconfig",
                        ("target", "params"))
    if loss_cfg.get("target") != LOSS_TARGET:
        raise ConfigError(f"upstream config key 'model.params.lossconfig.target' is {loss_cfg.get('target')!r}: the "
                          f"kit implements {LOSS_TARGET} only")
    where = "model.params.lossconfig.params"
    lp = _section(loss_cfg.get("params"), where, ("disc_start", "vf_loss_type", *LOSS_DEFAULTS, *LOSS_FIXED),
                  LOSS_FIXED)
    out["loss"]["disc_start"] = _required(lp, "disc_start", where, out, "loss.disc_start")
    for key, default in LOSS_DEFAULTS.items():  # a key written empty is a hole, as disc_start
        out["loss"][key] = _required(lp, key, where, out, f"loss.{key}") if key in lp else default
    if "vf_loss_type" in lp:
        if lp["vf_loss_type"] != "combined_v3":
            raise ConfigError(f"upstream config key '{where}.vf_loss_type' is {lp['vf_loss_type']!r}: the kit trains "
                              "the released VF loss (margin cosine + margin distance matrix) only")
        notes.append("vf_loss_type: combined_v3 is not a parameter of upstream's released loss (the file says to "
                     "ignore it); the kit trains the released VF loss")

    # data and lightning.trainer: the folders, the global batch, epochs, precision
    _translate_data(raw, out, notes)
    return out


def _translate_data(raw: dict, out: dict, notes: list[str]) -> None:
    """`data` and `lightning.trainer`: image folders, the global batch, epochs and precision."""
    # lightning.trainer: only the keys upstream main.py passes on
    lightning = _section(raw.get("lightning"), "lightning", ("trainer",))
    trainer = _section(lightning.get("trainer"), "lightning.trainer", TRAINER_KEYS)  # main.py passes only these on
    data = _section(raw.get("data"), "data", ("target", "params"))
    if not data:
        notes.append("no data section (an inference config): set data.image_folder and train.max_steps with --set")
        return
    if data.get("target", DATA_TARGET) != DATA_TARGET:
        raise ConfigError(f"upstream config key 'data.target' is {data['target']!r}: the kit reads {DATA_TARGET}")
    dp = _section(data.get("params"), "data.params", ("batch_size", "wrap", "num_workers", "train", "validation",
                                                      "shuffle_val_dataloader", "use_worker_init_fn",
                                                      "shuffle_test_loader"))
    # The global batch: upstream's per-GPU batch x devices x nodes, split again over this run's processes
    per_gpu = int(_required(dp, "batch_size", "data.params"))
    devices = trainer.get("devices", 1)
    if isinstance(devices, str):
        devices = len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    elif isinstance(devices, (list, tuple)):
        devices = len(devices)
    nodes = int(trainer.get("num_nodes", 1) or 1)
    out["train"]["global_batch_size"] = per_gpu * int(devices) * nodes
    notes.append(f"data.params.batch_size {per_gpu} per GPU x {devices} device(s) x {nodes} node(s) -> "
                 f"train.global_batch_size {out['train']['global_batch_size']} (split over this run's processes)")
    if dp.get("num_workers"):
        out["data"]["num_workers"] = 1  # the kit reads ahead in one thread; worker count changes no pixels
    # The image folders of the train and validation splits (ImageNet's class-folder layout)
    for split, key in (("train", "image_folder"), ("validation", "valid_folder")):
        ds = _section(dp.get(split), f"data.params.{split}")
        if not ds:
            continue
        target, name = DATASETS[split]
        if ds.get("target") != target:
            raise ConfigError(f"upstream config key 'data.params.{split}.target' is {ds.get('target')!r}: the kit reads "
                              f"an image folder in place of {target} only")
        sp = _section(ds.get("params"), f"data.params.{split}.params", ("data_root", "config", "process_images"))
        if sp.get("data_root"):  # where ImageNetTrain/Validation read the classes
            out["data"][key] = str(Path(str(sp["data_root"])) / name / "data")
        conf = _section(sp.get("config"), f"data.params.{split}.params.config",
                        ("size", "random_crop", "keep_orig_class_label"))
        if split == "train":
            out["data"]["image_size"] = int(conf.get("size", 256))
            out["data"]["crop"] = "random" if conf.get("random_crop", True) else "center"
    # How long and in what precision
    if "max_epochs" in trainer:
        epochs = _required(trainer, "max_epochs", "lightning.trainer", out, "train.max_epochs")
        out["train"]["max_epochs"] = int(epochs) if epochs is not None else None
    precision = trainer.get("precision", 32)
    if precision not in PRECISIONS:
        raise ConfigError(f"upstream config key 'lightning.trainer.precision' is {precision!r}: choose 32, 16 or bf16")
    out["train"]["precision"] = PRECISIONS[precision]
