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
from tests.tiny_assets import hub_tiny_config

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


# A folder's keys that must be changed before its configs load (none: the VFM-VAE trainer's configs name
# `vfm_vae_f16d32`, which the kit implements since repro/tokenizer/vfm_vae.py).
REPAIRS: dict[str, dict[str, str]] = {}


@pytest.mark.parametrize("path", OFFICIAL, ids=lambda p: str(p.relative_to(FIXTURES / "configs")))
def test_every_official_layout_loads_unchanged(path):
    repair = REPAIRS.get(path.relative_to(FIXTURES / "configs").parts[0], {})
    if repair:
        with pytest.raises(ConfigError, match=r"train_lightningdit_xl_1_stage_\d.yaml: config key 'vae.model_name' "
                                              r"is 'vfm_vae_f16d32': the kit's tokenizers are the official VA-VAE f16d32"):
            load_config(path)
    cfg = load_config(path, [f"{k}={v}" for k, v in repair.items()])
    values = flatten(cfg)
    for key, raw in _leaves(yaml.safe_load(path.read_text())).items():
        if key not in repair:
            assert values[key] == (float(raw) if isinstance(values[key], float) and raw is not None else raw), key


def test_official_layouts_cover_the_known_files():
    names = {p.name for p in OFFICIAL}
    assert {"config_details.yaml", "lightningdit_xl_vavae_f16d32.yaml", "lightningdit_xl_vavae_f16d32_64ep_cfg.yaml",
            "lightningdit_xl_vavae_f16d32_800ep_cfg.yaml", "train_lightningdit_xl_1_stage_0.yaml",
            "train_lightningdit_xl_1_stage_1.yaml"} <= names


