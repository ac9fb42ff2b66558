"""LPIPS perceptual distance (VGG16 trunk + learned linear heads), loaded from the official files.

Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"; the layout
is the one taming-transformers' `LPIPS` (used by LDM and VA-VAE's `LPIPSWithDiscriminator`) and
richzhang/PerceptualSimilarity's v0.1 `vgg` model use. Two weight files, both in their official formats:

- Trunk: torchvision's ImageNet VGG16, `vgg16-397923af.pth` (what `torchvision.models.vgg16(pretrained=True)`
  downloads), loaded into torchvision's own `vgg16(weights=None).features` up to relu5_3 (indices 0..29; the
  last max-pool, index 30, is not needed), so the file's keys load unchanged: a plain state dict with `features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}`
  (the 13 convolutions, 26 tensors) and `classifier.{0,3,6}.{weight,bias}` (unused here, counted and
  dropped). The `397923af` in the name is the start of the file's sha256 (torch.hub's convention) and is
  checked whenever the file name carries such a prefix.
- Heads: the LPIPS v0.1 linear layers, `vgg.pth` (richzhang/PerceptualSimilarity `lpips/weights/v0.1/vgg.pth`,
  pinned in configs/assets.yaml to commit 082bb24f with its sha256 `LPIPS_HEADS_SHA256`; taming calls the
  same file `vgg_lpips`, md5 `d507d7349b931f0638a25a48a722f98a`):
  a plain state dict with exactly `lin{k}.model.1.weight`, k = 0..4, of shapes (1, C_k, 1, 1),
  C = 64, 128, 256, 512, 512 (`model.0` is a Dropout, inactive in eval mode, so it is not built here).

Both files are read with `torch.load(weights_only=True)` and loaded strictly: a missing, unexpected or
wrongly-shaped tensor is a CheckpointError naming the file and the key.

    lpips = build_lpips("vgg16-397923af.pth", "vgg.pth")   # None (with a one-line note) if absent
    d = lpips(x, y)                                        # x, y (N,3,H,W) in [-1,1] -> (N,)
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from repro.errors import CheckpointError
from repro.utils.distributed import print0
from repro.utils.io import sha256_file

VGG16_TRUNK_FILE = "vgg16-397923af.pth"
LPIPS_HEADS_FILE = "vgg.pth"
LPIPS_HEADS_MD5 = "d507d7349b931f0638a25a48a722f98a"  # taming-transformers' MD5_MAP["vgg_lpips"]
# sha256 of the same file (PerceptualSimilarity commit 082bb24f, 7,289 bytes); step 2 checks it on download
LPIPS_HEADS_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"

# torchvision vgg16().features index of relu5_3: the trunk stops there (index 30 is the last max-pool)
_RELU5_3 = 29
# features[] index of the ReLU after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (the LPIPS taps)
_TAPS = (3, 8, 15, 22, 29)
HEAD_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS ScalingLayer: maps [-1,1] inputs to ImageNet-normalised ones, constants from the paper's code
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """torchvision's VGG16 `features` up to relu5_3 (its own module, so the same indices and keys)."""

    def __init__(self):
        super().__init__()
        from torchvision.models import vgg16

        self.features = vgg16(weights=None).features[:_RELU5_3 + 1]  # indices 0..29
        for layer in self.features:
            if isinstance(layer, nn.ReLU):
                layer.inplace = False  # the taps are ReLU outputs the next layers must not overwrite

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _TAPS:
                taps.append(x)  # (N, C_k, H / 2^k, W / 2^k)
        return taps


