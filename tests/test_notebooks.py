"""The notebooks as users meet them: every parameter visible to papermill, built from their builders, badges,
defaults that chain 00 -> 01 -> 03, the work folder per platform, torchrun launched from a cell, and
notebook 02 copied alone into an empty folder and run in a fresh environment without the kit (it installs
the kit itself, stops cleanly on its time budget, and continues on the next run)."""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

from repro import KIT_SOURCE
from repro.errors import ReproError
from repro.setup import notebook as nb_env
from tests.conftest import PROJECT_ROOT
from tests.test_packaging import clean_env, copy_checkout

NOTEBOOKS = PROJECT_ROOT / "notebooks"
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))
COMMON = ["kit_source", "workdir", "drive_mount", "gpus"]
sys.path.insert(0, str(NOTEBOOKS))  # the builders' shared module (badge URLs), as build_all.py imports it
import nbbuild  # noqa: E402


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def parameters_of(path: Path) -> dict[str, object]:
    cell = next(c for c in read(path).cells if "parameters" in c.metadata.get("tags", []))
    return {node.target.id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}


def outputs(path: Path) -> list[dict]:
    return [o for c in read(path).cells if c.cell_type == "code" for o in c.get("outputs", [])]


# ---------------------------------------------------------------------------------------------
# Static: parameters, builders, badges, chaining


@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_papermill_lists_every_parameter_typed_without_warnings(path, caplog):
    import papermill

    with caplog.at_level(logging.WARNING, logger="papermill"):
        listed = papermill.inspect_notebook(str(path))
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    declared = parameters_of(path)
    assert list(listed) == list(declared) and list(declared)[-len(COMMON):] == COMMON
    for name, p in listed.items():
        assert p["inferred_type_name"] == type(declared[name]).__name__ and p["help"], (name, p)
    assert declared["kit_source"] == KIT_SOURCE


