"""Latent extraction (step 6): images -> VA-VAE posterior -> safetensors shards + latents_stats.pt.

Follows upstream `extract_features.py` (ADM center crop, `encode(...).sample()`, the horizontal flip
encoded too, `latents` / `latents_flip` / `labels` shards, statistics at the end) and adds what a
notebook needs to survive:

- Fixed shards: shard k holds images [k*shard_size, (k+1)*shard_size) of the listing; process r
  handles the shards with k % world == r. A shard's name depends only on k
  (`latents_rank00_shard{k:03d}`), so 1 or N processes write the same folder and a restart with
  another process count still finds finished shards.
- Deterministic: the posterior noise of image i comes from its own generator seeded by
  `image_seed(seed, i)`, never from batch composition or process count. Batches never cross a shard.
  Shards are byte-identical across restarts and process counts on the same hardware and CPU thread
  count (torchrun sets OMP_NUM_THREADS=1; other thread counts round convolutions differently, ~1e-6).
- Resumable: each shard is written atomically; a rerun skips shards already on disk (after checking
  their header says they came from the same source size, seed, image size, store and shard size).
- Corrupt images and unusable `.cls` labels (not an integer class index) are recorded in the shard
  header (index, path, error), skipped and counted, so a rerun reuses the shard instead of failing on
  the same sample again; the final JSON report `extract_report.json` gathers them from all shards.
  What the listing finds (unlabelled images, incomplete tar samples, bad labels-file lines, directory
  links that loop) is reported there too, each once.
- `store="moments"` keeps posterior mean/logvar (kit-only; upstream's dataset cannot read it).
- `store="mean"` writes upstream-format shards holding the posterior mean instead of a draw (kit-only:
  deterministic, no noise; the header and the report say `posterior: mean`). A small tokenizer trained on
  little data has a wide posterior, and training the DiT on its draws is much slower (issue 13's notes).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from repro.data.image_loader import CroppedImages, cropped_batches
from repro.data.image_sources import ImageSource, list_images
from repro.data.latents import image_seed, list_shards, read_shard_info, shard_name, write_shard
from repro.data.stats import SCALE_NAME, STATS_NAME, validate_stats, write_scale_file, write_stats
from repro.data.stats_recompute import compute_global_scales, compute_stats
from repro.errors import ReproError
from repro.utils import distributed as dist
from repro.utils.io import atomic_write_json, make_dirs, remove_stale_temps

FORMAT_TAG = "repro-latents/1"
REPORT_NAME = "extract_report.json"
# header fields a finished shard must share with the current run to be reused on restart
_RESUME_KEYS = ("store", "posterior", "num_images_total", "image_size", "seed", "shard_size", "first_index")
STORES = ("sample", "moments", "mean")  # what a shard keeps of each posterior: a draw (upstream), mean+logvar, the mean


def _encode_batch(vae, images: list[torch.Tensor], indices: list[int], *, seed: int, store: str,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Encode images and their horizontal flips; per-image seeded noise for `store="sample"`."""
    x = torch.stack(images)
    # upstream flips the cropped PIL image (RandomHorizontalFlip(p=1)); flipping the tensor is identical
    x = torch.cat([x, x.flip(-1)]).to(device)
    with torch.inference_mode():
        post = vae.encode(x)
        mean = post.mean.to("cpu", torch.float32)
        logvar = post.logvar.to("cpu", torch.float32)
        std = post.std.to("cpu", torch.float32)
    n = len(images)
    if store == "moments":
        return {"mean": mean[:n], "logvar": logvar[:n], "mean_flip": mean[n:], "logvar_flip": logvar[n:]}
    if store == "mean":  # kit: the posterior mean, in upstream's sample-shard layout
        return {"latents": mean[:n], "latents_flip": mean[n:]}
    noise = torch.empty_like(mean)
    for j, i in enumerate(indices):
        g = torch.Generator().manual_seed(image_seed(seed, i))
        noise[j] = torch.randn(mean.shape[1:], generator=g)
        noise[n + j] = torch.randn(mean.shape[1:], generator=g)
    z = mean + std * noise  # = posterior.sample() with the image's own noise
    return {"latents": z[:n], "latents_flip": z[n:]}


