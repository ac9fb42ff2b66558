"""Step 2 works with any huggingface_hub from the declared lower bound to the newest (issue 11).

Kaggle and Colab keep the release their transformers pins (0.x under transformers 4.x, 1.x under 5.x),
so the kit uses only the client's public API. Checked here:

- the bound in requirements.txt is `MIN_HUB_VERSION`, and `check_client_version` enforces it;
- repro/hub imports no private client module and no transport library of the client's;
- with REPRO_HUB_VERSIONS_DIR pointing at a folder of `pip install --target DIR/<version>
  huggingface_hub==<version>` installs (.ci/run makes the lower bound and a 1.x release), the download
  tests run in a subprocess against each release, with httpx2 (2.x's transport) made unimportable.
  Without it these tests are skipped, saying so.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from repro.hub.client import MIN_HUB_VERSION, HubClientError, _release, check_client_version, installed_version

ROOT = Path(__file__).resolve().parent.parent
HUB_SOURCES = sorted((ROOT / "repro" / "hub").glob("*.py"))
DOWNLOAD_TESTS = ["tests/test_download.py", "tests/test_hub_downloader.py", "tests/test_hub_hostile.py"]
VERSIONS_ENV = "REPRO_HUB_VERSIONS_DIR"
# What 2.x brings that 0.x/1.x environments do not have: the tests must pass without it.
HIDDEN = ("httpx2", "httpcore2")


def test_requirements_bound_is_min_hub_version():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    (spec,) = [ln.split("#")[0].strip() for ln in lines if re.match(r"\s*huggingface[_-]hub\b", ln)]
    assert spec == f"huggingface_hub>={MIN_HUB_VERSION}"


def test_check_client_version_names_the_version_and_the_fix():
    assert check_client_version() == installed_version()
    assert check_client_version(MIN_HUB_VERSION) == MIN_HUB_VERSION
    assert check_client_version("2.4.0") == "2.4.0" and check_client_version("1.0.0rc1") == "1.0.0rc1"
    with pytest.raises(HubClientError, match=rf"huggingface_hub 0\.16\.4 is older than {MIN_HUB_VERSION}.*"
                                             rf"pip install 'huggingface_hub>={MIN_HUB_VERSION}'"):
        check_client_version("0.16.4")
    with pytest.raises(HubClientError, match="huggingface_hub is not installed; run pip install"):
        check_client_version(None)
    assert _release("0.36.2") < _release("1.0.0") < _release("1.33.0") < _release("2.4.0")


def test_repro_hub_uses_only_the_public_client_api():
    banned = [r"huggingface_hub\.file_download", r"huggingface_hub\.utils\._", r"huggingface_hub\._",
              r"^\s*(import|from)\s+(httpx2?|httpcore2?)\b"]
    for path in HUB_SOURCES:
        text = path.read_text()
        for pattern in banned:
            assert not re.search(pattern, text, re.M), f"{path.name}: {pattern}"
        if path.name not in ("download.py", "hf.py"):  # the kit's own transport lives in those two
            assert not re.search(r"^\s*(import|from)\s+requests\b", text, re.M), path.name


def test_transport_failures_are_recognised_without_importing_the_transport():
    import requests

    from repro.hub.client import hub_errors, is_transport_error

    failures = [requests.exceptions.ConnectionError("refused"), requests.exceptions.ReadTimeout("slow"),
                ConnectionRefusedError(), TimeoutError()]
    for name in ("httpx", "httpx2"):  # whichever of the 1.x / 2.x transports this environment has
        try:
            module = __import__(name)
        except ImportError:
            continue
        failures += [module.ConnectError("refused"), module.ReadTimeout("slow")]
    assert all(is_transport_error(e) for e in failures), [e for e in failures if not is_transport_error(e)]
    # Bugs are not network trouble: they must surface as themselves.
    assert not any(is_transport_error(e) for e in (TypeError("x"), ValueError("x"), KeyError("x")))
    assert hub_errors("NoSuchErrorInAnyRelease") == ()
    (gated,) = hub_errors("GatedRepoError")
    (no_repo,) = hub_errors("RepositoryNotFoundError")
    assert issubclass(gated, no_repo), "resolve_remote catches GatedRepoError first for this reason"


def test_client_module_imports_nothing_outside_the_standard_library():
    # Step 1 checks the version before anything is installed.
    code = ("import sys; import repro.hub.client; "
            "bad = [m for m in ('requests', 'huggingface_hub', 'yaml', 'filelock', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def prepared_releases() -> list:
    folder = os.environ.get(VERSIONS_ENV)
    if not folder:
        return [pytest.param(None, marks=pytest.mark.skip(
            reason=f"{VERSIONS_ENV} not set (.ci/run sets it to pip --target installs of older huggingface_hub)"))]
    return [pytest.param(d, id=d.name) for d in sorted(Path(folder).iterdir()) if d.is_dir()]


def hidden_modules(tmp_path: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes 2.x's transport unimportable (ModuleNotFoundError)."""
    hide = tmp_path / "hide"
    hide.mkdir()
    for name in HIDDEN:
        (hide / f"{name}.py").write_text(
            f"raise ModuleNotFoundError({f'No module named {name!r} (hidden by tests/test_hub_versions.py)'!r}, "
            f"name={name!r})\n")
    return hide


@pytest.mark.parametrize("install", prepared_releases())
def test_download_tests_pass_with_release(install, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != VERSIONS_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(hidden_modules(tmp_path)), str(install)])
    probe = ("import huggingface_hub, importlib.util\n"
             "print(huggingface_hub.__version__, huggingface_hub.__file__)\n"
             f"for name in {HIDDEN!r}:\n"
             "    try:\n        __import__(name)\n    except ModuleNotFoundError:\n        continue\n"
             "    raise SystemExit(name + ' is importable')\n")
    seen = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert seen.returncode == 0, seen.stdout + seen.stderr
    version, where = seen.stdout.split()
    assert version == install.name and where.startswith(str(install)), seen.stdout
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *DOWNLOAD_TESTS],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"huggingface_hub {version}:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"


def test_prepared_releases_include_the_bound_and_a_1x():
    folder = os.environ.get(VERSIONS_ENV)
    if not folder:
        pytest.skip(f"{VERSIONS_ENV} not set")
    names = {d.name for d in Path(folder).iterdir() if d.is_dir()}
    assert MIN_HUB_VERSION in names, f"the declared lower bound {MIN_HUB_VERSION} is not among {sorted(names)}"
    assert any(_release(n)[0] == 1 for n in names), f"no 1.x release among {sorted(names)}"
