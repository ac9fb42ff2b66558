"""Latent shards in the upstream LightningDiT layout, and the dataset that reads them.

Upstream (hustvl/LightningDiT `extract_features.py`, `datasets/img_latent_dataset.py`) writes
`latents_rank{rank:02d}_shard{idx:03d}.safetensors` files holding `latents` (N, C, h, w) float32,
`latents_flip` (the horizontally flipped image's latents) and `labels` (N,) int64, and normalises a
training latent as `(x - mean) / std * latent_multiplier` with `latents_stats.pt` = {'mean', 'std'},
each (1, C, 1, 1). The files written here are read unchanged by that upstream class.

The kit adds a "moments" variant (`store="moments"` in step 6): instead of one posterior sample it
keeps the posterior `mean`/`logvar` (and `mean_flip`/`logvar_flip`) and draws a fresh sample
`mean + exp(logvar / 2) * noise` at train time. Upstream's class cannot read such shards.

    ds = LatentShardDataset("data/latents", latent_multiplier=1.0)
    x, y = ds.get(0, flip=True)          # (C, h, w) float32, normalised; int label
"""

from __future__ import annotations

import bisect
import json
import os
import re
from pathlib import Path

import torch

from repro.data.stats import STATS_NAME, load_latent_stats
from repro.errors import ReproError
from repro.utils.io import atomic_save_safetensors
from repro.utils.seeding import seed_from

SAMPLE_KEYS = ("latents", "latents_flip", "labels")
MOMENT_KEYS = ("mean", "logvar", "mean_flip", "logvar_flip", "labels")
INFO_KEY = "repro"  # safetensors header key of the kit's shard record

# upstream's message when it finds no shards (ImgLatentDataset.compute_latent_stats -> torch.cat([]))
EMPTY_FOLDER_HINT = (
    "upstream LightningDiT fails on such a folder with `torch.cat(): expected a non-empty list of "
    "Tensors` (it computes latents_stats.pt from the shards it finds, and there are none)"
)


def shard_name(rank: int, index: int) -> str:
    """Upstream shard file name: `latents_rank00_shard000.safetensors`."""
    return f"latents_rank{rank:02d}_shard{index:03d}.safetensors"


def image_seed(seed: int, index: int) -> int:
    """The posterior-noise seed of image `index` (a 63-bit hash of (seed, index)).

    Noise drawn from `torch.Generator().manual_seed(image_seed(seed, i))` depends only on the image,
    never on batch composition, process count or restarts (upstream draws from one global stream).
    """
    return seed_from("repro-latents", int(seed), int(index))


def _natural_key(path: Path) -> list:
    # Same order as upstream's sorted(glob) while names have <= 3-digit shard numbers, and still
    # numeric past shard999 (lexicographic order would put shard1000 before shard101).
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def list_shards(data_dir: str | os.PathLike) -> list[Path]:
    """All `*.safetensors` shards in `data_dir`, in sorted order; temp files of a killed writer
    (`.NAME.*.tmp.safetensors`, hidden) are not shards."""
    folder = Path(data_dir)
    if not folder.is_dir():
        return []
    files = [p for p in folder.glob("*.safetensors") if p.is_file() and not p.name.startswith(".")]
    return sorted(files, key=_natural_key)


def write_shard(path: str | os.PathLike, latents: torch.Tensor | None, latents_flip: torch.Tensor | None,
                labels: torch.Tensor, *, mean: torch.Tensor | None = None, logvar: torch.Tensor | None = None,
                mean_flip: torch.Tensor | None = None, logvar_flip: torch.Tensor | None = None,
                metadata: dict | None = None) -> Path:
    """Write one shard atomically (temp file, then rename).

    Sample shards: `latents`, `latents_flip` (N, C, h, w) float32 and `labels` (N,) int64.
    Moment shards: pass `latents=None, latents_flip=None` and `mean`, `logvar`, `mean_flip`,
    `logvar_flip` (each (N, C, h, w)). `metadata` (JSON-able) goes into the header as one key,
    `repro` (read it back with `read_shard_info`).
    """
    # The shard's kind from what was passed: a posterior draw with its flip (upstream's layout), or the
    # four moment tensors; a mix of the two is a caller's bug.
    labels = torch.as_tensor(labels).to(torch.int64).reshape(-1)
    n = labels.shape[0]
    if latents is not None or latents_flip is not None:
        if latents is None or latents_flip is None or mean is not None or logvar is not None:
            raise ValueError("write_shard: pass both latents and latents_flip, or the four moment tensors instead")
        tensors = {"latents": latents, "latents_flip": latents_flip}
        kind = "sample"
    else:
        moments = {"mean": mean, "logvar": logvar, "mean_flip": mean_flip, "logvar_flip": logvar_flip}
        missing = [k for k, v in moments.items() if v is None]
        if missing:
            raise ValueError(f"write_shard: moment shard needs mean, logvar, mean_flip, logvar_flip; missing {missing}")
        tensors = moments
        kind = "moments"
    # Contiguous float32 CPU tensors of one row per label, each with storage of its own.
    out, storages = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu", torch.float32).contiguous()
        if t.untyped_storage().data_ptr() in storages:  # views of one tensor: safetensors refuses shared memory
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        if t.dim() != 4 or t.shape[0] != n:
            raise ValueError(f"write_shard: '{key}' must be (N={n}, C, h, w), got {tuple(t.shape)}")
        out[key] = t
    out["labels"] = labels.contiguous()
    info = dict(metadata or {}, total_size=n, store=kind)
    # one header key holding sorted JSON: safetensors writes several metadata keys in a random (hash
    # map) order, which would make identical shards differ byte for byte between runs
    return atomic_save_safetensors(out, path, metadata={INFO_KEY: json.dumps(info, sort_keys=True)})


