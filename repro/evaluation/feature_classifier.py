"""A small convolutional classifier trained on the user's own real images: the eyes of notebook 04's check.

Inception (step 8) needs a 92 MB download and sees 32 px images through a 299 px window; a logistic
regression on grey thumbnails cannot tell colour photographs apart (66% on held-out real patches where this
network gets 95%). This one is trained in a minute or two on 2 CPU cores on the very images the generator
learnt from, so its decisions and its features are about what distinguishes *these* classes:

- architecture: three stages of 3x3 conv + BatchNorm + ReLU (one conv of `width` channels at full
  resolution, then two of 2x and two of 4x), 2x2 max-pool between stages, global average pool -> the feature vector (4 * width) -> a linear head. Any image size.
- training: AdamW with a one-cycle cosine schedule, label smoothing 0.1, random translations of up to
  1/8 of the side (reflect padding) as the only augmentation: colour, orientation and scale can be what
  tells the classes apart, so they are left alone. Seeded, deterministic on the CPU.
- one class (an unconditional model): nothing to classify, so the network learns the pretext task of
  telling the four 90-degree rotations apart (Gidaris et al. 2018) and its features serve the distance.

    net, acc = train_classifier(images_uint8, labels, steps=400)
    feats = features(net, images_uint8); preds = predict(net, images_uint8)
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class SmallConvNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(1 if stage == 0 else 2):  # one conv at full resolution: most of the cost is there
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W), each channel in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _translate(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by up to 1/8 of its side (reflect padding), drawn from `generator`."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(shifts.tolist())])


def rotations(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pretext task of one class: every image at 0/90/180/270 degrees, labelled 0..3."""
    rotated = np.concatenate([np.rot90(images, k, axes=(1, 2)) for k in range(4)])
    return rotated, np.repeat(np.arange(4), len(images))


def train_classifier(images: np.ndarray, labels: np.ndarray, *, steps: int = 400, batch_size: int = 64,
                     width: int = 16, lr: float = 3e-3, seed: int = 0,
                     note: Optional[Callable[[str], None]] = None) -> SmallConvNet:
    """A SmallConvNet fitted to uint8 (N, H, W, 3) images and int labels 0..K-1 (eval mode on return)."""
    torch.manual_seed(seed)
    num_classes = int(labels.max()) + 1
    net = SmallConvNet(num_classes, width)
    x_all, y_all = to_input(images), torch.from_numpy(np.asarray(labels, dtype=np.int64))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    t0 = time.perf_counter()
    net.train()
    for step in range(steps):
        for group in opt.param_groups:  # linear warm-up, then cosine to 0 (one-cycle)
            group["lr"] = lr * (min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(0, len(x_all), (min(batch_size, len(x_all)),), generator=g)
        loss = F.cross_entropy(net(_translate(x_all[idx], g)), y_all[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if note is not None:
        note(f"classifier: {sum(p.numel() for p in net.parameters()) / 1e3:.0f}k parameters, {steps} steps of "
             f"{batch_size} on {len(x_all)} images in {time.perf_counter() - t0:.0f} s")
    return net.eval()


@torch.inference_mode()
def _batched(fn, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([fn(to_input(images[lo:lo + batch_size])) for lo in range(0, len(images), batch_size)])


def predict(net: SmallConvNet, images: np.ndarray) -> np.ndarray:
    """Predicted class per uint8 image."""
    return _batched(net, images).argmax(1).numpy()


def features(net: SmallConvNet, images: np.ndarray) -> np.ndarray:
    """The pooled feature vector (N, 4 * width) per uint8 image, float64."""
    return _batched(net.features, images).double().numpy()
