"""The VFM-VAE path offline, end to end, on a tiny random VFM-VAE served by the local fake hub (tests/tiny_vfm_vae.py):
step 2 fetches it by name, step 3 resolves `asset:vfm-vae-f16d32`, step 6 extracts latents from an image folder,
step 7 trains a tiny LightningDiT on them, step 4 samples and decodes with the VFM-VAE, step 8 evaluates (random
Inception weights); then a SIGKILLed VFM-VAE extraction resumes to the same shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("transformers", reason="VFM-VAE's encoder needs transformers (pip install transformers)")
from repro.data.synthetic import make_digits_folder
from repro.resources import find_config
from tests.fakehub import FakeHub, serve_manifest
from tests.test_evaluation import write_random_inception
from tests.test_extract import kill_after_first_shard
from tests.tiny_vfm_vae import TINY_IMAGE, TINY_Z, VFM_VAE_ASSET, tiny_vfm_vae_bytes, vfm_vae_repo


def write_vfm_config(root: Path) -> Path:
    """configs/tiny.yaml with the VFM-VAE: `vae.ckpt_path: asset:vfm-vae-f16d32`, 4-channel latents."""
    raw = yaml.safe_load(find_config("tiny").read_text())
    raw["ckpt_path"] = None  # the DiT comes from step 7 (given to step 4 with --set)
    raw["vae"].update(model_name="vfm_vae_f16d32", ckpt_path=f"asset:{VFM_VAE_ASSET}")
    raw["model"]["in_chans"] = TINY_Z
    raw["data"].update(data_path=str(root / "latents"), image_size=TINY_IMAGE)
    raw["train"].update(output_dir=str(root / "output"), max_steps=6, ckpt_every=6, log_every=2)
    raw["sample"].update(num_sampling_steps=4, cfg_scale=1.5)
    path = root / "tiny_vfm_vae.yaml"
    path.write_text("# Reproduces: no number. configs/tiny.yaml with a tiny random VFM-VAE (tests/tiny_vfm_vae.py)\n"
                    + yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    root = tmp_path_factory.mktemp("vfm")
    with pytest.MonkeyPatch.context() as mp, FakeHub(files={vfm_vae_repo(): tiny_vfm_vae_bytes()}) as hub:
        mp.setenv("REPRO_RUNS_DIR", str(root / "runs"))  # the module fixture outlives the per-test settings
        mp.setenv("HF_HOME", str(root / "hf"))
        mp.setenv("HF_ENDPOINT", hub.endpoint)
        yield _run(root, hub)


def _run(root: Path, hub: FakeHub) -> dict:
    from steps import step2_download, step3_configs, step4_inference, step6_extract, step7_train, step8_evaluate

    manifest = serve_manifest(root, hub)
    assets = step2_download.main(only=[VFM_VAE_ASSET], manifest=str(manifest))["assets"]
    resolved = step3_configs.main(config=str(write_vfm_config(root)), out=str(root / "resolved.yaml"))
    folder = Path(make_digits_folder(root / "digits", size=TINY_IMAGE, per_class=2)["folder"])
    report = step6_extract.main(str(resolved["path"]), source=str(folder), store="mean", batch_size=8, shard_size=12)
    dit = step7_train.main(str(resolved["path"]))
    samples = step4_inference.main(config=str(resolved["path"]), num_samples=8, out=str(root / "samples"),
                                   set=[f"ckpt_path={dit['checkpoint']}"], batch_size=4, progress=False)
    metrics = step8_evaluate.main(samples["out_dir"], ref=str(folder), metrics="fid", batch_size=8,
                                  weights=str(write_random_inception(root / "inception-random.pth")))
    return dict(root=root, hub=hub, assets=assets, resolved=resolved, folder=folder, report=report, dit=dit,
                samples=samples, metrics=metrics)


def test_step2_fetches_the_named_checkpoint_and_step3_resolves_it(path):
    repo, filename = vfm_vae_repo()
    assert path["hub"].count("GET", Path(filename).name) >= 1  # the file itself (its CDN redirect counts too)
    entry = path["assets"][VFM_VAE_ASSET]
    local = Path(entry["path"] if isinstance(entry, dict) else entry)
    assert local.read_bytes() == tiny_vfm_vae_bytes()
    cfg = path["resolved"]["config"]
    assert Path(cfg.vae.ckpt_path) == local and cfg.vae.model_name == "vfm_vae_f16d32"


def test_step6_latents_are_the_vfm_vae_posterior_mean(path):
    from repro.data.latents import LatentShardDataset, list_shards
    from repro.tokenizer.images import center_crop_arr, pil_to_tensor
    from repro.tokenizer.vfm_vae_load import load_vfm_vae
    from PIL import Image

    assert path["report"]["num_encoded"] == 20 and len(list_shards(path["root"] / "latents")) == 2
    ds = LatentShardDataset(path["root"] / "latents", latent_norm=False)
    x, _ = ds.raw(0)
    assert tuple(x.shape) == (TINY_Z, 4, 4)
    vae = load_vfm_vae(path["resolved"]["config"].vae.ckpt_path)
    image = Image.open(sorted((path["folder"] / "digit_0").iterdir())[0]).convert("RGB")
    with torch.no_grad():
        mean = vae.encode(pil_to_tensor(center_crop_arr(image, TINY_IMAGE))[None]).mean[0]
    torch.testing.assert_close(x, mean, rtol=1e-5, atol=1e-5)
    stats = torch.load(path["root"] / "latents" / "latents_stats.pt", weights_only=True)
    assert tuple(stats["mean"].shape) == (1, TINY_Z, 1, 1)


def test_step7_trains_step4_decodes_with_the_vfm_vae_and_step8_scores(path):
    losses = [json.loads(line)["loss"] for line in (Path(path["dit"]["run_dir"]) / "log.jsonl").read_text().splitlines()]
    assert path["dit"]["step"] == 6 and all(np.isfinite(losses))
    with np.load(path["samples"]["npz"]) as f:
        images = f["arr_0"]
    assert images.shape == (8, TINY_IMAGE, TINY_IMAGE, 3) and images.dtype == np.uint8 and images.std() > 0
    assert np.isfinite(path["metrics"]["fid"]) and path["metrics"]["fid"] > 0


def test_a_killed_vfm_vae_extraction_resumes_to_the_same_shards(path, tmp_path):
    import os
    import subprocess
    import sys

    from repro.data.extract import extract_latents
    from repro.tokenizer.vfm_vae_load import load_vfm_vae
    from tests.conftest import PROJECT_ROOT

    cfg = path["resolved"]["config"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child (OMP_NUM_THREADS=1): CPU rounding depends on the thread count
    try:
        extract_latents(load_vfm_vae(cfg.vae.ckpt_path), path["folder"], tmp_path / "ref", image_size=TINY_IMAGE,
                        batch_size=4, shard_size=4, seed=0, stats_subset=16)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "steps.step6_extract", "--config", str(path["resolved"]["path"]), "--source",
           str(path["folder"]), "--out", str(out), "--batch-size", "4", "--shard-size", "4", "--device", "cpu",
           "--set", "data.stats_subset=16"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    done_at_kill = kill_after_first_shard(cmd, out, env, timeout=90)
    assert 1 <= done_at_kill < 5 and not (out / "extract_report.json").exists()
    rerun = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads((out / "extract_report.json").read_text())
    assert report["shards_reused"] == done_at_kill and report["shards_written"] == 5 - done_at_kill
    shards = lambda folder: {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}  # noqa: E731
    assert shards(out) == shards(tmp_path / "ref") and len(shards(out)) == 5
    assert (out / "latents_stats.pt").read_bytes() == (tmp_path / "ref" / "latents_stats.pt").read_bytes()


def test_step4_latent_shards_are_upstreams_layout_and_decode_to_the_pngs(path, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from repro.sampling.latent_shards import pack_shards
    from repro.tokenizer.vfm_vae_load import load_vfm_vae
    from steps import step4_inference

    out = tmp_path / "shards"
    res = step4_inference.main(config=str(path["resolved"]["path"]), num_samples=6, out=str(out), batch_size=4,
                               set=[f"ckpt_path={path['dit']['checkpoint']}"], progress=False, latent_shards=True)
    assert [Path(p).name for p in res["latent_shards"]] == ["samples_rank00_shard000.safetensors"]
    with safe_open(res["latent_shards"][0], "pt") as f:
        assert set(f.keys()) == {"latents", "labels"}
    shard = load_file(res["latent_shards"][0])
    assert shard["latents"].shape == (6, TINY_Z, 4, 4) and shard["latents"].dtype == torch.float32
    assert shard["labels"].dtype == torch.int32 and shard["labels"].tolist() == res["labels"]
    # the latents are the tokenizer's: decoding them gives the PNGs (upstream's tools/decode does the same)
    vae = load_vfm_vae(path["resolved"]["config"].vae.ckpt_path, with_encoder=False)
    with torch.no_grad():
        pixels = ((vae.decode(shard["latents"][:1]) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
    with np.load(res["npz"]) as f:
        png = torch.from_numpy(f["arr_0"][0]).permute(2, 0, 1)
    assert (pixels[0].int() - png.int()).abs().max() <= 1
    # shards of 10,000 in upstream; smaller here to see the numbering
    names = [p.name for p in pack_shards(out, 6, shard_images=4)]
    assert names == ["samples_rank00_shard000.safetensors", "samples_rank00_shard001.safetensors"]


def test_a_killed_torchrun_training_on_vfm_vae_latents_resumes_bitwise(path, tmp_path):
    """Step 7 under torchrun (2 processes, gloo) on the VFM-VAE latents, its EMA grids decoded by the VFM-VAE:
    SIGKILLed (torchrun and both workers) after a checkpoint, rerun, it ends bitwise where an unbroken run does."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import PROJECT_ROOT
    from tests.test_tokenizer_engine import descendants

    def step7(out: Path) -> subprocess.Popen:
        sets = [f"train.output_dir={out}", "train.max_steps=24", "train.ckpt_every=2", "train.keep_last=0",
                "train.log_every=2", "train.sample_every=4", "train.sample_num=2", "train.resume=true"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "steps.step7_train", "--config", str(path["resolved"]["path"]), "--set", *sets]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
        return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    def finish(proc: subprocess.Popen) -> str:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
        return out

    finish(step7(tmp_path / "ref"))
    cut = step7(tmp_path / "cut")
    ckpts = lambda out: sorted(out.rglob("checkpoints/[0-9]*.pt"))  # noqa: E731 (not the .tmp of a write)
    deadline = time.time() + 300
    while time.time() < deadline and cut.poll() is None and not any(int(p.stem) >= 6 for p in ckpts(tmp_path / "cut")):
        time.sleep(0.01)
    assert cut.poll() is None, "the run ended before the kill"
    for pid in [cut.pid, *descendants(cut.pid)]:
        os.kill(pid, signal.SIGKILL)
    cut.communicate()
    left = ckpts(tmp_path / "cut")
    assert left and int(left[-1].stem) < 24
    assert "resumed from" in finish(step7(tmp_path / "cut"))
    assert list((tmp_path / "cut").rglob("samples/*.png")) or list((tmp_path / "cut").rglob("*grid*.png"))
    a, b = (torch.load(ckpts(tmp_path / run)[-1], weights_only=True) for run in ("ref", "cut"))
    assert a["step"] == b["step"] == 24
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
