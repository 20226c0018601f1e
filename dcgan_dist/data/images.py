"""Image conversions, grids and PNG/GIF writing (no torchvision needed).

Pixels live in two forms: uint8 in [0, 255] (shards, files) and float in [-1, 1] (the generator's Tanh range,
what the networks see). `to_unit_range` and `to_uint8` convert between them; nothing else does.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dcgan_dist.files import atomic_write

# File names taken for images: in a folder or zip to convert, and given as data (images, not shards).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 in [-1, 1], on the tensor's device."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 [0, 255] on the CPU (uint8 input is returned as it is)."""
    if images.dtype == torch.uint8:
        return images.cpu()
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def array_to_pil(array: np.ndarray) -> Image.Image:
    """H x W x C uint8 (C = 1 or 3) -> a greyscale or RGB PIL image."""
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0], "L")
    return Image.fromarray(array, "RGB")


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 N x C x H x W -> one H' x W' x C uint8 array, `nrow` images per row (default: square-ish)."""
    if images.dtype != torch.uint8:
        raise TypeError("make_grid expects uint8 images; use to_uint8 first")
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((padding + rows * (h + padding), padding + nrow * (w + padding), c), pad_value, np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = arr[i]
    return grid


def encode(image: Image.Image, fmt: str = "PNG", **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def grid_image(images: torch.Tensor, nrow: int | None = None) -> Image.Image:
    """A batch (uint8, or float in [-1, 1]) as one grid image."""
    return array_to_pil(make_grid(to_uint8(images), nrow))


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Save a PIL image atomically (format from the suffix: .png, .jpg, .gif, ...)."""
    return atomic_write(path, encode(image, Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")))


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save a batch (uint8, or float in [-1, 1]) as one grid image file."""
    return save_image(grid_image(images, nrow), path)


def gif(frames: Sequence[bytes], duration_ms: int = 250) -> bytes:
    """Encoded images (PNG bytes, in the order given) -> one animated GIF."""
    if not frames:
        raise ValueError("no frames to animate")
    first, *rest = [Image.open(io.BytesIO(frame)).convert("RGB") for frame in frames]
    return encode(first, "GIF", save_all=True, append_images=rest, duration=duration_ms, loop=0)
