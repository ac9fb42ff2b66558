"""Training logs in the run folder: console lines, `log.txt`, `log.jsonl` and a refreshed `loss.png`.

Upstream (hustvl/LightningDiT train.py) logs `(step=NNNNNNN) Train Loss: x, Train Steps/Sec: y` to
the console, `log.txt` and TensorBoard. The kit logs loss (= mse + cos, and each part), gradient
norm, images/s and learning rate every `train.log_every` steps, one JSON object per line in
`log.jsonl` (append-only; a line torn by a kill is dropped on resume, and rows past the resumed
step are removed, so the file always describes one consistent run) and a loss plot refreshed at most
every `plot_interval` seconds (matplotlib's Agg canvas directly: a notebook's backend is untouched).
Each row also has the ETA to `train.max_steps` and the peak memory of the window (GPU memory
allocated, or the process's peak RSS on the CPU; the largest over processes), and goes to the
TensorBoard / W&B backends the config asks for (`repro.training.log_backends`).
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

from repro.errors import ReproError
from repro.utils import distributed as dist
from repro.utils.hardware import GiB, peak_memory, reset_peak_memory
from repro.utils.io import atomic_path, atomic_write_text


def read_log_rows(path: Path, last_step: Optional[int]) -> list[dict[str, Any]]:
    """The complete JSON lines of `path` (a torn last one is ignored) up to step `last_step` (None: no rows)."""
    rows = []
    if path.is_file() and last_step is not None:
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row and row["step"] <= last_step:
                rows.append(row)
    return rows


def window_progress(step: int, max_steps: int, seconds_per_step: float, device: torch.device) -> dict[str, float]:
    """ETA at the window's pace and the window's peak memory (max over processes; every rank calls)."""
    peak = dist.all_reduce_values([float(peak_memory(device)[0])], "max")[0]
    reset_peak_memory(device)
    return {"seconds_per_step": seconds_per_step, "eta_seconds": max(max_steps - step, 0) * seconds_per_step,
            "memory_gib": peak / GiB}


def format_duration(seconds: float) -> str:
    d, rest = divmod(int(round(seconds)), 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{d}d{h:02d}h{m:02d}m" if d else f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class RunLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: Optional[int] = None,
                 plot_interval: float = 60.0, cfg=None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.jsonl, self.txt, self.plot_path = (self.run_dir / n for n in ("log.jsonl", "log.txt", "loss.png"))
        # loss.png is redrawn at most every plot_interval seconds, and at close when rows came since
        self.plot_interval, self._last_plot, self._dirty = plot_interval, 0.0, False
        self.rows: list[dict[str, Any]] = []
        self.backends: list = []
        self._lock = threading.Lock()  # a background checkpoint writer logs too
        if cfg is not None:  # TensorBoard / W&B: opened on rank 0, an error there raised on every rank
            error: Optional[ReproError] = None
            if enabled:
                from repro.training.log_backends import open_backends

                try:
                    self.backends = open_backends(cfg, self.run_dir, resume_step)
                except ReproError as e:
                    error = e
            message = dist.broadcast_object(str(error) if error is not None else None)
            if error is not None or message is not None:  # this rank's own error, else rank 0's as a ReproError
                raise error or ReproError(message)
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.rows = read_log_rows(self.jsonl, resume_step)
            if self.jsonl.exists():
                # drop a torn last line and the rows of steps being redone after a resume (or of a run
                # started over), so each step appears once
                atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))

    def info(self, message: str, echo: bool = True) -> None:
        """Print `message` (unless echo is False: already printed) and append it to log.txt."""
        if not self.enabled:
            return
        with self._lock:
            if echo:
                print(message, flush=True)
            with open(self.txt, "a") as f:
                f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}\n")

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": round(time.time(), 3), **values}
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.info(format_row(row))
        for backend in self.backends:
            backend.log(step, row)
        self._dirty = True
        if time.time() - self._last_plot >= self.plot_interval:
            self.plot()

    def image(self, step: int, tag: str, path: str | Path) -> None:
        """A PNG the run wrote (an EMA sample grid) to the TensorBoard / W&B backends; log.txt names it already."""
        for backend in self.backends:
            backend.log_image(step, tag, path)

    def plot(self) -> None:
        """Redraw `loss.png` from every logged row (atomic write)."""
        if not self.enabled or not self.rows:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        steps = [r["step"] for r in self.rows]
        for key, style in (("loss", "-"), ("mse", "--"), ("cos", ":")):
            ys = [r.get(key) for r in self.rows]
            if any(isinstance(v, (int, float)) and math.isfinite(v) for v in ys):
                ax.plot(steps, [v if v is not None else math.nan for v in ys], style, label=key)
        ax.set(xlabel="step", ylabel="training loss", title=self.run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(self.plot_path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
        self._last_plot = time.time()
        self._dirty = False

    def close(self) -> None:
        if self._dirty:
            self.plot()
        backends, self.backends = self.backends, []
        for backend in backends:
            backend.close()


def format_row(row: dict[str, Any]) -> str:
    parts = [f"(step={row['step']:07d})", f"loss {row['loss']:.4f}"]
    if row.get("cos") is not None:
        parts[-1] += f" (mse {row['mse']:.4f} + cos {row['cos']:.4f})"
    if row.get("grad_norm") is not None:
        parts.append(f"grad norm {row['grad_norm']:.3g}")
    parts.append(f"{row.get('images_per_sec', 0.0):.1f} img/s")
    parts.append(f"lr {row.get('lr', 0.0):.2e}")
    for key, text in (("loss_scale", "loss scale {:.0f}"), ("seconds_per_step", "{:.3g} s/step"),
                      ("memory_gib", "peak mem {:.2f} GiB")):
        if row.get(key) is not None:
            parts.append(text.format(row[key]))
    if row.get("eta_seconds") is not None:
        parts.append(f"ETA {format_duration(row['eta_seconds'])}")
    return " | ".join(parts)
