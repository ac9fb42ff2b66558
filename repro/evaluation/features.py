"""Inception-v3 features for the ADM protocol: TF-faithful network, streamed images, several processes.

Network: torch-fidelity's `FeatureExtractorInceptionV3`, a port of the TensorFlow 2015-12-05 graph that
the ADM evaluator runs (TF1-style bilinear resize to 299, (x - 128) / 128, TF padding/pooling quirks),
with weights only from a local file (`weights-inception-2015-12-05-6726825d.pth`, fetched by step 2).
torch-fidelity unpickles its weights file with arbitrary objects allowed; we never hand it the user's file: we load
it with `weights_only=True`, then pass it an in-memory copy of those verified tensors.

Features (TF graph name -> torch-fidelity module):
- `pool`:    `pool_3:0` -> torch-fidelity's '2048' output (global average pool after Mixed_7c).
- `spatial`: `mixed_6/conv:0` -> output of `Mixed_6d.branch1x1` (conv 1x1 + BN + ReLU, 192 x 17 x 17).
  torch-fidelity does not expose it, so a forward hook takes it. torch-fidelity's own weight
  converter maps TF `mixed_6/conv/{conv2d_params,batchnorm}` to `Mixed_6d.branch1x1.{conv,bn}`
  (mixed, mixed_1, mixed_2 = Mixed_5b..5d; mixed_3 = 6a; mixed_4..7 = 6b..6e), and the TF op named
  exactly `mixed_6/conv` is that block's ReLU output. ADM keeps channels [..., :7] of the NHWC
  tensor and flattens in (H, W, C) order, so we permute NCHW -> NHWC before flattening: the
  reference `mu_s`/`sigma_s` were computed in that order.
- `logits`:  torch-fidelity's 'logits_unbiased' = pool_3 @ softmax/weights (no bias), as ADM's IS graph.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from repro.errors import ReproError
from repro.evaluation.image_batches import ImageBatches
from repro.utils import distributed as du
from repro.utils.hardware import default_device
from repro.utils.io import sha256_file
from repro.utils.prefetch import prefetch

SPATIAL_MODULE = "Mixed_6d.branch1x1"  # TF `mixed_6/conv` (see module docstring)
SPATIAL_CHANNELS = 7
FEATURE_DIMS = {"pool": 2048, "spatial": SPATIAL_CHANNELS * 17 * 17, "logits": 1008}
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def verify_sha256(path: str | os.PathLike, expected: Optional[str]) -> str:
    """sha256 of `path`; if `expected` is given (full hash or a prefix of >= 8 hex digits, the torch.hub
    file-name convention), a mismatch is a ReproError naming the file and both hashes."""
    path = Path(path)
    if not path.is_file():
        raise ReproError(f"file not found: {path}")
    actual = sha256_file(path)
    if expected:
        exp = expected.strip().lower()
        if len(exp) < 8 or not actual.startswith(exp):
            raise ReproError(
                f"{path}: sha256 {actual} does not match the expected {exp}; the file is corrupt or a "
                f"different file: delete it and run `python -m steps.step2_download` again")
    return actual


@contextlib.contextmanager
def _tf32_disabled():
    """TF32 convolutions/matmuls move Inception features by ~1e-3 relative; ADM ran in true float32.
    Uses torch's `fp32_precision` API where it exists (mixing it with the legacy `allow_tf32` flags
    raises in torch >= 2.9), else the legacy flags; the previous setting is restored."""
    conv, mm = getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision") and hasattr(mm, "fp32_precision"):
        old = (conv.fp32_precision, mm.fp32_precision)
        conv.fp32_precision, mm.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, mm.fp32_precision = old
    else:
        old = (torch.backends.cudnn.allow_tf32, mm.allow_tf32)
        torch.backends.cudnn.allow_tf32, mm.allow_tf32 = False, False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, mm.allow_tf32 = old


class InceptionExtractor:
    """uint8 NHWC batches -> dict(pool=(B,2048), spatial=(B,2023), logits=(B,1008)) float32 numpy."""

    def __init__(self, weights_path: str | os.PathLike, expected_sha256: Optional[str] = None,
                 device: Optional[str | torch.device] = None):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights_path = Path(weights_path)
        if not self.weights_path.is_file():
            raise ReproError(f"Inception weights not found: {self.weights_path}; run "
                             f"`python -m steps.step2_download --only fid-inception` (step 2)")
        self.weights_sha256 = verify_sha256(self.weights_path, expected_sha256)
        try:
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle with code, truncated file, not a torch file
            raise ReproError(f"{self.weights_path}: not a loadable weights file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); expected torch-fidelity's {INCEPTION_FILE}") from None
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ReproError(f"{self.weights_path}: expected a state dict of tensors ({INCEPTION_FILE}), "
                             f"got {type(state).__name__}")
        buf = io.BytesIO()
        torch.save(state, buf)  # only tensors that passed weights_only=True reach torch-fidelity
        buf.seek(0)
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                              feature_extractor_weights_path=buf)
        except RuntimeError as e:  # strict load_state_dict: missing/unexpected keys or shapes
            raise ReproError(f"{self.weights_path}: not torch-fidelity's InceptionV3 weights "
                             f"({str(e).splitlines()[0][:300]})") from None
        self.device = torch.device(device) if device is not None else default_device()
        self.net = net.to(self.device).eval()
        self._spatial: Optional[torch.Tensor] = None
        self.net.get_submodule(SPATIAL_MODULE).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        # (B, 192, 17, 17) -> first 7 channels, NHWC order, flattened: ADM's spatial[..., :7]
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        with _tf32_disabled():
            pool, logits = self.net(x)
        spatial, self._spatial = self._spatial, None
        return {"pool": pool.float().cpu().numpy(), "spatial": spatial.float().cpu().numpy(),
                "logits": logits.float().cpu().numpy()}


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous slice of [0, n) for `rank`: rank order = image order, so gathered features line up."""
    return n * rank // world, n * (rank + 1) // world