def _latent_shape(vae, image_size: int, device: torch.device) -> tuple[int, int, int]:
    with torch.inference_mode():
        m = vae.encode(torch.zeros(1, 3, image_size, image_size, device=device)).mean
    return tuple(m.shape[1:])


def _extract_shard(vae, src: ImageSource, k: int, lo: int, hi: int, out: Path, meta: dict, *, image_size: int,
                   batch_size: int, seed: int, store: str, device: torch.device, progress,
                   workers: int = 0) -> tuple[int, list]:
    # Load and crop each image of the shard (in `workers` processes; kit: issue 16); an unreadable one is
    # recorded, never silently dropped.
    parts: dict[str, list[torch.Tensor]] = {}
    labels, corrupt = [], []
    for images, idx, batch_labels, batch_corrupt in cropped_batches(src, lo, hi, image_size=image_size,
                                                                   batch_size=batch_size, workers=workers):
        labels += batch_labels
        corrupt += batch_corrupt
        # Encode the batch (and its flips); batches never cross a shard.
        if images:
            for key, t in _encode_batch(vae, images, idx, seed=seed, store=store, device=device).items():
                parts.setdefault(key, []).append(t)
        progress(len(idx) + len(batch_corrupt))
    # One shard file, written atomically; its header records the source and the corrupt images.
    if labels:
        tensors = {key: torch.cat(ts) for key, ts in parts.items()}
    else:  # every image of this shard was corrupt: an empty shard keeps the index ranges fixed
        shape = (0, *_latent_shape(vae, image_size, device))
        keys = ("mean", "logvar", "mean_flip", "logvar_flip") if store == "moments" else ("latents", "latents_flip")
        tensors = {key: torch.zeros(shape) for key in keys}
    header = dict(meta, first_index=lo, num_indices=hi - lo, corrupt=corrupt)
    write_shard(out / shard_name(0, k), tensors.get("latents"), tensors.get("latents_flip"),
                torch.tensor(labels, dtype=torch.int64), mean=tensors.get("mean"), logvar=tensors.get("logvar"),
                mean_flip=tensors.get("mean_flip"), logvar_flip=tensors.get("logvar_flip"), metadata=header)
    return len(labels), corrupt


def _stale_corrupt(src: ImageSource, header: dict, image_size: int) -> str | None:
    """Why a finished shard must be encoded again: an image it recorded as unreadable reads now (the user
    fixed or replaced the file) or is another file; None when every recorded one still fails the same way."""
    for index, ref, _error in header.get("corrupt", []):
        i = int(index)
        if i >= len(src) or src.items[i].ref != ref:
            return f"image {i} was {ref}, the listing now has another file there"
        if CroppedImages(src, i, i + 1, image_size)[0][3] is None:
            return f"{ref}, unreadable when the shard was written, reads now"
    return None


def _named_bad(corrupt: list[dict], shown: int = 3) -> str:
    """'a.jpg (OSError: ...), b.png (...) and 4 more': the first few unreadable files, for the console."""
    named = ", ".join(f"{c['path']} ({c['error'][:80]})" for c in corrupt[:shown])
    return named + (f" and {len(corrupt) - shown} more" if len(corrupt) > shown else "")


def _check_out_dir(out: Path, expected: set[str]) -> None:
    foreign = [p.name for p in list_shards(out) if p.name not in expected]
    if foreign:
        raise ReproError(f"output folder {out} holds shards this extraction would not write ({foreign[0]}"
                         f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}): they would be mixed into "
                         f"training; use an empty --out folder or remove them")


