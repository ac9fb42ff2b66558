"""The kit's one image reader, and step 6's decoding of it in parallel.

Reading: `read_square` takes item i of an image source (`repro.data.image_sources`: decoded, converted to
RGB as upstream's loader does), resizes its short side to S and cuts an S x S square, centred (ADM's crop,
`repro.tokenizer.images.center_crop_arr`) or at a given offset (the tokenizer's random crops);
`read_file_square` does the same for one file (step 8's reference images). An unreadable image raises
`ImageLoadError` whose `.named` is "file: error"; `read_squares` reads many, leaving the unreadable ones
out in one line that names them. Step 6, step 8's references, step 9's training crops, step 10's held-out
images and notebook 04's recognition check all read images here.

Step 6's decoding in parallel: decoding JPEGs (PIL) is most of the CPU time of an extraction and one
process does it one image at a time. `cropped_batches` hands the images of an index range to `workers`
DataLoader processes and gives the batches back in order, batch j holding exactly indices
[lo + j*B, lo + (j+1)*B) like the serial loop, with the same per-image outcome: a cropped uint8 tensor
and its label, or the image recorded as corrupt ([index, ref, error]) and left out. The encoder sees the
same batches, so the shards are byte-identical whatever `workers` is (tests/test_image_loader.py);
`workers=0` decodes in this process.

    for images, indices, labels, corrupt in cropped_batches(src, 0, 10000, image_size=256, batch_size=32, workers=8):
        ...
    images, labels, skipped = read_squares(list_images("my_images"), 32, what="recognition check")
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image

from repro.data.image_sources import ImageLoadError, ImageSource, read_image_file
from repro.tokenizer.images import pil_to_tensor, square_crop


def read_square(src: ImageSource, index: int, size: int, offset=None) -> tuple[Image.Image, Optional[int]]:
    """(size x size RGB image, label) of item `index`: short side resized to `size`, then the central square
    (ADM's crop) or the one at `offset` = (u, v) in [0, 1) (`square_crop`); ImageLoadError naming the file."""
    image, label = src.load(index)
    return square_crop(image, size, offset), label


def read_file_square(path: str | os.PathLike, size: int) -> np.ndarray:
    """One image file as (size, size, 3) uint8, ADM's centre crop; ImageLoadError naming the file."""
    return np.asarray(square_crop(read_image_file(path), size), dtype=np.uint8)


def read_squares(src: ImageSource, size: int, what: str,
                 note: Callable[[str], None] = print) -> tuple[list[np.ndarray], list[Optional[int]], list[str]]:
    """(uint8 (size, size, 3) centre crops, labels, "file: error" of each unreadable image) of every item of
    `src`, in listing order. Unreadable images are left out, counted and named in one line (`what` says
    who reads them), never silently."""
    images, labels, skipped = [], [], []
    for i in range(len(src)):
        try:
            image, label = read_square(src, i, size)
        except ImageLoadError as e:
            skipped.append(e.named)
            continue
        images.append(np.asarray(image))
        labels.append(label)
    if skipped:
        shown = "; ".join(skipped[:3]) + (f"; +{len(skipped) - 3} more" if len(skipped) > 3 else "")
        note(f"{what}: {len(skipped)} unreadable image(s) of {src.root} left out ({shown})")
    return images, labels, skipped


class CroppedImages(torch.utils.data.Dataset):
    """Item k = image lo + k of `src`: (index, cropped tensor or None, label or None, error or None)."""

    def __init__(self, src: ImageSource, lo: int, hi: int, image_size: int):
        self.src, self.lo, self.hi, self.image_size = src, lo, hi, image_size

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, k: int) -> tuple[int, Optional[torch.Tensor], Optional[int], Optional[str]]:
        i = self.lo + k
        try:
            image, label = read_square(self.src, i, self.image_size)
            return i, pil_to_tensor(image), label, None
        except ImageLoadError as e:
            return i, None, None, str(e)
        except Exception as e:  # a crop/convert failure of one image must not end the run
            return i, None, None, f"{type(e).__name__}: {e}"


def cropped_batches(src: ImageSource, lo: int, hi: int, *, image_size: int, batch_size: int,
                    workers: int = 0) -> Iterator[tuple[list[torch.Tensor], list[int], list[int], list[list]]]:
    """(images, indices, labels, corrupt) per batch of [lo, hi), in order; `workers` decoding processes."""
    data = CroppedImages(src, lo, hi, image_size)
    if workers > 0:  # collate_fn=list keeps the items as they are (no stacking: corrupt ones have no tensor)
        batches = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                                              collate_fn=list, prefetch_factor=2)
    else:
        batches = ([data[k] for k in range(s, min(s + batch_size, len(data)))] for s in range(0, len(data), batch_size))
    for items in batches:
        images, indices, labels, corrupt = [], [], [], []
        for i, image, label, error in items:
            if error is not None:
                corrupt.append([i, src.items[i].ref, error])
                continue
            images.append(image)
            indices.append(i)
            labels.append(label)
        yield images, indices, labels, corrupt
