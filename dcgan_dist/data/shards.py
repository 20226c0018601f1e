"""WebDataset shard format: writing shards, finding them, and decoding their samples.

A shard is a plain tar file (webdataset's TarWriter). Its members' extension records the format, so the loader
needs no flag to read it:
  png (the default, lossless) and jpg: one member per image, `<key>.png` / `<key>.jpg`;
  raw: one member per chunk of up to RAW_CHUNK images, `<key of its first image>.raw.npy`, an N x H x W x C
  uint8 .npy array. Raw costs no decoding and no tar member per image, which is what lets one core deliver
  tens of thousands of images/s; PNG is smaller (docs/performance.md has both measured).
Images are stored at their training size (resized at conversion time), so training never resizes.

Reading, every format gives one sample per image (`iter_samples`), so shuffling, resuming and the counts
of samples per shard treat raw and PNG shards alike.

A shard directory also holds `dataset.json` (sample count, image size, channels, format, source, samples per
shard) so that tools can report epochs and check the model's image size without reading every shard.

Labels. A labelled set's samples carry a class index: a png/jpg sample as the standard WebDataset member
`<key>.cls` (an ASCII integer), a raw chunk as a second member beside its images, `<key>.labels.npy` (an int64
array, one label per image of the chunk). dataset.json then records `classes` (the names, index = label) and
`class_counts` ({name: samples}); an unlabelled set has neither, and its samples no label member.
"""

from __future__ import annotations

import glob
import io
import json
import mmap
import os
import re
import shlex
import shutil
import tarfile
import tempfile
import typing
from collections.abc import Iterable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from dcgan_dist.data.images import IMAGE_SUFFIXES, array_to_pil
from dcgan_dist.storage.filesystem import (
    ObjectReader,
    RunStorage,
    StoreUnreachable,
    check_bucket,
    is_remote,
    store_name,
)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
FORMATS = ("png", "jpg", "raw")  # what `data synth/convert --format` writes
RAW_EXTENSION = "raw.npy"  # a raw shard's member: a chunk of images as one N x H x W x C uint8 .npy array
# Images per raw member: enough that the tar reader's cost per member (tens of microseconds) is small per image,
# few enough that a truncated shard loses little and a chunk of 64x64 RGB images stays ~3 MiB.
RAW_CHUNK = 256
LABEL_EXTENSION = "cls"  # a png/jpg sample's label: the standard WebDataset member, an ASCII integer
RAW_LABELS_EXTENSION = "labels.npy"  # a raw chunk's labels: an int64 array, one per image of the chunk
META_FILE = "dataset.json"
# While `data synth`/`convert` writes a folder its dataset.json holds only this key; the real one replaces it last.
# A folder whose dataset.json still says so holds what a stopped or killed conversion left: it is refused.
# (A placeholder rather than a separate mark file: deleting an object in a store makes pyarrow put an empty
# "directory" object in its place.)
UNFINISHED_KEY = "unfinished"
UNFINISHED_NOTE = (
    "a `python -m dcgan_dist.data synth/convert` is writing this folder, or was stopped before it "
    "finished: then delete the folder and run it again"
)
SHARD_PATTERN = "shard-%06d.tar"


@dataclass
class DatasetInfo:
    num_samples: int
    image_size: int
    channels: int
    format: str
    num_shards: int
    source: str = ""
    skipped: int = 0
    extra: dict = field(default_factory=dict)
    # Samples written into each shard (file name -> count): the loader and `data inspect` check what they read
    # against it, so a truncated shard is reported instead of silently shrinking the data set.
    shard_counts: dict = field(default_factory=dict)
    # A labelled set: the class names (index = label) and the samples of each class; both empty (and absent from
    # dataset.json) when the samples carry no labels.
    classes: list = field(default_factory=list)
    class_counts: dict = field(default_factory=dict)

    def to_json(self) -> str:
        """dataset.json's text: `classes` and `class_counts` only for a labelled set."""
        data = asdict(self)
        if not self.classes:
            del data["classes"], data["class_counts"]
        return json.dumps(data, indent=2) + "\n"


# dataset.json's fields and the type each must have (int, str, dict, list), checked when it is read.
_FIELD_TYPES = typing.get_type_hints(DatasetInfo)


