"""Any denoiser with any process: the UNet family, the config keys of the DDPM process, training on the one engine
(LightningDiT + DDPM, UNet + DDPM, UNet + flow), exact resume after SIGKILL, sampling through step 4 (DDIM, DDPM,
x0 strips, per-image determinism).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.config import load_config
from repro.errors import ConfigError
from repro.models.denoisers import build_denoiser, combination_overrides, family_of
from repro.models.lightningdit import build_model
from repro.models.unet import UNET_MODELS, UNet
from repro.training import list_checkpoints
from steps.step7_train import main as train_main
from tests.conftest import PROJECT_ROOT
from tests.test_training import make_latents

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STAGE0 = "configs/train/tiny_stage_0.yaml"
DDPM = ["transport.process=ddpm", "transport.prediction=noise", "transport.use_cosine_loss=false",
        "transport.use_lognorm=false", "sample.sampling_method=ddim", "sample.num_sampling_steps=10"]
UNET = ["model.model_type=UNet-T"]


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    return make_latents(tmp_path_factory.mktemp("latents"))


def run_args(latents: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.data_path={latents}", f"train.output_dir={out}", *extra]


# ---------------------------------------------------------------------------------------------
# the UNet


def test_unet_shapes_classes_and_registry():
    torch.manual_seed(0)
    m = UNET_MODELS["UNet-T"](input_size=8, in_channels=4, num_classes=10)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 10.0, 999.0]), torch.tensor([0, 9, 10])  # 10 = null class
    assert m(x, t, y).shape == x.shape
    assert m.y_embedder.embedding_table.num_embeddings == 11 and m.num_classes == 10
    assert sum(isinstance(b, torch.nn.Module) for b in m.blocks) == len(m.blocks) > 0
    # zero-initialised output: the untrained UNet predicts 0; after a nudge, the label changes the output
    assert m(x, t, y).abs().max() == 0
    torch.nn.init.normal_(m.out_conv.weight, std=0.1)
    for block in m.modules():
        if hasattr(block, "conv2"):
            torch.nn.init.normal_(block.conv2.weight, std=0.1)
    assert not torch.allclose(m(x, t, torch.tensor([0, 0, 0])), m(x, t, torch.tensor([1, 1, 1])))
    # unconditional: no class embedding, labels ignored
    u = UNet(input_size=8, in_channels=4, num_classes=0, channels=(16, 32), num_res_blocks=1, time_dim=32)
    assert u.y_embedder is None
    torch.testing.assert_close(u(x, t, torch.tensor([0, 1, 2])), u(x, t, torch.tensor([5, 5, 5])))
    with pytest.raises(ValueError, match="multiple of 4"):
        UNet(input_size=6, channels=(8, 16, 32))
    # attention where asked: UNet-Mini at 4x4 and 2x2 of an 8x8 latent (factors 2 and 4) and in the middle
    mini = UNET_MODELS["UNet-Mini"](input_size=8, in_channels=4, num_classes=10)
    sizes = []
    hook = lambda mod, inp, out: sizes.append(inp[0].shape[-1])  # noqa: E731
    for mod in mini.modules():
        if type(mod).__name__ == "AttentionBlock":
            mod.register_forward_hook(hook)
    mini(torch.randn(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.int64))
    assert set(sizes) == {4, 2} and 8 not in sizes



@pytest.mark.parametrize("key,value", [("use_qknorm", "true"), ("use_swiglu", "false"), ("use_rope", "false"),
                                       ("use_rmsnorm", "false"), ("wo_shift", "true"), ("use_checkpoint", "true")])
def test_a_unet_refuses_lightningdit_switches_it_would_ignore(key, value):
    """A key the UNet does not implement is refused by name; at LightningDiT's defaults (own_data.yaml spells them
    out) the switches are simply not read, so notebook 04's UNet keeps working."""
    base = ["model.model_type=UNet-Mini"]
    assert load_config("configs/train/own_data.yaml", base).model.model_type == "UNet-Mini"
    with pytest.raises(ConfigError, match=rf"config key 'model.{key}' is .*UNet.* set model.{key}: "):
        load_config("configs/train/own_data.yaml", [*base, f"model.{key}={value}"])
    load_config("configs/train/own_data.yaml", [f"model.{key}={value}"])  # a LightningDiT takes it

def test_a_lightningdit_is_built_as_before_whatever_the_process():
    cfg = load_config(STAGE0)
    torch.manual_seed(0)
    a = build_model(cfg.model, 4, 4).state_dict()
    for process in ("flow", "ddpm"):
        torch.manual_seed(0)
        b = build_denoiser(cfg.model, 4, 4, process).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert family_of("UNet-S") == "unet" and family_of("LightningDiT-XL/1") == "dit"
    unet = load_config(STAGE0, UNET).model
    assert build_denoiser(unet, 4, 4, "flow").time_scale == 1000.0 and build_denoiser(unet, 4, 4, "ddpm").time_scale == 1.0