def test_keys_read_by_upstream_code_load():
    # train.py / inference.py / the VFM-VAE trainer read these with .get() defaults; users put them in configs
    cfg = load_config(None, ["train.weight_init=w.pt", "data.valid_path=val/", "optimizer.max_grad_norm=1.0",
                             "model.learn_sigma=false", "model.use_checkpoint=true", "train.use_checkpoint=true",
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
    tiny = str(hub_tiny_config(tmp_path))  # the tiny preset naming the official assets
    res = step3_configs.main(base=tiny)
    cfg = res["config"]
    assert cfg.ckpt_path == str(Path(table["lightningdit-xl-800ep"]["path"]).resolve())
    assert cfg.vae.ckpt_path == str(Path(table["vavae-f16d32"]["path"]).resolve())
    assert Path(cfg.data.data_path, "latents_stats.pt").is_file()
    assert Path(cfg.train.output_dir) == (paths.runs_dir() / "output").resolve()
    assert res["path"] == paths.runs_dir() / "configs" / "tiny_hub.resolved.yaml"
    assert any(c.startswith("ckpt_path: asset:lightningdit-xl-800ep -> ") for c in res["changes"])
    assert load_config(res["path"]) == cfg
    assert not any(isinstance(v, str) and v.startswith(("asset", "runs:")) for v in flatten(cfg).values())
    assert step3_configs.main(base=tiny, dry_run=True)["path"] is None


def test_missing_asset_says_which_and_how_to_fetch(tmp_path):
    _fake_assets(tmp_path, skip="lightningdit-xl-64ep")
    with pytest.raises(ConfigError, match=r"'lightningdit-xl-64ep'.*steps.step2_download --only lightningdit-xl-64ep"):
        step3_configs.main(base="lightningdit_xl_64ep", dry_run=True)
    paths.assets_json().unlink()
    with pytest.raises(ConfigError, match=r"step2_download --only lightningdit-xl-800ep latents-stats"):
        step3_configs.main(base=str(hub_tiny_config(tmp_path)), dry_run=True)


def test_a_broken_asset_table_is_one_error_everywhere(tmp_path):
    """Steps 3, 4 and 8 read runs/assets.json through one function: a broken table is never 'no assets'."""
    from repro.evaluation.evaluate import resolve_assets
    from repro.setup.prepare import prepare_config

    _fake_assets(tmp_path)
    tiny = str(hub_tiny_config(tmp_path))
    for broken in ('{"assets": [1, 2', '["not", "an", "object"]', '{"assets": 3}'):
        paths.assets_json().write_text(broken)
        for call in (lambda: step3_configs.main(base=tiny, dry_run=True),
                     lambda: prepare_config(tiny, demo=True),
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


# ----------------------------------------------------------------------------------------------
# Step 1: direct-URL requirements (issue 17) and what step 1 prints


def _dist_info(site: Path, name: str, version: str, direct_url: dict | None = None) -> None:
    """An installed distribution as pip leaves it: METADATA, and direct_url.json (PEP 610) if from a URL."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))


def test_direct_url_requirements_reach_pip_as_written_and_need_their_own_build(tmp_path):
    archive = "https://files.example.org/pkgs/probe-1.0.tar.gz"
    vcs = "git+https://github.com/example/tool.git@v2.1#subdirectory=py"
    reqs = install_plan.parse_requirements([f"probe @ {archive}", f"tool[cli] @ {vcs}", "plain>=1"])
    items = {i.name: i for i in install_plan.plan_installs(reqs, installed={"probe": "1.0", "plain": "1.5"})}
    # installed from an index under the same name: not the URL's build, whatever the version
    assert items["probe"].action == "replace" and "package index" in items["probe"].reason
    assert items["tool"].action == "install" and items["plain"].action == "ok"
    cmd = install_plan.pip_command(list(items.values()))
    assert cmd[4:] == [f"probe @ {archive}", f"tool[cli] @ {vcs}"]  # exactly as written, never a bare name
    assert f"'probe @ {archive}'" in install_plan.format_plan(list(items.values()))  # a command that pastes

    # real installed distributions (dist-info folders) with and without PEP 610 records
    site = tmp_path / "site"
    _dist_info(site, "probe", "1.0", {"url": archive, "archive_info": {"hashes": {"sha256": "ab" * 32}}})
    _dist_info(site, "tool", "2.1", {"url": "https://github.com/example/tool.git", "subdirectory": "py",
                                     "vcs_info": {"vcs": "git", "requested_revision": "v2.1", "commit_id": "c0ffee"}})
    _dist_info(site, "other", "3.0")  # from an index
    _dist_info(site, "elsewhere", "1.0", {"url": "https://mirror.example.net/pkgs/probe-1.0.tar.gz", "archive_info": {}})
    reqs = install_plan.parse_requirements([
        f"probe @ {archive}", f"tool @ {vcs}", "other @ https://example.org/other-3.0.whl",
        "elsewhere @ https://files.example.org/pkgs/probe-1.0.tar.gz",
        f"probe @ {archive}#sha256={'cd' * 32}"])
    got = [(i.action, i.reason) for i in install_plan.plan_installs(reqs, path=[str(site)])]
    assert [a for a, _ in got] == ["ok", "ok", "replace", "replace", "replace"], got
    assert "installed from https://mirror.example.net" in got[3][1] and f"sha256 {'ab' * 32}" in got[4][1]
    assert install_plan.origin_matches("git+https://user:token@github.com/example/tool.git@c0ffee#subdirectory=py",
                                       json.loads((site / "tool-2.1.dist-info" / "direct_url.json").read_text()))[0]
    assert not install_plan.origin_matches("git+https://github.com/example/tool.git@v3#subdirectory=py",
                                           json.loads((site / "tool-2.1.dist-info" / "direct_url.json").read_text()))[0]


def _wheel(folder: Path, name: str, version: str, source: str) -> Path:
    """A minimal pure-Python wheel whose module says where it came from."""
    import base64
    import hashlib
    import zipfile

    dist = f"{name.replace('-', '_')}-{version}"
    files = {"url_probe_pkg/__init__.py": f"SOURCE = {source!r}\n",
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(t.encode())}" for p, t in files.items()]
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record + [f"{dist}.dist-info/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for p, t in files.items():
            zf.writestr(p, t)
    return path


def _venv_over_this_environment(venv: Path) -> str:
    """A fresh venv (its own site-packages first) that also sees every package this interpreter sees;
    returns its python.

    `venv --system-site-packages` is not that when the tests themselves run in a venv (the README's
    set-up): the nested venv is built on the base interpreter and sees the base's packages, not this
    venv's (no torch there). A .pth file adding this interpreter's site folders (their own .pth files
    processed, as at start-up) works from the system interpreter and from any venv alike.
    """
    import site

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    lines = [f"import site; site.addsitedir({folder!r})\n" for folder in ours if Path(folder).is_dir()]
    Path(purelib, "repro_tests_outer_environment.pth").write_text("".join(lines))
    return py


def test_step1_replaces_an_index_build_with_the_direct_url_build(tmp_path):
    """Real pip in a real virtual environment: the same name and version from an index is not the URL's build."""
    name = "repro-kit-url-probe"
    _wheel(tmp_path / "index", name, "1.0", "index")
    url_wheel = _wheel(tmp_path / "url", name, "1.0", "url")
    py = _venv_over_this_environment(tmp_path / "venv")
    pip = [py, "-m", "pip", "install", "--no-index", "--disable-pip-version-check", "--no-deps"]
    subprocess.run([*pip, "--find-links", str(tmp_path / "index"), name], check=True, capture_output=True)
    source = lambda: subprocess.run([py, "-c", "import url_probe_pkg; print(url_probe_pkg.SOURCE)"],  # noqa: E731
                                    capture_output=True, text=True, check=True).stdout.strip()
    assert source() == "index"

    req = tmp_path / "requirements.txt"
    req.write_text(f"{name} @ {url_wheel.as_uri()}\n")
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    step1 = [py, "-m", "steps.step1_install", "--requirements", str(req), "--out", str(tmp_path / "runs"),
             "--pip-arg=--no-index", "--pip-arg=--disable-pip-version-check"]
    proc = subprocess.run(step1, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"replace  {name}" in proc.stdout and "installed from a package index, not from the URL" in proc.stdout
    assert f"'{name} @ {url_wheel.as_uri()}'" in proc.stdout  # handed to pip as written
    assert source() == "url"
    saved = json.loads((tmp_path / "runs" / "env.json").read_text())["install"]
    assert saved["installed"] == [f"{name} @ {url_wheel.as_uri()}"]
    again = subprocess.run([*step1, "--dry-run"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"ok       {name}" in again.stdout and f"installed from {url_wheel.as_uri()}" in again.stdout
    assert "plan: 0 to install, 1 satisfied" in again.stdout


def test_step1_prints_this_machines_values(capsys, tmp_path):
    """Each printed value checked against the machine, read here independently of envinfo."""
    import importlib.metadata
    import platform
    import re
    import shutil

    step1_install.main(dry_run=True, out=str(tmp_path / "runs"))
    out = capsys.readouterr().out
    line = {m.group(1): m.group(2) for m in re.finditer(r"^(python|platform|torch|gpu|ram|disk|precision|batch)"
                                                         r"\s+(.*)$", out, re.M)}
    assert line["python"] == f"{platform.python_version()} ({sys.executable})"
    assert line["platform"].endswith(f", {os.cpu_count()} CPUs)")
    assert line["torch"].startswith(f"{torch.__version__}, CUDA build {torch.version.cuda}")
    meminfo = dict(x.split(":") for x in Path("/proc/meminfo").read_text().splitlines())
    total = int(meminfo["MemTotal"].split()[0]) * 1024 / 2**30
    assert line["ram"].startswith(f"{total:.1f} GiB total, ")
    free = float(line["disk"].split(" GiB free at ")[0])
    assert line["disk"].endswith(f" free at {tmp_path / 'runs'}")
    assert abs(free - shutil.disk_usage(tmp_path).free / 2**30) < 1.0  # other writers move it a little
    if not torch.cuda.is_available():
        assert line["gpu"] == "none (CPU only)" and line["precision"].startswith("fp32 for `auto`")
        assert line["batch"].startswith("sample 4 per process") and "train micro batch 8 " in line["batch"]
    # every plan line's installed version is what importlib.metadata says
    reqs = install_plan.parse_requirements(PROJECT_ROOT / "requirements.txt")
    for req in reqs:
        found = re.search(rf"^(\w+)\s+{re.escape(req.name)}\s+\S+\s+(.*)$", out, re.M)
        assert found, req.name
        version = importlib.metadata.version(req.name)
        if found.group(1) in ("ok", "upgrade"):
            assert found.group(2).startswith(version), (req.name, found.group(0))
    hub = importlib.metadata.version("huggingface_hub")
    assert f"huggingface_hub {hub}: ok" in out



def test_recommended_batches_follow_the_documented_rules():
    """Against the rules written down (README, envinfo's constants), not against envinfo.recommend itself."""
    from repro.config import ModelConfig
    from repro.models.cost import block_saved_fn, training_memory_budget, usable_bytes

    # sampling: pow2_floor((GiB - 4 fixed) / per image: 0.25 half, 0.5 fp32), capped at 256
    assert envinfo.recommend_sampling([T4], "fp16")["sample"] == 32  # (15 - 4) / 0.25 = 44 -> 32
    assert envinfo.recommend_sampling([A100], "bf16")["sample"] == 256  # 304 -> cap
    assert envinfo.recommend_sampling([P100], "fp16")["sample"] == 32  # (16 - 4) / 0.25 = 48 -> 32
    assert envinfo.recommend_sampling([A100], "fp32")["sample"] == 128  # (80 - 4) / 0.5 = 152 -> 128
    assert envinfo.recommend([])["sample_per_proc_batch_size"] == 4  # upstream's sampling batch on a CPU
    # training, README: XL/1 on a 16 GB T4 trains at micro-batch 32 with checkpointing and the EMA in host memory
    t4 = envinfo.recommend_training(HARDWARE_PROFILES["t4"], "fp16")
    assert (t4["train_micro_batch_size"], t4["train_use_checkpoint"], t4["train_ema_on_cpu"]) == (32, True, True)
    # an 80 GB card: no saver, the largest power of two (<= 128) whose computed budget fits
    a100 = envinfo.recommend_training([A100], "bf16")
    m = a100["train_micro_batch_size"]
    saved = block_saved_fn(ModelConfig(), 16, "bf16")  # one XL block's saved activations, measured (affine in m)
    budget = lambda micro: training_memory_budget(ModelConfig(), 16, micro, "bf16", checkpointing=False,  # noqa: E731
                                                  block_saved=saved(micro)).total
    assert not a100["train_use_checkpoint"] and not a100["train_ema_on_cpu"]
    assert m >= 16 and budget(m) <= usable_bytes(A100.total_memory) and (m == 128 or
                                                                          budget(2 * m) > usable_bytes(A100.total_memory))


def test_step3_command_line_writes_the_resolved_config(tmp_path):
    out = tmp_path / "resolved.yaml"
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    cmd = [sys.executable, "-m", "steps.step3_configs", "--base", "tiny", "--profile", "cpu", "--out", str(out),
           "--set", "sample.cfg_scale=2.5", "--set", "sample.num_sampling_steps=7"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(out)
    assert (cfg.sample.cfg_scale, cfg.sample.num_sampling_steps) == (2.5, 7)
    assert "sample.cfg_scale:" in proc.stdout and "(--set)" in proc.stdout and proc.stdout.strip().splitlines()[-1] == f"wrote: {out}"
    dry = subprocess.run([*cmd[:-4], "--dry-run"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert dry.returncode == 0 and dry.stdout.strip().splitlines()[-1] == "wrote: nothing (--dry-run)"
    bad = subprocess.run([*cmd[:5], "--set", "sample.no_such_key=1"], cwd=PROJECT_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "sample.no_such_key" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_runs_marker_stays_inside_the_runs_folder():
    """`runs:REL` is a folder under the runs folder; one that climbs out of it is refused, naming it."""
    assert paths.runs_path("runs:tiny/latents") == (paths.runs_dir() / "tiny" / "latents").resolve()
    assert paths.runs_path("/abs/folder") == Path("/abs/folder")  # not a marker: as written
    for escape in ("runs:../elsewhere", "runs:a/../../elsewhere"):
        with pytest.raises(ConfigError, match=r"'runs:.*' points outside the runs folder"):
            paths.runs_path(escape)