def encode_image(array: np.ndarray, fmt: str = "png") -> bytes:
    """H x W x C (C = 1 or 3) uint8 -> PNG or JPEG bytes."""
    image = array_to_pil(array)
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=3)
    elif fmt in ("jpg", "jpeg"):
        image.save(buf, format="JPEG", quality=95)
    else:
        raise ValueError(f"unknown image format '{fmt}' (png or jpg)")
    return buf.getvalue()


def check_format(fmt: str) -> None:
    if fmt not in (*FORMATS, "jpeg"):
        raise ValueError(f"unknown shard format '{fmt}': use one of {', '.join(FORMATS)}")


def encode_raw_chunk(images: np.ndarray) -> bytes:
    """N x H x W x C uint8 -> the bytes of a raw member (.npy)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(images), allow_pickle=False)
    return buf.getvalue()


def encode_raw_labels(labels: np.ndarray) -> bytes:
    """N int labels -> the bytes of a raw chunk's labels member (.npy, int64)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(labels, dtype=np.int64), allow_pickle=False)
    return buf.getvalue()


def read_raw_labels(data: bytes, count: int) -> np.ndarray:
    """The bytes of a raw chunk's labels member -> its `count` int64 labels; ValueError for anything else."""
    try:
        labels = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises several kinds for damaged bytes
        raise ValueError(f"labels are not a .npy array: {exc}") from None
    if labels.dtype.kind not in "iu" or labels.shape != (count,):
        raise ValueError(f"expected {count} integer labels, got {labels.shape} {labels.dtype}")
    return labels.astype(np.int64)


def read_raw_chunk(data: bytes) -> np.ndarray:
    """The bytes of a raw member -> N x H x W x C uint8 array, a read-only view of `data` (no copy).
    Raises ValueError for anything else (a damaged header, another dtype or shape, too few bytes)."""
    # The header alone (a bytearray given to BytesIO would be copied whole, 3 MiB for a chunk of 64x64 RGB images).
    stream = io.BytesIO(bytes(memoryview(data)[: 1 << 16]))
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
    except Exception as exc:  # noqa: BLE001 - numpy's header parser raises several kinds for damaged bytes
        raise ValueError(f"not a .npy array: {exc}") from None
    if dtype != np.uint8 or fortran_order or len(shape) != 4 or shape[3] not in (1, 3):
        raise ValueError(f"expected an N x H x W x C (C = 1 or 3) uint8 array in C order, got {shape} {dtype}")
    size = int(np.prod(shape))
    if len(data) - stream.tell() != size:
        raise ValueError(f"{shape} needs {size} bytes of pixels, the member holds {len(data) - stream.tell()}")
    return np.frombuffer(data, np.uint8, count=size, offset=stream.tell()).reshape(shape)


# 16-bit greyscale as Pillow opens it (a 16-bit PNG is I;16; other decoders give I): scaled to 8 bits, not clipped.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_GREY_MODES = ("1", "LA", "La")  # -> L (alpha dropped)
_COLOUR_MODES = ("P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")  # -> RGB (alpha dropped, palette applied)


def _grey_palette(image: Image.Image) -> bool:
    """A palette image whose colours are all grey (how some tools save greyscale PNGs): one channel, not three."""
    palette = np.asarray(image.getpalette() or [], dtype=np.int32).reshape(-1, 3)
    return len(palette) > 0 and bool((palette == palette[:, :1]).all())


