"""The kit in three lines: load a LightningDiT from anywhere, sample PIL images, evaluate, export, share.

    from repro import Pipeline
    pipe = Pipeline.from_pretrained("tiny")
    images = pipe(["golden retriever", 207], seed=0)       # class names or ids -> PIL images

`from_pretrained` takes, first that applies: a folder `Pipeline.export` wrote (its export.json), a run folder
of step 7 (its config.yaml and newest checkpoint's EMA), a YAML config, a preset name ('demo',
'lightningdit_xl_800ep', 'tiny'; fetched and resolved as step 4 does), a step-2 asset name of a DiT
checkpoint ('lightningdit-xl-800ep': the preset that uses it), or a Hugging Face repo id ('owner/name': an
export pushed with `push_to_hub`, downloaded and verified through step 2's machinery, offline when cached).

Image i of a call is step 4's image i: its noise is drawn from (seed, i) alone (repro.sampling.plan), so
`pipe(labels, seed=s)` gives the pixels of `python -m steps.step4_inference --labels ... --seed s` with the
same batch size. Everything below stays reachable: `pipe.config` (the resolved Config), `pipe.sampler`
(repro.sampling.engine's SamplerSetup: model, VA-VAE, statistics), `pipe.source`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from repro import paths
from repro.config import Config, apply_overrides, flatten, load_config
from repro.errors import ReproError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
OUTPUT_TYPES = ("pil", "np", "latent")


class Samples(list):
    """The PIL images of one call (output_type 'np': one (N, H, W, 3) uint8 array instead), with `.latents`
    (N, C, h, w) float32 on the CPU (model space, before de-normalisation), `.labels` and `.seed`."""

    latents: torch.Tensor
    labels: list[int]
    seed: int


def _with_assets(cfg: Config) -> Config:
    """`asset:`/`asset-dir:`/`runs:` values filled as step 3 fills them; a missing download is fetched first."""
    from repro.setup.resolve import MissingAssetError, resolve_config

    if not any(isinstance(v, str) and v.startswith(("asset:", "asset-dir:", "runs:")) for v in flatten(cfg).values()):
        return cfg
    try:
        return resolve_config(cfg)[0]
    except MissingAssetError as e:
        from repro.hub import fetch_assets

        print(f"asset {e.name} ({e.key}) is not downloaded yet: fetching it as step 2 does", flush=True)
        fetch_assets(names=[e.name])
        return resolve_config(cfg)[0]


def _preset_of_asset(name: str) -> Optional[Path]:
    """The preset whose ckpt_path is `asset:NAME` (top-level presets first), or None."""
    from repro.resources import configs_dir

    folder = configs_dir()
    for path in sorted(folder.rglob("*.yaml"), key=lambda p: (len(p.relative_to(folder).parts), str(p))):
        if path.name == "assets.yaml":
            continue
        try:
            if str(load_config(path).ckpt_path).strip() == f"asset:{name}":
                return path
        except ReproError:
            continue
    return None


def _newest_checkpoint(run_dir: Path) -> tuple[int, Path]:
    from repro.training.checkpoints import checkpoint_dir, list_checkpoints

    found = list_checkpoints(checkpoint_dir(run_dir))
    if not found:
        raise ReproError(f"run folder {run_dir} has no checkpoint in {checkpoint_dir(run_dir)} yet: train on "
                         "(python -m steps.step7_train --config ...) until the first save (train.ckpt_every)")
    return found[-1]


def _metrics_of_run(run_dir: Path) -> Optional[dict]:
    """The newest metrics.json step 8 wrote in a run folder (or a sample folder under it), or None."""
    import json

    found = sorted(run_dir.glob("**/metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else None


class Pipeline:
    """A LightningDiT + its tokenizer + latent statistics, loaded once; call it to sample (see module docstring)."""

    def __init__(self, config: Config, *, source: str = "", device: Optional[str | torch.device] = None,
                 precision: Optional[str] = None, compile: Optional[str | bool] = None,
                 class_names: Optional[Sequence[str]] = None, run_dir: Optional[Path] = None,
                 step: Optional[int] = None, metrics: Optional[dict] = None):
        from repro.data.class_names import names_for
        from repro.sampling.engine import build_sampler

        self.config, self.source, self.run_dir, self.step, self.metrics = config, source, run_dir, step, metrics
        self.sampler = build_sampler(config, device=device, precision=precision, compile=compile)
        self.class_names, self.class_names_source = names_for(config.data.num_classes, config.data.data_path,
                                                              class_names)

    # ------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, set: Optional[Sequence[str]] = None,
                        revision: str = "main", device: Optional[str] = None, precision: Optional[str] = None,
                        compile: Optional[str | bool] = None,
                        class_names: Optional[Sequence[str] | str] = None) -> "Pipeline":
        """Load from a preset, an asset name, a run folder, an exported folder, a YAML file or a Hub repo id;
        `set` overrides config keys as `--set` does ("sample.cfg_scale=4.0"); `class_names` (in label order, or
        a file with one a line) name the classes when neither step 6's record nor ImageNet's list applies."""
        from repro.hub.export import INDEX, read_export

        text, overrides = str(name_or_path), list(set or [])
        path = Path(text).expanduser()
        kw: dict[str, Any] = dict(device=device, precision=precision, compile=compile)
        if class_names is not None:
            kw["class_names"] = class_names
        # A folder: an export, or a run of step 7.
        if path.is_dir():
            if (path / INDEX).is_file():
                cfg, info = read_export(path, overrides)
                return cls(_with_assets(cfg), source=str(path), **{"class_names": info.get("class_names"), **kw},
                           step=info.get("step"), metrics=info.get("metrics"))
            if (path / "config.yaml").is_file():
                return cls._from_run(path, overrides, **kw)
            raise ReproError(f"{path} is a folder but holds neither {INDEX} (an export: Pipeline.export) nor "
                             "config.yaml (a run folder of step 7): give one of those, a preset name or a repo id")
        # A YAML file or a preset, resolved as step 4 resolves its --config; an asset name: the preset using it.
        if path.is_file() or _exists_as_preset(text):
            return cls._from_config(text, overrides, **kw)
        preset = _preset_of_asset(text.split(":", 1)[1] if text.startswith("asset:") else text)
        if preset is not None:
            return cls._from_config(str(preset), overrides, **kw)
        if not REPO_ID.fullmatch(text):
            raise ReproError(f"{text!r} is not a folder, a YAML file, a preset ({', '.join(_preset_names())}), "
                             "the asset name of a DiT checkpoint or a Hub repo id (owner/name): check the spelling")
        # A Hub repo id: step 2's verified download (cached snapshots are used offline).
        from repro.hub.share import fetch_shared

        folder = fetch_shared(text, revision=revision)
        cfg, info = read_export(folder, overrides)
        return cls(_with_assets(cfg), source=text, **{"class_names": info.get("class_names"), **kw},
                   step=info.get("step"), metrics=info.get("metrics"))

    @classmethod
    def _from_config(cls, base: str, overrides: list[str], **kw) -> "Pipeline":
        from repro.setup.prepare import prepare_config
        from repro.utils.hardware import default_device

        dev = torch.device(kw["device"]) if kw.get("device") else default_device()
        cfg, _ = prepare_config(base, overrides=overrides, cuda=dev.type == "cuda")
        return cls(_with_assets(cfg), source=base, **kw)

    @classmethod
    def _from_run(cls, run_dir: Path, overrides: list[str], **kw) -> "Pipeline":
        cfg = load_config(run_dir / "config.yaml", overrides)
        paths.resolve_runs_markers(cfg)
        step, checkpoint = _newest_checkpoint(run_dir)
        cfg.ckpt_path = str(checkpoint)
        if not cfg.vae.ckpt_path:
            raise ReproError(f"{run_dir / 'config.yaml'} has no vae.ckpt_path, so its latents cannot be decoded: "
                             "pass set=['vae.ckpt_path=PATH'] (the tokenizer the latents were extracted with)")
        return cls(_with_assets(cfg), source=str(run_dir), run_dir=run_dir, step=step,
                   metrics=_metrics_of_run(run_dir), **kw)

    # ------------------------------------------------------------------------------------------
    # Sampling

    def __call__(self, labels: Optional[int | str | Sequence[int | str]] = None, *, num_images: Optional[int] = None,
                 seed: Optional[int] = None, num_steps: Optional[int] = None, guidance: Optional[float] = None,
                 precision: Optional[str] = None, batch_size: Optional[int] = None,
                 output_type: str = "pil") -> Samples | torch.Tensor | Any:
        """Images for `labels` (class ids or names, cycled to `num_images`; None: step 4's random labels).
        `num_steps`, `guidance` (the CFG scale) and `precision` override the config for this call."""
        from repro.data.class_names import resolve_labels
        from repro.sampling import plan
        from repro.sampling.engine import check_inputs, decode_to_uint8, sample_latents
        from repro.utils.hardware import resolve_precision

        if output_type not in OUTPUT_TYPES:
            raise ReproError(f"output_type={output_type!r}: choose one of {', '.join(OUTPUT_TYPES)}")
        # This call's settings: a copy of the config and of the sampler around the same loaded modules.
        cfg = copy.deepcopy(self.config)
        for key, value in (("sample.num_sampling_steps", num_steps), ("sample.cfg_scale", guidance)):
            if value is not None:
                cfg = apply_overrides(cfg, [f"{key}={value}"])
        check_inputs(cfg)
        prec = resolve_precision(precision, self.sampler.device, "precision") if precision else self.sampler.precision
        setup = dataclasses.replace(self.sampler, cfg=cfg, precision=prec)
        # What image i is: step 4's plan (fixed labels, or the seed's uniform draw) and its noise.
        seed = cfg.sample.seed if seed is None else int(seed)
        if isinstance(labels, (int, str)):
            labels = [labels]
        ids = resolve_labels(list(labels), self.class_names, self.class_names_source) if labels else None
        n = int(num_images if num_images is not None else (len(ids) if ids else 1))
        all_labels = plan.plan_labels(n, setup.num_classes, seed, "uniform", ids)
        batch = int(batch_size or max(1, cfg.sample.per_proc_batch_size if isinstance(
            cfg.sample.per_proc_batch_size, int) else n))
        latents, pixels = [], []
        for k in range(plan.num_batches(n, batch)):
            idx = plan.batch_indices(k, batch, n)
            x = sample_latents(setup, plan.batch_noise(seed, idx, setup.latent_shape), all_labels[idx.start:idx.stop])
            latents.append(x.cpu())
            if output_type != "latent":
                pixels.append(decode_to_uint8(setup, x, first_index=idx.start))
        latents = torch.cat(latents)
        if output_type == "latent":
            return latents
        import numpy as np

        arrays = np.concatenate(pixels)
        if output_type == "np":
            return arrays
        from PIL import Image

        out = Samples(Image.fromarray(a) for a in arrays)
        out.latents, out.labels, out.seed = latents, all_labels.tolist(), seed
        return out

    # ------------------------------------------------------------------------------------------
    # Evaluating, exporting, sharing

    def evaluate(self, num_samples: Optional[int] = None, *, ref: Optional[str] = None,
                 metrics: str = "fid,sfid,is,prec,recall", out: Optional[str | os.PathLike] = None,
                 seed: Optional[int] = None, batch_size: Optional[int | str] = None, class_balanced: bool = False,
                 weights: Optional[str] = None, eval_batch_size: Optional[int] = None) -> dict:
        """Step 4 writes `num_samples` images (resumable), step 8 scores them (FID, sFID, IS, precision, recall
        against the ADM batch or `ref`, your images); returns metrics.json's content. From a run folder the
        samples go to RUN/eval/step<N>, and the numbers to the run's TensorBoard / W&B when its config logs there."""
        from repro.evaluation.evaluate import DEFAULT_BATCH_SIZE, configured_reference, evaluate, resolve_assets
        from repro.sampling.run import run_sampling

        if out is None and self.run_dir is not None:
            out = self.run_dir / "eval" / f"step{self.step:07d}"
        run = run_sampling(self.config, out_dir=str(out) if out is not None else None, num_samples=num_samples,
                           batch_size=batch_size, seed=seed, class_balanced=class_balanced,
                           device=str(self.sampler.device), progress=False)
        samples = Path(run["out_dir"])
        ref_path, weights_path, weights_sha = resolve_assets(ref if ref is not None else configured_reference(samples),
                                                             weights)
        result = evaluate(samples, ref_path, metrics, weights_path=weights_path, weights_sha256=weights_sha,
                          batch_size=eval_batch_size or DEFAULT_BATCH_SIZE, device=str(self.sampler.device))
        self.metrics = result
        if self.run_dir is not None:
            from repro.training.log_backends import log_evaluation

            log_evaluation(self.config, self.run_dir, self.step, result)
        return result

    def export(self, folder: str | os.PathLike, include_vae: Optional[bool] = None,
               repo_id: Optional[str] = None) -> Path:
        """Write the shareable folder (repro.hub.export): EMA weights as safetensors, config, statistics,
        tokenizer (or its step-2 asset name), an index of sha256s and a model card with the measured metrics."""
        from repro.hub.export import export_model

        names = self.class_names if self.class_names and "ImageNet" not in self.class_names_source else None
        info = export_model(self.config, folder, step=self.step, metrics=self.metrics, class_names=names,
                            source=self.source, include_vae=include_vae, repo_id=repo_id)
        return Path(info["folder"])

    def push_to_hub(self, repo_id: str, *, private: Optional[bool] = None, token: Optional[str] = None,
                    folder: Optional[str | os.PathLike] = None, commit_message: Optional[str] = None) -> str:
        """Export (into `folder`, default runs/exports/<repo name>) and upload to the Hub; returns the repo URL."""
        from repro.hub.share import push_folder

        target = Path(folder) if folder is not None else paths.runs_dir() / "exports" / repo_id.replace("/", "--")
        self.export(target, repo_id=repo_id)
        return push_folder(target, repo_id, private=private, token=token, commit_message=commit_message)

    def __repr__(self) -> str:
        c = self.config
        return (f"Pipeline({c.model.model_type}, {c.data.image_size}px, {c.data.num_classes} classes, "
                f"{c.sample.sampling_method} {c.sample.num_sampling_steps} steps, cfg {c.sample.cfg_scale}, "
                f"{self.sampler.precision} on {self.sampler.device}; from {self.source})")


def _exists_as_preset(text: str) -> bool:
    from repro.resources import find_config

    try:
        find_config(text)
        return True
    except ReproError:
        return False


def _preset_names() -> list[str]:
    from repro.resources import configs_dir

    folder = configs_dir()
    return sorted(str(q.relative_to(folder).with_suffix("")) for q in folder.rglob("*.yaml") if q.name != "assets.yaml")