class LPIPS(nn.Module):
    """d(x, y) = sum_k mean_hw( w_k . (f_k(x)/|f_k(x)| - f_k(y)/|f_k(y)|)^2 ); frozen, eval mode.

    Inputs (N,3,H,W) in [-1,1]; returns (N,). Gradients flow to the inputs (for the training loss),
    never to the weights.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.vgg = VGG16Features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in HEAD_CHANNELS)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always eval: the official heads were used without dropout at test time

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (N,3,H,W) batches of the same shape; got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
        fx = self.vgg((x - self.shift) / self.scale)
        fy = self.vgg((y - self.shift) / self.scale)
        total = x.new_zeros(x.shape[0])
        for head, a, b in zip(self.heads, fx, fy):
            # unit-normalise along channels (eps 1e-10 as the reference), squared difference, 1x1 head
            diff = (_unit(a) - _unit(b)) ** 2  # (N, C_k, h, w)
            total = total + head(diff).mean(dim=(1, 2, 3))
        return total


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt((x * x).sum(dim=1, keepdim=True)) + eps)


# ---------------------------------------------------------------------------------------------
# Loading the official files


def _read(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{what} file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-torch files
        raise CheckpointError(f"{path}: cannot be read as a torch state dict with weights_only=True "
                              f"({type(exc).__name__}: {exc}); is it the {what} file?") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a plain state dict of tensors ({what}); got {type(obj).__name__}")
    return obj


def _check_hash_prefix(path: Path) -> None:
    # torch.hub convention: `name-<first 8+ hex digits of the sha256>.ext`
    match = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z]+$", path.name)
    if match is None:
        return
    actual = sha256_file(path)
    if not actual.startswith(match.group(1)):
        raise CheckpointError(f"{path}: sha256 {actual} does not start with {match.group(1)} as its name says; "
                              "the file is corrupt or renamed: download it again")


def _load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], path: Path, what: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        detail = (f"missing {missing[:3]}" if missing else "") + (" " if missing and unexpected else "") + \
                 (f"unexpected {unexpected[:3]}" if unexpected else "")
        raise CheckpointError(f"{path} is not the {what} file: {detail}")
    for key, value in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected "
                                  f"{tuple(value.shape)} ({what})")
    module.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True)


def load_vgg16_trunk(lpips: LPIPS, path: str | os.PathLike) -> int:
    """Load torchvision's `vgg16-397923af.pth` into `lpips.vgg`; return how many classifier tensors were dropped."""
    path = Path(path)
    _check_hash_prefix(path)
    raw = _read(path, "torchvision VGG16 (vgg16-397923af.pth)")
    trunk = {k: v for k, v in raw.items() if k.startswith("features.")}
    dropped = [k for k in raw if not k.startswith("features.")]
    strays = [k for k in dropped if not k.startswith("classifier.")]
    if strays:
        raise CheckpointError(f"{path} has keys a torchvision VGG16 state dict does not: {strays[:3]}")
    _load_strict(lpips.vgg, trunk, path, "torchvision VGG16 (features.* tensors)")
    return len(dropped)


def load_lpips_heads(lpips: LPIPS, path: str | os.PathLike, expected_md5: Optional[str] = None) -> None:
    """Load the LPIPS v0.1 `vgg.pth` heads (`lin{k}.model.1.weight`) into `lpips.heads`."""
    path = Path(path)
    if expected_md5 is not None:
        actual = hashlib.md5(path.read_bytes()).hexdigest()
        if actual != expected_md5:
            raise CheckpointError(f"{path}: md5 {actual} is not the expected {expected_md5}; download it again")
    raw = _read(path, "LPIPS heads (vgg.pth)")
    expected = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(HEAD_CHANNELS)}
    missing = [k for k in expected if k not in raw]
    unexpected = [k for k in raw if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path} is not the LPIPS v0.1 vgg.pth (exactly lin0..lin4.model.1.weight): "
                              + "; ".join(part for part in (f"missing {missing}" if missing else "",
                                                            f"unexpected {unexpected[:3]}" if unexpected else "")
                                          if part))
    for key, shape in expected.items():
        if tuple(raw[key].shape) != shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(raw[key].shape)}, expected {shape}")
    renamed = {f"{key[3]}.weight": value for key, value in raw.items()}  # lin{k}.model.1.weight -> heads[k]
    _load_strict(lpips.heads, renamed, path, "LPIPS v0.1 vgg heads")


def load_lpips(trunk_path: str | os.PathLike, heads_path: str | os.PathLike,
               device: str | torch.device = "cpu", heads_md5: Optional[str] = None) -> LPIPS:
    """Build LPIPS and load both official files strictly; frozen, eval mode, on `device`.

    `heads_md5` (e.g. LPIPS_HEADS_MD5, taming's published hash) checks the heads file first.
    """
    with torch.device("meta"):
        lpips = LPIPS()  # no random init of 14.7M parameters that are overwritten at once
    lpips.to_empty(device="cpu")
    lpips.shift.copy_(torch.tensor(_SHIFT).view(1, 3, 1, 1))
    lpips.scale.copy_(torch.tensor(_SCALE).view(1, 3, 1, 1))
    dropped = load_vgg16_trunk(lpips, trunk_path)
    load_lpips_heads(lpips, heads_path, expected_md5=heads_md5)
    print0(f"LPIPS: VGG16 trunk from {Path(trunk_path).name} ({dropped} classifier tensors unused), "
           f"heads from {Path(heads_path).name}")
    return lpips.to(device).requires_grad_(False).eval()


def build_lpips(trunk_path: Optional[str | os.PathLike], heads_path: Optional[str | os.PathLike],
                device: str | torch.device = "cpu", heads_md5: Optional[str] = None) -> Optional[LPIPS]:
    """LPIPS from the two files, or None with a one-line note when either file is not given or absent.

    Present but wrong files are errors (CheckpointError), never a silent fallback.
    """
    absent = [str(p) if p else name for p, name in ((trunk_path, VGG16_TRUNK_FILE), (heads_path, LPIPS_HEADS_FILE))
              if not p or not Path(p).is_file()]
    if absent:
        print0(f"note: LPIPS weights absent ({', '.join(absent)}): training and evaluation go on without "
               "LPIPS (run step 2 to fetch them)")
        return None
    return load_lpips(trunk_path, heads_path, device=device, heads_md5=heads_md5)

