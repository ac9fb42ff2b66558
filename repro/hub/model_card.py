"""The model card (README.md) of an exported model: what it is, how to load it, what it was trained on,
how long, the sampler it was meant for and the numbers step 8 measured (or that none were measured).

    text = model_card(cfg, info)    # cfg: the exported config; info: export.json's content (repro.hub.export)

The card's YAML front matter carries the Hub's metadata (library, tags); the numbers come only from
step 8's metrics.json (never estimated), with what they were computed on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from repro.config import Config

METRIC_NAMES = {"fid": "FID", "sfid": "sFID", "is": "Inception Score", "prec": "Precision", "recall": "Recall"}
IMAGENET_CLASSES = 1000


def _front_matter(cfg: Config, info: dict) -> list[str]:
    tags = ["lightningdit", "latent-diffusion", "flow-matching", "class-conditional", "image-generation", "repro"]
    lines = ["---", "library_name: repro", "tags:"] + [f"- {t}" for t in tags]
    if cfg.data.num_classes == IMAGENET_CLASSES and not info.get("class_names"):
        lines += ["datasets:", "- imagenet-1k"]
    return lines + ["---", ""]


def _trained_on(cfg: Config, info: dict) -> str:
    names = info.get("class_names")
    if names:
        shown = ", ".join(map(str, names[:12])) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        classes = f"{cfg.data.num_classes} classes ({shown})"
    elif cfg.data.num_classes == IMAGENET_CLASSES:
        classes = "ImageNet-1k's 1000 classes (labels are ImageNet ids; names are accepted too)"
    else:
        classes = f"{cfg.data.num_classes} classes"
    return (f"{cfg.data.image_size}x{cfg.data.image_size} images through the tokenizer `{Path(str(cfg.vae.ckpt_path)).name}` "
            f"(downsampling {cfg.vae.downsample_ratio}, {cfg.model.in_chans} latent channels), {classes}")


def _training(cfg: Config, info: dict) -> list[str]:
    t = cfg.train
    step = info.get("step")
    rows = [f"- steps: {step if step is not None else 'not recorded (exported from a weights file)'}",
            f"- global batch {t.global_batch_size}, learning rate {cfg.optimizer.lr}, precision {t.precision}",
            f"- weights: the checkpoint's `{info.get('weights')}`"
            + (f" (EMA decay {t.ema_decay})" if info.get("weights") == "ema" else ""),
            f"- source: `{info.get('source')}`"]
    return rows


def _metrics(metrics: Optional[dict]) -> list[str]:
    if not metrics:
        return ["Not measured yet. `pipe.evaluate(num_samples=50000)` (step 8's protocol on samples it writes) "
                "measures FID, sFID, IS, precision and recall; export again to put them here."]
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {label} | {metrics[key]:.4g} |" for key, label in METRIC_NAMES.items()
             if isinstance(metrics.get(key), (int, float))]
    ref = Path(str(metrics.get("reference", "?"))).name
    rows += ["", f"Measured by step 8 on {metrics.get('num_samples', '?')} samples against `{ref}` "
                 f"({metrics.get('reference_kind', 'reference')})."]
    sampler = metrics.get("sampler")
    if isinstance(sampler, dict) and sampler:
        shown = [f"{k} {v}" for k, v in sampler.items()  # settings, not the measuring machine's paths
                 if not isinstance(v, dict) and not str(v).startswith(("/", "~")) and not k.endswith(("path", "config"))]
        if shown:
            rows.append("Sampler: " + ", ".join(shown) + ".")
    return rows


def _files(info: dict) -> list[str]:
    rows = ["| file | bytes | sha256 |", "|---|---|---|"]
    for name, entry in (info.get("files") or {}).items():
        rows.append(f"| `{name}` | {entry.get('size')} | `{str(entry.get('sha256'))[:16]}...` |")
    if info.get("vae_asset"):
        rows.append(f"| `asset:{info['vae_asset']}` | (step 2 downloads it) | verified by step 2 |")
    return rows


def model_card(cfg: Config, info: dict[str, Any], repo_id: Optional[str] = None) -> str:
    """README.md text for an exported model (`cfg` as exported, `info` its export.json content)."""
    where = repo_id or "FOLDER_OR_REPO_ID"
    first = 0 if cfg.data.num_classes == 1 else min(1, cfg.data.num_classes - 1)
    s = info.get("sample") or {}
    lines = _front_matter(cfg, info) + [
        f"# {cfg.model.model_type}, {cfg.data.image_size} px, {cfg.data.num_classes} classes",
        "",
        f"A class-conditional LightningDiT latent diffusion model ({info.get('parameters', 0) / 1e6:.1f} M parameters, "
        f"flow matching), exported by the repro kit {info.get('kit_version')}.",
        "",
        "## Use",
        "",
        "```python",
        "from repro import Pipeline",
        f'pipe = Pipeline.from_pretrained("{where}")',
        f"images = pipe([0, {first}], seed=0)   # PIL images; class ids or names",
        "```",
        "",
        "## Trained on",
        "",
        _trained_on(cfg, info) + ".",
        "",
        "## Training",
        "",
        *_training(cfg, info),
        "",
        "## Sampling defaults",
        "",
        f"{s.get('method', cfg.sample.sampling_method)}, {s.get('num_steps', cfg.sample.num_sampling_steps)} steps, "
        f"CFG scale {s.get('cfg_scale', cfg.sample.cfg_scale)} (interval from t = {s.get('cfg_interval_start')}, "
        f"{s.get('cfg_channels')} channels), timestep shift {s.get('timestep_shift')}, {s.get('precision')} "
        "(`pipe(..., num_steps=, guidance=, precision=)` change them per call).",
        "",
        "## Metrics",
        "",
        *_metrics(info.get("metrics")),
        "",
        "## Files",
        "",
        *_files(info),
        "",
    ]
    return "\n".join(lines)
