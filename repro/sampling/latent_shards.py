"""Step 4's `--latent-shards`: the sampled latents in upstream's shard layout, beside the PNGs.

VFM-VAE's tools/preprocess_for_lightningdit/sample.py saves what the DiT sampled, mapped back to the tokenizer's
latent space (`x * std / latent_multiplier + mean`), as `samples_rank{r:02d}_shard{s:03d}.safetensors` holding
`latents` (N, C, h, w) float32 and `labels` (N,) int32, 10,000 images a shard; its tools/decode turns them into
images. The kit writes each batch's latents as it goes (`latent_batches/`, so a killed run resumes like its PNGs),
then packs images 0..n-1 in index order into rank-00 shards: the same files whatever the process count.
"""

from __future__ import annotations

from pathlib import Path

import torch

from repro.errors import ReproError
from repro.utils.io import atomic_save_safetensors, make_dirs

SHARD_IMAGES = 10_000  # upstream's save_chunk
BATCH_DIR = "latent_batches"


def shard_name(rank: int, shard: int) -> str:
    return f"samples_rank{rank:02d}_shard{shard:03d}.safetensors"


def batch_path(out: Path, start: int, stop: int) -> Path:
    return Path(out) / BATCH_DIR / f"{start:07d}_{stop:07d}.safetensors"


def save_batch(out: Path, start: int, latents: torch.Tensor, labels: torch.Tensor) -> None:
    """One batch's tokenizer-space latents and labels (images start..start+len-1)."""
    path = batch_path(out, start, start + len(latents))
    make_dirs(path.parent)
    atomic_save_safetensors({"latents": latents.detach().to("cpu", torch.float32).contiguous(),
                             "labels": labels.detach().to("cpu", torch.int32).contiguous()}, path)


def done_indices(out: Path) -> set[int]:
    """Images whose latents are saved (a batch resumes only when its PNGs and its latents exist)."""
    done: set[int] = set()
    for p in (Path(out) / BATCH_DIR).glob("*_*.safetensors"):
        start, stop = (int(v) for v in p.stem.split("_"))
        done.update(range(start, stop))
    return done


def pack_shards(out: Path, n: int, shard_images: int = SHARD_IMAGES) -> list[Path]:
    """Write images 0..n-1's latents as upstream shards in `out`; a ReproError names the first missing image."""
    from safetensors.torch import load_file

    latents: list = [None] * n
    labels: list = [None] * n
    for p in sorted((Path(out) / BATCH_DIR).glob("*_*.safetensors")):
        start = int(p.stem.split("_")[0])
        part = load_file(str(p))
        for j in range(len(part["latents"])):
            if start + j < n:
                latents[start + j], labels[start + j] = part["latents"][j], part["labels"][j]
    missing = [i for i in range(n) if latents[i] is None]
    if missing:
        raise ReproError(f"{out}: no saved latents for image {missing[0]} ({len(missing)} missing): its PNGs were "
                         "sampled without --latent-shards; sample into a new --out with --latent-shards")
    written = []
    for s, lo in enumerate(range(0, n, shard_images)):
        hi = min(n, lo + shard_images)
        path = Path(out) / shard_name(0, s)
        atomic_save_safetensors({"latents": torch.stack(latents[lo:hi]), "labels": torch.stack(labels[lo:hi])}, path)
        written.append(path)
    return written