def extract_latents(vae, source, out_dir, *, image_size: int = 256, batch_size: int = 32, shard_size: int = 10000,
                    seed: int = 0, store: str = "sample", device: str | torch.device | None = None,
                    stats_subset: int = 10000, labels_file: str | os.PathLike | None = None, workers: int = 0) -> dict:
    """Encode every image of `source` into shards under `out_dir`, then write `latents_stats.pt` and
    `extract_report.json`. Runs on this process's share of shards (`repro.utils.distributed`).
    `workers` processes decode and crop the images (repro.data.image_loader; the shards are the same
    for any count). Returns the report (the same dict on every process)."""
    # Arguments and the fixed listing of the source (the same on every process).
    if store not in STORES:
        raise ReproError(f"store={store!r}: choose 'sample' (upstream shards), 'mean' (the posterior mean in "
                         "upstream's layout) or 'moments' (posterior mean/logvar)")
    if workers < 0:
        raise ReproError(f"workers={workers}: the number of image-decoding processes must be >= 0 (0 = this process)")
    if batch_size < 1 or shard_size < 1:
        raise ReproError(f"batch_size={batch_size} and shard_size={shard_size} must be >= 1")
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out_dir)
    src = list_images(source, labels_file)
    n = len(src)
    if n == 0:
        raise ReproError(f"image source {src.root} lists no images ({len(src.problems)} problem(s), "
                         f"{src.ignored} other file(s)): check --source")
    # The plan every process derives alike: shard k holds images k*shard_size.., and every shard carries
    # the header a resumed run must match.
    num_shards = math.ceil(n / shard_size)
    names = {shard_name(0, k) for k in range(num_shards)}
    meta = {"kit": FORMAT_TAG, "store": "moments" if store == "moments" else "sample", "num_images_total": n,
            "image_size": image_size, "seed": seed, "shard_size": shard_size, "source_kind": src.kind}
    if store == "mean":
        meta["posterior"] = "mean"  # kit: recorded only here, so shards of the other stores stay as they were
    # Rank 0 prepares the folder (stale temp files out, foreign shards refused) before anyone writes.
    if dist.is_main():
        make_dirs(out)
        remove_stale_temps(out)  # temp files of a killed run; before any process starts writing
        _check_out_dir(out, names)
        dist.print0(f"extracting {n} images ({src.kind}: {src.root}) into {num_shards} shard(s) of {shard_size} "
                    f"in {out} with {world} process(es), store={store}, image size {image_size}, seed {seed}")
    dist.barrier()

    # This process's shards (round-robin, so any process count writes the same files); finished ones are
    # reused after checking they come from the same extraction.
    mine = [k for k in range(num_shards) if k % world == rank]
    todo, skipped = [], 0
    for k in mine:
        header = read_shard_info(out / shard_name(0, k))
        if header is None:
            todo.append(k)
            continue
        want = dict(meta, first_index=k * shard_size)
        for record in (header, want):  # no `posterior` field: a draw (sample shards) or moments
            record.setdefault("posterior", record.get("store"))
        diff = [f"{key}={header.get(key)!r} (now {want[key]!r})" for key in _RESUME_KEYS if header.get(key) != want[key]]
        if header.get("kit") != FORMAT_TAG or diff:
            raise ReproError(f"{out / shard_name(0, k)} comes from a different extraction ({', '.join(diff) or 'not made by this kit'}); "
                             f"use a new --out folder, or delete the old shards to start over")
        if (why := _stale_corrupt(src, header, image_size)) is not None:
            print(f"[rank {rank}] {shard_name(0, k)}: {why}: encoding it again", flush=True)
            todo.append(k)
            continue
        skipped += 1

    # Encode the remaining shards; the bar counts images (rank 0's share), one line per finished shard.
    from repro.utils.progress import progress_bar

    total = sum(min((k + 1) * shard_size, n) - k * shard_size for k in todo)
    bar = progress_bar(total=total, disable=not dist.is_main() or total == 0, desc="encode", unit="img", mininterval=5)
    written, t0 = 0, time.time()
    try:
        for k in todo:
            lo, hi = k * shard_size, min((k + 1) * shard_size, n)
            count, corrupt = _extract_shard(vae, src, k, lo, hi, out, meta, image_size=image_size,
                                            batch_size=batch_size, seed=seed, store=store, device=device,
                                            progress=bar.update, workers=workers)
            written += 1
            bar.write(f"[rank {rank}] wrote {shard_name(0, k)}: images {lo}..{hi - 1}, {count} encoded, "
                      f"{len(corrupt)} corrupt ({time.time() - t0:.0f}s)")
    finally:
        bar.close()  # an interruption's message then starts on its own line
    # Rank 0 gathers the report and writes the statistics, once every shard exists.
    written, skipped = (int(v) for v in dist.all_reduce_values([written, skipped], "sum"))
    dist.barrier()
    if dist.is_main():
        _finish(out, src, num_shards, meta, stats_subset=stats_subset, seed=seed, written=written, skipped=skipped)
    dist.barrier()
    return json.loads((out / REPORT_NAME).read_text())


