"""Issue 13, steps 9 and 10: the tokenizer config (kit schema and upstream's VA-VAE YAMLs), training that learns,
resumes bitwise, splits over torchrun processes and stops on its budget, the optional loss parts, fine-tuning from a
tokenizer file, and the evaluation (PSNR, SSIM, rFID with a random-weights Inception in torch-fidelity's format)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from repro.config import load_config
from repro.data.synthetic import make_digits_folder
from repro.errors import ConfigError, ReproError
from repro.tokenizer.loader import OFFICIAL_ARCH, load_tokenizer, load_vae, read_tokenizer_header
from repro.tokenizer_training.config import load_tokenizer_config
from repro.tokenizer_training.trainer import train_tokenizer
from tests.conftest import FIXTURES, PROJECT_ROOT

UPSTREAM = FIXTURES / "tokenizer_configs"
# f2 autoencoder of width 8 on 16 px images: 8x8x4 latents, a step in a few ms
TINY = ["model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[]",
        "model.z_channels=4", "model.embed_dim=4", "model.resolution=16", "model.norm_groups=4",
        "data.image_size=16", "train.global_batch_size=8", "train.log_every=1", "train.lr=0.002"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    make_digits_folder(root / "train", size=16, per_class=4, held_out=root / "held", held_out_per_class=2)
    return root


def tiny_cfg(digits: Path, out: Path, *more: str):
    return load_tokenizer_config(PROJECT_ROOT / "configs/tokenizer/digits_f4.yaml",
                                 [*TINY, f"data.image_folder={digits / 'train'}", f"train.output_dir={out}", *more])


# ----------------------------------------------------------------------------------------------
# Configs


def test_kit_schema_refuses_unknown_keys_wrong_types_and_contradictions(tmp_path):
    cases = [("model.chh=8", r"unknown tokenizer config key 'model.chh'; did you mean 'model.ch'\?"),
             ("model.ch_mult=[1,two]", r"'model.ch_mult\[1\]': expected int"),
             ("loss.rec_loss=l2", r"'loss.rec_loss': expected 'l1' or 'mse', got 'l2'"),
             ("train.max_epochs=3", r"'train.max_steps' \(300\) and 'train.max_epochs' \(3\) are both set"),
             ("data.image_size=30", r"'data.image_size' \(30\) must be a multiple of the downsampling factor 4"),
             ("model.norm_groups=5", r"'ch' \(32\) must be a multiple of 'norm_groups' \(5\)"),
             ("train.ema_decay=1.5", r"'train.ema_decay' must be in \[0, 1\)")]
    for override, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_tokenizer_config(PROJECT_ROOT / "configs/tokenizer/digits_f4.yaml", [override])


def test_upstream_vavae_configs_load_unchanged_and_mean_what_upstream_does():
    notes: list[str] = []
    cfg = load_tokenizer_config(UPSTREAM / "vavae_f16d32_vfdinov2.yaml", notes=notes)
    assert cfg.arch() == OFFICIAL_ARCH and cfg.train.lr == 1e-4 and (cfg.train.beta1, cfg.train.beta2) == (0.5, 0.9)
    assert (cfg.loss.kl_weight, cfg.loss.disc_start, cfg.loss.disc_weight) == (1e-6, 5001, 0.5)
    assert (cfg.loss.vf, cfg.loss.vf_weight, cfg.loss.adaptive_vf) == ("dinov2", 0.1, True)
    assert (cfg.loss.cos_margin, cfg.loss.distmat_margin) == (0.5, 0.25)
    assert cfg.train.global_batch_size == 8 * 8 * 4 and cfg.train.max_epochs == 50 and cfg.train.precision == "fp32"
    assert cfg.data.image_folder == "/path/to/imagenet/ILSVRC2012_train/data" and cfg.data.crop == "random"
    assert any("batch_size 8 per GPU x 8 device(s) x 4 node(s)" in n for n in notes)
    # without VF: upstream's class defaults for what the file leaves out (vf keys unused)
    ldm = load_tokenizer_config(UPSTREAM / "vavae_f16d32_ldm.yaml")
    assert ldm.loss.vf is None and ldm.loss.disc_start == 5001
    # inference configs of tokenizer/configs: the data comes from --set
    exp = load_tokenizer_config(UPSTREAM / "tokenizer_vavae_f16d32.yaml", ["data.image_folder=x", "train.max_steps=5"])
    assert exp.loss.disc_start == 1 and exp.ckpt_path == "/path/to/checkpoint.pt"
    # the staged file leaves values empty: an error naming the key, unless --set fills it
    long = UPSTREAM / "vavae_f16d32_vfdinov2_long.yaml"
    with pytest.raises(ConfigError, match=r"'model.params.lossconfig.params.disc_start' is empty .* --set "
                                          r"loss.disc_start=VALUE"):
        load_tokenizer_config(long)
    filled = load_tokenizer_config(long, ["loss.disc_start=1", "loss.vf_weight=0.5", "loss.distmat_margin=0",
                                          "loss.cos_margin=0", "train.max_epochs=100"])
    assert filled.loss.vf_weight == 0.5 and filled.train.max_epochs == 100


@pytest.mark.parametrize("old,new,message", [
    ("use_vf: dinov2", "use_vf: mae", r"'model.params.use_vf' is 'mae': the kit aligns with DINOv2 only"),
    ("reverse_proj: true ", "reverse_proj: false ", r"'model.params.reverse_proj' is False"),
    ("dropout: 0.0", "dropout: 0.1", r"'model.params.ddconfig.dropout' is 0.1: the kit's blocks have no dropout"),
    ("disc_weight: 0.5", "disc_weight: 0.5\n        pixelloss_weight: 2.0",
     r"'model.params.lossconfig.params.pixelloss_weight' is 2.0: upstream stores it and never uses it"),
    ("precision: 32", "precision: 32\n    gradient_clip_val: 1.0", r"'lightning.trainer.gradient_clip_val' is not read"),
    ("target: ldm.models.autoencoder.AutoencoderKL", "target: ldm.models.autoencoder.VQModel", r"trains .*AutoencoderKL"),
])
def test_upstream_values_the_kit_does_not_implement_are_refused(tmp_path, old, new, message):
    text = (UPSTREAM / "vavae_f16d32_vfdinov2.yaml").read_text()
    assert old in text
    path = tmp_path / "changed.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message) as err:
        load_tokenizer_config(path)
    assert "\n" not in str(err.value)


def test_step3_and_the_dit_steps_say_a_tokenizer_config_is_one(tmp_path):
    for path in (UPSTREAM / "vavae_f16d32_vfdinov2.yaml", PROJECT_ROOT / "configs/tokenizer/digits_f4.yaml"):
        with pytest.raises(ConfigError, match=r"this is a tokenizer config .*step 9 \(python -m "
                                              r"steps.step9_train_tokenizer --config"):
            load_config(path)
    proc = subprocess.run([sys.executable, "-m", "steps.step3_configs", "--base", str(UPSTREAM / "vavae_f16d32_ldm.yaml")],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
    assert proc.returncode == 1 and "this is a tokenizer config" in proc.stderr and "unknown" not in proc.stderr


def test_every_tokenizer_key_has_a_row_in_docs_config_keys():
    import dataclasses
    import re

    from repro.tokenizer_training.config import TokenizerConfig

    text = (PROJECT_ROOT / "docs" / "config_keys.md").read_text().split("## Tokenizer configs (step 9)")[1]
    documented = set(re.findall(r"`([a-z_.0-9]+)`", " ".join(line.split("|")[1] for line in text.splitlines()
                                                             if line.startswith("| "))))
    cfg = TokenizerConfig()
    keys = ["ckpt_path"] + [f"{section}.{f.name}" for section in ("model", "loss", "data", "train")
                            for f in dataclasses.fields(getattr(cfg, section))]
    missing = [k for k in keys if k not in documented]
    assert not missing, f"add rows to docs/config_keys.md (tokenizer section) for {missing}"


# ----------------------------------------------------------------------------------------------
# Training


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def test_training_learns_and_writes_a_tokenizer_the_dit_config_loads(digits, tmp_path):
    res = train_tokenizer(tiny_cfg(digits, tmp_path, "train.max_steps=40", "train.ckpt_every=20", "train.warmup_steps=0"))
    rows = _rows(res["run_dir"])
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    assert last < 0.6 * first, (first, last)
    run = Path(res["run_dir"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000040.pt"]  # keep_last 1
    for name in ("tokenizer.safetensors", "config.yaml", "log.txt", "loss.png"):
        assert (run / name).is_file(), name
    header = read_tokenizer_header(res["tokenizer"])
    assert header["step"] == 40 and header["arch"]["ch_mult"] == [1, 2] and header["image_size"] == 16
    assert header["class_names"] == [f"digit_{c}" for c in range(10)]
    # the DiT side: vae.model_name custom builds it from the file; wrong numbers are errors naming both
    dit = load_config(PROJECT_ROOT / "configs/train/own_data.yaml", res["dit_overrides"])
    vae = load_vae(dit.vae)
    assert vae.embed_dim == 4 and vae.downsample_ratio == 2
    for override, message in (("vae.ch=16", r"'vae.ch' is 16 but the tokenizer .* has 8: set vae.ch: 8"),
                              ("vae.downsample_ratio=4", r"'vae.downsample_ratio' is 4 but the tokenizer .* has 2")):
        with pytest.raises(ConfigError, match=message):
            load_vae(load_config(PROJECT_ROOT / "configs/train/own_data.yaml", [*res["dit_overrides"], override]).vae)
    official = load_config(None, [f"vae.ckpt_path={res['tokenizer']}"])
    with pytest.raises(ConfigError, match=r"is a tokenizer trained by step 9, but vae.model_name is 'vavae_f16d32': "
                                          r"set vae.model_name: custom"):
        load_vae(official.vae)


def test_a_killed_run_resumes_bitwise_with_gan_and_ema(digits, tmp_path):
    # a constant learning rate: stopping at step 3 is then the 6-step run killed after its step-3 checkpoint
    more = ["loss.disc_start=2", "loss.disc_num_layers=1", "train.ema_decay=0.9", "train.ckpt_every=3",
            "train.lr_schedule=constant", "train.warmup_steps=0"]
    straight = train_tokenizer(tiny_cfg(digits, tmp_path / "a", "train.max_steps=6", *more))
    train_tokenizer(tiny_cfg(digits, tmp_path / "b", "train.max_steps=3", *more))
    resumed = train_tokenizer(tiny_cfg(digits, tmp_path / "b", "train.max_steps=6", *more))
    assert resumed["step"] == 6 and "resumed from" in (Path(resumed["run_dir"]) / "log.txt").read_text()
    a, b = load_file(straight["tokenizer"]), load_file(resumed["tokenizer"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(straight["checkpoint"], weights_only=True)
    sb = torch.load(resumed["checkpoint"], weights_only=True)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])  # discriminator included
    assert any(k.startswith("disc.") for k in sa["model"]) and "disc_loss" in _rows(straight["run_dir"])[-1]


def test_time_budget_stops_cleanly_and_the_next_call_continues(digits, tmp_path):
    cfg = tiny_cfg(digits, tmp_path, "train.max_steps=4")
    first = train_tokenizer(cfg, time_budget=1e-3)
    assert first["stopped"] == "time_budget" and first["step"] == 0 and first["tokenizer"] is None
    second = train_tokenizer(cfg)
    assert second["step"] == 4 and second["stopped"] == "max_steps"
    assert train_tokenizer(cfg)["stopped"] == "already_done"


def test_lpips_absent_is_a_note_and_vf_trains_against_a_small_frozen_network(digits, tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU())  # (N, 16, 8, 8)
    cfg = tiny_cfg(digits, tmp_path, "train.max_steps=3", "loss.perceptual_weight=1.0", "loss.vf=dinov2")
    res = train_tokenizer(cfg, feature_net=net)
    log = (Path(res["run_dir"]) / "log.txt").read_text()
    assert "note: LPIPS weights absent" in log and "training goes on without LPIPS" in log and "+ VF" in log
    row = _rows(res["run_dir"])[-1]
    assert row["vf_loss"] > 0 and row["vf_weight"] > 0
    assert any(k.startswith("vf.proj") for k in torch.load(res["checkpoint"], weights_only=True)["model"])
    # without a network and without the DINOv2 weights: a clear error, not a silent run without VF
    with pytest.raises(ConfigError, match=r"loss.vf is dinov2 but loss.vf_weights asset:dinov2-vitl14 is not on disk"):
        train_tokenizer(tiny_cfg(digits, tmp_path / "x", "train.max_steps=1", "loss.vf=dinov2"))


def test_init_from_a_tokenizer_file_and_refusals(digits, tmp_path):
    base = train_tokenizer(tiny_cfg(digits, tmp_path / "base", "train.max_steps=2"))
    tuned = train_tokenizer(tiny_cfg(digits, tmp_path / "tuned", "train.max_steps=1", "train.lr=0",
                                     f"model.init_from={base['tokenizer']}"))
    a, b = load_file(base["tokenizer"]), load_file(tuned["tokenizer"])
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: the weights it started from
    with pytest.raises(ConfigError, match=r"has architecture .* the config's model section says"):
        train_tokenizer(tiny_cfg(digits, tmp_path / "c", "train.max_steps=1", "model.ch=16",
                                 f"model.init_from={base['tokenizer']}"))
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(plain))
    with pytest.raises(ConfigError, match=r"is the official VA-VAE f16d32 layout, but the config's model section differs"):
        train_tokenizer(tiny_cfg(digits, tmp_path / "d", "train.max_steps=1", f"model.init_from={plain}"))


def test_two_processes_train_what_one_does(digits, tmp_path):
    common = ["--config", str(PROJECT_ROOT / "configs/tokenizer/digits_f4.yaml"), "--set", *TINY,
              f"data.image_folder={digits / 'train'}", "train.max_steps=3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    runs = {}
    for n in (2, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "steps.step9_train_tokenizer", *common, f"train.output_dir={tmp_path / str(n)}"]
        proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        runs[n] = load_file(str(tmp_path / str(n) / "own_data" / "tokenizer.safetensors"))
    # all-reduce order only: Adam divides by sqrt(v), so a near-zero gradient's rounding can move a weight by a few
    # percent of one step (lr 2e-3); different batches or a missing all-reduce move it by whole steps
    for k in runs[1]:
        torch.testing.assert_close(runs[2][k], runs[1][k], rtol=1e-4, atol=2e-4)


# ----------------------------------------------------------------------------------------------
# Evaluation


def test_evaluation_reports_psnr_ssim_and_rfid_when_inception_weights_exist(digits, tmp_path, capsys):
    from steps import step10_evaluate_tokenizer
    from tests.test_evaluation import write_random_inception

    res = train_tokenizer(tiny_cfg(digits, tmp_path, "train.max_steps=2"))
    plain = step10_evaluate_tokenizer.main(tokenizer=res["tokenizer"], folder=str(digits / "held"), out=str(tmp_path / "e1"))
    assert plain["rfid"] is None and plain["lpips"] is None and plain["images_used"] == 20
    assert "rFID skipped: Inception weights asset:fid-inception are not on disk" in capsys.readouterr().out
    assert Path(plain["grid"]).is_file() and json.loads((tmp_path / "e1" / "metrics.json").read_text())["psnr"] == plain["psnr"]
    # PSNR is that of the saved pixels: recompute it from the decoded posterior means
    vae, _ = load_tokenizer(res["tokenizer"])
    from repro.tokenizer.images import to_uint8
    from repro.tokenizer_training.data import TokenizerImages
    x, _ = TokenizerImages(digits / "held", 16, crop="center").centre_crops()
    with torch.no_grad():
        rec = to_uint8(vae.decode(vae.encode(x).mean)).numpy().astype(np.float64)
    mse = ((to_uint8(x).numpy() - rec) ** 2).reshape(len(x), -1).mean(1)
    assert plain["psnr"] == pytest.approx(float(np.mean(10 * np.log10(255.0 ** 2 / mse))), rel=1e-9)
    weights = write_random_inception(tmp_path / "weights-inception-random.pth")
    from repro.tokenizer_training.evaluate import evaluate_tokenizer
    with_fid = evaluate_tokenizer(res["tokenizer"], digits / "held", out_dir=tmp_path / "e2", inception_weights=str(weights),
                                  rfid_images=12)
    assert with_fid["rfid"] > 0 and with_fid["rfid_images"] == 12


def test_unreadable_images_are_reported_and_replaced_never_silently_dropped(digits, tmp_path, capsys):
    import shutil
    folder = tmp_path / "imgs"
    shutil.copytree(digits / "train", folder)
    (folder / "digit_0" / "broken.png").write_bytes(b"not a png")
    res = train_tokenizer(tiny_cfg(digits, tmp_path, "train.max_steps=6", f"data.image_folder={folder}"))
    out = capsys.readouterr().out
    assert res["step"] == 6 and "broken.png cannot be read" in out and "replaced by the next readable image" in out
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ReproError, match=r"lists no images"):
        train_tokenizer(tiny_cfg(digits, tmp_path / "e", "train.max_steps=1", f"data.image_folder={tmp_path / 'empty'}"))


def test_the_logged_lr_after_a_resume_is_the_scheduled_one(digits, tmp_path):
    """Warm-up and a cosine schedule, stopped at step 3 and resumed to 6: the log rows of steps 4-6 show the lr the
    unbroken run used (the optimizer set once showed the starting lr after a resume: load_state_dict replaces
    Adam's group list)."""
    more = ["train.ckpt_every=3", "train.log_every=1", "train.warmup_steps=4", "train.lr_schedule=cosine"]
    whole = _rows(train_tokenizer(tiny_cfg(digits, tmp_path / "whole", "train.max_steps=6", *more))["run_dir"])
    train_tokenizer(tiny_cfg(digits, tmp_path / "cut", "train.max_steps=3", *more))
    cut = _rows(train_tokenizer(tiny_cfg(digits, tmp_path / "cut", "train.max_steps=6", *more))["run_dir"])
    lrs = lambda rows: {r["step"]: r["lr"] for r in rows if r["step"] > 3}  # noqa: E731 (steps 1-3 had max_steps 3)
    assert len(set(lrs(whole).values())) == 3  # the schedule moves
    assert lrs(cut) == lrs(whole)
