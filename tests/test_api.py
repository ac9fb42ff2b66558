"""The Python API (repro.Pipeline): the README's first code block runs offline in a fresh venv; the images
are step 4's; a run folder of step 7 loads with its newest EMA; export -> push to a (fake, real-HTTP) Hub ->
load by repo id gives the same images bitwise, and offline from the cache afterwards; errors are one line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from repro import Pipeline
from repro.errors import ReproError
from tests.conftest import PROJECT_ROOT
from tests.fakehub import FakeHub

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def readme_first_python_block() -> str:
    text = (PROJECT_ROOT / "README.md").read_text()
    match = re.search(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert match, "README.md has no ```python block"
    return match.group(1)


def same_pixels(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """One runs folder for the module: the tiny preset's generated weights are made once."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture
def tiny(tiny_runs, monkeypatch):
    monkeypatch.setenv("REPRO_RUNS_DIR", str(tiny_runs))
    return Pipeline.from_pretrained("tiny")


def test_readme_first_code_block_is_the_api_and_runs_offline_in_a_fresh_venv(tmp_path):
    block = readme_first_python_block()
    lines = [x for x in block.splitlines() if x.strip() and not x.lstrip().startswith("#")]
    assert len(lines) == 3 and lines[0] == "from repro import Pipeline", block
    # A fresh venv that sees the installed dependencies (torch...) but not this checkout, which PYTHONPATH adds.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    script = tmp_path / "work" / "readme_block.py"
    script.parent.mkdir()
    script.write_text(block)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_ENDPOINT")}
    env.update(PYTHONPATH=str(PROJECT_ROOT), REPRO_RUNS_DIR=str(tmp_path / "runs"), HF_HOME=str(tmp_path / "hf"),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([str(venv / "bin" / "python"), str(script)], cwd=script.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "configs" / "tiny.resolved.yaml").is_file()  # step 3's file, written on the way


def test_images_are_step4s_images_and_settings_apply_per_call(tiny, tmp_path):
    from steps.step4_inference import main as step4

    images = tiny([1, "2", 3], seed=5)
    assert [im.size for im in images] == [(64, 64)] * 3 and images.labels == [1, 2, 3]
    assert images.latents.shape == (3, 32, 4, 4)
    run = step4(config="tiny", labels=[1, 2, 3], num_samples=3, seed=5, out=str(tmp_path / "s4"), progress=False)
    pngs = sorted(Path(run["images_dir"]).glob("*.png"))
    from PIL import Image

    assert same_pixels(images, [Image.open(p).convert("RGB") for p in pngs])  # step 4's image i, bitwise
    # per-call settings change the pixels, and the pipeline's own config is left as it was
    fewer = tiny([1, 2, 3], seed=5, num_steps=4, guidance=1.0)
    assert not same_pixels(images, fewer) and tiny.config.sample.num_sampling_steps == 8
    latents = tiny([1, 2, 3], seed=5, output_type="latent")  # the same batches: the same latents, bitwise
    assert latents.shape == (3, 32, 4, 4) and np.array_equal(latents.numpy(), images.latents.numpy())
    assert tiny(num_images=2, seed=5, output_type="np").shape == (2, 64, 64, 3)  # step 4's random labels


def test_export_push_to_the_hub_and_load_by_repo_id_gives_the_same_images(tiny, tmp_path, monkeypatch):
    images = tiny([0, 4, 9], seed=1)
    with FakeHub() as hub:
        hub.write_token = "hf_write"
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_write")
        url = tiny.push_to_hub("me/tiny-lightningdit", folder=tmp_path / "export")
        assert url.endswith("/me/tiny-lightningdit") and hub.commits[-1]["repo"] == "me/tiny-lightningdit"
        pushed = set(hub.commits[-1]["files"])
        assert {"export.json", "model.safetensors", "config.yaml", "latents_stats.pt", "README.md"} <= pushed
        card = hub.files[("me/tiny-lightningdit", "README.md")].decode()
        assert 'Pipeline.from_pretrained("me/tiny-lightningdit")' in card and "library_name: repro" in card
        assert hub.validated == [card]  # the client had the card's front matter checked before uploading
        loaded = Pipeline.from_pretrained("me/tiny-lightningdit")
        assert same_pixels(images, loaded([0, 4, 9], seed=1))
        gets = hub.count("GET")
        # Loaded again: the cached files are used, only the index is asked for (a HEAD).
        Pipeline.from_pretrained("me/tiny-lightningdit")
        assert hub.count("GET") == gets
    # The Hub is gone: the cached snapshot loads, with every file checked against the index.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = Pipeline.from_pretrained("me/tiny-lightningdit")
    assert same_pixels(images, again([0, 4, 9], seed=1))
    with pytest.raises(ReproError, match=r"me/other.*no copy of its revision 'main'"):
        Pipeline.from_pretrained("me/other")


def test_push_without_write_access_is_one_line(tiny, tmp_path, monkeypatch):
    with FakeHub() as hub:
        hub.write_token = "hf_write"
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_read_only")
        with pytest.raises(ReproError, match=r"push to me/x on .* failed \(HTTP 403.*HF_TOKEN to a token with write"):
            tiny.push_to_hub("me/x", folder=tmp_path / "export")


def test_a_run_folder_loads_its_newest_ema_and_exports_it(tmp_path, monkeypatch):
    from repro.data.synthetic import local_asset
    from steps.step7_train import main as step7
    from tests.test_training import STAGE0, make_latents

    latents = make_latents(tmp_path / "latents")
    vae = local_asset("tiny-vavae")
    result = step7(STAGE0, set=[f"data.data_path={latents}", f"train.output_dir={tmp_path / 'out'}",
                                "train.max_steps=4", "train.ckpt_every=2", f"vae.ckpt_path={vae}"])
    run_dir = Path(result["run_dir"])
    pipe = Pipeline.from_pretrained(run_dir)
    assert pipe.step == 4 and pipe.config.ckpt_path.endswith("0000004.pt")
    images = pipe([0, 1, 2, 3], seed=0)
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "metrics.json").write_text(json.dumps({"fid": 123.4, "num_samples": 16,
                                                               "reference": "/x/ref.npz"}))
    folder = Pipeline.from_pretrained(run_dir).export(tmp_path / "exported")
    info = json.loads((folder / "export.json").read_text())
    assert info["step"] == 4 and info["weights"] == "ema" and info["metrics"]["fid"] == 123.4
    card = (folder / "README.md").read_text()
    assert "| FID | 123.4 |" in card and "- steps: 4" in card
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.metadata()["repro_weights"] == "ema"
    assert same_pixels(images, Pipeline.from_pretrained(folder)([0, 1, 2, 3], seed=0))
    # a changed file is refused, naming it
    (folder / "latents_stats.pt").write_bytes(b"x")
    with pytest.raises(ReproError, match=r"latents_stats.pt: sha256 .* does not match"):
        Pipeline.from_pretrained(folder)


