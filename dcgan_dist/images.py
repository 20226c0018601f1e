"""Image grids and PNG/GIF writing (no torchvision needed)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (the generator's Tanh range), N x C x H x W -> uint8 in [0, 255]."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


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


def array_to_pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, "L" if array.shape[2] == 1 else "RGB")


def save_image_atomic(image: Image.Image, path: str | Path, **save_kwargs) -> Path:
    """Write via a temp file + rename so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format=save_kwargs.pop("format", path.suffix.lstrip(".").upper() or "PNG"), **save_kwargs)
    tmp.replace(path)
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save a batch (uint8, or float in [-1, 1]) as one PNG grid."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    return save_image_atomic(array_to_pil(make_grid(images, nrow)), path)


def save_gif(frames: Sequence[Image.Image], path: str | Path, duration_ms: int = 200) -> Path:
    if not frames:
        raise ValueError("no frames to animate")
    first, *rest = [f.convert("RGB") for f in frames]
    return save_image_atomic(first, path, format="GIF", save_all=True, append_images=rest, duration=duration_ms, loop=0)
