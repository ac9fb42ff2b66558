"""Issue 12: every config key honoured as upstream honours it or refused naming the key; a key left out
means what upstream's code makes of it; the reproduction presets sample as upstream (fp32); the
validation loss of `data.valid_path`; fixtures, LICENSE and NOTICE that say truthfully where things come from.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from repro import paths
from repro.config import Config, flatten, load_config
from repro.config_checks import (MODEL_TYPES, SAMPLING_METHODS, TORCHDIFFEQ_ONLY_METHODS, UPSTREAM_WHEN_MISSING,
                                 missing_upstream_defaults)
from repro.data.latents import shard_name, write_shard
from repro.data.stats import write_stats
from repro.data.stats_recompute import compute_stats
from repro.errors import ConfigError, ReproError
from repro.models.lightningdit import LIGHTNINGDIT_MODELS, build_model
from repro.setup import envinfo
from repro.setup.resolve import HARDWARE_PROFILES, find_config, resolve_config, resolve_file
from repro.training.validation import ValidationLoss, summarise
from repro.transport import METHODS
from tests.conftest import FIXTURES, PROJECT_ROOT

STAGE0 = "configs/train/tiny_stage_0.yaml"

# ----------------------------------------------------------------------------------------------
# Refused values: one line naming the key, the values the kit supports, and the fix

REFUSED = [
    ("transport.path_type=GVP", r"'transport.path_type' is 'GVP': upstream accepts it but the kit implements only "
                                r"Linear .*; set transport.path_type: Linear"),
    ("transport.path_type=VP", r"'transport.path_type' is 'VP': upstream accepts it"),
    ("transport.prediction=noise", r"'transport.prediction' is 'noise': upstream accepts it .* only velocity"),
    ("transport.prediction=score", r"'transport.prediction' is 'score'"),
    ("transport.loss_weight=velocity", r"'transport.loss_weight' is 'velocity': .*no effect; set transport.loss_weight: null"),
    ("transport.train_eps=0.001", r"'transport.train_eps' is 0.001: .*sets it to 0"),
    ("transport.sample_eps=0.001", r"'transport.sample_eps' is 0.001"),
    ("sample.mode=SDE", r"'sample.mode' is 'SDE': upstream's Sampler has an SDE integrator but inference.py raises "
                        r"NotImplementedError .*; set sample.mode: ODE"),
    ("sample.sampling_method=bosh3", r"'sample.sampling_method' is 'bosh3': upstream accepts it but the kit implements "
                                     r"only euler, midpoint, heun2, rk4, dopri5"),
    ("sample.reverse=true", r"'sample.reverse' is True: .*set sample.reverse: false"),
    ("sample.likelihood=true", r"'sample.likelihood' is True: upstream inference.py never reads it"),
    ("model.learn_sigma=true", r"'model.learn_sigma' is True: .*velocity only"),
    ("train.use_checkpoint=false", r"'train.use_checkpoint' is False: upstream train.py only logs it"),
    ("vae.model_name=vavae_experimentals", r"'vae.model_name' is 'vavae_experimentals': the kit's tokenizers are the "
                                           r"official VA-VAE f16d32 \('vavae_f16d32'\) and one trained by step 9"),
    ("vae.downsample_ratio=8", r"'vae.downsample_ratio' is 8: .*set vae.downsample_ratio: 16"),
    ("vae.model_name=custom vae.downsample_ratio=12 data.image_size=48",
     r"'vae.downsample_ratio' is 12: a tokenizer of step 9 downsamples by a power of two"),
    ("data.num_classes=1 sample.cfg_scale=4.0", r"'sample.cfg_scale' is 4.0: data.num_classes is 1 \(an unconditional"),
    ("model.model_type=LightningDiT-H/2", r"'model.model_type' is 'LightningDiT-H/2', not one of LightningDiT-B/1, "),
]
NEAR_MISSES = [("sample.sampling_method=dopri", "dopri5"), ("sample.sampling_method=Euler", "euler"),
               ("model.model_type=LightningDiT-XXL/1", "LightningDiT-XL/1"), ("sample.mode=ode", "ODE"),
               ("transport.path_type=linear", "Linear"), ("transport.prediction=velocty", "velocity")]


@pytest.mark.parametrize("override,message", REFUSED, ids=[o for o, _ in REFUSED])
def test_unimplemented_values_are_refused_naming_key_and_choices(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, override.split(" "))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override,meant", NEAR_MISSES, ids=[o for o, _ in NEAR_MISSES])
def test_near_misses_get_did_you_mean(override, meant):
    with pytest.raises(ConfigError, match=re.escape(f"did you mean '{meant}'?")):
        load_config(None, [override])


def test_accepted_values_that_mean_the_default():
    cfg = load_config(None, ["transport.train_eps=0", "transport.sample_eps=null", "sample.sampling_method=dopri5",
                             "model.model_type=LightningDiT-T/1", "train.use_checkpoint=true", "model.learn_sigma=false"])
    assert cfg.sample.sampling_method == "dopri5" and cfg.transport.train_eps == 0.0
    # kit (issue 13): a tokenizer of step 9 at f4, f8 or f16 (checked against its file when it loads)
    for ratio in (4, 8, 16):
        assert load_config(None, ["vae.model_name=custom", f"vae.downsample_ratio={ratio}"]).vae.downsample_ratio == ratio


def test_enumerations_match_the_implementations():
    from torchdiffeq._impl.odeint import SOLVERS

    from repro import config_checks as cc
    from repro import transport
    from repro.models.unet import UNET_MODELS

    assert set(MODEL_TYPES) == set(LIGHTNINGDIT_MODELS) | set(UNET_MODELS)  # kit (issue 23): the UNet family too
    assert set(SAMPLING_METHODS) == set(METHODS)
    assert (cc.DDPM_SAMPLING_METHODS, cc.DDPM_SCHEDULES, cc.DDPM_PREDICTIONS, cc.DDPM_VARIANCES) == (
        transport.DDPM_METHODS, transport.SCHEDULES, transport.PREDICTIONS, transport.VARIANCES)
    assert set(SAMPLING_METHODS) | set(TORCHDIFFEQ_ONLY_METHODS) == set(SOLVERS)  # upstream's spellings


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_file_is_refused_by_every_step_and_nothing_is_written(tmp_path):
    from steps import step7_train

    official = FIXTURES / "configs" / "lightningdit" / "config_details.yaml"
    bad = _write(tmp_path / "bad.yaml", official.read_text().replace("sampling_method: euler", "sampling_method: dopri")
                 .replace("output_dir: 'output'", f"output_dir: '{tmp_path / 'out'}'"))
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    proc = subprocess.run([sys.executable, "-m", "steps.step3_configs", "--base", str(bad)], cwd=PROJECT_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {bad}: config key 'sample.sampling_method' is 'dopri', not "
                                                "one of euler, midpoint, heun2, rk4, dopri5; did you mean 'dopri5'?"]
    assert not (paths.runs_dir() / "configs").exists()
    with pytest.raises(ConfigError, match=r"bad.yaml: config key 'sample.sampling_method' is 'dopri'"):
        step7_train.main(str(bad))
    assert not (tmp_path / "out").exists()
    # the same file with the value repaired by --set: loaded, and step 3 lists the change
    cfg, changes, _ = resolve_file(bad, ["sample.sampling_method=dopri5"], profile="cpu")
    assert cfg.sample.sampling_method == "dopri5" and "sample.sampling_method: dopri -> dopri5 (--set)" in changes


# ----------------------------------------------------------------------------------------------
# Missing keys: what upstream train.py / inference.py use


MINIMAL = """\
data: {data_path: latents, image_size: 256, num_classes: 1000, num_workers: 8}
vae: {model_name: vavae_f16d32}
model: {model_type: LightningDiT-XL/1, use_qknorm: false}
train: {max_steps: 10, global_batch_size: 8, global_seed: 0, output_dir: out, exp_name: x, log_every: 1, ckpt_every: 5}
optimizer: {lr: 0.0002, beta2: 0.95}
transport: {path_type: Linear, prediction: velocity, loss_weight: null, train_eps: null, sample_eps: null}
sample: {mode: ODE, sampling_method: euler, atol: 1.0e-6, rtol: 0.001, reverse: false, num_sampling_steps: 250,
         cfg_scale: 1.0, per_proc_batch_size: 4, fid_num: 50000}