def image_to_array(image: Image.Image) -> np.ndarray:
    """A decoded PIL image -> H x W x C uint8: greyscale modes (and a palette of greys) give one channel, colour
    modes three. Raises
    ValueError for a mode with no faithful 8-bit form (float, LAB, HSV, ...)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        array = ((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8)  # 0..65535 -> 0..255, rounded
    elif mode in ("L", "RGB"):
        array = np.asarray(image)
    elif mode in _GREY_MODES or (mode in ("P", "PA") and _grey_palette(image)):
        array = np.asarray(image.convert("L"))
    elif mode in _COLOUR_MODES:
        array = np.asarray(image.convert("RGB"))
    else:
        raise ValueError(f"unsupported image mode {mode}")
    return array[:, :, None] if array.ndim == 2 else array


def decode_sample(sample: dict) -> np.ndarray:
    """A WebDataset sample dict -> H x W x C uint8 array (C = 1 for greyscale, 3 for RGB; image_to_array).

    Raises ValueError for a sample with no image, undecodable bytes or an unsupported mode; the caller counts and
    skips it. MemoryError is not a property of the sample: it propagates.
    """
    image = sample.get("raw")  # an image of a raw chunk, already an array (iter_samples)
    if image is not None:
        return image
    if "__error__" in sample:  # a raw chunk that could not be read
        raise ValueError(f"sample '{sample.get('__key__')}' in {sample.get('__url__')}: {sample['__error__']}")
    for ext in IMAGE_EXTENSIONS:
        data = sample.get(ext)
        if data is not None:
            break
    else:
        raise ValueError(
            f"sample '{sample.get('__key__')}' in {sample.get('__url__')} has no image ({', '.join(IMAGE_EXTENSIONS)})"
        )
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image_to_array(image)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for damaged bytes
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(
            f"sample '{sample.get('__key__')}' in {sample.get('__url__')}: cannot decode: {reason}"
        ) from None


def decode_label(sample: dict) -> int | None:
    """A sample's class label (its `.cls` member, or its raw chunk's labels), None when it carries none. Raises
    ValueError for a `.cls` member that is not a whole number >= 0."""
    label = sample.get("label")  # an image of a raw chunk (iter_samples)
    if label is not None:
        return int(label)
    data = sample.get(LABEL_EXTENSION)
    if data is None:
        return None
    text = data.decode("ascii", "replace").strip() if isinstance(data, bytes) else str(data).strip()
    if not text.isdigit():
        raise ValueError(
            f"sample '{sample.get('__key__')}' in {sample.get('__url__')}: its label (.cls) is {text[:20]!r}, "
            "not a class number"
        )
    return int(text)


class ShardTar:
    """One shard's tar file being written: images in, members out (one per image for png/jpg; for raw one per
    chunk of `raw_chunk` images, and the last, shorter chunk on close). Keys are the images' indices in the set.
    A label (class index) goes with every image of a labelled set, or with none."""

    def __init__(self, path: str | Path, fmt: str = "png", raw_chunk: int = RAW_CHUNK):
        check_format(fmt)
        self.fmt, self.raw_chunk = fmt, raw_chunk
        self._tar = wds.TarWriter(str(path))
        self._chunk: list[np.ndarray] = []
        self._labels: list[int] = []
        self._chunk_start = 0

    def write(self, index: int, array: np.ndarray, label: int | None = None) -> None:
        """Image number `index` of the data set (its key), H x W x C uint8, with its class index if labelled."""
        if self.fmt != "raw":
            sample = {"__key__": f"{index:09d}", self.fmt: encode_image(array, self.fmt)}
            if label is not None:
                sample[LABEL_EXTENSION] = str(int(label)).encode()
            self._tar.write(sample)
        else:
            if not self._chunk:
                self._chunk_start = index
            elif (label is None) != (not self._labels):
                raise ValueError("a raw chunk's images are all labelled or none is")
            self._chunk.append(array)
            if label is not None:
                self._labels.append(int(label))
            if len(self._chunk) == self.raw_chunk:
                self._write_chunk()

    def _write_chunk(self) -> None:
        sample = {"__key__": f"{self._chunk_start:09d}", RAW_EXTENSION: encode_raw_chunk(np.stack(self._chunk))}
        if self._labels:
            sample[RAW_LABELS_EXTENSION] = encode_raw_labels(np.array(self._labels))
        self._tar.write(sample)
        self._chunk, self._labels = [], []

    def close(self) -> None:
        if self._chunk:
            self._write_chunk()
        self._tar.close()

    def __enter__(self) -> ShardTar:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


class ShardWriter:
    """Writes H x W x C uint8 images into numbered shards in `out_dir`, then `dataset.json`.

    Use as a context manager; `write` takes one image at a time, keys are the running sample index.
    fmt: png, jpg or raw (see the module's docstring); raw_chunk: images per raw member. classes: the class names
    of a labelled set (then every `write` gives a label, 0 <= label < len(classes)); None: unlabelled.
    """

    def __init__(
        self,
        out_dir: str | Path,
        shard_size: int = 1000,
        fmt: str = "png",
        source: str = "",
        raw_chunk: int = RAW_CHUNK,
        classes: list[str] | None = None,
    ):
        if shard_size < 1 or raw_chunk < 1:
            raise ValueError("shard_size and raw_chunk must be at least 1")
        check_format(fmt)
        self.out = ShardOutput(str(out_dir))
        self.fmt, self.source, self.shard_size, self.raw_chunk = fmt, source, shard_size, raw_chunk
        self.count = 0
        self.shape: tuple[int, ...] | None = None
        self.skipped = 0
        self.shard_counts: dict[str, int] = {}
        self.classes = list(classes) if classes else None
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"class names must be distinct: {self.classes}")
        self.label_counts = [0] * len(self.classes or [])
        self._tar: ShardTar | None = None

    def write(self, array: np.ndarray, label: int | None = None) -> None:
        if array.ndim != 3 or array.dtype != np.uint8:
            raise ValueError(f"expected H x W x C uint8, got {array.shape} {array.dtype}")
        if (label is None) != (self.classes is None):
            raise ValueError("a labelled set (classes given) takes a label with every image, an unlabelled one none")
        if label is not None and not 0 <= label < len(self.label_counts):
            raise ValueError(f"label {label} of image {self.count} is not one of the {len(self.label_counts)} classes")
        if self.shape is None:
            self.shape = array.shape
        elif array.shape != self.shape:
            raise ValueError(f"image {self.count} has shape {array.shape}, the first had {self.shape}")
        if self.count % self.shard_size == 0:  # the next shard
            self._close_tar()
            name = SHARD_PATTERN % len(self.shard_counts)
            self._tar, self._name = ShardTar(self.out.staging / name, self.fmt, self.raw_chunk), name
            self.shard_counts[name] = 0
        assert self._tar is not None  # opened above at the first image of every shard
        self._tar.write(self.count, array, label)
        if label is not None:
            self.label_counts[label] += 1
        self.shard_counts[self._name] += 1
        self.count += 1

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            self.out.finished(self._name)

    def close(self) -> DatasetInfo:
        self._close_tar()
        if self.count == 0 or self.shape is None:  # the shape is the first image's
            raise ValueError("no images were written")
        info = DatasetInfo(
            num_samples=self.count,
            image_size=int(self.shape[0]),
            channels=int(self.shape[2]),
            format=self.fmt,
            num_shards=len(self.shard_counts),
            source=self.source,
            skipped=self.skipped,
            shard_counts=dict(self.shard_counts),
            classes=list(self.classes or []),
            class_counts=dict(zip(self.classes or [], self.label_counts)),
        )
        self.out.close(info)
        return info

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            unfinished = [self._name] if self._tar is not None else []
            if self._tar is not None:
                self._tar.close()
                self._tar = None
            self.out.discard(unfinished)


class ShardOutput:
    """Where new shards go: a local folder, written in place, or s3://bucket/prefix, each shard written to a
    local staging folder and uploaded as soon as it is complete (so staging holds a few shards at most).
    Refuses a place that already holds shards. A placeholder dataset.json ({UNFINISHED_KEY: ...}) is written
    first and the real one last, in its place: shards that a killed conversion left are never taken for a data
    set. `discard` (an error, a stop) removes what this output wrote. A bucket that does not exist yet is created
    (the one command that does: training, sample, evaluate and inspect never create buckets)."""

    def __init__(self, out: str):
        self.storage = RunStorage(out)
        if self.storage.remote and check_bucket(out, create=True):
            print(f"created bucket '{out[len('s3://') :].split('/')[0]}' at {store_name()}", flush=True)
        existing = [name for name, is_dir in self.storage.list("") if not is_dir and name.endswith(".tar")]
        if existing:
            raise FileExistsError(f"{self.storage.location} already holds {len(existing)} shards; choose an empty one")
        local = self.storage.local_dir()  # None for an object store
        if local is None:
            self.staging = Path(tempfile.mkdtemp(prefix="dcgan-shards-"))
        else:
            self.staging = local
            self.staging.mkdir(parents=True, exist_ok=True)
        self.storage.write(META_FILE, (json.dumps({UNFINISHED_KEY: UNFINISHED_NOTE}) + "\n").encode())
        self.written: list[str] = []

    def finished(self, name: str) -> None:
        """Shard `name` is complete in the staging folder."""
        self.written.append(name)
        if self.storage.remote:
            self.storage.upload(self.staging / name, name)
            (self.staging / name).unlink()

    def close(self, info: DatasetInfo) -> None:
        self.storage.write(META_FILE, info.to_json().encode())
        self._drop_staging()

    def discard(self, unfinished: Iterable[str] = ()) -> None:
        """The output is abandoned: the shards it wrote (and `unfinished` ones in staging) and the placeholder go."""
        for name in [*self.written, *unfinished, META_FILE]:
            self.storage.delete(name)
            if self.storage.remote:
                (self.staging / name).unlink(missing_ok=True)
        self._drop_staging()

    def _drop_staging(self) -> None:
        if self.storage.remote:
            shutil.rmtree(self.staging, ignore_errors=True)


def is_url(spec: str) -> bool:
    """A location that is neither a local path nor an object store prefix (pipe:, http://, ...)."""
    return not is_remote(spec) and ("://" in spec or spec.startswith("pipe:"))


def _is_folder(part: str) -> bool:
    """A local directory, or an s3:// prefix that is not a single .tar object."""
    return (is_remote(part) and not part.endswith(".tar")) or os.path.isdir(os.path.expanduser(part))


def _folder_of(part: str) -> str:
    """The folder (path or s3:// prefix) that holds a spec part's shards and dataset.json."""
    return os.path.expanduser(part).rstrip("/") if _is_folder(part) else os.path.dirname(expand_shards(part)[0])


class ImagesNotShards(FileNotFoundError):
    """data.shards names image files (a folder of JPEGs, a glob of PNGs), not the tar shards training reads: the
    message gives the `data convert` command that makes shards of them."""

    def __init__(self, given: str, source: str, size: int = 64):
        self.given, self.source, self.size = given, source, size
        out = f"{source.rstrip('/')}-shards"
        # The command last on the line, so that it pastes as it is.
        super().__init__(
            f"'{given}' holds image files, not .tar shards; convert them (then set "
            f"data.shards={shlex.quote(out)}): python -m dcgan_dist.data convert --src {shlex.quote(source)} "
            f"--out {shlex.quote(out)} --size {size}"
        )

    def for_size(self, size: int) -> ImagesNotShards:
        return ImagesNotShards(self.given, self.source, size)


def _is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def expand_shards(spec: str) -> list[str]:
    """Shard spec -> list of URLs/paths.

    Accepts a directory (all *.tar inside, sorted), a glob (`data/*.tar`), a brace pattern
    (`data/shard-{000000..000009}.tar`), a `pipe:` command or URL, and several of these joined by '::'.
    """
    urls: list[str] = []
    for part in wds.shardlists.expand_urls(spec):
        if is_url(part) or (is_remote(part) and part.endswith(".tar")):
            if is_remote(part):
                check_bucket(part)
            urls.append(part)
        elif is_remote(part):  # a prefix: the .tar objects directly in it
            check_bucket(part)
            storage = RunStorage(part)
            found = sorted(
                storage.where(name) for name, is_dir in storage.list("") if not is_dir and name.endswith(".tar")
            )
            if not found:
                raise FileNotFoundError(f"no .tar shards in '{part}'")
            urls.extend(found)
        elif os.path.isdir(part):
            found = sorted(str(p) for p in Path(part).glob("*.tar"))
            if not found and any(p.is_file() and _is_image(p) for p in Path(part).expanduser().rglob("*")):
                raise ImagesNotShards(part, part)
            if not found:
                raise FileNotFoundError(f"no .tar shards in directory '{part}'")
            urls.extend(found)
        elif any(ch in part for ch in "*?["):
            found = sorted(glob.glob(os.path.expanduser(part)))
            if not found:
                raise FileNotFoundError(f"no shards match '{part}'")
            pictures = [p for p in found if _is_image(p)]  # read as tar they would fail with 'bad checksum'
            if pictures and len(pictures) == len(found):
                raise ImagesNotShards(part, os.path.dirname(found[0]) or ".")
            if pictures:  # shards and images alike (a preview.png beside the shards, say)
                raise FileNotFoundError(
                    f"'{part}' matches image files as well as shards ({os.path.basename(pictures[0])}"
                    f"{f' and {len(pictures) - 1} more' if len(pictures) > 1 else ''}): match "
                    f"only the shards, e.g. {os.path.join(os.path.dirname(found[0]), '*.tar')}"
                )
            urls.extend(found)
        else:
            path = os.path.expanduser(part)
            if not os.path.exists(path):
                raise FileNotFoundError(f"shard '{part}' does not exist")
            if _is_image(path):
                raise ImagesNotShards(part, os.path.dirname(path) or ".")
            urls.append(path)
    if not urls:
        raise FileNotFoundError(f"no shards in '{spec}'")
    return urls


def read_info(spec: str) -> DatasetInfo | None:
    """dataset.json beside the shards of a spec's first part (its directory or prefix, or the folder of its first
    shard), if there is one; None for pipe:/http URLs. Keys this version does not know are ignored one by one
    (a newer writer's extras); a file that is not JSON or lacks a required key raises ValueError."""
    first = spec.split("::")[0]
    if is_url(first):
        return None
    folder = RunStorage(_folder_of(first))
    if not folder.is_file(META_FILE):
        return None
    where = folder.where(META_FILE)
    try:
        data = json.loads(folder.read(META_FILE))
    except ValueError as exc:
        raise ValueError(
            f"{where} is not valid JSON ({exc}); fix it, or delete it (the shards load without it)"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{where} does not hold a JSON object; fix it, or delete it (the shards load without it)")
    if UNFINISHED_KEY in data:
        raise ValueError(
            f"{folder.location} holds what a stopped `python -m dcgan_dist.data synth/convert` left (its "
            "dataset.json was never written): delete it and run that command again"
        )
    known = {f.name for f in fields(DatasetInfo)}
    required = [f.name for f in fields(DatasetInfo) if f.default is MISSING and f.default_factory is MISSING]
    absent = [name for name in required if name not in data]
    if absent:
        raise ValueError(f"{where} lacks {', '.join(absent)}; fix it, or delete it (the shards load without it)")
    kept = {key: value for key, value in data.items() if key in known}
    for key, value in kept.items():
        wanted = {int: "a whole number >= 0", str: "a string", dict: "a JSON object", list: "a list"}[_FIELD_TYPES[key]]
        if key == "classes":
            wanted = "a list of distinct class names"
        if (
            not isinstance(value, _FIELD_TYPES[key])
            or isinstance(value, bool)
            or (isinstance(value, int) and value < 0)
            or (
                key in ("shard_counts", "class_counts")
                and not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value.values())
            )
            or (key == "classes" and (not all(isinstance(c, str) for c in value) or len(set(value)) != len(value)))
        ):
            raise ValueError(
                f"{where}: '{key}' should be {wanted}, it is {json.dumps(value)[:80]}; fix it, or delete "
                "it (the shards load without it)"
            )
    return DatasetInfo(**kept)


def read_classes(shards: str) -> list[str] | None:
    """The class names of a shard set (index = label), from its dataset.json files; None when unlabelled (or a
    URL without one). Reads dataset.json only. Parts of a '::'-joined spec must agree: labelled parts with other
    classes, or labelled and unlabelled parts together, raise ValueError (one line)."""
    found = {part: (info.classes if info is not None else []) for part, info in spec_parts(shards)}
    distinct = {tuple(classes) for classes in found.values()}
    if len(distinct) > 1:
        described = "; ".join(f"{part}: {', '.join(c) if c else 'unlabelled'}"[:120] for part, c in found.items())
        raise ValueError(
            f"the '::'-joined parts have different classes ({described}): join only sets "
            "labelled alike (or unlabelled ones)"
        )
    classes = next(iter(distinct))
    return list(classes) if classes else None


def spec_parts(spec: str) -> list[tuple[str, DatasetInfo | None]]:
    """Each '::'-joined part of a shard spec with the dataset.json beside its shards (None for URLs, or none)."""
    return [(part, None if is_url(part) else read_info(part)) for part in spec.split("::")]


def shard_counts(spec: str) -> tuple[dict[str, int], list[str]]:
    """({shard path: samples written}, [shards that dataset.json lists but the spec's directories no longer
    hold]) over every part of a spec, as their dataset.json files record them."""
    counts, missing = {}, []
    for part, info in spec_parts(spec):
        if info is None or not info.shard_counts:
            continue
        folder, present = _folder_of(part), set(expand_shards(part))
        for name, count in info.shard_counts.items():
            path = f"{folder}/{name}"
            counts[path] = count
            if _is_folder(part) and path not in present:  # a glob or brace pattern may pick a subset on purpose
                missing.append(path)
    return counts, missing


def _open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_):
    """webdataset's opener for s3:// shards: the object read in 4 MiB ranged GETs (storage/filesystem.py says
    which store)."""
    if mode != "rb":
        raise ValueError(f"{url}: shards in an object store are read here, written with `data synth/convert --out`")
    return io.BufferedReader(ObjectReader(url), buffer_size=4 << 20)


# webdataset has no s3:// scheme of its own; its table of openers is the documented place to add one.
wds.gopen_schemes.setdefault("s3", _open_s3)


def _stopping_when_store_unreachable(handler):
    """webdataset's error handler for a shard, except that an object store which stopped answering (after the
    storage timeout) stops the reading: the shard is not bad, and every other one would wait as long."""

    def handle(exc: Exception) -> bool:
        if isinstance(exc, StoreUnreachable):
            raise exc
        return handler(exc)

    return handle


def iter_samples(urls: Iterable[str], handler=wds.handlers.reraise_exception) -> Iterator[dict]:
    """One sample per image from shards, in order, through webdataset's tar reader. A png/jpg sample is a dict of
    bytes keyed by extension; a raw chunk becomes one sample per image with "raw": its H x W x C uint8 array,
    keyed `<chunk key>/<i>`. Every sample has "__url__", "__key__" and "__index__", its ordinal in its shard
    (0, 1, ... in the order the shard holds them); an image of a labelled raw chunk has "label" (an int), a
    png/jpg sample its ".cls" member as written (decode_label reads either). A raw chunk that cannot be read is
    one sample with "__error__" (decode_sample raises it); an unreadable tar goes to `handler`, as webdataset
    does."""
    handler = _stopping_when_store_unreachable(handler)
    for url in urls:
        index = 0
        for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=handler):
            chunk = sample.get(RAW_EXTENSION)
            if chunk is None:
                sample["__index__"] = index
                index += 1
                yield sample
                continue
            try:
                images = read_raw_chunk(chunk)
                labels_data = sample.get(RAW_LABELS_EXTENSION)
                labels = None if labels_data is None else read_raw_labels(labels_data, len(images))
            except ValueError as exc:
                yield {
                    "__key__": sample["__key__"],
                    "__url__": url,
                    "__index__": index,
                    "__error__": f"raw chunk: {exc}",
                }
                index += 1
                continue
            key = sample["__key__"]
            for i in range(len(images)):
                # Each image is copied out of its chunk (12 KB at 64x64 RGB, about a microsecond): a view would keep
                # the whole chunk alive while the shuffle buffer holds any of its images (64x64 RGB, buffer of 5,000:
                # 172 MB more resident memory with views, 90 MB with copies; no difference in speed measured).
                image = {"__key__": f"{key}/{i}", "__url__": url, "__index__": index + i, "raw": images[i].copy()}
                if labels is not None:
                    image["label"] = int(labels[i])
                yield image
            index += len(images)


