"""The kit as pip installs it: every package and configs/ shipped, real dependencies equal to
requirements.txt, the Python lower bound, and the steps run from an empty folder with only the installed
copy importable (a real `pip install`, offline, into a fresh target)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import PROJECT_ROOT
from tests.fakehub import FakeHub
from tests.tiny_assets import STATS_REPO, tiny_asset_files

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
# pip runs offline here: no index, and the build uses this environment's setuptools
OFFLINE_PIP = {"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def copy_checkout(dest: Path) -> Path:
    """The checkout's files (tracked and new, not ignored) copied to `dest`: pip builds in the source folder,
    and the shared checkout must not get build/ and *.egg-info folders."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=PROJECT_ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = PROJECT_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())
    return dest


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would make the checkout importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **OFFLINE_PIP, **extra}


def requirement_set(lines) -> dict[str, str]:
    reqs = [Requirement(line) for line in lines]
    return {r.name.lower().replace("_", "-"): str(r.specifier) for r in reqs}


# ---------------------------------------------------------------------------------------------
# Metadata


def test_every_package_is_listed_and_configs_ship_as_package_data():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(PROJECT_ROOT).parts) for p in (PROJECT_ROOT / "repro").rglob("__init__.py")}
    assert listed == on_disk | {"repro.configs", "steps"}, "pyproject.toml [tool.setuptools] packages is out of date"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"repro.configs": "configs"}
    data = PYPROJECT["tool"]["setuptools"]["package-data"]["repro.configs"]
    shipped = {p for pattern in data for p in (PROJECT_ROOT / "configs").glob(pattern)}
    assert shipped == set((PROJECT_ROOT / "configs").rglob("*.yaml")), "a config would not be installed"


def test_dependencies_are_requirements_txt_and_torch_is_a_range():
    """requirements.txt (what CI and a checkout's tests install) is the core + the `notebooks`, `own-data` and
    `vfm-vae` extras; tests/test_dependencies.py compares the declarations with what the code imports."""
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    declared = requirement_set(project["dependencies"] + extras["notebooks"] + extras["own-data"] + extras["vfm-vae"])
    lines = [ln.split("#")[0].strip() for ln in (PROJECT_ROOT / "requirements.txt").read_text().splitlines()]
    assert declared == requirement_set(filter(None, lines)), "pyproject.toml and requirements.txt disagree"
    for name in ("torch", "torchvision"):
        spec = declared[name]
        assert spec.startswith(">=") and "," not in spec, f"{name} must stay an open range (never replace CUDA builds)"


def test_requires_python_is_the_first_version_the_code_runs_on():
    """3.10: repro/config_builder.py needs types.UnionType; every file parses as 3.10 source (no 3.11 syntax)."""
    assert PYPROJECT["project"]["requires-python"] == ">=3.10"
    assert "types.UnionType" in (PROJECT_ROOT / "repro" / "config_builder.py").read_text()  # reads `X | Y` annotations
    for path in [*(PROJECT_ROOT / "repro").rglob("*.py"), *(PROJECT_ROOT / "steps").rglob("*.py")]:
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))
    for name in ("tomllib", "typing.Self", "ExceptionGroup", "datetime.UTC", "StrEnum"):  # 3.11-only library names
        users = [p.name for p in (PROJECT_ROOT / "repro").rglob("*.py") if name in p.read_text()]
        assert not users, f"{name} (Python 3.11+) used in {users}: raise requires-python or avoid it"


# ---------------------------------------------------------------------------------------------
# A real install


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install --no-deps <copy of the checkout>` into a fresh target folder (offline)."""
    base = tmp_path_factory.mktemp("install")
    source = copy_checkout(base / "src")
    target = base / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)],
                   env=clean_env(), check=True, capture_output=True, timeout=300)
    return target


def run_installed(target: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=clean_env(PYTHONPATH=str(target), **env),
                          capture_output=True, text=True, timeout=300)


def test_the_install_ships_configs_and_the_steps(installed):
    for rel in ("repro/configs/assets.yaml", "repro/configs/tiny.yaml", "repro/configs/train/tiny_stage_0.yaml",
                "steps/step4_inference.py", "steps/run_main.py", "repro/setup/notebook.py"):
        assert (installed / rel).is_file(), rel
    assert not (installed / "configs").exists() and not (installed / "tests").exists()


def test_steps_run_from_an_empty_folder_with_only_the_installed_kit(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    probe = run_installed(installed, empty, "-c", "import repro, repro.resources as p; print(repro.__file__); "
                          "print(p.configs_dir()); print(p.find_config('train/tiny_stage_0'))")
    assert probe.returncode == 0, probe.stderr
    kit, configs, stage0 = probe.stdout.split()
    assert kit.startswith(str(installed)) and configs == str(installed / "repro" / "configs")
    assert stage0 == str(installed / "repro" / "configs" / "train" / "tiny_stage_0.yaml")

    # step 2 reads the shipped configs/assets.yaml and downloads (from the local fake hub)
    with FakeHub(files={STATS_REPO: tiny_asset_files()[STATS_REPO]}) as hub:
        step2 = run_installed(installed, empty, "-m", "steps.step2_download", "--only", "latents-stats",
                              HF_ENDPOINT=hub.endpoint, REPRO_RUNS_DIR=str(empty / "runs"))
    assert step2.returncode == 0, step2.stdout + step2.stderr
    table = json.loads((empty / "runs" / "assets.json").read_text())["assets"]
    assert Path(table["latents-stats"]["path"]).is_file()

    # step 1 checks the installed kit's own dependencies (an install ships no requirements.txt)
    step1 = run_installed(installed, empty, "-m", "steps.step1_install", "--dry-run", REPRO_RUNS_DIR=str(empty / "runs"))
    assert step1.returncode == 0, step1.stdout + step1.stderr
    plan = json.loads((empty / "runs" / "env.json").read_text())["install"]
    assert plan["requirements"] == "the installed kit's metadata"
    assert {"torch", "torch-fidelity"} <= {item["name"] for item in plan["plan"]}
    assert "papermill" not in {item["name"] for item in plan["plan"]}  # an extra, not a dependency

    # step 3 finds the tiny preset by name and makes its kit-local weights, offline
    step3 = run_installed(installed, empty, "-m", "steps.step3_configs", "--base", "tiny",
                          REPRO_RUNS_DIR=str(empty / "runs"), HF_HUB_OFFLINE="1")
    assert step3.returncode == 0, step3.stdout + step3.stderr
    assert (empty / "runs" / "configs" / "tiny.resolved.yaml").is_file()
    assert (empty / "runs" / "local_assets" / "tiny-dit").is_dir()
    assert sorted(p.name for p in empty.iterdir()) == ["runs"]  # nothing written beside the runs folder


@pytest.mark.slow
def test_install_from_a_git_url_ships_configs(tmp_path):
    repo = copy_checkout(tmp_path / "repo")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run(git + cmd, cwd=repo, check=True, capture_output=True)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    f"git+file://{repo}"], env=clean_env(), check=True, capture_output=True, timeout=300)
    assert (target / "repro" / "configs" / "assets.yaml").is_file()
    assert (target / "repro" / "configs" / "train" / "tiny_stage_1.yaml").is_file()
