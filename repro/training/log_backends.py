"""Where training metrics go besides `log.txt` / `log.jsonl`: TensorBoard and Weights & Biases, both opt-in.

Upstream (hustvl/LightningDiT train.py) writes TensorBoard: `Loss/train` (the MSE term) every log
step, `Loss/validation` with `data.valid_path`, and the config as the text `training configs`.
With `train.tensorboard: true` the kit writes the same tags under `RUN/tensorboard/` (upstream:
`tensorboard_logs/EXP` under the working directory) plus every other logged number as
`train/<key>` (the kit's loss = mse + cos, step time, img/s, ETA, grad norm, learning rate, memory).
`train.wandb: true` logs the same rows to the W&B project `train.wandb_project` (VFM-VAE's key; the
kit never contacts W&B unless asked: `WANDB_MODE=offline` keeps it on disk); a resumed run continues
the same W&B run (its id is kept in `RUN/wandb_run_id.txt`).

Besides numbers, both get the EMA sample grids the DiT trainer writes every `train.sample_every` steps
(`samples/ema_grid`, `log_image`) and step 8's numbers when a run folder is evaluated
(`repro.Pipeline.from_pretrained(RUN).evaluate()` -> `log_evaluation`: `eval/fid`, `eval/is`, ... at the
checkpoint's step). W&B plots every key against the training step as its own x axis (`trainer/step`,
`define_metric`), not against W&B's internal step counter, which only moves forward: so after a resume
from an older checkpoint (a kill after later rows were logged) the re-logged rows are kept, not dropped
as rows "below the last step".

Both packages are optional imports: asking for one that is not installed stops the run at its start
with the `pip install` that fixes it. Every backend has `log(step, row)` and `close()`; the JSONL
file of `repro.training.logs.RunLogger` is the kit's own and always on.

    backends = open_backends(cfg, run_dir, resume_step=None)   # [] unless the config asks
"""

from __future__ import annotations

import math
import re
import secrets
from pathlib import Path
from typing import Any, Optional, Protocol

from repro.errors import ConfigError, ReproError
from repro.utils.io import atomic_write_text

# upstream's TensorBoard tags for the numbers it logs: with the cosine loss on, upstream's "Train Loss" is
# the MSE term alone (train.py adds mse_loss to running_loss), and its validation value likewise;
# every other key (the kit's loss = mse + cos included) goes under "train/"
UPSTREAM_TAGS = {"mse": "Loss/train", "val_mse": "Loss/validation"}


class MetricsBackend(Protocol):
    name: str

    def log(self, step: int, row: dict[str, Any]) -> None: ...

    def log_image(self, step: int, tag: str, image: str | Path) -> None: ...

    def close(self) -> None: ...


def read_rgb(image: str | Path):
    """(H, W, 3) uint8 of a PNG the kit wrote (a sample grid)."""
    import numpy as np
    from PIL import Image

    with Image.open(image) as im:
        return np.asarray(im.convert("RGB"))


