"""Shared pieces of the notebook builders (build_*.py): the title with its badges, the papermill parameters
cell, the set-up cell that installs the kit where it is missing, and stable .ipynb output.

A new notebook is one more `build_<name>.py` next to this file with a `main()` that writes it;
`python notebooks/build_all.py` runs every builder. Its cells:

    cells = [title_cell("04_own_data.ipynb", "# Train on your own images", "What it does ..."),
             parameters_cell([Param("epochs", int, 5, "passes over the data")]),   # + the common ones
             setup_cell(),                          # installs the kit if needed, sets the work folder
             new_markdown_cell("## Step ..."), new_code_cell("from steps import step6_extract ...")]
    write(notebook(cells), "04_own_data.ipynb")

The parameters cell is a Colab form that papermill reads too: each parameter is a typed literal with a
Colab `# @param` annotation on its line (`steps: int = 0  # @param {type:"integer"}`), its help on a
`# @markdown` line above it (shown in the form; papermill skips comment lines), so `papermill
--help-notebook` lists every field with its type. The set-up cell ends with `gpu_check`: on a runtime
without a GPU it says how to get one and, where the notebook has a `fallback`, switches defaults to a run
that finishes in minutes. The notebook metadata asks Colab for a T4 and Kaggle for a T4 with Internet on.
The kit's source (repro.KIT_SOURCE) is written into each notebook at build time: rebuild after changing it.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def _kit_source() -> str:
    """repro.KIT_SOURCE, read from the checkout's repro/__init__.py (the builders need no installed kit)."""
    tree = ast.parse((HERE.parent / "repro" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["KIT_SOURCE"]:
            return ast.literal_eval(node.value)
    raise ValueError("repro/__init__.py defines no KIT_SOURCE")


KIT_SOURCE = _kit_source()
_GITHUB = re.compile(r"github\.com[/:]([\w.-]+)/([\w.-]+?)(?:\.git)?(?:@[\w./-]+)?$")


@dataclass(frozen=True)
class Param:
    name: str
    type: type  # str, int, float or bool
    default: Any
    help: str
    choices: tuple = ()  # a Colab drop-down (other values can still be typed in) instead of a text field


# Every notebook has these, after its own.
COMMON = (
    Param("kit_source", str, KIT_SOURCE, "pip install source of the kit when it is missing: a git URL or a local checkout"),
    Param("workdir", str, "", "work folder for runs, checkpoints and the HF cache; empty picks one for this platform"),
    Param("drive_mount", bool, False, "Colab only: mount Google Drive and keep the work folder there"),
    Param("gpus", int, 0, "processes for sampling and training; 0 means every visible GPU, torchrun when more than one"),
)


def github_repo(source: str = KIT_SOURCE) -> str:
    """'owner/name' of a GitHub source URL (for the Colab and Kaggle links)."""
    m = _GITHUB.search(source)
    if m is None:
        raise ValueError(f"repro.KIT_SOURCE {source!r} is not a GitHub URL: the badges need one")
    return f"{m.group(1)}/{m.group(2)}"


def open_links(filename: str, source: str = KIT_SOURCE) -> tuple[str, str]:
    """(Colab URL, Kaggle URL) that open notebooks/<filename> of the kit's GitHub repository."""
    repo = github_repo(source)
    colab = f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/{filename}"
    kaggle = f"https://kaggle.com/kernels/welcome?src=https://github.com/{repo}/blob/main/notebooks/{filename}"
    return colab, kaggle


def badge_line(filename: str, source: str = KIT_SOURCE) -> str:
    """Markdown 'Open in Colab' and 'Open in Kaggle' badges for notebooks/<filename> on GitHub."""
    colab, kaggle = open_links(filename, source)
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab}) "
            f"[![Open in Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)]({kaggle})")


def title_cell(filename: str, title: str, body: str) -> nbformat.NotebookNode:
    how = ("Opened on its own (Colab, Kaggle, an uploaded file), the first code cell installs the kit from "
           "`kit_source`; runs, checkpoints and the Hugging Face cache go to one work folder that outlives the "
           "runtime (`workdir`; Kaggle: /kaggle/working; Colab: Drive with `drive_mount`). Run every cell again "
           "after a disconnect: each step continues where it stopped.")
    return new_markdown_cell(f"{title}\n\n{badge_line(filename)}\n\n{body}\n\n{how}")


# Colab form field types of the parameter types (https://colab.research.google.com/notebooks/forms.ipynb)
_FORM_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}
# Every notebook that falls back to a small run on a CPU has this parameter.
CPU_FALLBACK = Param("cpu_fallback", bool, True, "without a GPU, switch the defaults to a run that finishes in "
                                                 "minutes (the first cell says what it changed)")


