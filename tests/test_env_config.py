"""Step 1 (environment doctor, install planner, hardware traps) and step 3 (configs, presets, resolution)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from repro import paths
from repro.setup import envinfo, install_plan
from repro.config import Config, flatten, load_config
from repro.setup.envinfo import GPUInfo
from repro.utils.hardware import GiB
from repro.errors import ConfigError, ReproError
from repro.setup.resolve import HARDWARE_PROFILES, find_config, resolve_config
from steps import step1_install, step3_configs
from tests.conftest import FIXTURES, PROJECT_ROOT

OFFICIAL = sorted((FIXTURES / "configs").rglob("*.yaml"))
ASSET_NAMES = ["vavae-f16d32", "latents-stats", "lightningdit-xl-800ep", "lightningdit-xl-64ep", "adm-ref-imagenet256"]
P100 = GPUInfo("Tesla P100-PCIE-16GB", (6, 0), 16 * GiB)
T4 = GPUInfo("Tesla T4", (7, 5), 15 * GiB)
A100 = GPUInfo("NVIDIA A100-SXM4-80GB", (8, 0), 80 * GiB)
TORCH_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # a CUDA 13 wheel: no Pascal


# ----------------------------------------------------------------------------------------------
# Step 1


def test_step1_reports_this_machine_and_writes_env_json(capsys):
    report = step1_install.main(install=False)
    out = capsys.readouterr().out
    for word in ("python", "torch", "precision", "attention", "disk", "ram"):
        assert word in out
    saved = json.loads(paths.env_json().read_text())
    assert saved["torch"]["version"] == torch.__version__
    assert saved["recommended"] == report["recommended"]
    assert saved["platform"]["kind"] in ("local", "kaggle", "colab")
    if not torch.cuda.is_available():
        assert saved["gpus"] == [] and saved["recommended"]["precision"] == "fp32"
        assert saved["problems"] == []


def test_step1_dry_run_subprocess_prints_plan_and_keeps_torch(tmp_path):
    env = dict(os.environ, REPRO_RUNS_DIR=str(tmp_path / "runs"))
    proc = subprocess.run([sys.executable, "-m", "steps.step1_install", "--dry-run"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "plan:" in proc.stdout and "keep     torch" in proc.stdout
    saved = json.loads((tmp_path / "runs" / "env.json").read_text())
    assert saved["install"]["dry_run"] is True and saved["install"]["installed"] == []
    assert {i["name"]: i["action"] for i in saved["install"]["plan"]}["torch"] == "keep"


def test_install_planner_with_fake_requirements():
    reqs = install_plan.parse_requirements(["foo>=1.0", "bar>=2,<3  # comment", "torch>=99", "Baz_Pkg",
                                            "", "# only a comment", "qux==1.0; python_version < '3'"])
    items = {i.name: i for i in install_plan.plan_installs(
        reqs, installed={"bar": "3.1", "torch": "2.1.0", "baz-pkg": "0.1"})}
    assert items["foo"].action == "install" and items["foo"].installed is None
    assert items["bar"].action == "upgrade" and "outside" in items["bar"].reason
    assert items["torch"].action == "keep" and items["torch"].reason.startswith("WARNING")
    assert items["Baz_Pkg"].action == "ok"
    assert items["qux"].action == "skip"
    cmd = install_plan.pip_command(list(items.values()))
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"]
    assert "foo>=1.0" in cmd and any(c.startswith("bar") for c in cmd)
    assert not any(c.startswith(("torch", "Baz", "qux")) for c in cmd[4:])
    assert install_plan.warnings_of(list(items.values()))[0].startswith("torch:")
    plan_text = install_plan.format_plan(list(items.values()))
    assert "2 to install" in plan_text and "1 kept" in plan_text


def test_install_planner_missing_torch_is_kept_and_satisfied_installs_nothing():
    items = install_plan.plan_installs(install_plan.parse_requirements(["torchvision>=0.16", "numpy>=1.0"]),
                                       installed={"numpy": "2.0"})
    assert [i.action for i in items] == ["keep", "ok"]
    assert install_plan.execute_plan(items) == []  # nothing to do: pip is not run


def test_requirements_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "req.txt"
    bad.write_text("numpy>=1\n--index-url https://example.invalid\n")
    with pytest.raises(ReproError, match=r"req.txt:2"):
        install_plan.parse_requirements(bad)
    bad.write_text("numpy>=1\nnot a requirement!!\n")
    with pytest.raises(ReproError, match=r"req.txt:2: invalid requirement"):
        install_plan.parse_requirements(bad)
    with pytest.raises(ReproError, match="requirements file not found"):
        step1_install.main(requirements=str(tmp_path / "missing.txt"))


def test_failed_install_is_an_error_with_pips_message(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("repro-kit-no-such-package-xyz==1.0\n")
    with pytest.raises(ReproError) as err:
        step1_install.main(requirements=str(req), pip_args=["--no-index", "--disable-pip-version-check"])
    msg = str(err.value)
    assert "pip install failed" in msg and "repro-kit-no-such-package-xyz" in msg
    assert "No matching distribution" in msg or "Could not find a version" in msg


# ----------------------------------------------------------------------------------------------
# Hardware traps (pure functions, fabricated GPUs)


def test_p100_under_torch_without_sm60_gets_the_fix():
    assert not envinfo.arch_supported(P100.capability, TORCH_ARCHS)
    msg = envinfo.arch_trap(P100, TORCH_ARCHS, torch_version="2.9.0+cu130", cuda_version="13.0", platform="kaggle")
    assert "sm_60" in msg and "no kernel image" in msg
    assert "download.pytorch.org/whl/cu126" in msg and "GPU T4 x2" in msg
    assert envinfo.arch_trap(T4, TORCH_ARCHS) is None
    assert envinfo.arch_trap(P100, ["sm_50", "sm_60", "sm_70"]) is None


def test_arch_compatibility_rules():
    assert envinfo.arch_supported((8, 9), ["sm_80"])  # same major, newer minor: the cubin runs
    assert not envinfo.arch_supported((9, 0), ["sm_80", "sm_86"])  # new major needs its own cubin or PTX
    assert envinfo.arch_supported((9, 0), ["sm_80", "compute_80"])  # PTX JIT
    assert envinfo.arch_supported((9, 0), ["sm_90a"]) and not envinfo.arch_supported((9, 1), ["sm_90a"])
    blackwell = GPUInfo("NVIDIA RTX PRO 6000", (12, 0), 96 * GiB)
    assert "cu128" in envinfo.arch_trap(blackwell, ["sm_80", "sm_90"])


def test_precision_and_batch_choices():
    assert envinfo.choose_precision([T4])[0] == "fp16" and "no native bf16" in envinfo.choose_precision([T4])[1]
    assert envinfo.choose_precision([P100])[0] == "fp16"
    assert envinfo.choose_precision([A100])[0] == "bf16"
    assert envinfo.choose_precision([A100, T4])[0] == "fp16"  # the weakest GPU decides
    assert envinfo.choose_precision([])[0] == "fp32"
    t4, a100 = envinfo.recommend([T4]), envinfo.recommend([A100])
    assert 1 <= t4["sample_per_proc_batch_size"] < a100["sample_per_proc_batch_size"] <= 256
    assert 1 <= t4["train_micro_batch_size"] < a100["train_micro_batch_size"] <= 128
    assert envinfo.recommend([])["device"] == "cpu"


def test_training_layout_follows_the_memory_budget(tmp_path):
    # issue 7: XL/1 trains on a 16 GB T4 at micro-batch >= 8, with the savers the budget needs
    t4 = envinfo.recommend(HARDWARE_PROFILES["t4"])
    assert t4["train_micro_batch_size"] >= 8 and t4["train_use_checkpoint"]
    assert "GiB computed" in t4["train_batch_reason"]
    a100 = envinfo.recommend([A100])
    assert not a100["train_use_checkpoint"] and not a100["train_ema_on_cpu"]  # 80 GB needs no saver
    tiny = envinfo.recommend([GPUInfo("tiny", (8, 0), 8 * GiB)])  # the fp32 state alone is 12.6 GiB
    assert tiny["train_micro_batch_size"] == 1 and "does not fit" in tiny["train_batch_reason"]
    _fake_assets(tmp_path)
    cfg, changes = resolve_config(load_config(find_config("lightningdit_xl_800ep")), profile="t4")
    assert cfg.train.micro_batch_size == t4["train_micro_batch_size"] and cfg.model.use_checkpoint
    assert cfg.train.ema_on_cpu == t4["train_ema_on_cpu"]
    assert any(c.startswith("model.use_checkpoint: False -> True (needed for train.micro_batch_size") for c in changes)
    fixed, _ = resolve_config(load_config(find_config("lightningdit_xl_800ep"), ["train.micro_batch_size=4"]),
                              profile="t4")
    assert not fixed.model.use_checkpoint and not fixed.train.ema_on_cpu  # an explicit micro-batch: untouched


def test_sdpa_and_platform_detection():
    on = {"flash": True, "mem_efficient": True, "math": True, "cudnn": True}
    assert envinfo.sdpa_kernels((7, 5), on) == {"flash": False, "mem_efficient": True, "cudnn": False, "math": True}
    assert envinfo.sdpa_kernels((8, 0), on)["flash"]
    assert envinfo.sdpa_kernels((8, 0), dict(on, flash=False))["flash"] is False
    assert envinfo.detect_platform({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}) == "kaggle"
    assert envinfo.detect_platform({"COLAB_GPU": "1"}) == "colab"
    assert envinfo.detect_platform({}, colab_importable=True) == "colab"
    assert envinfo.detect_platform({}, colab_importable=False) == "local"


# ----------------------------------------------------------------------------------------------
# Step 3: official layouts, presets, resolution


def _leaves(raw: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in raw.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("path", OFFICIAL, ids=lambda p: str(p.relative_to(FIXTURES / "configs")))
def test_every_official_layout_loads_unchanged(path):
    cfg = load_config(path)
    values = flatten(cfg)
    for key, raw in _leaves(yaml.safe_load(path.read_text())).items():
        assert values[key] == (float(raw) if isinstance(values[key], float) and raw is not None else raw), key


def test_official_layouts_cover_the_known_files():
    names = {p.name for p in OFFICIAL}
    assert {"config_details.yaml", "lightningdit_xl_vavae_f16d32.yaml", "lightningdit_xl_vavae_f16d32_64ep_cfg.yaml",
            "lightningdit_xl_vavae_f16d32_800ep_cfg.yaml", "train_lightningdit_xl_1_stage_0.yaml",
            "train_lightningdit_xl_1_stage_1.yaml"} <= names


def test_keys_read_by_upstream_code_load():
    # train.py / inference.py / the VFM-VAE trainer read these with .get() defaults; users put them in configs
    cfg = load_config(None, ["train.weight_init=w.pt", "data.valid_path=val/", "optimizer.max_grad_norm=1.0",
                             "model.learn_sigma=false", "model.use_checkpoint=true", "train.use_checkpoint=false",
                             "train.grad_accum_steps=2", "train.resume=false", "train.wandb_project=x"])
    assert cfg.train.weight_init == "w.pt" and cfg.optimizer.max_grad_norm == 1.0 and cfg.train.grad_accum_steps == 2


def test_misspelled_key_and_wrong_type_are_named(tmp_path):
    text = OFFICIAL[0].read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("  cfg_scale:", "  cfg_scal:"))
    with pytest.raises(ConfigError, match=r"unknown config key 'sample.cfg_scal'; did you mean 'sample.cfg_scale'"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"bad.yaml"):
        step3_configs.main(base=str(bad), dry_run=True)
    bad.write_text(text.replace("num_sampling_steps: 250", "num_sampling_steps: many"))
    with pytest.raises(ConfigError, match=r"'sample.num_sampling_steps': expected int"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"did you mean 'bf16'"):
        load_config(None, ["sample.precision=bf61"])
    with pytest.raises(ConfigError, match=r"did you mean 'sample.cfg_scale'"):
        load_config(None, ["cfg_scale=4"])


def test_presets_name_their_number_and_carry_the_settings():
    for name in ("lightningdit_xl_800ep", "lightningdit_xl_64ep", "demo", "tiny"):
        assert find_config(name).read_text().startswith("# Reproduces:")
    s800, s64 = load_config(find_config("lightningdit_xl_800ep")).sample, load_config(find_config("lightningdit_xl_64ep")).sample
    assert (s800.cfg_scale, s800.cfg_interval_start, s800.timestep_shift, s800.num_sampling_steps,
            s800.sampling_method) == (6.7, 0.125, 0.3, 250, "euler")
    assert (s64.cfg_scale, s64.cfg_interval_start, s64.timestep_shift) == (10.0, 0.10, 0.3)
    demo = load_config(find_config("demo"))
    assert (demo.sample.cfg_scale, demo.sample.cfg_interval_start, demo.sample.timestep_shift) == (9.0, 0.0, 0.0)
    assert demo.ckpt_path == "asset:lightningdit-xl-800ep"
    tiny = load_config(find_config("tiny"))
    assert (tiny.model.model_type, tiny.vae.ch, tiny.data.image_size, tiny.data.num_classes) == ("LightningDiT-T/1", 32, 64, 10)
    assert tiny.sample.num_sampling_steps <= 16 and tiny.sample.precision == "fp32" == tiny.train.precision
    for preset in ("lightningdit_xl_800ep", "lightningdit_xl_64ep", "demo", "tiny"):
        values = [v for v in flatten(load_config(find_config(preset))).values() if isinstance(v, str)]
        assert not any("path/to" in v or "your_path" in v for v in values)


def _fake_assets(tmp_path: Path, skip: str | None = None) -> dict:
    table = {}
    for name in ASSET_NAMES:
        if name != skip:
            f = tmp_path / "assets" / name / ("latents_stats.pt" if name == "latents-stats" else f"{name}.bin")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"x")
            table[name] = {"path": str(f), "sha256": "0" * 64}
    paths.assets_json().parent.mkdir(parents=True, exist_ok=True)
    paths.assets_json().write_text(json.dumps({"assets": table}))
    return table


def test_asset_markers_resolve_and_the_resolved_config_round_trips(tmp_path):
    table = _fake_assets(tmp_path)
    res = step3_configs.main(base="tiny")
    cfg = res["config"]
    assert cfg.ckpt_path == str(Path(table["lightningdit-xl-800ep"]["path"]).resolve())
    assert cfg.vae.ckpt_path == str(Path(table["vavae-f16d32"]["path"]).resolve())
    assert Path(cfg.data.data_path, "latents_stats.pt").is_file()
    assert Path(cfg.train.output_dir) == (paths.runs_dir() / "output").resolve()
    assert res["path"] == paths.runs_dir() / "configs" / "tiny.resolved.yaml"
    assert any(c.startswith("ckpt_path: asset:lightningdit-xl-800ep -> ") for c in res["changes"])
    assert load_config(res["path"]) == cfg
    assert not any(isinstance(v, str) and v.startswith(("asset", "runs:")) for v in flatten(cfg).values())
    assert step3_configs.main(base="tiny", dry_run=True)["path"] is None


def test_missing_asset_says_which_and_how_to_fetch(tmp_path):
    _fake_assets(tmp_path, skip="lightningdit-xl-64ep")
    with pytest.raises(ConfigError, match=r"'lightningdit-xl-64ep'.*steps.step2_download --only lightningdit-xl-64ep"):
        step3_configs.main(base="lightningdit_xl_64ep", dry_run=True)
    paths.assets_json().unlink()
    with pytest.raises(ConfigError, match=r"step2_download --only lightningdit-xl-800ep latents-stats"):
        step3_configs.main(base="tiny", dry_run=True)


def test_a_broken_asset_table_is_one_error_everywhere(tmp_path):
    """Steps 3, 4 and 8 read runs/assets.json through one function: a broken table is never 'no assets'."""
    from repro.evaluation.evaluate import resolve_assets
    from repro.setup.prepare import prepare_config

    _fake_assets(tmp_path)
    for broken in ('{"assets": [1, 2', '["not", "an", "object"]', '{"assets": 3}'):
        paths.assets_json().write_text(broken)
        for call in (lambda: step3_configs.main(base="tiny", dry_run=True),
                     lambda: prepare_config("tiny", demo=True),
                     lambda: resolve_assets(None, None)):
            with pytest.raises(ConfigError, match=r"asset table .*assets\.json .*step2_download"):
                call()
    paths.assets_json().write_text(json.dumps({"assets": {"fid-inception": {"path": "gone.pth"}}}))
    with pytest.raises(ReproError, match=r"no --ref given and .*assets\.json does not list asset 'adm-ref-imagenet256'"):
        resolve_assets(None, None)
    with pytest.raises(ReproError, match=r"--weights given and .*'fid-inception' to .*gone\.pth, which is gone"):
        resolve_assets("ref.npz", None)


def test_env_adaptation_and_set_overrides_win(tmp_path):
    _fake_assets(tmp_path)
    paths.env_json().write_text(json.dumps({"recommended": envinfo.recommend([A100])}))
    res = step3_configs.main(base="lightningdit_xl_800ep", set=["sample.per_proc_batch_size=8", "sample.precision=fp16"],
                             out=str(tmp_path / "x.yaml"))
    cfg = res["config"]
    assert (cfg.sample.per_proc_batch_size, cfg.sample.precision) == (8, "fp16")  # --set wins
    assert cfg.train.precision == "bf16" and cfg.train.micro_batch_size == envinfo.recommend([A100])["train_micro_batch_size"]
    assert "sample.per_proc_batch_size: auto -> 8 (--set)" in res["changes"]
    assert any(c.startswith("train.precision: auto -> bf16") for c in res["changes"])
    assert load_config(tmp_path / "x.yaml") == cfg
    t4, _ = resolve_config(load_config(find_config("lightningdit_xl_800ep"), ["sample.precision=bf16"]),
                           assets=paths.assets_json(), profile="t4")
    assert t4.train.precision == "fp16" and t4.sample.precision == "bf16"  # explicit values are kept ...
    _, changes = resolve_config(load_config(find_config("demo"), ["sample.precision=bf16"]), profile="t4")
    assert any(c.startswith("warning: sample.precision: bf16 kept") for c in changes)  # ... and warned about
    assert set(HARDWARE_PROFILES) >= {"cpu", "t4", "p100", "a100-80gb"}


def test_cpu_profile_and_unknown_names():
    cfg, changes = resolve_config(Config(), profile="cpu")
    assert cfg.sample.precision == "fp32" and cfg.train.micro_batch_size == 8
    with pytest.raises(ConfigError, match="unknown hardware profile 'tpu'"):
        resolve_config(Config(), profile="tpu")
    with pytest.raises(ConfigError, match="config not found: nope"):
        find_config("nope")