def gather_rows(local: np.ndarray) -> Optional[np.ndarray]:
    """Concatenate every rank's rows (rank order) on rank 0; other ranks get None. One process: identity."""
    if du.get_world_size() == 1:
        return local
    dev, world = du.comm_device(), du.get_world_size()
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=torch.float32, device=dev)
    padded[:local.shape[0]] = torch.from_numpy(local).to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)] if du.is_main() else None
    torch.distributed.gather(padded, parts, dst=0)
    if not du.is_main():
        return None
    return np.concatenate([p[:c].cpu().numpy() for p, c in zip(parts, counts)], axis=0)


def extract_features(source: ImageBatches, extractor: InceptionExtractor, batch_size: int,
                     keys: tuple[str, ...] = ("pool", "spatial", "logits"),
                     desc: str = "inception") -> Optional[dict[str, np.ndarray]]:
    """Features of every image of `source`; each rank reads only its contiguous slice, in batches.

    Returns {key: (N, dim) float32} on rank 0 (None on the others), rows in image order.
    """
    from repro.utils.progress import progress_bar

    start, stop = shard_range(source.num_images, du.get_rank(), du.get_world_size())
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    bar = progress_bar(total=source.num_images, desc=desc, unit="img", disable=not du.is_main(),
               mininterval=2.0)
    try:
        for batch in prefetch(source.iter_batches(start, stop, batch_size)):
            feats = extractor(batch)
            for k in keys:
                out[k].append(feats[k])
            # rank 0's bar counts all ranks' images assuming equal pace (slices differ by at most one image)
            bar.update(min(len(batch) * du.get_world_size(), source.num_images - bar.n))
    finally:
        bar.close()
    local = {k: (np.concatenate(v, axis=0) if v else np.zeros((0, FEATURE_DIMS[k]), np.float32))
             for k, v in out.items()}
    gathered = {k: gather_rows(v) for k, v in local.items()}
    return gathered if du.is_main() else None

