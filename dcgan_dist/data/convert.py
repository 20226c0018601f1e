"""Real data sets -> shards: an image folder (CelebA's img_align_celeba/), a zip of images, MNIST IDX files.

Images are centre-cropped to a square, resized once to the training size and written as shards (PNG by
default, or jpg or raw: see shards.py), so training never decodes anything bigger than it trains on and never
resizes. An unreadable or corrupt image
is reported and skipped; the conversion goes on and prints how many were skipped.

Labels (shards.py says how shards carry them), where the source has them:
- IDX: a label file beside each image file (`train-labels-idx1-ubyte[.gz]` beside `train-images-idx3-ubyte[.gz]`,
  `t10k-*` likewise). Class names: `--classes digits` ("0".."9", MNIST), `fashion` (Fashion-MNIST's ten), or
  names joined by commas; by default `fashion` when the source's path names Fashion-MNIST, else `digits`.
  A label file that does not match its images (count, a label with no class name, truncated) is refused before
  any shard is written.
- An image folder with one subfolder per class and no images of its own (torchvision's ImageFolder convention):
  classes = the sorted names of the subfolders that hold images, each image labelled with its subfolder's.
- `--classes none` writes unlabelled shards from a labelled source. Zips and other folders are unlabelled.
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
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension (count)

MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# `convert --classes`: the named lists; any other value is the class names joined by commas.
CLASS_LISTS = {"digits": MNIST_CLASSES, "fashion": FASHION_MNIST_CLASSES}

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


def read_idx_labels(path: Path) -> np.ndarray:
    """MNIST / Fashion-MNIST `*-labels-idx1-ubyte[.gz]` -> N uint8 labels. ValueError (one line) for a file that
    is not one or is truncated."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            header = f.read(8)
            if len(header) < 8:
                raise ValueError(f"{path}: too short for an IDX label file")
            magic, count = struct.unpack(">II", header)
            if magic != IDX_LABELS_MAGIC:
                raise ValueError(
                    f"{path}: not an IDX label file (magic {magic:#010x}, expected {IDX_LABELS_MAGIC:#010x})"
                )
            data = f.read(count)
    except (OSError, EOFError) as exc:  # a damaged .gz
        raise ValueError(f"{path}: cannot read: {exc}") from None
    if len(data) != count:
        raise ValueError(f"{path}: truncated: header says {count} labels, file holds {len(data)}")
    return np.frombuffer(data, np.uint8)


def labels_file(images: Path) -> Path | None:
    """The label file beside an IDX image file (`X-images-idx3-ubyte[.gz]` -> `X-labels-idx1-ubyte[.gz]`, either
    compression), if there is one."""
    name = images.name
    for a, b in (("-images-idx3-ubyte", "-labels-idx1-ubyte"), ("-images.idx3-ubyte", "-labels.idx1-ubyte")):
        if a in name:
            stem = name[: name.index(a)] + b
            for candidate in (stem, stem + ".gz"):
                if (images.parent / candidate).is_file():
                    return images.parent / candidate
    return None


def class_names(classes: str | None, src: Path) -> list[str]:
    """IDX class names from `--classes` (digits, fashion, or names joined by commas); by default fashion when the
    source's path names Fashion-MNIST (torchvision's FashionMNIST/raw, say), else digits."""
    if classes is None:
        return FASHION_MNIST_CLASSES if "fashion" in str(src.resolve()).lower() else MNIST_CLASSES
    if classes in CLASS_LISTS:
        return CLASS_LISTS[classes]
    names = [name.strip() for name in classes.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise ValueError(f"--classes {classes!r}: give digits, fashion, none or distinct names joined by commas")
    return names


def class_folders(root: Path) -> list[Path]:
    """torchvision's ImageFolder convention: a folder with no images of its own and subfolders holding them, one
    per class -> those subfolders, sorted by name (index = label); [] for any other folder. One subfolder alone
    is no class structure (a data set kept in photos/all/, say)."""
    if any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir()):
        return []
    folders = sorted((p for p in root.iterdir() if p.is_dir() and folder_items_exist(p)), key=lambda p: p.name)
    return folders if len(folders) >= 2 else []


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
    classes: str | None = None,
) -> DatasetInfo:
    """Convert `src` (image folder, .zip of images, or IDX file/folder) into shards in `out`; fmt: png, jpg or raw.
    Labels where the source has them (the module's docstring); classes: IDX class names (digits, fashion, names
    joined by commas; None: from the path), "none" for unlabelled shards from any source."""
    src = Path(src).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"source '{src}' does not exist")
    check_format(fmt)
    if is_idx(src):
        return _convert_idx(src, out, size, crop, shard_size, limit, progress, fmt, classes)
    archive = None
    names: list[str] | None = None
    labels: list[int] | None = None
    if src.is_file() and src.suffix.lower() == ".zip":
        items, archive = zip_items(src)
    elif src.is_dir():
        items = folder_items(src)
        folders = class_folders(src) if classes != "none" else []
        if folders:  # one subfolder per class
            names = [f.name for f in folders]
            index = {name: i for i, name in enumerate(names)}
            # Images in a subfolder without images at its own level are under a class folder too (rglob).
            labels = [index.get(Path(name).parts[0], -1) for name, _ in items]
            kept = [i for i, label in enumerate(labels) if label >= 0]
            items, labels = [items[i] for i in kept], [labels[i] for i in kept]
    else:
        raise ValueError(f"don't know how to read '{src}': expected an image folder, a .zip of images or an IDX file")
    if not items:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in '{src}'")
    if limit:
        items = items[:limit]
    size, channels = size or 64, channels or 3
    decoded = _decode_items(items, size, channels, crop)
    try:
        if names is not None and labels is not None:
            print(
                f"labels: {len(names)} classes from the subfolders of {src} ({', '.join(names[:5])}"
                + (", ...)" if len(names) > 5 else ")"),
                flush=True,
            )
            decoded = ((name, result, label) for (name, result), label in zip(decoded, labels))
        return _write(decoded, len(items), out, shard_size, str(src), progress, fmt, names)
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