@dataclass
class RawChunk:
    """One raw member of a shard as the loader's chunk path reads it: `images` N x H x W x C uint8 (None when the
    member could not be read: `error` says why), `labels` its N int64 labels (None: unlabelled, or unreadable:
    `label_error`), `first` the shard ordinal of its first image (its images are `first`, `first` + 1, ...)."""

    url: str
    key: str
    first: int
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    error: str | None = None
    label_error: str | None = None

    @property
    def count(self) -> int:
        """Ordinals the chunk takes in its shard (a damaged member takes one, as iter_samples gives it)."""
        return 1 if self.images is None else len(self.images)


_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's <key>.<extension> split


# Local raw shards mapped into this process's memory, kept across passes (mapping anew costs a page fault per
# 4 KiB on each pass, as much as copying the images out): path -> ((device, inode, size, mtime), mapping). Page
# cache, not memory of the process's own: the kernel drops it under pressure and reads it again. A file replaced
# or changed in size is mapped again; beyond MAPPED_FILES the oldest mapping is let go (a mapped file that was
# deleted keeps its disk space until then).
_MAPPED: dict[str, tuple[tuple[int, int, int, int], memoryview]] = {}
MAPPED_FILES = 256


def _mapped(path: str, file) -> memoryview:
    info = os.fstat(file.fileno())
    stamp = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    known = _MAPPED.get(path)
    if known is None or known[0] != stamp:
        _MAPPED.pop(path, None)
        while len(_MAPPED) >= MAPPED_FILES:
            del _MAPPED[next(iter(_MAPPED))]  # unmapped once the last chunk viewing it is gone
        known = _MAPPED[path] = (stamp, memoryview(mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ)))
    return known[1]


