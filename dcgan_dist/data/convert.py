"""Real data sets -> shards: an image folder (CelebA's img_align_celeba/), a zip of images, MNIST IDX files.

Images are centre-cropped to a square, resized once to the training size and written as shards (PNG by
default, or jpg or raw: see shards.py), so training never decodes anything bigger than it trains on and never
resizes. An unreadable or corrupt image
is reported and skipped; the conversion goes on and prints how many were skipped.
"""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dcgan_dist.data.images import IMAGE_SUFFIXES, array_to_pil
from dcgan_dist.data.shards import DatasetInfo, ShardWriter, check_format
from dcgan_dist.stopping import raise_on_signals

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions (count, rows, cols)

# One item of a source: its name (for messages) and a function that opens it as a PIL image.
Item = tuple[str, Callable[[], Image.Image]]


def centre_crop_resize(image: Image.Image, size: int, channels: int, crop: int = 0) -> np.ndarray:
    """Centre crop (`crop` px square, or the largest square), resize to size x size -> H x W x C uint8."""
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    side = min(crop, w, h) if crop else min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC if side < size else Image.Resampling.LANCZOS)
    array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def _open_file(path: Path) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        with Image.open(path) as image:
            image.load()
            return image.copy()

    return load


def folder_items(root: Path) -> list[Item]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [(str(p.relative_to(root)), _open_file(p)) for p in files]


def zip_items(path: Path) -> tuple[list[Item], zipfile.ZipFile]:
    archive = zipfile.ZipFile(path)
    names = sorted(n for n in archive.namelist() if Path(n).suffix.lower() in IMAGE_SUFFIXES and not n.endswith("/"))

    def opener(name: str) -> Callable[[], Image.Image]:
        def load() -> Image.Image:
            with Image.open(io.BytesIO(archive.read(name))) as image:
                image.load()
                return image.copy()

        return load

    return [(n, opener(n)) for n in names], archive


def read_idx_images(path: Path) -> np.ndarray:
    """MNIST / Fashion-MNIST `*-images-idx3-ubyte[.gz]` -> N x 28 x 28 uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        header = f.read(16)
        if len(header) < 16:
            raise ValueError(f"{path}: too short for an IDX image file")
        magic, count, rows, cols = struct.unpack(">IIII", header)
        if magic != IDX_IMAGES_MAGIC:
            raise ValueError(f"{path}: not an IDX image file (magic {magic:#010x}, expected {IDX_IMAGES_MAGIC:#010x})")
        data = f.read(count * rows * cols)
    if len(data) != count * rows * cols:
        raise ValueError(
            f"{path}: truncated: header says {count} images of {rows}x{cols}, file holds {len(data)} bytes"
        )
    return np.frombuffer(data, np.uint8).reshape(count, rows, cols)


def idx_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    return sorted(p for p in src.iterdir() if "-images-idx3-ubyte" in p.name or p.name.endswith("-images.idx3-ubyte"))


def is_idx(src: Path) -> bool:
    return (src.is_file() and "idx3-ubyte" in src.name) or (
        src.is_dir() and bool(idx_files(src)) and not folder_items_exist(src)
    )


def folder_items_exist(root: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.rglob("*") if p.is_file())


def convert(
    src: str | Path,
    out: str | Path,
    size: int | None = None,
    channels: int | None = None,
    crop: int = 0,
    shard_size: int = 1000,
    limit: int = 0,
    progress: bool = True,
    fmt: str = "png",
) -> DatasetInfo:
    """Convert `src` (image folder, .zip of images, or IDX file/folder) into shards in `out`; fmt: png, jpg or raw."""
    src = Path(src).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"source '{src}' does not exist")
    check_format(fmt)
    if is_idx(src):
        return _convert_idx(src, out, size, crop, shard_size, limit, progress, fmt)
    archive = None
    if src.is_file() and src.suffix.lower() == ".zip":
        items, archive = zip_items(src)
    elif src.is_dir():
        items = folder_items(src)
    else:
        raise ValueError(f"don't know how to read '{src}': expected an image folder, a .zip of images or an IDX file")
    if not items:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in '{src}'")
    if limit:
        items = items[:limit]
    size, channels = size or 64, channels or 3
    try:
        return _write(_decode_items(items, size, channels, crop), len(items), out, shard_size, str(src), progress, fmt)
    finally:
        if archive is not None:
            archive.close()


def _decode_items(
    items: list[Item], size: int, channels: int, crop: int
) -> Iterator[tuple[str, np.ndarray | Exception]]:
    for name, load in items:
        try:
            yield name, centre_crop_resize(load(), size, channels, crop)
        except Exception as exc:  # corrupt / truncated / not an image: reported and skipped
            yield name, exc


def _convert_idx(src: Path, out, size, crop, shard_size, limit, progress, fmt) -> DatasetInfo:
    arrays = [read_idx_images(p) for p in idx_files(src)]
    images = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    if limit:
        images = images[:limit]

    def items() -> Iterator[tuple[str, np.ndarray | Exception]]:
        for i, img in enumerate(images):
            if size and size != img.shape[0] or crop:
                yield str(i), centre_crop_resize(array_to_pil(img[:, :, None]), size or img.shape[0], 1, crop)
            else:
                yield str(i), img[:, :, None]

    return _write(items(), len(images), out, shard_size, str(src), progress, fmt)


def _write(items, total: int, out, shard_size: int, source: str, progress: bool, fmt: str) -> DatasetInfo:
    skipped = 0
    bar = tqdm(
        total=total, unit="img", desc=f"converting -> {out}", disable=None if progress else True
    )  # None: only on a terminal
    # SIGTERM/SIGINT: the writer removes the shards it wrote (stopping.StoppedBySignal); an error does the same.
    with raise_on_signals(), ShardWriter(out, shard_size=shard_size, fmt=fmt, source=source) as writer:
        for name, result in items:
            if isinstance(result, Exception):
                skipped += 1
                tqdm.write(f"skipping {name}: {type(result).__name__}: {result}")
            else:
                writer.write(result)
            bar.update(1)
        bar.close()
        writer.skipped = skipped
        info = writer.close()
    print(
        f"wrote {info.num_samples} images ({info.image_size}x{info.image_size}x{info.channels}) "
        f"in {info.num_shards} shard(s) to {out}; skipped {skipped} unreadable file(s)"
    )
    return info