def test_wrong_names_are_one_line(tiny, tmp_path):
    with pytest.raises(ReproError, match=r"'no_such_preset' is not a folder, a YAML file, a preset \(.*tiny"):
        Pipeline.from_pretrained("no_such_preset")
    with pytest.raises(ReproError, match=r"neither export.json .* nor config.yaml"):
        Pipeline.from_pretrained(tmp_path)
    named = Pipeline.from_pretrained("tiny", class_names=[f"digit {i}" for i in range(10)])
    assert named(["digit 7", 3], seed=0).labels == [7, 3]
    with pytest.raises(ReproError, match=r"did you mean 'digit 3'"):
        named(["digt 3"])
    with pytest.raises(ReproError, match=r"output_type='pt'"):
        tiny([1], output_type="pt")
    with pytest.raises(ReproError, match=r"label 'golden retriever' is a name, but this config's 10 classes have no names"):
        tiny(["golden retriever"])


def test_step11_exports_and_a_refused_pickle_names_it(tiny_runs, tmp_path, monkeypatch, capsys):
    import torch

    from repro.models.checkpoint import CheckpointError, read_checkpoint
    from steps import step11_export

    monkeypatch.setenv("REPRO_RUNS_DIR", str(tiny_runs))
    result = step11_export.cli(["--from", "tiny", "--out", str(tmp_path / "export")])
    assert "model.safetensors" in result["files"] and "exported LightningDiT-T/1" in capsys.readouterr().out
    assert Pipeline.from_pretrained(result["folder"]).config.model.model_type == "LightningDiT-T/1"
    torch.save({"ema": {}, "hook": os.system}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"EMA-only safetensors export of a kit run: `python -m steps.step11_export"):
        read_checkpoint(tmp_path / "evil.pt")
