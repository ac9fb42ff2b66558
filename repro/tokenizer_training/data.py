"""The tokenizer's training images: an image folder, seeded per-sample crops, flips and posterior noise.

The folder is listed as step 6 lists it (`repro.data.image_sources`: class folders, a labels file or
WebDataset tars; grayscale, CMYK, palette, alpha and 16-bit images converted to RGB as upstream's loader
does; listing problems reported) and read with the kit's one image reader (`repro.data.image_loader.read_square`):
the short side resized to `image_size` (ADM's halving with BOX, then BICUBIC, as step 6's crop; smaller images
are enlarged the same way) and cropped to a square at a random offset (upstream's ImageNetTrain:
albumentations SmallestMaxSize + RandomCrop) or in the centre.

Every random choice of sample j of the global batch of step s (crop offset, flip, and the posterior noise
that `z = mean + std * eps` uses) comes from its own generator seeded by (seed, s, j), in the same order
whatever the config uses, so a resumed run and any process count see the same batches
(`repro.training.data_order` does the same for the DiT). An image that cannot be read is reported (its
path and the error, once) and replaced in that batch by the next readable image of the listing, a fixed
choice, so the run stays deterministic.

    images = TokenizerImages("my_images", image_size=32, crop="random", random_flip=False)
    x, eps = build_batch(images, indices, step=1, first_position=0, seed=0, latent_shape=(4, 8, 8))
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from PIL import Image

from repro.data.image_loader import read_square
from repro.data.image_sources import ImageLoadError, ImageSource, list_images
from repro.errors import ReproError
from repro.tokenizer.images import pil_to_tensor
from repro.utils.seeding import seed_from

SEED_TAG = "repro-tokenizer"


class TokenizerImages:
    """Images of a folder as (3, S, S) float tensors in [-1, 1], crop and flip chosen by a generator."""

    def __init__(self, source, image_size: int, crop: str = "random", random_flip: bool = False,
                 note: Callable[[str], None] = print):
        self.src: ImageSource = list_images(source)
        self.image_size, self.crop, self.random_flip, self.note = int(image_size), crop, bool(random_flip), note
        if len(self.src) == 0:
            raise ReproError(f"image folder {self.src.root} lists no images ({len(self.src.problems)} problem(s), "
                             f"{self.src.ignored} other file(s)): check data.image_folder")
        self.bad: dict[int, str] = {}  # index -> error, reported once each

    def __len__(self) -> int:
        return len(self.src)

    def describe(self) -> str:
        classes = f", {len(self.src.class_names)} class folder(s)" if self.src.class_names else ""
        problems = (f"; {len(self.src.problems)} listing problem(s) skipped, e.g. {self.src.problems[0]['path']}: "
                    f"{self.src.problems[0]['error']}" if self.src.problems else "")
        return f"{len(self)} images in {self.src.root} ({self.src.kind}{classes}){problems}"

    def _read(self, index: int, offset) -> tuple[int, Image.Image]:
        """(index actually used, its S x S crop at `offset`, None = centre): an unreadable image is reported
        and the next readable one taken."""
        for k in range(len(self)):
            i = (index + k) % len(self)
            if i in self.bad:
                continue
            try:
                return i, read_square(self.src, i, self.image_size, offset)[0]
            except ImageLoadError as e:
                self.bad[i] = str(e)
                self.note(f"note: image {e.ref} cannot be read ({e}): it is replaced by the next readable image "
                          f"wherever it is drawn ({len(self.bad)} unreadable so far)")
        raise ReproError(f"no image of {self.src.root} can be read ({len(self.bad)} tried): check data.image_folder")

    def item(self, index: int, generator: torch.Generator) -> torch.Tensor:
        """Image `index` cropped (and maybe flipped) with draws from `generator`: (3, S, S) in [-1, 1]."""
        u = torch.rand(3, generator=generator)  # crop x, crop y, flip: always drawn, in this order
        offset = (u[0], u[1]) if self.crop == "random" else None
        x = pil_to_tensor(self._read(index, offset)[1])
        return x.flip(-1) if self.random_flip and bool(u[2] < 0.5) else x

    def class_interleaved(self) -> list[int]:
        """Every index once, the classes taken in turn (first image of each class, then the second, ...), so
        the first k of them sample every class (a listing sorted by class folder would give one class)."""
        groups: dict = {}
        for i, item in enumerate(self.src.items):
            groups.setdefault(item.label, []).append(i)
        return [col[k] for k in range(max(map(len, groups.values()))) for col in groups.values() if k < len(col)]

    def centre_crops(self, limit: Optional[int] = None) -> tuple[torch.Tensor, list[int]]:
        """Centre crops (no flip) of the first `limit` readable images (all by default) in class-interleaved
        order, and their indices; unreadable ones are reported and left out (evaluation)."""
        out: dict[int, torch.Tensor] = {}  # index -> crop
        for i in self.class_interleaved():
            if limit is not None and len(out) >= limit:
                break
            j, image = self._read(i, None)
            if j == i:  # else unreadable (reported by _read): evaluation leaves it out
                out[i] = pil_to_tensor(image)
        if not out:
            raise ReproError(f"no image of {self.src.root} can be read: check the folder")
        return torch.stack(list(out.values())), list(out)


def build_batch(images: TokenizerImages, indices: Sequence[int], step: int, first_position: int, *, seed: int,
                latent_shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (m, 3, S, S), posterior noise (m, C, h, w)) of global-batch positions first_position, +1, ..."""
    xs, eps = [], []
    for j, index in enumerate(indices):
        g = torch.Generator().manual_seed(seed_from(SEED_TAG, seed, "sample", step, first_position + j))
        xs.append(images.item(int(index), g))
        eps.append(torch.randn(latent_shape, generator=g, dtype=torch.float32))
    return torch.stack(xs), torch.stack(eps)
