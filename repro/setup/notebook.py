"""What the notebooks need around the steps: a work folder that outlives the runtime, every visible GPU,
figures that show up under Jupyter and papermill alike.

A notebook's first cell installs the kit when it is missing (see notebooks/nbbuild.py), then calls
`configure_environment`, before any other kit call:

    env = configure_environment(workdir="", drive_mount=False)   # REPRO_RUNS_DIR, HF_HOME under env.root
    run = launch(step4_inference.main, gpus=0, config="tiny", num_samples=16)   # torchrun on >1 GPU
    show_figure(show_samples(images, labels), env.root / "samples.png")

Where the work folder goes when `workdir` is empty (runs, checkpoints and the Hugging Face cache all
live under it, so a resumed notebook finds what the last session wrote):
- Kaggle: /kaggle/working, the only folder Kaggle keeps between sessions of a notebook version (20 GB);
- Colab: Google Drive (`drive_mount=True`, mounted here), else ./work on the runtime's disk, which a
  disconnect loses (said when it is chosen);
- elsewhere: ./work.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from repro import paths
from repro.errors import ReproError
from repro.setup.envinfo import detect_platform
from repro.utils.io import atomic_path

# The folders each service keeps between sessions (nowhere else are these paths used).
KAGGLE_WORKING = Path("/kaggle/working")
COLAB_DRIVE_MOUNT = Path("/content/drive")
COLAB_DRIVE_ROOT = COLAB_DRIVE_MOUNT / "MyDrive" / "repro-kit"
LOCAL_ROOT = Path("work")
# The module each torchrun process runs: it calls the step's main(**kwargs) and writes rank 0's result.
WORKER_MODULE = "steps.run_main"


@dataclass
class NotebookEnv:
    platform: str  # kaggle | colab | local
    root: Path  # the work folder
    runs: Path  # REPRO_RUNS_DIR: run records, samples, training runs
    hf_home: Path  # HF_HOME: the Hugging Face cache
    persistent: bool  # survives the runtime (Kaggle's output folder, Drive, a local disk)

    def describe(self) -> str:
        keep = "kept between sessions" if self.persistent else "LOST when the runtime disconnects (drive_mount=True keeps it)"
        return f"platform {self.platform}; work folder {self.root} ({keep}); runs {self.runs}; HF cache {self.hf_home}"


def work_root(workdir: str = "", drive_mount: bool = False, platform: Optional[str] = None) -> tuple[Path, bool]:
    """(work folder, whether it outlives the runtime) for this platform; `workdir` wins when given."""
    where = platform or detect_platform()
    if drive_mount and where != "colab":
        raise ReproError(f"drive_mount=True is for Colab, but this is {where}: set workdir to a folder instead")
    if workdir:
        return Path(workdir).expanduser().absolute(), where != "colab" or _on_drive(Path(workdir))
    if where == "kaggle":
        return KAGGLE_WORKING, True
    if where == "colab" and drive_mount:
        from google.colab import drive  # only importable on Colab

        drive.mount(str(COLAB_DRIVE_MOUNT))
        return COLAB_DRIVE_ROOT, True
    return LOCAL_ROOT.absolute(), where != "colab"


def _on_drive(path: Path) -> bool:
    return COLAB_DRIVE_MOUNT in path.expanduser().absolute().parents


def configure_environment(workdir: str = "", drive_mount: bool = False,
                          platform: Optional[str] = None) -> NotebookEnv:
    """Pick the work folder and point the kit (REPRO_RUNS_DIR) and the HF client (HF_HOME) into it.

    Call it before any other kit call: huggingface_hub reads HF_HOME once, when it is imported.
    """
    root, persistent = work_root(workdir, drive_mount, platform)
    env = NotebookEnv(platform=platform or detect_platform(), root=root, runs=root / "runs",
                      hf_home=root / "hf_home", persistent=persistent)
    hub = sys.modules.get("huggingface_hub.constants")
    imported_home = getattr(hub, "HF_HOME", None)
    if imported_home is not None and Path(imported_home).absolute() != env.hf_home:
        raise ReproError(f"huggingface_hub was imported with HF_HOME={imported_home} before the work folder was set: "
                         "restart the kernel and run the notebook from its first cell")
    env.runs.mkdir(parents=True, exist_ok=True)
    os.environ["REPRO_RUNS_DIR"] = str(env.runs)
    os.environ["HF_HOME"] = str(env.hf_home)
    print(env.describe(), flush=True)
    return env


# ---------------------------------------------------------------------------------------------------
# A runtime without a GPU

# How to get a GPU where the notebook runs (the menus as Colab and Kaggle name them).
GPU_HOWTO = {
    "colab": "Runtime -> Change runtime type -> Hardware accelerator: T4 GPU -> Save, then run all cells again",
    "kaggle": "Settings -> Accelerator -> GPU T4 x2, and Settings -> Internet on (downloads need it), then run all "
              "cells again",
    "local": "run it where torch sees a CUDA GPU (torch.cuda.is_available() is False here)",
}


def gpu_check(platform: str, values: Optional[dict[str, Any]] = None, defaults: Optional[dict[str, Any]] = None,
              fallback: Optional[dict[str, Any]] = None, gpu: Optional[bool] = None) -> dict[str, Any]:
    """The notebook's `values`, for this runtime. With a CUDA GPU they are returned unchanged. Without one,
    print how to get one on `platform` (GPU_HOWTO) and replace each `fallback` key whose value is still the
    notebook's default (`defaults`) by its fallback, a run that finishes in minutes on a CPU, saying so;
    a value the user set is kept. `gpu`: whether a GPU is visible (None: ask torch)."""
    values = dict(values or {})
    if gpu is None:
        gpu = visible_gpus() > 0
    if gpu:
        return values
    print(f"no GPU on this runtime: to get one, {GPU_HOWTO.get(platform, GPU_HOWTO['local'])}.", flush=True)
    changed = {k: v for k, v in (fallback or {}).items() if k in values and values[k] == (defaults or {}).get(k)}
    if changed:
        values.update(changed)
        told = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        print(f"meanwhile this run uses {told} so that it finishes in minutes on the CPU (set cpu_fallback=False "
              "to run the defaults on the CPU anyway: hours)", flush=True)
    elif fallback:
        print("the values you set are kept: on a CPU this run may take hours", flush=True)
    return values


# ---------------------------------------------------------------------------------------------------
# One process per GPU


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def processes_for(gpus: int, device: Optional[str] = None) -> int:
    """How many processes a step runs in: `gpus` (> 0), or every visible GPU (0); one on a CPU device.

    On a machine without a GPU, gpus > 1 starts that many CPU processes (gloo), as the tests do.
    """
    if gpus < 0:
        raise ReproError(f"gpus={gpus}: give 0 (every visible GPU) or a number of processes")
    visible = visible_gpus()
    if gpus == 0:
        return visible if visible > 1 and not (device or "").startswith("cpu") else 1
    if visible and gpus > visible:
        raise ReproError(f"gpus={gpus}, but only {visible} GPU(s) are visible: set gpus={visible} or 0 for all")
    return gpus


def launch(main: Callable[..., Any], gpus: int = 0, **kwargs: Any) -> Any:
    """`main(**kwargs)` in this kernel on one GPU or the CPU; on several, the same call in one torchrun
    process per GPU, its output streamed into the cell, returning rank 0's result.

    `main` is a step's main (steps.stepN_x.main); kwargs must be JSON values (they cross a process).
    """
    n = processes_for(gpus, kwargs.get("device"))
    if n <= 1:
        return main(**kwargs)
    module = main.__module__
    try:
        payload = json.dumps(kwargs)
    except TypeError as e:
        raise ReproError(f"launch({module}.main): arguments must be JSON values to reach torchrun ({e})") from None
    result_file = paths.runs_dir().absolute() / "launch" / f"{module}.{os.getpid()}.{time.time_ns()}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", WORKER_MODULE, module, "--kwargs", payload, "--result", str(result_file)]
    print(f"launch: torchrun --standalone --nproc_per_node={n} -m {module} (one process per "
          f"{'GPU' if visible_gpus() else 'CPU worker'})", flush=True)
    _stream(cmd, _child_env(), f"torchrun -m {module}")
    try:
        return json.loads(result_file.read_text())
    except (OSError, ValueError) as e:
        raise ReproError(f"torchrun -m {module} finished but left no readable result in {result_file} ({e})") from None
    finally:
        result_file.unlink(missing_ok=True)


def _child_env() -> dict[str, str]:
    """This kernel's environment, plus the folder this kit is imported from (an uninstalled checkout too)."""
    import repro

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    kit_parent = str(Path(repro.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (kit_parent, env.get("PYTHONPATH", "")) if p)
    return env


def _stream(cmd: list[str], env: dict[str, str], what: str, tail_lines: int = 10) -> None:
    """Run `cmd`, printing its output line by line as it comes. If it fails: an error carrying the steps'
    own one-line errors (`error: ...`, printed by every rank), else the last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    errors: dict[str, None] = {}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line.rstrip())
            if line.startswith(("error: ", "stopped: ")):
                errors[line.strip()] = None
        code = proc.wait()
    except KeyboardInterrupt:  # the cell was interrupted: stop the workers at their next safe point
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if code != 0:
        said = " | ".join(errors) if errors else "its last lines: " + " | ".join(line for line in tail if line)[-1500:]
        raise ReproError(f"{what} failed with exit code {code}: {said}")


# ---------------------------------------------------------------------------------------------------
# Figures


def show_image(path: str | os.PathLike) -> None:
    """Display a PNG inline in a notebook (Jupyter, Colab, papermill); print its path elsewhere."""
    path = Path(path)
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        get_ipython = None  # noqa: N806
    if get_ipython is None or get_ipython() is None:
        print(f"figure: {path}", flush=True)
    else:
        display(Image(filename=str(path)))


def show_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Save a matplotlib Figure as a PNG (atomically) and display that PNG: a bare Figure object shows
    as the text `<Figure size ...>` wherever no inline backend is active, papermill included."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    show_image(path)