# ---------------------------------------------------------------------------------------------
# the config


@pytest.mark.parametrize("extra, message", [
    (["sample.sampling_method=dopri5"], "'sample.sampling_method' is 'dopri5': an ODE solver of flow matching"),
    (["sample.sampling_method=dim"], "did you mean 'ddim'"),
    (["transport.use_cosine_loss=true"], "'transport.use_cosine_loss' is True"),
    (["sample.num_sampling_steps=1001"], "the process has 1000 timesteps"),
    (["sample.sampling_method=ddpm", "sample.eta=0.5"], "'sample.eta' is 0.5"),
    (["transport.schedule=sigmoid"], "'transport.schedule' is 'sigmoid'"),
    (["sample.timestep_shift=0.3"], "'sample.timestep_shift' is 0.3"),
    (["transport.prediction=score"], "'transport.prediction' is 'score'"),
])
def test_contradictory_ddpm_keys_are_refused(extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(STAGE0, DDPM + extra)


def test_flow_refuses_ddpm_samplers_and_official_configs_are_unchanged():
    with pytest.raises(ConfigError, match="DDIM and DDPM sample the DDPM process"):
        load_config(STAGE0, ["sample.sampling_method=ddim"])
    for name in ("configs/lightningdit_xl_800ep.yaml", "configs/train/lightningdit_xl_800ep_stage_0.yaml"):
        cfg = load_config(name)
        assert cfg.transport.process == "flow" and cfg.model.model_type.startswith("LightningDiT")
    for denoiser in ("dit", "unet"):
        for process in ("flow", "ddpm"):
            cfg = load_config("configs/train/own_data.yaml", combination_overrides(denoiser, process))
            assert family_of(cfg.model.model_type) == denoiser and cfg.transport.process == process


def test_ddpm_draws_its_timesteps_logit_normal_where_use_lognorm_says_so():
    """Notebook 04's LightningDiT + DDPM draws t logit-normal, k = floor(t T): the middle half of the indices gets
    73% of the draws (uniform: 50%); upstream DDPM (combination_overrides' default) stays uniform."""
    from repro.models.denoisers import own_data_overrides
    from repro.transport.ddpm import DiffusionSchedule
    from repro.transport.path import sample_timesteps

    for keys, share in ((own_data_overrides("dit", "ddpm")[1], 0.727), (combination_overrides("dit", "ddpm"), 0.5)):
        t = load_config("configs/train/own_data.yaml", keys).transport
        k = DiffusionSchedule.from_config(t).index_of(sample_timesteps(20000, t.use_lognorm, torch.Generator().manual_seed(0)))
        assert t.process == "ddpm" and float(((k >= 250) & (k < 750)).double().mean()) == pytest.approx(share, abs=0.015)


# ---------------------------------------------------------------------------------------------
# training on the one engine


@pytest.mark.parametrize("extra", [UNET + DDPM, DDPM, UNET + ["transport.use_cosine_loss=false"]],
                         ids=["unet-ddpm", "dit-ddpm", "unet-flow"])
def test_every_combination_trains_and_lowers_the_loss(latents, tmp_path, extra):
    result = train_main(STAGE0, set=run_args(latents, tmp_path, "train.max_steps=120", "train.log_every=20",
                                             "train.ckpt_every=1000", "optimizer.lr=0.002", *extra))
    rows = [json.loads(line) for line in (Path(result["run_dir"]) / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.85 * rows[0]["loss"], [r["loss"] for r in rows]  # ε-MSE falls slowly at small t
    state = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert state["config"]["transport"]["process"] == ("ddpm" if "transport.process=ddpm" in extra else "flow")
    if extra[0] == UNET[0]:
        assert any(k.startswith("down.") for k in state["ema"])


def step7(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.Popen([sys.executable, "-m", "steps.step7_train", *args], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_unet_ddpm_resumes_bitwise_after_sigkill(latents, tmp_path):
    steps = 60
    ckpt_dir = lambda out: out / "tiny_two_stage" / "checkpoints"  # noqa: E731
    args = lambda out: ["--config", STAGE0, "--set", *run_args(latents, out, f"train.max_steps={steps}",  # noqa: E731
                                                               "train.ckpt_every=5", "train.log_every=5", *UNET, *DDPM)]
    ref = step7(args(tmp_path / "ref"))
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out
    run = step7(args(tmp_path / "cut"))
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None:
        if any(int(p.stem) >= 20 for _, p in list_checkpoints(ckpt_dir(tmp_path / "cut"))):
            break
        time.sleep(0.005)
    assert run.poll() is None, run.communicate()[0]
    run.send_signal(signal.SIGKILL)
    run.communicate()
    again = step7(args(tmp_path / "cut"))
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "resumed from" in out, out
    a, b = (torch.load(list_checkpoints(ckpt_dir(tmp_path / d))[-1][1], map_location="cpu", weights_only=True)
            for d in ("ref", "cut"))
    assert a["step"] == b["step"] == steps
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"


# ---------------------------------------------------------------------------------------------
# sampling through step 4


@pytest.fixture(scope="module")
def unet_run(latents, tmp_path_factory) -> tuple[Path, dict]:
    from tests.tiny_assets import write_tiny_assets

    out = tmp_path_factory.mktemp("unet_run")
    assets = write_tiny_assets(out / "assets")
    result = train_main(STAGE0, set=run_args(latents, out, "train.max_steps=20", "train.ckpt_every=20", *UNET, *DDPM))
    return Path(result["checkpoint"]), {"vae": assets["vavae-f16d32"]}


@pytest.mark.parametrize("sampler", [["sample.sampling_method=ddim"], ["sample.sampling_method=ddim", "sample.eta=1.0"],
                                     ["sample.sampling_method=ddpm", "sample.num_sampling_steps=20"]],
                         ids=["ddim", "ddim-eta1", "ddpm"])
def test_step4_samples_a_unet_ddpm_checkpoint_image_by_image(unet_run, latents, tmp_path, sampler):
    from steps.step4_inference import main as sample_main

    ckpt, files = unet_run
    common = [f"ckpt_path={ckpt}", f"vae.ckpt_path={files['vae']}", f"data.data_path={latents}", *UNET, *DDPM,
              *sampler]
    a = sample_main(config=STAGE0, out=str(tmp_path / "a"), num_samples=6, batch_size=4, set=common, trajectory=3,
                    progress=False)
    b = sample_main(config=STAGE0, out=str(tmp_path / "b"), num_samples=6, batch_size=6, set=common, progress=False)
    with np.load(a["npz"]) as fa, np.load(b["npz"]) as fb:
        x, y = fa["arr_0"].astype(int), fb["arr_0"].astype(int)
    assert x.shape[0] == 6 and np.abs(x - y).max() <= 1  # any batch size: the same images, to rounding
    steps = 20 if "sample.num_sampling_steps=20" in sampler else 10
    assert len(sorted(Path(a["trajectories_dir"]).glob("*.png"))) == 6 and a["trajectory_steps"] == [0, round((steps - 1) / 2), steps - 1]


# ---------------------------------------------------------------------------------------------
# notebook 04 with denoiser=unet


def run_notebook_04(tmp_path: Path, **params) -> dict:
    out = tmp_path / "out.ipynb"
    cmd = [sys.executable, "-m", "papermill", str(PROJECT_ROOT / "notebooks" / "04_own_data.ipynb"), str(out),
           "--no-progress-bar", *[a for k, v in params.items() for a in ("-p", k, str(v))]]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=3600,
                          env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "w" / "own_data" / "summary.json").read_text())


@pytest.mark.slow
def test_notebook_04_runs_headless_with_a_unet_and_ddim(tmp_path):
    summary = run_notebook_04(tmp_path, workdir=tmp_path / "w", denoiser="unet", images_per_class=7, tokenizer_steps=3,
                              dit_steps=3, samples_per_class=2, sampling_steps=4, trajectory=2, rfid_images=0)
    dit_yaml = load_config(tmp_path / "w" / "own_data" / "dit.yaml")
    assert dit_yaml.model.model_type == "UNet-Mini" and dit_yaml.transport.process == "ddpm"
    assert dit_yaml.transport.prediction == "velocity"  # notebook 04's DDPM default (ε: `prediction=noise`)
    assert dit_yaml.transport.schedule == "cosine"  # ... and its schedule (lightdiff's default: `schedule=linear`)
    assert dit_yaml.sample.sampling_method == "ddim"
    with np.load(summary["samples_npz"]) as f:
        assert f["arr_0"].shape == (20, 32, 32, 3)


@pytest.mark.slow
def test_acceptance_notebook_04_with_a_unet_recognises_at_least_90_percent(tmp_path):
    """The full default run with denoiser=unet (UNet-Mini, DDPM v on the cosine schedule, DDIM 50 steps)."""
    summary = run_notebook_04(tmp_path, workdir=tmp_path / "w", denoiser="unet")
    check = summary["check"]
    print(check["summary"], f"stage times {summary['times']}")
    assert check["recognised"] >= 0.9 and check["heldout_accuracy"] >= 0.9 and check["ratio"] >= 0.9
