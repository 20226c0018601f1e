"""Labels through the data pipeline: IDX label files and class folders converted, synthetic labels, dataset.json's
classes, read_classes, the loader's (images, labels) batches, inspect's counts; the data dead ends and the loader
worker cap. Small in-process tests on real shards, plus the CLI's exit code where the promise is the command's."""

import gzip
import json
import logging
import shlex
import struct
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan_dist.cli.data import main as data_main
from dcgan_dist.data import ImageBatches, ShardWriter, read_info, synth, write_synthetic_shards
from dcgan_dist.data import loader as loader_module
from dcgan_dist.data.convert import FASHION_MNIST_CLASSES, MNIST_CLASSES, convert
from dcgan_dist.data.inspect import inspect
from dcgan_dist.data.loader import check_shards
from dcgan_dist.data.shards import ImagesNotShards, decode_label, expand_shards, iter_samples, read_classes

from .conftest import run_cli


def write_idx_images(path: Path, images: np.ndarray) -> None:
    payload = struct.pack(">IIII", 0x00000803, *images.shape) + images.tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_idx_labels(path: Path, labels, count: int | None = None, magic: int = 0x00000801) -> None:
    labels = np.asarray(labels, dtype=np.uint8)
    payload = struct.pack(">II", magic, len(labels) if count is None else count) + labels.tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def tagged_digits(n: int, start: int = 0) -> np.ndarray:
    """n random 28x28 images whose first pixel is their index (start + i): the label can be checked per image."""
    images = np.random.default_rng(start).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(start, start + n)
    return images


def all_batches(spec: str, batch: int, total: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pass of a set: (images, labels) of `total` samples."""
    loader = ImageBatches(spec, batch, shuffle_buffer=4, **kwargs)
    try:
        got = [next(loader) for _ in range(total // batch)]
    finally:
        loader.close()
    labels = [b[1] for b in got]
    return torch.cat([b[0] for b in got]), (None if labels[0] is None else torch.cat(labels))


def mnist(folder: Path, train_labels, test_labels=None, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """train-* (and t10k-*) IDX images and labels in `folder`, as the MNIST download names them."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    train = tagged_digits(len(train_labels))
    write_idx_images(folder / f"train-images-idx3-ubyte{suffix}", train)
    write_idx_labels(folder / f"train-labels-idx1-ubyte{suffix}", train_labels)
    if test_labels is None:
        return train, np.asarray(train_labels)
    test = tagged_digits(len(test_labels), start=len(train_labels))
    write_idx_images(folder / "t10k-images-idx3-ubyte", test)  # uncompressed beside compressed: both read
    write_idx_labels(folder / "t10k-labels-idx1-ubyte", test_labels)
    return np.concatenate([train, test]), np.concatenate([train_labels, test_labels])


@pytest.mark.parametrize("fmt", ["png", "raw"])
def test_convert_idx_with_label_files(tmp_path, fmt):
    labels_train, labels_test = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], [9, 7, 9, 3]
    images, labels = mnist(tmp_path / "mnist", labels_train, labels_test)
    info = convert(tmp_path / "mnist", tmp_path / "out", shard_size=5, progress=False, fmt=fmt)
    assert info.classes == MNIST_CLASSES
    on_disk = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert on_disk["classes"] == MNIST_CLASSES
    assert on_disk["class_counts"] == {str(d): int((labels == d).sum()) for d in range(10)}
    assert read_classes(str(tmp_path / "out")) == MNIST_CLASSES
    got, got_labels = all_batches(str(tmp_path / "out"), 4, len(images), expect_chw=(1, 28, 28))
    # Each image (tagged by its first pixel) carries its own label, whichever shard and order it came in.
    assert sorted(zip(got[:, 0, 0, 0].tolist(), got_labels.tolist())) == list(enumerate(labels.tolist()))


def test_idx_class_names_fashion_by_path_or_option(tmp_path):
    mnist(tmp_path / "FashionMNIST" / "raw", [0, 9, 7, 7])
    info = convert(tmp_path / "FashionMNIST" / "raw", tmp_path / "fashion", progress=False)
    assert info.classes == FASHION_MNIST_CLASSES and info.class_counts["Sneaker"] == 2
    assert info.class_counts["Ankle boot"] == info.class_counts["T-shirt/top"] == 1
    mnist(tmp_path / "plain", [0, 1, 2, 1])
    named = convert(tmp_path / "plain", tmp_path / "named", progress=False, classes="zero,one,two")
    assert named.classes == ["zero", "one", "two"] and named.class_counts == {"zero": 1, "one": 2, "two": 1}
    unlabelled = convert(tmp_path / "plain", tmp_path / "unlabelled", progress=False, classes="none")
    assert unlabelled.classes == [] and read_classes(str(tmp_path / "unlabelled")) is None
    assert "classes" not in json.loads((tmp_path / "unlabelled" / "dataset.json").read_text())


