"""What the kit asks of its users' environments: the distribution name, third-party imports against the
declared dependencies (core and per-feature extras), version floors of the torch features the kit uses,
and the LPIPS weights from a pinned, hashed source built on torchvision's own VGG16."""

from __future__ import annotations

import ast
import re
import sys
import tomllib

import pytest
import torch
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from repro.errors import ReproError
from repro.tokenizer.lpips import LPIPS_HEADS_SHA256, VGG16Features
from repro.utils.hardware import TORCH_FEATURES, require_torch
from tests.conftest import PROJECT_ROOT


def test_lpips_heads_are_pinned_to_a_commit_with_their_sha256():
    assets = yaml.safe_load((PROJECT_ROOT / "configs" / "assets.yaml").read_text())["assets"]
    heads = assets["lpips-vgg-heads"]
    assert re.fullmatch(r"https://raw\.githubusercontent\.com/richzhang/PerceptualSimilarity/[0-9a-f]{40}/"
                        r"lpips/weights/v0\.1/vgg\.pth", heads["url"]), heads["url"]
    assert heads["sha256"] == LPIPS_HEADS_SHA256 and heads["size"] == 7289


def test_lpips_trunk_is_torchvisions_vgg16_features_with_the_same_keys():
    from torchvision.models import vgg16

    with torch.device("meta"):
        ours, theirs = VGG16Features(), vgg16(weights=None)
    wanted = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if k.startswith("features.")}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == wanted  # 13 convolutions, 26 tensors
    assert len(wanted) == 26 and not any(getattr(m, "inplace", False) for m in ours.features)


# ---------------------------------------------------------------------------------------------
# Imports against declarations

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
# import name -> the distribution that provides it (where they differ)
DISTRIBUTION_OF = {"PIL": "pillow", "yaml": "pyyaml", "torch_fidelity": "torch-fidelity",
                   "huggingface_hub": "huggingface-hub", "sklearn": "scikit-learn",
                   "IPython": "ipykernel"}  # IPython: every notebook kernel has it (ipykernel installs it)
# a torch submodule that needs another distribution: torch's SummaryWriter imports tensorboard
SUBMODULE_DISTRIBUTION = {"torch.utils.tensorboard": "tensorboard"}
PLATFORM_ONLY = {"google"}  # google.colab: imported only on Colab, which has it
# The files of a feature that lives in an extra: what they may import beyond the core.
FEATURE_EXTRAS = {
    "repro/data/synthetic.py": ["own-data"], "repro/evaluation/recognition.py": ["own-data"],
    "repro/data/sample_sets.py": ["own-data"],
    "repro/training/log_backends.py": ["tensorboard", "wandb"], "repro/tokenizer_training/modules.py": ["vf"],
    "repro/explorer.py": ["notebooks"], "repro/setup/notebook.py": ["notebooks"],
    "repro/utils/progress.py": ["notebooks"], "repro/tokenizer/vfm_vae.py": ["vfm-vae"],
}


def _name(requirement: str) -> str:
    return Requirement(requirement).name.lower().replace("_", "-")


def _imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(module, eager) for every absolute import: eager = runs when the module is imported (not in a function,
    nor under `try: ... except ImportError`)."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, eager: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((a.name, eager) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, eager))
        for child in ast.iter_child_nodes(node):
            lazy = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
                isinstance(node, ast.Try) and child in node.body
                and any("ImportError" in ast.unparse(h.type or ast.Name("")) for h in node.handlers))
            visit(child, eager and not lazy)

    visit(tree, True)
    return found


def _distribution(module: str) -> str | None:
    for prefix, dist in SUBMODULE_DISTRIBUTION.items():
        if module == prefix or module.startswith(prefix + "."):
            return dist
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in {"repro", "steps"} | PLATFORM_ONLY:
        return None
    return DISTRIBUTION_OF.get(top, top).lower().replace("_", "-")


def test_every_import_is_declared_in_the_core_or_its_features_extra():
    core = {_name(r) for r in PYPROJECT["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in PYPROJECT["optional-dependencies"].items()}
    used: set[str] = set()
    for path in [*(PROJECT_ROOT / "repro").rglob("*.py"), *(PROJECT_ROOT / "steps").rglob("*.py")]:
        rel = path.relative_to(PROJECT_ROOT).as_posix()
        allowed = core.union(*(extras[e] for e in FEATURE_EXTRAS.get(rel, [])))
        for module, eager in _imports(ast.parse(path.read_text())):
            dist = _distribution(module)
            if dist is None:
                continue
            used.add(dist)
            assert dist in allowed, (f"{rel} imports {module} ({dist}): declare it in the core or in the extra of "
                                     "this feature (and list the file in FEATURE_EXTRAS)")
            assert not eager or dist in core, (f"{rel} imports {module} ({dist}, an extra) at import time: import it "
                                               "where the feature runs, with an error naming the extra")
    assert core - used == set(), f"declared in the core, never imported: {core - used}"
    assert "scipy" not in core  # the kit never imports it (torch-fidelity brings its own)
    assert not FEATURE_EXTRAS.keys() - {p.relative_to(PROJECT_ROOT).as_posix() for p in PROJECT_ROOT.rglob("*.py")}


def test_the_distribution_is_named_apart_from_its_import_names():
    import repro

    assert PYPROJECT["name"] == repro.DISTRIBUTION == "repro-latent-kit"  # "repro" is taken on PyPI
    assert "repro-latent-kit[notebooks,own-data,vfm-vae]" in PYPROJECT["optional-dependencies"]["test"]


def test_torch_features_newer_than_the_floor_are_named_with_their_version():
    torch_req = next(Requirement(r) for r in PYPROJECT["dependencies"] if _name(r) == "torch")
    floor = Version(next(iter(torch_req.specifier)).version)
    needed = {f: Version(v) for f, (v, _) in TORCH_FEATURES.items()}
    assert needed["grad_scaler"] <= floor < needed["fsdp2"]  # fp16 training on the floor; FSDP2 checked where used
    require_torch("fsdp2", installed="2.6.0+cu124")
    with pytest.raises(ReproError, match=r"^train.strategy: fsdp \(FSDP2's torch.distributed.fsdp.fully_shard\) "
                                         r"needs torch >= 2.6; this is torch 2.5.1\+cu121: upgrade it"):
        require_torch("fsdp2", installed="2.5.1+cu121")
    with pytest.raises(ReproError, match=r"fp16 training's gradient scaler .* needs torch >= 2.3; this is torch 2.2.2"):
        require_torch("grad_scaler", installed="2.2.2")
    source = (PROJECT_ROOT / "repro" / "training" / "strategy.py").read_text()
    assert source.count('require_torch("fsdp2")') == 1  # FSDPStrategy checks before any work


def test_ipywidgets_7_and_8_are_both_accepted():
    import ipywidgets

    from repro.explorer import MIN_IPYWIDGETS, _ipywidgets

    notebooks = {_name(r): str(Requirement(r).specifier) for r in PYPROJECT["optional-dependencies"]["notebooks"]}
    assert notebooks["ipywidgets"] == ">=7.5" and MIN_IPYWIDGETS == (7, 5)
    assert _ipywidgets() is ipywidgets and hasattr(ipywidgets, "Combobox")
