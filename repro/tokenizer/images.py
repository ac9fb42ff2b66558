"""Image <-> tensor conversions exactly as the upstream LightningDiT pipeline does them.

Input side (extract_features.py / VA_VAE.img_transform): a PIL image goes through
`ensure_rgb` (what torchvision's ImageFolder loader does), `center_crop_arr` (ADM: `resize_short_side`
then the central square; `square_crop` places the square anywhere), then
`pil_to_tensor` (ToTensor + Normalize(0.5, 0.5)) to a (3,H,W) float tensor in [-1,1].

Output side (VA_VAE.decode_to_images): `to_uint8` maps decoded images in [-1,1] to uint8
pixels with upstream's `clamp(127.5 * x + 128, 0, 255)` and truncation. Note +128, not +127.5:
upstream's quirk, kept so that sample grids and FID .npz files match the official numbers.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from repro.errors import ReproError


def ensure_rgb(pil_image: Image.Image) -> Image.Image:
    """Return an RGB version of any PIL image; RGB images come back unchanged (same object).

    Alpha is dropped, not composited: this is what `Image.convert("RGB")` in torchvision's
    default ImageFolder loader (used upstream) does, so fully transparent pixels keep their
    stored colour. Grayscale and bilevel are replicated to three channels, CMYK uses PIL's
    conversion, palette images map through their palette (transparency dropped too).
    """
    if pil_image.mode == "RGB":
        return pil_image
    if pil_image.mode == "P" and "transparency" in pil_image.info:
        # going through RGBA gives the same colours and avoids PIL's palette-transparency warning
        return pil_image.convert("RGBA").convert("RGB")
    try:
        return pil_image.convert("RGB")  # also 16-bit / float grayscale: clipped to 0..255 by PIL
    except ValueError as exc:  # rare modes PIL cannot convert directly (e.g. premultiplied "La")
        raise ReproError(f"cannot convert a {pil_image.mode!r} image to RGB ({exc}); "
                         "re-save the image as RGB PNG/JPEG") from None


def resize_short_side(pil_image: Image.Image, size: int) -> Image.Image:
    """Short side -> `size`, ADM's way (guided-diffusion image_datasets.py): halve with BOX filtering while the
    short side is at least twice the target (cheap and alias-free), then BICUBIC with the sides rounded.

    The one resize of the kit: step 6's crop, the tokenizer's training crops, the recognition check and
    the reference images all go through it. An image already at `size` comes back as a copy (PIL's
    resize to the same size), so smaller and exact images take the same path as large ones.
    """
    if size <= 0:
        raise ReproError(f"resize_short_side: the image size must be positive, got {size}")
    while min(*pil_image.size) >= 2 * size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = size / min(*pil_image.size)
    return pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)


def square_crop(pil_image: Image.Image, size: int, offset=None) -> Image.Image:
    """`resize_short_side`, then a size x size square: central, or at `offset` = (u, v) in [0, 1), the share
    of the free width/height left of and above it (the tokenizer's random crop; upstream's RandomCrop).

    u and v may be 0-d torch tensors: `int(u * (w - size + 1))` then computes in float32, as the
    tokenizer's training crops always have (a float64 product could round differently).
    """
    pil_image = resize_short_side(pil_image, size)
    w, h = pil_image.size
    if offset is None:
        left, top = (w - size) // 2, (h - size) // 2
    else:
        left, top = int(offset[0] * (w - size + 1)), int(offset[1] * (h - size + 1))
    return Image.fromarray(np.asarray(pil_image)[top: top + size, left: left + size])


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's center crop (guided-diffusion image_datasets.py), used by upstream LightningDiT: the short
    side resized to `image_size` (`resize_short_side`), then the central image_size x image_size square."""
    if image_size <= 0:
        raise ReproError(f"center_crop_arr: image_size must be positive, got {image_size}")
    return square_crop(pil_image, image_size)


def pil_to_tensor(pil_image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3,H,W) float32 in [-1,1], bit-identical to ToTensor + Normalize(0.5, 0.5)."""
    # (H,W,3) uint8; a copy, so the tensor owns it
    x = torch.from_numpy(np.array(ensure_rgb(pil_image), dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    # same operations in the same order as torchvision: /255, then (x - 0.5) / 0.5
    return x.to(torch.float32).div(255).sub_(0.5).div_(0.5)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N,C,H,W) in [-1,1] -> (N,H,W,C) uint8 on the CPU, as upstream decode_to_images.

    Computed in float32 (half/bfloat16 inputs are upcast first: bfloat16 cannot hold 127.5*x+128
    to a fraction), then `clamp(127.5 * x + 128, 0, 255)` and truncation toward zero.
    """
    if images.ndim != 4:
        raise ReproError(f"to_uint8 expects images of shape (N, C, H, W); got {tuple(images.shape)}")
    return torch.clamp(127.5 * images.to(torch.float32) + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8)