def bad_label_sources(root: Path) -> dict[str, Path]:
    """Sources whose label files are wrong, each in its own folder."""
    sources = {}
    for case in ("count", "class", "truncated", "one missing", "not labels"):
        folder = root / case.replace(" ", "-")
        folder.mkdir(parents=True)
        write_idx_images(folder / "train-images-idx3-ubyte", tagged_digits(6))
        sources[case] = folder
    write_idx_labels(sources["count"] / "train-labels-idx1-ubyte", [1, 2, 3, 4, 5])  # 5 labels for 6 images
    write_idx_labels(sources["class"] / "train-labels-idx1-ubyte", [1, 2, 3, 4, 5, 10])  # no class 10 of 10
    write_idx_labels(sources["truncated"] / "train-labels-idx1-ubyte", [1, 2, 3], count=6)
    write_idx_labels(sources["one missing"] / "train-labels-idx1-ubyte", [0] * 6)
    write_idx_images(sources["one missing"] / "t10k-images-idx3-ubyte", tagged_digits(2))  # no t10k labels
    write_idx_labels(sources["not labels"] / "train-labels-idx1-ubyte", [0] * 6, magic=0x803)
    return sources


def test_bad_label_files_are_one_line_exit_2_before_any_shard(tmp_path, capsys):
    words = {"count": "5 labels", "class": "label 10", "truncated": "truncated", "one missing": "t10k"}
    words["not labels"] = "not an IDX label file"
    for case, source in bad_label_sources(tmp_path / "src").items():
        out = tmp_path / "out" / case.replace(" ", "-")
        assert data_main(["convert", "--src", str(source), "--out", str(out)]) == 2, case
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and words[case] in lines[0], (case, lines)
        assert not out.exists() or not any(out.iterdir()), case  # no shard, no placeholder


def test_the_bad_label_exit_code_from_the_command_line(tmp_path):
    source = bad_label_sources(tmp_path / "src")["count"]
    proc = run_cli("-m", "dcgan_dist.data", "convert", "--src", str(source), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not list((tmp_path / "out").glob("*.tar")) if (tmp_path / "out").exists() else True


CLASS_COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}


def class_folder(root: Path, per_class: dict[str, int]) -> Path:
    for name, n in per_class.items():
        (root / name / "nested").mkdir(parents=True)
        for i in range(n):  # a few in a nested folder: still the class of their top subfolder
            where = root / name / ("nested" if i % 3 == 2 else "")
            Image.new("RGB", (40, 36), CLASS_COLOURS[name]).save(where / f"{i}.png")
    (root / "empty").mkdir()  # no images: no class
    return root


def test_convert_an_image_folder_with_class_subfolders(tmp_path):
    source = class_folder(tmp_path / "pets", {"emu": 2, "cat": 4, "dog": 3})
    info = convert(source, tmp_path / "out", size=32, shard_size=4, progress=False)
    assert info.classes == ["cat", "dog", "emu"]  # sorted names (ImageFolder), index = label
    assert info.class_counts == {"cat": 4, "dog": 3, "emu": 2}
    images, labels = all_batches(str(tmp_path / "out"), 3, 9, expect_chw=(3, 32, 32))
    colours = [tuple(int(v) for v in image[:, 16, 16]) for image in images]
    expected = [list(CLASS_COLOURS.values())[k] for k in [0, 1, 2]]  # cat, dog, emu by label
    assert all(max(abs(a - b) for a, b in zip(colour, expected[label])) <= 2 for colour, label in zip(colours, labels))
    assert Counter(labels.tolist()) == {0: 4, 1: 3, 2: 2}
    # A folder with images of its own (CelebA's img_align_celeba/) or one subfolder only stays unlabelled.
    Image.new("RGB", (40, 40)).save(source / "loose.png")
    assert convert(source, tmp_path / "mixed", size=32, progress=False).classes == []
    assert convert(source / "cat", tmp_path / "one", size=32, progress=False).classes == []
    (source / "loose.png").unlink()
    assert convert(source, tmp_path / "none", size=32, progress=False, classes="none").classes == []