def read_shard_info(path: str | os.PathLike) -> dict | None:
    """The kit's header record of a shard (`{}` for upstream shards); None when the file is unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
        return json.loads(meta[INFO_KEY]) if INFO_KEY in meta else {}
    except Exception:
        return None


class LatentShardDataset(torch.utils.data.Dataset):
    """Map-style dataset over every shard in `data_dir` (sorted), read lazily through memory maps.

    Index i is the i-th image across shards in order (upstream's numbering). `get(i, flip)` picks
    `latents_flip` when `flip` is true; upstream flips with probability 0.5 inside `__getitem__`,
    the kit lets the caller choose (seeded, so a resumed run sees the same data).
    """

    def __init__(self, data_dir: str | os.PathLike, *, latent_norm: bool = True, latent_multiplier: float = 1.0,
                 stats_path: str | os.PathLike | None = None, global_scale: float | None = None):
        from safetensors import safe_open

        self.data_dir = Path(data_dir)
        self.latent_norm = bool(latent_norm)
        self.latent_multiplier = float(latent_multiplier)
        # kit (issue 23): data.latent_scaling global(_means): one factor 1/sigma instead of per-channel statistics
        if global_scale is not None and self.latent_norm:
            raise ReproError("a global latent scale replaces the per-channel statistics: pass latent_norm=False")
        self.global_scale = float(global_scale) if global_scale is not None else None
        # Every shard of the folder, in upstream's sorted order; none is an error with the fix.
        self.files = list_shards(self.data_dir)
        if not self.files:
            where = "does not exist" if not self.data_dir.is_dir() else "holds no *.safetensors latent shards"
            raise ReproError(
                f"latent folder {self.data_dir} {where}; {EMPTY_FOLDER_HINT}. Run step 6 "
                f"(python -m steps.step6_extract --config C --source IMAGES --out {self.data_dir}) "
                f"or fix data.data_path to point at the folder with the shards")
        self.store: str | None = None
        self._counts: list[int] = []
        shape = None
        # Read each shard's header only: its kind (sample/moments), keys and shape must agree across the folder.
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt", device="cpu") as h:
                    keys = set(h.keys())
                    kind = "sample" if "latents" in keys or "latents_flip" in keys else "moments"
                    needed = SAMPLE_KEYS if kind == "sample" else MOMENT_KEYS
                    missing = [k for k in needed if k not in keys]
                    if missing:
                        raise ReproError(
                            f"latent shard {f} lacks key(s) {', '.join(repr(k) for k in missing)} "
                            f"(has {sorted(keys)}; a {kind} shard needs {list(needed)}): re-extract it with step 6")
                    main_key = needed[0]
                    lat_shape = tuple(h.get_slice(main_key).get_shape())
                    n_labels = h.get_slice("labels").get_shape()
            except ReproError:
                raise
            except Exception as e:  # truncated / not a safetensors file
                raise ReproError(f"latent shard {f} cannot be read ({e}); delete it and re-run step 6") from e
            if len(lat_shape) != 4 or list(n_labels) != [lat_shape[0]]:
                raise ReproError(f"latent shard {f}: '{main_key}' is {lat_shape} and 'labels' is {tuple(n_labels)}; "
                                 f"expected (N, C, h, w) and (N,): re-extract it with step 6")
            if self.store is None:
                self.store, shape, first = kind, lat_shape[1:], f
            elif kind != self.store:
                raise ReproError(f"latent folder {self.data_dir} mixes {self.store} shards ({first.name}) and "
                                 f"{kind} shards ({f.name}); keep one kind per folder")
            elif lat_shape[1:] != shape:
                raise ReproError(
                    f"latent folder {self.data_dir} mixes shard shapes: {first.name} has (C, h, w) = {shape}, "
                    f"{f.name} has {lat_shape[1:]} ({shape[0]} vs {lat_shape[1]} channels); keep shards of one "
                    f"tokenizer and image size per folder")
            self._counts.append(lat_shape[0])
        # Global index -> (shard, row) through the running counts; file handles open lazily per process.
        self.channels, h_, w_ = shape
        self.latent_size = h_ if h_ == w_ else (h_, w_)
        self._starts = [0]
        for c in self._counts:
            self._starts.append(self._starts[-1] + c)
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()
        self._labels: torch.Tensor | None = None

        # Normalisation statistics (upstream's latents_stats.pt), checked against the channel count.
        self.stats_path = Path(stats_path) if stats_path is not None else self.data_dir / STATS_NAME
        self._mean = self._std = None
        if self.latent_norm:
            if not self.stats_path.is_file():
                raise ReproError(
                    f"latent statistics {self.stats_path} not found and data.latent_norm is on: run step 5 "
                    f"(python -m steps.step5_fix_stats --config C --recompute, or --refetch for the official file)")
            mean, std = load_latent_stats(self.stats_path, self.channels)
            self._mean, self._std = mean[0], std[0]  # (C, 1, 1) for one latent

    # -- reading -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"latent index {index} out of range for {n} latents in {self.data_dir}")
        k = bisect.bisect_right(self._starts, index) - 1
        return k, index - self._starts[k]

    def _handle(self, k: int):
        from safetensors import safe_open

        if os.getpid() != self._pid:  # a forked DataLoader worker opens its own maps
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(k)
        if h is None:
            h = self._handles[k] = safe_open(str(self.files[k]), framework="pt", device="cpu")
        return h

    def __getstate__(self):  # safe_open handles cannot be pickled (spawned workers reopen them)
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def raw(self, index: int, flip: bool = False, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """The stored latent (a drawn posterior sample for moment shards), not normalised."""
        k, row = self._locate(index)
        h = self._handle(k)
        y = int(h.get_slice("labels")[row:row + 1][0])
        if self.store == "sample":
            x = h.get_slice("latents_flip" if flip else "latents")[row:row + 1][0].float()
        else:
            sfx = "_flip" if flip else ""
            mean = h.get_slice("mean" + sfx)[row:row + 1][0].float()
            logvar = h.get_slice("logvar" + sfx)[row:row + 1][0].float()
            # the LDM/VA-VAE posterior: std = exp(logvar / 2), logvar clamped to [-30, 20]
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            x = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return x, y

    def posterior_mean(self, index: int, flip: bool = False) -> torch.Tensor:
        """kit (issue 23): the posterior mean of a moment shard's latent (C, h, w), not normalised."""
        if self.store != "moments":
            raise ReproError(f"latent folder {self.data_dir} holds sample shards: no posterior means are stored")
        k, row = self._locate(index)
        return self._handle(k).get_slice("mean_flip" if flip else "mean")[row:row + 1][0].float()

    def get(self, index: int, flip: bool, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """(x (C, h, w) float32 normalised as upstream, y int)."""
        x, y = self.raw(index, flip, generator)
        if self.latent_norm:
            x = (x - self._mean) / self._std
        elif self.global_scale is not None:  # kit (issue 23): x * 1/sigma, no mean shift
            x = x * self.global_scale
        return x * self.latent_multiplier, y

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.get(index, flip=False)

    # -- whole-folder facts --------------------------------------------------------------------

    @property
    def labels(self) -> torch.Tensor:
        """Every label, (len,) int64, in index order (read once)."""
        if self._labels is None:
            parts = [self._handle(k).get_tensor("labels").to(torch.int64) for k in range(len(self.files))]
            self._labels = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return self._labels

    @property
    def num_classes_seen(self) -> int:
        """max label + 1: the smallest `data.num_classes` that covers every label in the shards."""
        return int(self.labels.max()) + 1 if len(self) else 0

    @property
    def stats(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std), each (1, C, 1, 1), when latent_norm is on."""
        return (self._mean[None], self._std[None]) if self._mean is not None else None

