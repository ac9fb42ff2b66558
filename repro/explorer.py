"""Notebook 00's interactive explorer: type a class name, move the guidance and steps sliders, pick a seed,
press the button, see a grid of that class.

The drawing is one call, `draw_grid`, which the button runs and the tests call headless: the public API's
`Pipeline.from_pretrained(config)` (loaded once per config and device, so each press only samples) and
`pipe(class, num_images=..., seed=..., num_steps=..., guidance=...)`, image i being step 4's image i. It sits
next to repro/api.py, above the rows it calls. The
widgets around it are built only where a notebook frontend can show them (Colab, a kernel started by
Jupyter Server: `repro.utils.progress.widget_frontend`, `REPRO_PROGRESS=widget` forces it). Under papermill
or in a terminal `explorer()` says so in one line and builds nothing, so a saved notebook holds no dead
widget. ipywidgets 7.x (what Colab has shipped) and 8.x both work: the class box is a `Combobox`
(ipywidgets >= 7.5) with completion over the model's class names.

    from repro.explorer import explorer, draw_grid
    explorer(config="runs/configs/demo.resolved.yaml")                   # the widgets (a notebook frontend)
    draw_grid(config, "golden retriever", guidance=4.0, steps=50, seed=1)  # what its button does
"""

from __future__ import annotations

import copy
import re
from typing import Any, Optional, Sequence

import numpy as np

from repro import paths
from repro.api import Pipeline
from repro.config import apply_overrides, load_config, save_config
from repro.data.class_names import names_for
from repro.errors import ReproError
from repro.resources import find_config
from repro.sampling.grid import grid_shape, save_grid
from repro.utils.io import make_dirs
from repro.utils.progress import widget_frontend

EXPLORER_DIR = "runs:explorer"  # one grid at a time: new settings replace it (step 4's demo folder rule)
MIN_IPYWIDGETS = (7, 5)  # Combobox arrived in ipywidgets 7.5; Colab has shipped 7.x, Jupyter installs 8.x
_PIPELINES: dict[tuple[str, Optional[str]], Pipeline] = {}  # (config, device) -> the loaded pipeline


def pipeline(config: str, device: Optional[str] = None) -> Pipeline:
    """The explorer's Pipeline for `config` on `device`, loaded on the first press and kept for the next ones."""
    key = (str(config), device)
    if key not in _PIPELINES:
        _PIPELINES[key] = Pipeline.from_pretrained(str(config), device=device)
    return _PIPELINES[key]


def draw_grid(config: str, class_name: str | int, guidance: float, steps: int, seed: int, num_images: int = 4,
              out: str = EXPLORER_DIR, device: Optional[str] = None, show: bool = True) -> dict:
    """Sample `num_images` images of one class (a name, with did-you-mean on a typo, or an id) with this
    guidance scale, number of Euler grid points and seed; write and (`show`) display their grid.

    Returns {'grid': its PNG, 'out_dir' (the grid and the config.yaml it was drawn with), 'labels', 'seed',
    'images': the PIL images}."""
    if steps < 2:
        raise ReproError(f"steps={steps}: the Euler grid needs at least 2 points (1 step)")
    if guidance < 1.0:
        raise ReproError(f"guidance={guidance}: classifier-free guidance scales start at 1.0 (no guidance)")
    label = class_name.strip() if isinstance(class_name, str) else class_name
    if label == "":
        raise ReproError("type a class name (or a class id) first")
    pipe = pipeline(config, device)
    images = pipe(label, num_images=num_images, seed=seed, num_steps=steps, guidance=guidance)
    # What the grid was drawn with, beside it: the config with this press's steps and guidance.
    folder = make_dirs(paths.runs_path(str(out)))
    save_config(apply_overrides(copy.deepcopy(pipe.config), [f"sample.cfg_scale={guidance}", f"sample.num_sampling_steps={steps}"]),
                folder / "config.yaml")
    rows, cols = grid_shape(len(images), 4)
    grid = save_grid(np.stack([np.asarray(image) for image in images]), folder / "grid.png", rows, cols)
    result = {"grid": str(grid), "out_dir": str(folder), "labels": images.labels, "seed": images.seed,
              "images": list(images)}
    if show:
        from repro.setup.notebook import show_image

        show_image(result["grid"])
    return result


def class_choices(config: str) -> list[str]:
    """What the class box completes: the model's class names (ImageNet's 1000, or step 6's class folders),
    else its class ids as text."""
    cfg = load_config(find_config(config))  # a preset's asset-dir: path finds no class folders: ImageNet's or ids
    names, _ = names_for(cfg.data.num_classes, cfg.data.data_path)
    return list(names) if names else [str(i) for i in range(cfg.data.num_classes)]


def _ipywidgets():
    try:
        import ipywidgets
    except ImportError:
        raise ReproError("the explorer needs ipywidgets: pip install 'ipywidgets>=7.5' (or the kit's "
                         "[notebooks] extra), then run this cell again") from None
    version = tuple(int(v) for v in re.findall(r"\d+", ipywidgets.__version__)[:2])
    if version < MIN_IPYWIDGETS or not hasattr(ipywidgets, "Combobox"):
        raise ReproError(f"the explorer needs ipywidgets >= 7.5 (its Combobox); this runtime has "
                         f"{ipywidgets.__version__}: pip install -U 'ipywidgets>=7.5'")
    return ipywidgets


def build_explorer(config: str, choices: Sequence[str], class_name: str = "", guidance: float = 4.0,
                   steps: int = 50, seed: int = 0, num_images: int = 4, device: Optional[str] = None) -> Any:
    """The widgets (a VBox), wired to `draw_grid`; its `.draw` attribute is the button's callback. Building
    them needs no frontend (the tests press the button headless); showing them does."""
    w = _ipywidgets()
    box = w.Combobox(value=class_name or (choices[0] if choices else ""), options=list(choices),
                     description="class", placeholder="type a class name", ensure_option=False)
    scale = w.FloatSlider(value=guidance, min=1.0, max=10.0, step=0.5, description="guidance")
    points = w.IntSlider(value=steps, min=2, max=250, step=1, description="steps")
    seed_box = w.IntText(value=seed, description="seed")
    button = w.Button(description="draw the grid", button_style="primary")
    shown = w.Output()

    def draw(_button=None) -> Optional[dict]:
        with shown:
            if hasattr(shown, "clear_output"):
                shown.clear_output(wait=True)
            try:
                return draw_grid(config, box.value, scale.value, points.value, seed_box.value,
                                 num_images=num_images, device=device)
            except ReproError as e:  # a typo in the class name: its did-you-mean, not a traceback
                print(f"error: {e}")
                return None

    button.on_click(draw)
    ui = w.VBox([box, scale, points, seed_box, button, shown])
    ui.draw = draw
    return ui


def explorer(config: str, guidance: float = 4.0, steps: int = 50, seed: int = 0, num_images: int = 4,
             device: Optional[str] = None) -> Any:
    """Show the explorer where a notebook frontend can draw it; elsewhere one line saying how to draw a grid
    without it, and None."""
    if not widget_frontend():
        print(f"explorer: no notebook frontend here (papermill, a terminal), so no widgets; the same grid: "
              f"draw_grid({str(config)!r}, 'CLASS NAME', guidance={guidance}, steps={steps}, seed={seed}) "
              f"from repro.explorer (written to {paths.runs_path(EXPLORER_DIR)})", flush=True)
        return None
    from IPython.display import display

    ui = build_explorer(config, class_choices(config), guidance=guidance, steps=steps, seed=seed,
                        num_images=num_images, device=device)
    display(ui)
    return ui
