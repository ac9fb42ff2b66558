"""Shared pieces of the notebook builders (build_*.py): the find-the-kit cell and stable .ipynb output."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_notebook

HERE = Path(__file__).resolve().parent


def find_root_source(step_file: str, extra: str = "") -> str:
    """The first code cell: walk up from the working directory to the kit's folder and work from there."""
    return f'''\
# Make the kit importable wherever the kernel started (papermill starts it in notebooks/ unless told):
# walk up from the working directory to the folder that holds steps/ and repro/, and work from there.
import os, sys
from pathlib import Path

root = Path.cwd().resolve()
while not ((root / "steps" / "{step_file}").is_file() and (root / "repro").is_dir()):
    if root == root.parent:
        raise RuntimeError("run this notebook inside the kit's folder (git clone it, then open notebooks/)")
    root = root.parent
os.chdir(root)
sys.path.insert(0, str(root)){extra}'''


def notebook(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: rebuilding gives the same file
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def write(nb: nbformat.NotebookNode, name: str) -> Path:
    nbformat.validate(nb)
    path = HERE / name
    nbformat.write(nb, path)
    print("wrote", path)
    return path