def test_every_notebook_is_rebuilt_by_one_command_and_has_no_outputs():
    check = subprocess.run([sys.executable, str(NOTEBOOKS / "build_all.py"), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    listed = subprocess.run([sys.executable, "-c", "import build_all; print(' '.join(build_all.builders()))"],
                            cwd=NOTEBOOKS, capture_output=True, text=True, check=True).stdout.split()
    assert sorted(listed) == [p.name for p in ALL], "a notebook without a builder"
    assert not any(outputs(p) for p in ALL), "commit the notebooks without outputs"


@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_first_cells_badge_and_bootstrap_without_path_tricks(path):
    cells = read(path).cells
    badge = nbbuild.badge_line(path.name)
    assert cells[0].cell_type == "markdown" and badge in cells[0].source
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert all(url in readme for url in nbbuild.open_links(path.name)), "README lacks the notebook's links"
    setup = cells[2].source
    assert "pip\", \"install\", kit_source" in setup and "configure_environment(workdir=workdir" in setup
    assert "chdir" not in setup and "sys.path" not in setup and "returncode != 0" in setup


def test_each_notebook_reads_what_the_previous_one_wrote():
    fid = parameters_of(NOTEBOOKS / "01_sample_fid.ipynb")["output_dir"]
    assert parameters_of(NOTEBOOKS / "03_evaluate.ipynb")["samples"] == f"{fid}/samples.npz"
    assert fid.startswith("runs:")  # inside the work folder every notebook shares


# ---------------------------------------------------------------------------------------------
# The work folder


def test_work_folder_per_platform(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert nb_env.work_root(platform="kaggle") == (nb_env.KAGGLE_WORKING, True)
    assert nb_env.work_root(platform="local") == (tmp_path / "work", True)
    assert nb_env.work_root(platform="colab") == (tmp_path / "work", False)  # the runtime's disk
    assert nb_env.work_root(str(tmp_path / "w"), platform="colab") == (tmp_path / "w", False)
    with pytest.raises(ReproError, match="drive_mount=True is for Colab, but this is kaggle"):
        nb_env.work_root(drive_mount=True, platform="kaggle")
    for key in ("REPRO_RUNS_DIR", "HF_HOME"):
        monkeypatch.setenv(key, "before")  # restored after the test
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:  # an earlier test imported the client in this process; a fresh kernel has not
        monkeypatch.setattr(hub, "HF_HOME", str(tmp_path / "w" / "hf_home"))
    env = nb_env.configure_environment(workdir=str(tmp_path / "w"), platform="local")
    assert (env.runs, env.hf_home) == (tmp_path / "w" / "runs", tmp_path / "w" / "hf_home") and env.runs.is_dir()
    assert os.environ["REPRO_RUNS_DIR"] == str(env.runs) and os.environ["HF_HOME"] == str(env.hf_home)


def test_hf_home_set_too_late_is_an_error_not_a_silent_other_cache(tmp_path):
    code = ("import huggingface_hub.constants\nfrom repro.setup.notebook import configure_environment\n"
            f"configure_environment(workdir={str(tmp_path / 'w')!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HOME": str(tmp_path / "elsewhere")})
    assert proc.returncode == 1 and "restart the kernel" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------
# torchrun from a cell


def test_launch_streams_torchrun_and_returns_rank0s_result(tmp_path, monkeypatch, capsys):
    from steps import step4_inference

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kwargs = dict(config="tiny", num_samples=4, batch_size=2, device="cpu", progress=False,
                  set=["sample.num_sampling_steps=4"])
    one = nb_env.launch(step4_inference.main, gpus=0, out=str(tmp_path / "one"), **kwargs)
    two = nb_env.launch(step4_inference.main, gpus=2, out=str(tmp_path / "two"), **kwargs)
    printed = capsys.readouterr().out
    assert "launch: torchrun --standalone --nproc_per_node=2 -m steps.step4_inference" in printed
    assert "4 images (4 new)" in printed and "2 process(es)" in printed  # the workers' log, streamed
    assert two["num_samples"] == 4 and Path(two["npz"]).is_file()
    assert not list((Path(os.environ["REPRO_RUNS_DIR"]) / "launch").glob("*.json"))  # the result file is gone
    with np.load(one["npz"]) as a, np.load(two["npz"]) as b:
        assert (a["arr_1"] == b["arr_1"]).all()
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # thread-count rounding only
    with pytest.raises(ReproError, match=r"torchrun -m steps.step4_inference failed with exit code 1: error: config not found: nope"):
        nb_env.launch(step4_inference.main, gpus=2, config="nope", device="cpu")


# ---------------------------------------------------------------------------------------------
# Notebook 02 alone, in a fresh environment without the kit


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A venv that sees this environment's packages (torch, papermill, ...) but not the kit, a kernel that
    runs its Python, and a copy of the checkout to install from (offline: no index, no build isolation)."""
    base = tmp_path_factory.mktemp("fresh")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(base / "venv")],
                   check=True)
    python = base / "venv" / "bin" / "python"
    spec = base / "venv" / "share" / "jupyter" / "kernels" / "repro-fresh"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": [str(python), "-m", "ipykernel_launcher", "-f",
                                                           "{connection_file}"], "display_name": "fresh",
                                                  "language": "python"}))
    probe = subprocess.run([str(python), "-c", "import repro"], cwd=base, env=clean_env(), capture_output=True)
    assert probe.returncode != 0, "the fresh environment must not see the kit"
    return {"python": python, "source": copy_checkout(base / "src"), "venv": base / "venv"}


def run_alone(fresh, folder: Path, workdir: Path, **params) -> Path:
    """papermill on notebooks/02_train.ipynb copied alone into `folder`, with the fresh environment's Python."""
    folder.mkdir(exist_ok=True)
    (folder / "02_train.ipynb").write_bytes((NOTEBOOKS / "02_train.ipynb").read_bytes())
    out = folder / f"out{len(list(folder.glob('out*')))}.ipynb"
    params = {"kit_source": fresh["source"], "workdir": workdir, **params}
    cmd = [str(fresh["python"]), "-m", "papermill", "02_train.ipynb", out.name, "-k", "repro-fresh",
           "--no-progress-bar", *[arg for k, v in params.items() for arg in ("-p", k, str(v))]]
    proc = subprocess.run(cmd, cwd=folder, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def streams(path: Path) -> str:
    return "".join(o.get("text", "") for o in outputs(path) if o["output_type"] == "stream")


SMALL = dict(num_classes=2, images_per_class=8, stage0_steps=4, stage1_steps=6, grid_steps=2)


def test_train_notebook_alone_installs_the_kit_stops_on_its_budget_and_continues(fresh, tmp_path):
    work = tmp_path / "W"
    first = run_alone(fresh, tmp_path / "alone", work, time_budget=0.001, **SMALL)
    text = streams(first)
    assert f"installing the kit: pip install {fresh['source']}" in text and "Successfully installed repro" in text
    assert list((fresh["venv"] / "lib").glob("python3*/site-packages/repro/configs/assets.yaml"))
    assert "stage 0 stopped by the time budget at step 0 of 4" in text and "no checkpoint yet" in text

    second = run_alone(fresh, tmp_path / "alone", work, **SMALL)
    text = streams(second)
    assert "installing the kit" not in text and "stage 1 done: step 6" in text
    run_dir = work / "runs" / "tiny_two_stage"
    assert (run_dir / "ema_grid.png").is_file() and (run_dir / "checkpoints" / "0000006.pt").is_file()
    assert any("image/png" in o.get("data", {}) for o in outputs(second))


@pytest.mark.slow
def test_acceptance_train_notebook_alone_with_only_kit_source_and_workdir_runs_twice(fresh, tmp_path):
    work = tmp_path / "W"
    for _ in range(2):
        out = run_alone(fresh, tmp_path / "alone", work)
    assert "nothing to do: step 200" in streams(out) and (work / "runs" / "tiny_two_stage" / "ema_grid.png").is_file()