def _finish(out: Path, src: ImageSource, num_shards: int, meta: dict, *, stats_subset: int, seed: int,
            written: int, skipped: int) -> None:
    """Rank 0: gather counts and corrupt files from every shard header, write stats and the report."""
    encoded, corrupt = 0, []
    for k in range(num_shards):
        header = read_shard_info(out / shard_name(0, k))
        if header is None:
            raise ReproError(f"{out / shard_name(0, k)} is missing after extraction; run the same command again")
        encoded += int(header["total_size"])
        corrupt += [{"index": i, "path": p, "error": e} for i, p, e in header.get("corrupt", [])]
    if encoded == 0:  # nothing readable: no shard of zero latents stays behind to be reused by the next run
        for k in range(num_shards):
            (out / shard_name(0, k)).unlink(missing_ok=True)
        raise ReproError(f"none of the {len(src)} image(s) of {src.root} could be read: {_named_bad(corrupt)}; "
                         f"fix or replace them and run the same command again (no shard was kept)")
    if corrupt:
        dist.print0(f"warning: {len(corrupt)} image(s) could not be read and were left out: {_named_bad(corrupt)} "
                    f"(all in {out / REPORT_NAME}); fix them and run the same command again to add them")
    stats_path = out / STATS_NAME
    stats = compute_stats(out, subset=stats_subset, seed=seed)  # the same code as step 5 --recompute
    old = validate_stats(stats_path, stats["mean"].shape[1])
    if not (old.ok and torch.equal(old.mean, stats["mean"]) and torch.equal(old.std, stats["std"])):
        write_stats(stats_path, stats, backup=True)
    # kit (issue 23): the global factors of data.latent_scaling, in a file of their own (stats bytes unchanged)
    write_scale_file(out / SCALE_NAME, compute_global_scales(out, subset=stats_subset, seed=seed))
    store_name = meta.get("posterior", meta["store"])  # sample | moments | mean
    report = {
        "out_dir": str(out), "source": src.root, "source_kind": src.kind, "store": store_name,
        "image_size": meta["image_size"], "seed": seed, "shard_size": meta["shard_size"],
        "num_images_listed": len(src), "num_encoded": encoded, "num_corrupt": len(corrupt), "corrupt": corrupt,
        "num_listing_problems": len(src.problems), "listing_problems": src.problems, "num_ignored_files": src.ignored,
        "num_classes": len(src.class_names) if src.class_names else None, "class_names": src.class_names,
        "num_shards": num_shards, "shards_written": written, "shards_reused": skipped,
        "stats_path": str(stats_path), "stats_subset": min(stats_subset, encoded),
        "latent_channels": int(stats["mean"].shape[1]),
    }
    atomic_write_json(out / REPORT_NAME, report)
    dist.print0(f"done: {encoded} latents in {num_shards} shard(s) ({written} written now, {skipped} reused), "
                f"{len(corrupt)} corrupt or badly labelled and {len(src.problems)} listing problem(s) (unlabelled, "
                f"incomplete, bad label line, directory loop) skipped "
                f"(listed in {out / REPORT_NAME}); statistics in {stats_path}")
    dist.print0(f"wrote: {num_shards} shard(s) in {out}, {stats_path}, {out / REPORT_NAME}")


def report_class_names(folder: str | os.PathLike) -> list[str] | None:
    """The class-folder names step 6 recorded for a latent folder (sorted = label order), or None when the
    folder has no report or its source had no class folders (a labels file, tar shards)."""
    report = Path(folder) / REPORT_NAME
    if not report.is_file():
        return None
    try:
        names = json.loads(report.read_text()).get("class_names")
    except (OSError, ValueError, AttributeError) as e:
        raise ReproError(f"{report} is unreadable ({e}): run step 6 on that folder again to rewrite it") from None
    return [str(n) for n in names] if isinstance(names, list) else None