def _literal(p: Param) -> str:
    """Two lines: the help as Colab form markdown, then `name: type = value  # @param ...`. papermill reads the
    assignment (the text after its first '#' is its help) and skips the comment line; the one thing it cannot
    parse is a second '=' or a '#' in the value itself."""
    if not isinstance(p.default, p.type) or (p.type is int and isinstance(p.default, bool)):
        raise ValueError(f"parameter {p.name}: default {p.default!r} is not a {p.type.__name__}")
    text = repr(p.default)
    if "=" in text or "#" in text:
        raise ValueError(f"parameter {p.name}: papermill cannot parse '=' or '#' in a default value: {text}")
    if not p.help or "\n" in p.help:
        raise ValueError(f"parameter {p.name}: the help must be one non-empty line: {p.help!r}")
    if p.choices:
        if any(not isinstance(c, p.type) for c in p.choices) or p.default not in p.choices:
            raise ValueError(f"parameter {p.name}: choices {p.choices} must be {p.type.__name__}s and hold the default")
        form = f"{json.dumps(list(p.choices))} {{allow-input: true}}"
    else:
        form = f'{{type:"{_FORM_TYPES[p.type]}"}}'
    return f"# @markdown `{p.name}`: {p.help}\n{p.name}: {p.type.__name__} = {text}  # @param {form}"


def parameters_cell(params: Sequence[Param], common: bool = True) -> nbformat.NotebookNode:
    """The cell papermill overrides (tag `parameters`) and Colab shows as a form: the notebook's own
    parameters, then COMMON."""
    every = list(params) + (list(COMMON) if common else [])
    names = [p.name for p in every]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate parameter names: {names}")
    title = "# @title Parameters (a form on Colab; papermill -p NAME VALUE overrides them)\n"
    return new_code_cell(title + "\n".join(map(_literal, every)), metadata={"tags": ["parameters"]})


SETUP = '''\
# Set-up: install the kit if this runtime lacks it (Colab, Kaggle, a fresh environment), then keep runs,
# checkpoints and the Hugging Face cache under one work folder that outlives the runtime.
import importlib, subprocess, sys
from pathlib import Path

try:
    import repro
    if not hasattr(repro, "KIT_SOURCE"):  # this kit's marker: some other package is named repro too
        raise RuntimeError(f"the package 'repro' at {repro.__file__} is not this kit (it has no repro.KIT_SOURCE): "
                           f"pip uninstall it, restart the kernel and run this cell again")
except ImportError:
    print(f"installing the kit: pip install {kit_source}", flush=True)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", kit_source], capture_output=True, text=True)
    if pip.returncode != 0:
        raise RuntimeError(f"pip install {kit_source} failed (exit {pip.returncode}):\\n{pip.stdout[-2000:]}\\n{pip.stderr[-3000:]}")
    print(pip.stdout.strip().splitlines()[-1] if pip.stdout.strip() else "installed", flush=True)
    importlib.invalidate_caches()
    try:
        import repro
    except ImportError:
        raise RuntimeError("the kit was installed but this kernel cannot import it yet: restart the kernel "
                           "and run all cells again") from None

from repro.setup.notebook import configure_environment, gpu_check, launch, show_figure, show_image

env = configure_environment(workdir=workdir, drive_mount=drive_mount)'''


# The runtime each service opens the notebook with: Colab reads `accelerator` and `colab.gpuType`; Kaggle
# reads `kaggle` (the fields its own notebook files carry: `nvidiaTeslaT4` is "GPU T4 x2", and downloads
# need Internet on).
GPU_RUNTIME = {
    "accelerator": "GPU",
    "colab": {"gpuType": "T4", "provenance": []},
    "kaggle": {"accelerator": "nvidiaTeslaT4", "isGpuEnabled": True, "isInternetEnabled": True,
               "language": "python", "sourceType": "notebook", "dataSources": []},
}


def setup_cell(params: Sequence[Param] = (), fallback: dict[str, Any] | None = None) -> nbformat.NotebookNode:
    """The set-up cell, ending with the GPU check. `fallback`: {parameter: value for a CPU run}, applied to
    the parameters (of `params`, with CPU_FALLBACK among them) still at their defaults when there is no GPU."""
    if not fallback:
        return new_code_cell(SETUP + "\n\n# Without a GPU: how to get one here (this notebook's defaults also run on a CPU)."
                             "\ngpu_check(env.platform)")
    defaults = {p.name: p.default for p in params}
    if "cpu_fallback" not in defaults or not set(fallback) <= set(defaults):
        raise ValueError(f"fallback {sorted(fallback)} needs cpu_fallback and those parameters among {sorted(defaults)}")
    names = list(fallback)
    check = (f"runtime = gpu_check(env.platform, values=dict({', '.join(f'{n}={n}' for n in names)}),\n"
             f"                    defaults={ {n: defaults[n] for n in names}!r},\n"
             f"                    fallback={fallback!r} if cpu_fallback else None)\n"
             + "\n".join(f"{n} = runtime[{n!r}]" for n in names))
    return new_code_cell(SETUP + "\n\n# Without a GPU: how to get one here, and (cpu_fallback) a run that finishes in "
                                 "minutes.\n" + check)


def notebook(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: rebuilding gives the same file
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata.update(GPU_RUNTIME)
    return nb


def write(nb: nbformat.NotebookNode, name: str) -> Path:
    nbformat.validate(nb)
    path = HERE / name
    nbformat.write(nb, path)
    print("wrote", path)
    return path


def write_all(notebooks: dict) -> None:
    """A builder's `main()`: write each notebook of its NOTEBOOKS table."""
    for name, build in notebooks.items():
        write(build(), name)


__all__ = ["COMMON", "CPU_FALLBACK", "GPU_RUNTIME", "Param", "badge_line", "github_repo", "open_links", "new_code_cell", "new_markdown_cell", "notebook",
           "parameters_cell", "setup_cell", "title_cell", "write", "write_all"]
