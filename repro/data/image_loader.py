"""Step 6's image decoding in parallel: DataLoader workers read, decode and ADM-crop, in index order.

Decoding JPEGs (PIL) is most of the CPU time of an extraction and one process does it one image at a
time. `cropped_batches` hands the images of an index range to `workers` DataLoader processes and
gives the batches back in order, batch j holding exactly indices [lo + j*B, lo + (j+1)*B) like the
serial loop, with the same per-image outcome: a cropped uint8 tensor and its label, or the image
recorded as corrupt ([index, ref, error]) and left out. The encoder sees the same batches, so the
shards are byte-identical whatever `workers` is (tests/test_image_loader.py); `workers=0` decodes in
this process.

    for images, indices, labels, corrupt in cropped_batches(src, 0, 10000, image_size=256, batch_size=32, workers=8):
        ...
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from repro.data.image_sources import ImageLoadError, ImageSource


class CroppedImages(torch.utils.data.Dataset):
    """Item k = image lo + k of `src`: (index, cropped tensor or None, label or None, error or None)."""

    def __init__(self, src: ImageSource, lo: int, hi: int, image_size: int):
        self.src, self.lo, self.hi, self.image_size = src, lo, hi, image_size

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, k: int) -> tuple[int, Optional[torch.Tensor], Optional[int], Optional[str]]:
        from repro.tokenizer.images import center_crop_arr, pil_to_tensor

        i = self.lo + k
        try:
            img, label = self.src.load(i)
            return i, pil_to_tensor(center_crop_arr(img, self.image_size)), label, None
        except ImageLoadError as e:
            return i, None, None, str(e)
        except Exception as e:  # a crop/convert failure of one image must not end the run
            return i, None, None, f"{type(e).__name__}: {e}"


def _as_list(items: list) -> list:
    return items  # keep the items as they are (no stacking: corrupt ones have no tensor)


def cropped_batches(src: ImageSource, lo: int, hi: int, *, image_size: int, batch_size: int,
                    workers: int = 0) -> Iterator[tuple[list[torch.Tensor], list[int], list[int], list[list]]]:
    """(images, indices, labels, corrupt) per batch of [lo, hi), in order; `workers` decoding processes."""
    data = CroppedImages(src, lo, hi, image_size)
    if workers > 0:
        batches = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                                              collate_fn=_as_list, prefetch_factor=2)
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