def test_images_given_as_shards_convert_with_their_classes(tmp_path):
    """data.shards= a folder of class folders: the one line's command makes labelled shards of them."""
    source = class_folder(tmp_path / "pets", {"cat": 2, "dog": 2})
    with pytest.raises(ImagesNotShards) as caught:
        check_shards(str(source), (3, 32, 32))
    message = str(caught.value)
    assert "\n" not in message
    command = shlex.split(message[message.index("python -m dcgan_dist.data convert") :])
    assert command[:4] == ["python", "-m", "dcgan_dist.data", "convert"] and "--size" in command
    assert data_main(command[3:]) == 0  # after "python -m dcgan_dist.data"
    out = command[command.index("--out") + 1]
    assert read_info(out).image_size == 32 and read_classes(out) == ["cat", "dog"]


@pytest.mark.parametrize("labels, fmt", [("skin", "png"), ("hair", "raw")])
def test_synth_labels_are_the_drawn_attributes(tmp_path, labels, fmt):
    info = write_synthetic_shards(
        tmp_path / "s", 12, shard_size=5, size=32, seed=3, fmt=fmt, processes=1, progress=False, labels=labels
    )
    classes = list(synth.LABELS[labels][0])
    assert info.classes == classes and read_classes(str(tmp_path / "s")) == classes
    want = [synth.face_label(labels, synth.draw_face_with_attributes(i, 3, 32)[1]) for i in range(12)]
    assert info.class_counts == {name: want.count(k) for k, name in enumerate(classes)}
    samples = list(iter_samples(expand_shards(str(tmp_path / "s"))))
    assert [decode_label(s) for s in samples] == want  # in the order written: face i, its own class
    # The same faces as the unlabelled set of this seed.
    plain = write_synthetic_shards(
        tmp_path / "p", 12, shard_size=5, size=32, seed=3, fmt=fmt, processes=1, progress=False
    )
    assert plain.classes == [] and read_classes(str(tmp_path / "p")) is None
    a, _ = all_batches(str(tmp_path / "s"), 12, 12, seed=1)
    b, none = all_batches(str(tmp_path / "p"), 12, 12, seed=1)
    assert none is None and torch.equal(a, b)


def test_synth_labels_from_the_command_line(tmp_path):
    assert data_main(["synth", "--out", str(tmp_path / "s"), "--num", "6", "--size", "32", "--labels", "skin"]) == 0
    assert read_classes(str(tmp_path / "s")) == ["light", "medium", "dark"]
    assert sum(read_info(str(tmp_path / "s")).class_counts.values()) == 6


def labelled(out: Path, labels: list[int | None], classes: list[str] | None, fmt: str = "png", shard_size: int = 4):
    """Shards of tagged 8x8 images (first pixel = index) with these labels."""
    rng = np.random.default_rng(0)
    with ShardWriter(out, shard_size=shard_size, fmt=fmt, raw_chunk=3, classes=classes) as writer:
        for i, label in enumerate(labels):
            image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            image[0, 0, 0] = i
            writer.write(image, label)
        writer.close()
    return out


@pytest.mark.parametrize("fmt, num_workers", [("png", 0), ("raw", 2), ("jpg", 0)])
def test_the_loader_yields_each_samples_own_label(tmp_path, fmt, num_workers):
    labels = [i % 3 for i in range(7)] + [2] * 9  # 16 samples in 4 shards; uneven classes
    labelled(tmp_path / "s", labels, ["a", "b", "c"], fmt=fmt)
    images, got = all_batches(str(tmp_path / "s"), 4, 16, num_workers=num_workers, seed=7)
    assert got.dtype == torch.int64 and got.shape == (16,)
    if fmt != "jpg":  # lossy: the tag pixel is not exact
        assert sorted(zip(images[:, 0, 0, 0].tolist(), got.tolist())) == list(enumerate(labels))
    assert Counter(got.tolist()) == Counter(labels)


def test_read_classes_and_joined_sets(tmp_path):
    a = labelled(tmp_path / "a", [0, 1, 0, 1], ["x", "y"])
    b = labelled(tmp_path / "b", [1, 1, 0, 0], ["x", "y"])
    c = labelled(tmp_path / "c", [0, 0, 0, 0], ["z"])
    plain = labelled(tmp_path / "plain", [None] * 4, None)
    assert read_classes(str(a)) == ["x", "y"] and read_classes(f"{a}::{b}") == ["x", "y"]
    assert read_classes(str(plain)) is None and read_classes(f"{plain}/*.tar") is None
    for spec in (f"{a}::{c}", f"{a}::{plain}"):
        with pytest.raises(ValueError, match="different classes") as caught:
            read_classes(spec)
        assert "\n" not in str(caught.value)
    _, labels = all_batches(f"{a}::{b}", 4, 8)
    assert Counter(labels.tolist()) == {0: 4, 1: 4}
    # dataset.json's classes are checked when read: a broken list is one line.
    meta = json.loads((a / "dataset.json").read_text())
    (a / "dataset.json").write_text(json.dumps({**meta, "classes": ["x", "x"]}))
    with pytest.raises(ValueError, match="'classes' should be a list of distinct class names"):
        read_classes(str(a))