def _local_members(path: str) -> Iterator[tuple[str, memoryview]]:
    """(name, data) of a local tar file's regular members, `data` a view of the file mapped into memory (_mapped):
    the loader's one copy of an image is the batch's, straight from the page cache (webdataset's stream reader
    costs ~5 ms per 3 MiB member). Raises tarfile.ReadError (truncated, not a tar) or OSError."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            return
        mapped = _mapped(path, file)
        with tarfile.open(fileobj=file, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    raise tarfile.ReadError("unexpected end of data")
                yield member.name, mapped[member.offset_data : member.offset_data + member.size]


def _grouped(members: Iterable[tuple[str, bytes | memoryview]]) -> Iterator[dict]:
    """Consecutive members with the same key -> one sample dict {"__key__": key, extension: data}."""
    sample: dict | None = None
    members = iter(members)
    while True:
        try:
            name, data = next(members)
        except StopIteration:
            break
        except Exception:  # a damaged shard: what it held before the damage is given first
            if sample is not None:
                yield sample
            raise
        match = _MEMBER.match(name)
        if match is None:
            continue
        key, ext = match.groups()
        if sample is not None and sample["__key__"] != key:
            yield sample
            sample = None
        sample = sample or {"__key__": key}
        sample[ext] = data
    if sample is not None:
        yield sample


def iter_raw_chunks(urls: Iterable[str], handler=wds.handlers.reraise_exception) -> Iterator[RawChunk]:
    """A raw set's shards as whole chunks (no per-image Python): local files through a direct tar reader, other
    locations through webdataset's. Ordinals as iter_samples gives them; a member that is no raw chunk (or a
    damaged one) is a RawChunk with `error`; an unreadable tar goes to `handler` (exception args: reason, url)."""
    handler = _stopping_when_store_unreachable(handler)
    for url in urls:
        index = 0
        local = not is_url(url) and not is_remote(url)
        stamp = _stamp(os.path.expanduser(url)) if local else None
        known = _PARSED.get(url)
        if stamp is not None and known is not None and known[0] == stamp:  # read in an earlier pass: no parsing
            yield from known[1]
            if known[2] is not None and not handler(tarfile.ReadError(known[2], url)):
                return
            continue
        if local:
            samples = _grouped(_local_members(os.path.expanduser(url)))
        else:
            samples = wds.tariterators.tarfile_samples([{"url": url}], handler=handler)
        parsed: list[RawChunk] = []
        try:
            for sample in samples:
                chunk = RawChunk(url, sample["__key__"], index)
                data = sample.get(RAW_EXTENSION)
                try:
                    if data is None:
                        raise ValueError(f"no {RAW_EXTENSION} member in a raw set")
                    chunk.images = read_raw_chunk(data)
                except ValueError as exc:
                    chunk.error = f"sample '{chunk.key}' in {url}: raw chunk: {exc}"
                if chunk.images is not None and sample.get(RAW_LABELS_EXTENSION) is not None:
                    try:
                        chunk.labels = read_raw_labels(sample[RAW_LABELS_EXTENSION], len(chunk.images))
                    except ValueError as exc:
                        chunk.label_error = f"sample '{chunk.key}' in {url}: {exc}"
                index += chunk.count
                parsed.append(chunk)
                yield chunk
        except (tarfile.TarError, OSError, EOFError) as exc:
            if not local:
                raise
            reason = str(exc) or type(exc).__name__
            if stamp is not None:
                _remember(url, (stamp, parsed, reason))
            if not handler(tarfile.ReadError(reason, url)):
                return
            continue
        if stamp is not None:
            _remember(url, (stamp, parsed, None))


# A local raw shard's chunks as the last pass read them (views of its mapping), with the error that ended the
# reading, if one did: path -> (stamp, chunks, error). Later passes skip the tar and .npy parsing (~1 us an image).
_PARSED: dict[str, tuple[tuple[int, int, int, int], list[RawChunk], str | None]] = {}


def _stamp(path: str) -> tuple[int, int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _remember(url: str, entry: tuple) -> None:
    _PARSED.pop(url, None)
    while len(_PARSED) >= MAPPED_FILES:
        del _PARSED[next(iter(_PARSED))]
    _PARSED[url] = entry
