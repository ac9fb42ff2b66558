"""Run one step's `main(**kwargs)` in every torchrun process; rank 0 writes the result as JSON.

What a notebook starts on a machine with several GPUs (repro.setup.notebook.launch), so a cell's
keyword arguments run unchanged under torchrun and its result comes back to the cell:

    torchrun --standalone --nproc_per_node=2 -m steps.run_main steps.step4_inference \
        --kwargs '{"config": "tiny", "num_samples": 16}' --result runs/launch/result.json

Only `steps.stepN_x` modules are accepted. Exit codes are the steps' own (1 with a one-line error).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from repro.errors import ReproError
from repro.utils import distributed
from repro.utils.cli import run_cli
from repro.utils.io import atomic_write_text

STEP_MODULE = re.compile(r"^steps\.step\d+_\w+$")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
        return value.tolist()
    return str(value)  # paths, dataclasses' reprs


def main(module: str, kwargs: dict, result: str) -> dict:
    """Import `module`, call its main(**kwargs); rank 0 writes the returned dict to `result`."""
    if not STEP_MODULE.match(module):
        raise ReproError(f"steps.run_main runs a step's main (steps.stepN_x), not {module!r}")
    out = importlib.import_module(module).main(**kwargs)
    if distributed.is_main():
        atomic_write_text(Path(result), json.dumps(out, default=_jsonable))
    return out


def cli(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m steps.run_main", description=__doc__.splitlines()[0])
    p.add_argument("module", help="the step, e.g. steps.step4_inference")
    p.add_argument("--kwargs", default="{}", help="its main()'s keyword arguments as a JSON object")
    p.add_argument("--result", required=True, help="JSON file for rank 0's result")
    a = p.parse_args(argv)
    try:
        return run_cli(lambda: main(a.module, json.loads(a.kwargs), a.result))
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    cli()