def idx_labels(files: list[Path], counts: list[int], classes: str | None, src: Path) -> tuple[list[str], np.ndarray]:
    """The class names and the labels of IDX image files (`counts` images each), from the label files beside them;
    ([], empty) when none has one or `classes` is "none". ValueError (one line) for label files missing beside
    some image files only, or not matching their images."""
    found = {path: labels_file(path) for path in files}
    if classes == "none" or not any(found.values()):
        return [], np.zeros(0, np.int64)
    missing = [path.name for path, labels in found.items() if labels is None]
    if missing:
        raise ValueError(
            f"{', '.join(missing)} has no label file beside it, the other image files have: add it (the "
            f"{missing[0].replace('images-idx3', 'labels-idx1')} of the same release), or give --classes none"
        )
    names = class_names(classes, src)
    parts = []
    for (path, labels_path), count in zip(found.items(), counts):
        assert labels_path is not None  # checked above
        labels = read_idx_labels(labels_path)
        if len(labels) != count:
            raise ValueError(f"{labels_path} holds {len(labels)} labels for the {count} images of {path.name}")
        if len(labels) and int(labels.max()) >= len(names):
            raise ValueError(
                f"{labels_path}: label {int(labels.max())} has no class name ({len(names)} classes: "
                f"{', '.join(names[:3])}, ...); give --classes with {int(labels.max()) + 1} or more names"
            )
        parts.append(labels.astype(np.int64))
    print(f"labels: {', '.join(p.name for p in found.values() if p)}; classes: {', '.join(names)}", flush=True)
    return names, np.concatenate(parts)


def _convert_idx(src: Path, out, size, crop, shard_size, limit, progress, fmt, classes=None) -> DatasetInfo:
    files = idx_files(src)
    arrays = [read_idx_images(p) for p in files]
    # Read and checked before any shard is written.
    names, labels = idx_labels(files, [len(a) for a in arrays], classes, src)
    images = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    if limit:
        images, labels = images[:limit], labels[:limit]

    def items() -> Iterator[tuple]:
        for i, img in enumerate(images):
            if size and size != img.shape[0] or crop:
                array = centre_crop_resize(array_to_pil(img[:, :, None]), size or img.shape[0], 1, crop)
            else:
                array = img[:, :, None]
            yield (str(i), array, int(labels[i])) if names else (str(i), array)

    return _write(items(), len(images), out, shard_size, str(src), progress, fmt, names or None)


def _write(
    items, total: int, out, shard_size: int, source: str, progress: bool, fmt: str, classes: list[str] | None = None
) -> DatasetInfo:
    """Items are (name, image or the exception that made it unreadable[, label]): labelled when `classes`."""
    skipped = 0
    bar = tqdm(
        total=total, unit="img", desc=f"converting -> {out}", disable=None if progress else True
    )  # None: only on a terminal
    # SIGTERM/SIGINT: the writer removes the shards it wrote (stopping.StoppedBySignal); an error does the same.
    with (
        raise_on_signals(),
        ShardWriter(out, shard_size=shard_size, fmt=fmt, source=source, classes=classes) as writer,
    ):
        for name, result, *label in items:
            if isinstance(result, Exception):
                skipped += 1
                tqdm.write(f"skipping {name}: {type(result).__name__}: {result}")
            else:
                writer.write(result, label[0] if label else None)
            bar.update(1)
        bar.close()
        writer.skipped = skipped
        info = writer.close()
    print(
        f"wrote {info.num_samples} images ({info.image_size}x{info.image_size}x{info.channels}) "
        f"in {info.num_shards} shard(s) to {out}; skipped {skipped} unreadable file(s)"
        + (f"; labelled, {len(info.classes)} classes" if info.classes else "")
    )
    return info