"""


def test_missing_keys_mean_what_upstream_makes_of_them(tmp_path):
    cfg = load_config(_write(tmp_path / "minimal.yaml", MINIMAL))
    got = {k: v for k, v in flatten(cfg).items() if k in UPSTREAM_WHEN_MISSING}
    assert got == UPSTREAM_WHEN_MISSING == {
        "data.latent_norm": False, "data.latent_multiplier": 0.18215, "model.use_swiglu": False,
        "model.use_rope": False, "model.use_rmsnorm": False, "model.in_chans": 4, "train.resume": False,
        "transport.use_cosine_loss": False, "transport.use_lognorm": False}
    assert (cfg.sample.cfg_interval_start, cfg.sample.timestep_shift, cfg.vae.downsample_ratio) == (0.0, 0.0, 16)
    assert cfg.sample.precision == "fp32"  # inference.py never autocasts
    # step 3 says so, once per key; a key given with --set is not "absent"
    _, changes, _ = resolve_file(tmp_path / "minimal.yaml", ["model.in_chans=32"], profile="cpu")
    absent = [c for c in changes if "absent in minimal.yaml" in c]
    assert len(absent) == len(UPSTREAM_WHEN_MISSING) - 1
    assert "data.latent_multiplier: absent in minimal.yaml -> 0.18215 (what upstream train.py/inference.py" in changes[1]
    # Config() and load_config(None) keep the official configs' values; a complete file fills nothing
    assert Config().model.use_swiglu and load_config(None).data.latent_multiplier == 1.0
    for official in sorted((FIXTURES / "configs" / "lightningdit").rglob("*.yaml")):
        assert missing_upstream_defaults(yaml.safe_load(official.read_text())) == {"train.resume": False}


# ----------------------------------------------------------------------------------------------
# Sampling precision: the reproduction presets sample as upstream


def test_reproduction_presets_sample_in_fp32_and_step3_says_why():
    for preset in ("lightningdit_xl_800ep", "lightningdit_xl_64ep", "demo", "tiny"):
        assert load_config(find_config(preset)).sample.precision == "fp32", preset
    precision, why = envinfo.choose_precision(HARDWARE_PROFILES["a100-80gb"])
    assert precision == "bf16" and "as upstream trains" in why
    # step 1's recommendation for an A100 (the batch figures as envinfo.recommend writes them)
    a100 = {"precision": precision, "precision_reason": why, "sample_per_proc_batch_size": 256,
            "sample_batch_reason": "80 GiB GPU, bf16, XL/1 at 256 px", "train_micro_batch_size": 64,
            "train_batch_reason": "fits", "train_use_checkpoint": False, "train_ema_on_cpu": False}
    base = load_config(find_config("lightningdit_xl_800ep"), ["ckpt_path=x", "vae.ckpt_path=x", "data.data_path=x",
                                                              "data.fid_reference_file=x"])
    cfg, changes = resolve_config(base, env={"recommended": a100})
    assert cfg.sample.precision == "fp32" and cfg.train.precision == "bf16"  # training autocasts, as upstream
    assert cfg.sample.per_proc_batch_size == 128  # fp32 activations take twice the memory
    assert any(c.startswith("sample.per_proc_batch_size: auto -> 128 (halved for sample.precision fp32") for c in changes)
    # `auto` is an opt-in whose reason is true for sampling
    _, auto_changes = resolve_config(load_config(None, ["sample.precision=auto"]), env={"recommended": a100})
    line = next(c for c in auto_changes if c.startswith("sample.precision: auto -> bf16"))
    assert "upstream inference.py samples in fp32 + TF32" in line and "set sample.precision=fp32" in line


def test_step8_scores_against_the_run_configs_fid_reference_file(tmp_path):
    from repro.config import save_config
    from repro.evaluation.evaluate import configured_reference

    run = tmp_path / "run"
    run.mkdir()
    assert configured_reference(run) is None  # no run config: step 2's asset, as before
    save_config(Config(), run / "config.yaml")
    assert configured_reference(run) is None  # key unset
    ref = _write(tmp_path / "my_ref.npz", "x")
    save_config(load_config(None, [f"data.fid_reference_file={ref}"]), run / "config.yaml")
    assert configured_reference(run) == ref and configured_reference(run / "samples.npz") == ref
    save_config(load_config(None, [f"data.fid_reference_file={tmp_path / 'gone.npz'}"]), run / "config.yaml")
    with pytest.raises(ReproError, match=r"config.yaml: data.fid_reference_file is .*gone.npz, which does not exist: "
                                         r"pass --ref FILE"):
        configured_reference(run)


# ----------------------------------------------------------------------------------------------
# Documentation, fixtures, licenses


def test_every_key_has_a_row_in_docs_config_keys():
    text = (PROJECT_ROOT / "docs" / "config_keys.md").read_text()
    rows = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    documented = set(re.findall(r"`([a-z_.0-9]+)`", " ".join(rows)))
    missing = [k for k in flatten(Config()) if k not in documented]
    assert not missing, f"add a row to docs/config_keys.md for {missing}"
    for key in UPSTREAM_WHEN_MISSING:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}`"))
        assert "*missing ->" in row, key


def test_official_fixtures_hold_upstreams_values_and_say_so():
    for path in sorted((FIXTURES / "configs").rglob("*.yaml")):
        lines = path.read_text().splitlines()
        assert lines[0].startswith("# Test data: every key and value of ") and " at commit " in " ".join(lines[:2])
        raw = yaml.safe_load(path.read_text())
        for value in (raw["ckpt_path"], raw["data"]["data_path"], raw["data"]["fid_reference_file"]):
            assert value.startswith(("path/to/your", "your_path/")), (path, value)  # upstream's placeholders


def test_license_and_notice():
    license_text = (PROJECT_ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "Copyright (c) 2026 repro kit contributors" in license_text
    notice = (PROJECT_ROOT / "NOTICE").read_text()
    for credit in ("hustvl/LightningDiT", "MIT License, Copyright (c) 2024 HUST Vision Lab", "openai/guided-diffusion",
                   "centre crop", "VA-VAE", "taming-transformers", "latent-diffusion"):
        assert credit in notice, credit


# ----------------------------------------------------------------------------------------------
# data.valid_path: upstream's validation loss


def make_latents(folder: Path, n: int = 11, seed: int = 0, stats: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for k, count in enumerate((n // 2, n - n // 2)):
        lat = torch.randn(count, 32, 4, 4, generator=g) * 2 + 1
        write_shard(folder / shard_name(0, k), lat, lat.flip(-1), torch.arange(count) % 4)
    if stats:
        write_stats(folder / "latents_stats.pt", compute_stats(folder, subset=64), backup=False)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("latents")
    return make_latents(root / "train", n=32, seed=1), make_latents(root / "valid", n=11, seed=2)


def _tiny(cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg.model, 4, cfg.data.num_classes)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-zero starts at a zero output: give every weight a value
            p.add_(0.05 * torch.randn_like(p))
    return model.train()


def test_validation_loss_is_the_same_however_the_set_is_split(folders):
    cfg = load_config(STAGE0, [f"data.valid_path={folders[1]}"])
    model = _tiny(cfg)
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append((m.training, args[2].clone())))
    one = ValidationLoss(cfg, rank=0, world=1, device=torch.device("cpu"), precision="fp32")
    sums = one.local_sums(model, 4)
    assert model.training and all(not training for training, _ in seen)  # eval mode inside, restored after
    assert all(bool((y < cfg.data.num_classes).all()) for _, y in seen)  # no label dropout
    assert int(sums[2]) == len(one) == 11
    # two processes: every latent once (rank 1's padded repeat has weight 0), same total
    parts = [ValidationLoss(cfg, rank=r, world=2, device=torch.device("cpu"), precision="fp32").local_sums(model, 3)
             for r in (0, 1)]
    assert int(parts[0][2] + parts[1][2]) == 11
    torch.testing.assert_close(parts[0] + parts[1], sums, rtol=1e-6, atol=0)
    # the same draws at every evaluation: bitwise equal results
    assert one(model, 4) == one(model, 4) == summarise(sums, True)
    row = one(model, 4)
    assert row["val_loss"] == pytest.approx(row["val_mse"] + row["val_cos"]) and row["val_images"] == 11


def test_validation_draws_t_uniformly_whatever_use_lognorm_says(folders):
    from repro.training.validation import _draw

    class Zeros:  # a dataset stand-in: only the draws matter here
        def get(self, index, flip, generator=None):
            return torch.zeros(1), 0

    t = torch.cat([_draw(Zeros(), i, 0)[2] for i in range(4000)])
    assert abs(float((t < 0.05).float().mean()) - 0.05) < 0.015  # logit-normal would put 0.2% there
    cfgs = [load_config(STAGE0, [f"data.valid_path={folders[1]}", f"transport.use_lognorm={v}"]) for v in ("true", "false")]
    model = _tiny(cfgs[0])
    a, b = (ValidationLoss(c, rank=0, world=1, device=torch.device("cpu"), precision="fp32")(model, 4) for c in cfgs)
    assert a == b


def test_training_logs_the_validation_loss_at_each_checkpoint(folders, tmp_path):
    from steps import step7_train

    common = [f"data.data_path={folders[0]}", f"train.output_dir={tmp_path}", "train.max_steps=4",
              "train.ckpt_every=2", "train.log_every=1", "train.global_batch_size=8", "train.micro_batch_size=4",
              "train.async_save=false"]
    res = step7_train.main(STAGE0, set=[*common, f"data.valid_path={folders[1]}"])
    rows = [json.loads(x) for x in (Path(res["run_dir"]) / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_mse" in r] == [2, 4]
    assert all("val_mse" not in r for r in rows if r["step"] in (1, 3))
    # the logged value is the loss of the checkpoint's training weights (not the EMA)
    cfg = load_config(STAGE0, [*common, f"data.valid_path={folders[1]}"])
    model = build_model(cfg.model, 4, cfg.data.num_classes)
    state = torch.load(res["checkpoint"], map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"], strict=True)
    again = ValidationLoss(cfg, rank=0, world=1, device=torch.device("cpu"), precision="fp32")(model, 4)
    assert rows[-1]["val_mse"] == pytest.approx(again["val_mse"], rel=1e-6, abs=0)
    assert "validation loss" in (Path(res["run_dir"]) / "log.txt").read_text()


def test_a_bad_validation_folder_stops_before_anything_is_written(folders, tmp_path):
    from steps import step7_train

    common = [f"data.data_path={folders[0]}", f"train.output_dir={tmp_path / 'out'}"]
    with pytest.raises(ReproError, match=r"data.valid_path .*nowhere does not exist: extract the validation images"):
        step7_train.main(STAGE0, set=[*common, f"data.valid_path={tmp_path / 'nowhere'}"])
    no_stats = make_latents(tmp_path / "no_stats", stats=False)
    with pytest.raises(ReproError, match=r"has no latents_stats.pt .*step5_fix_stats --config .*tiny_stage_0.yaml "
                                         r"--recompute --set data.data_path="):
        step7_train.main(STAGE0, set=[*common, f"data.valid_path={no_stats}"])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_processes_log_the_validation_loss_of_one(folders, tmp_path):
    common = [f"data.data_path={folders[0]}", "train.max_steps=2", "train.ckpt_every=2", "train.log_every=1",
              "train.global_batch_size=8", "train.micro_batch_size=4", f"data.valid_path={folders[1]}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "steps.step7_train", "--config", STAGE0, "--set", *common, f"train.output_dir={tmp_path / 'two'}"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmd = [sys.executable, "-m", "steps.step7_train", "--config", STAGE0, "--set", *common,
           "train.micro_batch_size=8", f"train.output_dir={tmp_path / 'one'}"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = [json.loads((tmp_path / w / "tiny_two_stage" / "log.jsonl").read_text().splitlines()[-1]) for w in ("two", "one")]
    assert last[0]["val_images"] == last[1]["val_images"] == 11
    assert last[0]["val_mse"] == pytest.approx(last[1]["val_mse"], rel=1e-5)
