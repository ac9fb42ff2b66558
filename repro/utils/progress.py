"""Progress bars that render wherever the kit runs: a terminal, a live notebook, papermill, a log file.

`tqdm.auto` picks the ipywidgets bar inside any Jupyter kernel, but a kernel run headless (papermill,
Kaggle's "Save & Run All", nbclient) has no frontend to draw the widget: the saved notebook then
shows `0%` as text and nothing else. So the widget bar is used only where a frontend is known to be
attached (Colab; a kernel started by Jupyter Server, which sets JPY_SESSION_NAME); everywhere else
the text bar, which Jupyter renders too. Without a terminal the text bar refreshes at most every
`NON_TTY_INTERVAL` seconds, so a long run does not fill a notebook or a log with bar states.

`REPRO_PROGRESS=text|widget` overrides the choice.

    bar = progress_bar(total=n, desc="sample", unit="img")
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

NON_TTY_INTERVAL = 10.0  # seconds between bar refreshes when stderr is not a terminal


def _in_kernel() -> bool:
    shell = sys.modules.get("IPython")
    try:
        ip = shell.get_ipython() if shell is not None else None
    except AttributeError:
        return False
    return ip is not None and getattr(ip, "kernel", None) is not None


def widget_frontend() -> bool:
    """True where an ipywidgets bar is drawn: a Jupyter kernel with a frontend attached (see module doc)."""
    choice = os.environ.get("REPRO_PROGRESS", "").lower()
    if choice in ("text", "widget"):
        return choice == "widget"
    if not _in_kernel() or importlib.util.find_spec("ipywidgets") is None:
        return False
    return "google.colab" in sys.modules or bool(os.environ.get("JPY_SESSION_NAME"))


def progress_bar(**kwargs: Any):
    """A tqdm bar (same keyword arguments) of the kind this process can show."""
    if widget_frontend():
        from tqdm.notebook import tqdm
    else:
        from tqdm.std import tqdm

        stream = kwargs.get("file") or sys.stderr
        if not getattr(stream, "isatty", lambda: False)():
            kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.1)), NON_TTY_INTERVAL)
    return tqdm(**kwargs)
