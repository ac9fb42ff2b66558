"""`pip install repro-latent-kit` without extras runs steps 1-8 on the tiny preset (issue 22: honest dependencies).

Each step runs as a subprocess in which every package of an extra (and the tests' own) is uninstalled as far as
`import` can tell: a `sitecustomize` on PYTHONPATH blocks their top-level modules, so a step that reaches for one
fails here exactly as it would on a core-only install. tests/test_dependencies.py checks the declarations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PROJECT_ROOT
from tests.fakehub import FakeHub
from tests.test_evaluation import write_random_inception
from tests.tiny_assets import STATS_REPO, tiny_asset_files

# the top-level modules of the extras (notebooks, own-data, tensorboard, wandb, vf, vfm-vae) and of the tests
BLOCKED = ("sklearn", "threadpoolctl", "papermill", "ipykernel", "ipywidgets", "nbformat", "tensorboard", "wandb",
           "timm", "transformers", "skimage", "pytest")

SITECUSTOMIZE = f'''
import importlib.abc, importlib.machinery, sys
class _NotInstalled(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # a spec without an origin whose loading fails as a missing package's import does
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            return importlib.machinery.ModuleSpec(name, self)
        return None
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {{spec.name!r}} (an extra: not installed here)", name=spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, _NotInstalled())
'''


def test_steps_1_to_8_run_on_the_tiny_preset_without_any_extra(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    runs = tmp_path / "runs"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(PROJECT_ROOT)]), REPRO_RUNS_DIR=str(runs),
               HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")

    def step(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{args[0]}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert proc.stdout.strip().splitlines()[-1].startswith("wrote: "), f"{args[0]} ends without a wrote: line"
        return proc.stdout

    probe = subprocess.run([sys.executable, "-c", "import sklearn"], env=env, capture_output=True, text=True)
    assert "an extra: not installed here" in probe.stderr  # the blocker works
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in range(2):
        (images / f"class_{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray((rng.random((40, 40, 3)) * 80 + 100 * c).astype(np.uint8)).save(
                images / f"class_{c}" / f"{i}.png")

    step("steps.step1_install", "--dry-run")
    with FakeHub(files={STATS_REPO: tiny_asset_files()[STATS_REPO]}) as hub:  # the local fake Hugging Face hub
        env["HF_ENDPOINT"] = hub.endpoint
        step("steps.step2_download", "--only", "latents-stats")
    env["HF_HUB_OFFLINE"] = "1"  # the tiny preset's weights are kit-local: nothing else is fetched
    step("steps.step3_configs", "--config", "tiny")
    resolved = runs / "configs" / "tiny.resolved.yaml"
    step("steps.step4_inference", "--config", str(resolved), "--num-samples", "8", "--batch-size", "4",
         "--out", str(tmp_path / "samples"), "--no-progress")
    step("steps.step5_fix_stats", "--config", str(resolved))
    step("steps.step6_extract", "--config", str(resolved), "--source", str(images), "--out", str(tmp_path / "latents"))
    step("steps.step7_train", "--config", str(PROJECT_ROOT / "configs/train/tiny_stage_0.yaml"), "--set",
         f"data.data_path={tmp_path / 'latents'}", f"train.output_dir={tmp_path / 'train'}", "data.num_classes=2",
         "train.max_steps=2", "data.image_size=64")
    weights = write_random_inception(tmp_path / "inception.pth")
    step("steps.step8_evaluate", "--samples", str(tmp_path / "samples"), "--ref", str(images), "--weights",
         str(weights), "--metrics", "fid,is", "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "m.json"))
    record = json.loads((tmp_path / "m.json").read_text())
    assert np.isfinite(record["fid"]) and record["num_samples"] == 8