# The W&B x axis of every key: the training step, logged with each row (W&B's own step only moves forward).
WANDB_STEP = "trainer/step"
WANDB_PREFIXES = ("train/", "Loss/", "samples/", "eval/")


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a log row (booleans, None, text and NaN left out)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def tagged(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a log row under their TensorBoard / W&B tags (step and time left out: the x axis)."""
    return {UPSTREAM_TAGS.get(k, f"train/{k}"): v for k, v in numbers(row).items() if k not in ("step", "time")}


def missing_package(key: str, package: str) -> ConfigError:
    return ConfigError(f"{key} is true but the '{package}' package is not installed: pip install {package} "
                       f"(or set {key}=false)")


class TensorBoardBackend:
    name = "tensorboard"

    def __init__(self, run_dir: Path, config_text: str = "", resume_step: Optional[int] = None, purge: bool = True):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package for its event protos
            raise missing_package("train.tensorboard", "tensorboard") from None
        # purge_step: events past the resumed step (written before a kill) are hidden, one curve per run
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step is not None and purge else None)
        if config_text and resume_step is None:
            self.writer.add_text("training configs", config_text, global_step=0)

    def log(self, step: int, row: dict[str, Any]) -> None:
        for tag, value in tagged(row).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_image(self, step: int, tag: str, image: str | Path) -> None:
        self.writer.add_image(tag, read_rgb(image), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder: made once, reused by every resume (so W&B shows one run)."""
    id_file = Path(run_dir) / "wandb_run_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not re.fullmatch(r"[a-z0-9]{8,32}", run_id):  # absent, or not an id this kit wrote
        run_id = secrets.token_hex(8)
        atomic_write_text(id_file, run_id + "\n")
    return run_id


class WandbBackend:
    name = "wandb"

    def __init__(self, run_dir: Path, project: Optional[str], run_name: str, config: dict):
        if not project:
            raise ConfigError("train.wandb is true but train.wandb_project is empty: name the W&B project "
                              "(e.g. --set train.wandb_project=lightningdit)")
        try:
            import wandb
        except ImportError:
            raise missing_package("train.wandb", "wandb") from None
        run_id = wandb_run_id(run_dir)
        try:
            self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow", dir=str(run_dir),
                                  config=config)
            self.run.define_metric(WANDB_STEP)
            for prefix in WANDB_PREFIXES:
                self.run.define_metric(f"{prefix}*", step_metric=WANDB_STEP)
        except Exception as e:  # not logged in, no network, a bad entity: one line, with the ways out
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ReproError(f"Weights & Biases could not start a run in project {project!r} ({first}): run "
                             "`wandb login`, or set WANDB_MODE=offline to log to disk only, or set "
                             "train.wandb=false") from None

    def log(self, step: int, row: dict[str, Any]) -> None:
        self.run.log({**tagged(row), WANDB_STEP: step})  # no step=: W&B would drop rows below its last step

    def log_image(self, step: int, tag: str, image: str | Path) -> None:
        import wandb

        self.run.log({tag: wandb.Image(read_rgb(image), caption=f"step {step}"), WANDB_STEP: step})

    def close(self) -> None:
        self.run.finish()


def open_backends(cfg, run_dir: str | Path, resume_step: Optional[int] = None,
                  purge: bool = True) -> list[MetricsBackend]:
    """The backends `cfg.train` asks for (rank 0 only: the caller decides); [] by default. `purge=False` keeps
    TensorBoard's events past `resume_step` (`log_evaluation` adds to a finished run's curves)."""
    out: list[MetricsBackend] = []
    try:
        if cfg.train.tensorboard:
            from repro.config import config_to_yaml

            out.append(TensorBoardBackend(Path(run_dir), config_to_yaml(cfg), resume_step, purge))
        if cfg.train.wandb:
            out.append(WandbBackend(Path(run_dir), cfg.train.wandb_project, cfg.train.exp_name, cfg.to_dict()))
    except BaseException:
        for b in out:
            b.close()
        raise
    return out


def log_evaluation(cfg, run_dir: str | Path, step: Optional[int], metrics: dict[str, Any]) -> list[str]:
    """Step 8's numbers of a run folder's checkpoint into the backends its config logs to, as `eval/<metric>` at
    the checkpoint's step (TensorBoard events past it are kept: the training curves stay); returns their names."""
    scores = {f"eval/{k}": v for k, v in numbers(metrics).items() if k in ("fid", "sfid", "is", "prec", "recall")}
    if not scores or step is None:
        return []
    out = open_backends(cfg, run_dir, resume_step=step, purge=False)
    try:
        for backend in out:
            if isinstance(backend, TensorBoardBackend):
                for tag, value in scores.items():
                    backend.writer.add_scalar(tag, value, step)
            else:
                backend.run.log({**scores, WANDB_STEP: step})
    finally:
        for backend in out:
            backend.close()
    return [b.name for b in out]