def test_a_labelled_sample_without_a_label_is_skipped_and_counted(tmp_path):
    """Damaged-sample handling as for an undecodable image: a sample of a labelled set with no (or no valid)
    label is unusable, counted, and the rest trains with their own labels."""
    out = labelled(tmp_path / "s", [0, 1] * 10, ["a", "b"], shard_size=10)
    # A hand-made shard beside them with a .cls that is not a class number and one with no .cls at all.
    import webdataset as wds

    good = next(iter_samples([str(out / "shard-000000.tar")]))
    with wds.TarWriter(str(out / "shard-000002.tar")) as tar:
        tar.write({"__key__": "x1", "png": good["png"], "cls": b"seven"})
        tar.write({"__key__": "x2", "png": good["png"]})
        tar.write({"__key__": "x3", "png": good["png"], "cls": b"5"})  # no class 5 of 2
    loader = ImageBatches(str(out), 4, shuffle_buffer=2, max_bad_fraction=0.2)
    try:
        got = [next(loader) for _ in range(6)]  # a pass: the 20 usable samples; counts arrive with the next batch
    finally:
        loader.close()
    assert loader.counters.bad_samples >= 3  # pass 0 (all three), maybe some of pass 1
    assert Counter(torch.cat([b[1] for b in got[:5]]).tolist()) == {0: 10, 1: 10}
    report = inspect(str(out))
    assert report["bad_samples"] == 3 and report["class_counts"] == {"a": 10, "b": 10}


def test_inspect_counts_each_class(tmp_path):
    labelled(tmp_path / "s", [0, 2, 2, 1, 2, 2, 0], ["zero", "one", "two", "three"], fmt="raw")
    report = inspect(str(tmp_path / "s"))
    assert report["classes"] == ["zero", "one", "two", "three"]
    assert report["class_counts"] == {"zero": 2, "one": 1, "two": 4, "three": 0}  # every class, one with none
    assert report["bad_samples"] == 0 and report["samples"] == 7
    labelled(tmp_path / "p", [None] * 3, None)
    unlabelled = inspect(str(tmp_path / "p"), preview=str(tmp_path / "preview.png"))
    assert unlabelled["classes"] is None and unlabelled["class_counts"] is None
    assert Path(unlabelled["preview"]).is_file()  # the preview as before


def test_old_raw_shards_without_labels_still_load(tmp_path):
    labelled(tmp_path / "s", [None] * 8, None, fmt="raw")
    assert not any(".labels.npy" in name for name in _members(tmp_path / "s"))
    images, labels = all_batches(str(tmp_path / "s"), 4, 8)
    assert labels is None and images.shape == (8, 3, 8, 8)


def _members(folder: Path) -> list[str]:
    import tarfile

    return [m for shard in sorted(folder.glob("*.tar")) for m in tarfile.open(shard).getnames()]


def test_loader_workers_are_capped_at_the_cpus_without_torchs_warning(tmp_path, monkeypatch, caplog):
    labelled(tmp_path / "s", [None] * 16, None)
    monkeypatch.setattr(loader_module, "available_cpus", lambda: 1)
    with caplog.at_level(logging.WARNING, logger="dcgan_dist.data"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = ImageBatches(str(tmp_path / "s"), 4, num_workers=3, shuffle_buffer=2)
        try:
            next(loader)
        finally:
            loader.close()
    assert (loader.num_workers, loader.num_slots) == (1, 1)
    lowered = [r for r in caplog.records if "data.num_workers=3" in r.getMessage()]
    assert len(lowered) == 1
    assert not [w for w in caught if "DataLoader will create" in str(w.message)]


def test_drawing_the_embedded_set_shows_progress_with_a_count(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synth, "PROGRESS_LINE_S", 0.0)  # a line after every shard, not every 5 s
    synth.ensure_synthetic(str(tmp_path / "cache"), 60, 32, 3)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("drawing faces: ")]
    assert lines and all("/60" in line for line in lines)
