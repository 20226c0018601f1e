"""Shards: writer -> loader round trip, rank/worker splitting, resume, faults, converters, CLI."""

import gzip
import io
import json
import struct
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dcgan_dist.config import build_config
from dcgan_dist.data import (
    ImageBatches,
    ShardWriter,
    check_shards,
    expand_shards,
    normalise,
    read_info,
    write_synthetic_shards,
)
from dcgan_dist.data.convert import convert
from dcgan_dist.data.images import to_unit_range
from dcgan_dist.data.shards import decode_sample, iter_samples
from dcgan_dist.data.synth import draw_face
from dcgan_dist.distributed.env import DistEnv
from dcgan_dist.errors import RunError
from dcgan_dist.training.trainer import make_loader

from .conftest import run_cli


def tagged_images(n: int, size: int = 8, channels: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Random images whose first two pixel values encode their index."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        a = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
        a[0, 0, 0], a[0, 1, 0] = i % 256, i // 256
        images.append(a)
    return images


def tag(image: torch.Tensor) -> int:  # C x H x W uint8
    return int(image[0, 0, 0]) + 256 * int(image[0, 0, 1])


LABEL_CLASSES = ["c0", "c1", "c2", "c3", "c4"]  # labelled sets here: image i (its tag) has label i % 5


def write(
    out: Path, images: list[np.ndarray], shard_size: int, fmt: str = "png", raw_chunk: int = 4, labelled: bool = False
) -> Path:
    """Shards of `images`; raw ones in chunks of `raw_chunk` images, so that a shard holds several chunks and a
    shorter last one. labelled: image i has label i % 5 (of LABEL_CLASSES)."""
    classes = LABEL_CLASSES if labelled else None
    with ShardWriter(out, shard_size=shard_size, fmt=fmt, raw_chunk=raw_chunk, classes=classes) as writer:
        for i, a in enumerate(images):
            writer.write(a, i % len(LABEL_CLASSES) if labelled else None)
        writer.close()
    return out


def take(batches: ImageBatches, n: int) -> list[torch.Tensor]:
    return [next(batches)[0] for _ in range(n)]


@pytest.mark.parametrize("fmt", ["png", "raw"])
def test_round_trip_is_pixel_exact(tmp_path, fmt):
    images = tagged_images(96, channels=3)
    write(tmp_path / "s", images, shard_size=32, fmt=fmt, raw_chunk=10)
    info = read_info(str(tmp_path / "s"))
    assert (info.num_samples, info.num_shards, info.image_size, info.channels, info.format) == (96, 3, 8, 3, fmt)
    assert info.shard_counts == {f"shard-{i:06d}.tar": 32 for i in range(3)}  # images, not tar members
    batches = ImageBatches(str(tmp_path / "s"), batch_size=8, seed=1, shuffle_buffer=16, expect_chw=(3, 8, 8))
    got = torch.cat(take(batches, 12))  # exactly one pass
    assert got.dtype == torch.uint8 and got.shape == (96, 3, 8, 8)
    by_tag = {tag(img): img for img in got}
    assert sorted(by_tag) == list(range(96))  # every sample once
    for i, a in enumerate(images):
        assert torch.equal(by_tag[i], torch.from_numpy(a).permute(2, 0, 1))
    order = [tag(img) for img in got]
    assert order != sorted(order)  # shuffled


@pytest.mark.parametrize("size, channels", [(64, 3), (64, 1), (5, 3), (28, 1)])
def test_raw_round_trip_is_pixel_exact(tmp_path, size, channels):
    images = tagged_images(22, size=size, channels=channels)
    write(tmp_path / "r", images, shard_size=10, fmt="raw", raw_chunk=4)  # shards of 10, 10, 2; chunks of 4, 4, 2
    with tarfile.open(tmp_path / "r" / "shard-000000.tar") as tar:
        assert tar.getnames() == ["000000000.raw.npy", "000000004.raw.npy", "000000008.raw.npy"]
    got = torch.cat(take(ImageBatches(str(tmp_path / "r"), 11, shuffle_buffer=5, expect_chw=(channels, size, size)), 2))
    assert got.dtype == torch.uint8 and got.shape == (22, channels, size, size)
    assert Counter(g.permute(1, 2, 0).numpy().tobytes() for g in got) == Counter(a.tobytes() for a in images)


@pytest.mark.parametrize("fmt", ["png", "raw"])
def test_samples_carry_their_ordinal_in_the_shard_and_a_unique_key(tmp_path, fmt):
    images = tagged_images(25, size=4)
    write(tmp_path / "s", images, shard_size=10, fmt=fmt, raw_chunk=4)
    samples = list(iter_samples(expand_shards(str(tmp_path / "s"))))
    assert [s["__index__"] for s in samples] == [*range(10), *range(10), *range(5)]
    assert len({(s["__url__"], s["__key__"]) for s in samples}) == 25
    assert [int(decode_sample(s)[0, 0, 0]) for s in samples] == list(range(25))  # tagged_images' index, in order
    if fmt == "raw":
        assert [s["__key__"] for s in samples[:6]] == [
            "000000000/0",
            "000000000/1",
            "000000000/2",
            "000000000/3",
            "000000004/0",
            "000000004/1",
        ]


def test_a_raw_shard_without_dataset_json_still_loads(tmp_path):
    out = write(tmp_path / "r", tagged_images(12), shard_size=6, fmt="raw")
    (out / "dataset.json").unlink()
    assert read_info(str(out)) is None
    check_shards(str(out), (3, 8, 8))  # the first image tells the size
    with pytest.raises(ValueError, match="model.image_size=8"):
        check_shards(str(out), (3, 64, 64))
    got = torch.cat(take(ImageBatches(str(out), 4, shuffle_buffer=4), 3))
    assert sorted(tag(img) for img in got) == list(range(12))


def test_a_damaged_raw_shard_is_counted_not_fatal(tmp_path):
    out = write(tmp_path / "r", tagged_images(40), shard_size=10, fmt="raw", raw_chunk=4)  # chunks of 4, 4, 2
    with tarfile.open(out / "shard-000001.tar") as tar:
        second = tar.getmembers()[1]
    data = bytearray((out / "shard-000001.tar").read_bytes())
    data[second.offset_data : second.offset_data + 6] = b"NOTNPY"  # a chunk whose header is not .npy any more
    (out / "shard-000001.tar").write_bytes(bytes(data))
    shard = (out / "shard-000002.tar").read_bytes()
    with tarfile.open(out / "shard-000002.tar") as tar:
        second = tar.getmembers()[1]
    (out / "shard-000002.tar").write_bytes(shard[: second.offset_data + 100])  # cut inside its second chunk
    batches = ImageBatches(str(out), 1, shuffle_buffer=4)
    tags = [tag(b[0]) for b in take(batches, 2 * 26)]  # two passes over what is readable
    assert set(tags) == set(range(40)) - set(range(14, 18)) - set(range(24, 30))
    assert batches.counters.bad_samples == 2  # the damaged chunk, once per pass (its images cannot be counted)
    assert batches.counters.bad_shards >= 1
    assert batches.counters.missing_samples >= 6  # the truncated shard's lost images, against dataset.json
    proc = run_cli("-m", "dcgan_dist.data", "inspect", str(out), "--preview", str(tmp_path / "p.png"), "--json")
    assert proc.returncode == 1 and json.loads(proc.stdout)["formats"] == {"raw": 30}
    assert "not a .npy array" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: shard ")]
    assert errors[0] == "error: shard shard-000001.tar: 7 samples, dataset.json says 10 (truncated?)"
    assert errors[1].startswith("error: shard shard-000002.tar: unreadable after 4 sample(s)") and len(errors) == 2


def test_normalise_makes_the_loaders_channels_last_batches_contiguous_on_the_device():
    hwc = torch.randint(0, 256, (4, 6, 6, 3), dtype=torch.uint8)
    batch = hwc.permute(0, 3, 1, 2)  # what the loader yields: B x C x H x W over channels-last memory
    want = to_unit_range(batch.contiguous())
    out = normalise(batch, "cpu")
    assert out.is_contiguous() and torch.equal(out, want)
    out = normalise(batch, "cpu", channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, want)


def test_the_trainers_loader_pins_memory_for_a_cuda_device(tiny_shards):
    """Pinned host memory lets normalise's non_blocking copy overlap the GPU's work; nothing here touches CUDA."""
    cfg = build_config(None, ["model.image_size=32", "data.num_workers=0"])
    assert make_loader(cfg, DistEnv(device=torch.device("cuda")), str(tiny_shards)).pin_memory
    assert not make_loader(cfg, DistEnv(), str(tiny_shards)).pin_memory


def test_greyscale_round_trip(tmp_path):
    images = tagged_images(10, size=28, channels=1)
    write(tmp_path / "g", images, shard_size=5)
    got = torch.cat(take(ImageBatches(str(tmp_path / "g"), 5, shuffle_buffer=4), 2))
    assert got.shape == (10, 1, 28, 28)
    assert sorted(tag(img) for img in got) == list(range(10))


@pytest.mark.parametrize("world_size, num_workers", [(1, 2), (2, 1), (2, 2), (3, 2)])
def test_rank_and_worker_splits_are_disjoint_and_cover_the_set(tmp_path, world_size, num_workers):
    n, shard_size = 144, 12  # 12 equal shards: every slot gets whole shards of the same length
    write(tmp_path / "s", tagged_images(n), shard_size)
    seen = []
    for rank in range(world_size):
        batches = ImageBatches(
            str(tmp_path / "s"), 1, rank=rank, world_size=world_size, seed=4, num_workers=num_workers, shuffle_buffer=8
        )
        seen.append([tag(b[0]) for b in take(batches, n // world_size)])  # one pass of this rank
        batches.close()
    for rank_tags in seen:
        assert len(set(rank_tags)) == len(rank_tags)  # no repeats within a pass
    assert sorted(t for rank_tags in seen for t in rank_tags) == list(range(n))  # disjoint and complete


def test_stream_is_infinite_and_reshuffles_each_pass(tmp_path):
    write(tmp_path / "s", tagged_images(20), 5)
    batches = ImageBatches(str(tmp_path / "s"), 4, shuffle_buffer=8)
    first = [tag(i) for b in take(batches, 5) for i in b]
    second = [tag(i) for b in take(batches, 5) for i in b]
    assert sorted(first) == sorted(second) == list(range(20))
    assert first != second


@pytest.mark.parametrize(
    "num_workers, consumed, fmt", [(0, 5, "png"), (2, 3, "png"), (2, 4, "png"), (0, 5, "raw"), (2, 3, "raw")]
)
def test_resume_continues_the_same_sequence(tmp_path, num_workers, consumed, fmt):
    write(tmp_path / "s", tagged_images(64), 8, fmt=fmt, raw_chunk=3)
    kwargs = dict(batch_size=6, seed=2, num_workers=num_workers, shuffle_buffer=10)
    reference = ImageBatches(str(tmp_path / "s"), **kwargs)
    expected = take(reference, consumed + 8)
    reference.close()
    first = ImageBatches(str(tmp_path / "s"), **kwargs)
    take(first, consumed)
    state = first.state_dict()
    first.close()
    resumed = ImageBatches(str(tmp_path / "s"), **kwargs)
    resumed.load_state_dict(state)
    for want, got in zip(expected[consumed:], take(resumed, 8)):
        assert torch.equal(want, got)


def labelled_tags(batches: ImageBatches, n: int) -> list[int]:
    """The tags of n batches of a set written with labelled=True; each image's label checked (tag % 5)."""
    tags = []
    for _ in range(n):
        images, labels = next(batches)
        assert labels is not None and labels.tolist() == [tag(i) % len(LABEL_CLASSES) for i in images]
        tags += [tag(i) for i in images]
    return tags


def one_pass_after_resize(tmp_path, before: dict, after: dict, steps_before: int, steps_after: int):
    """Every rank of layout `before` takes `steps_before` batches; their states go to every rank of layout
    `after`, which take `steps_after` batches each. Returns (tags trained before, {new rank: its tags}). The set
    is labelled: every (image, label) pair is checked on the way."""
    spec = str(tmp_path / "s")
    states, trained = {}, []
    for rank in range(before["world_size"]):
        batches = ImageBatches(spec, rank=rank, seed=3, shuffle_buffer=10, **before)
        trained += labelled_tags(batches, steps_before)
        states[rank] = batches.state_dict()
        batches.close()
    resumed = {}
    for rank in range(after["world_size"]):
        batches = ImageBatches(spec, rank=rank, seed=3, shuffle_buffer=10, **after)
        batches.load_rank_states(states)
        resumed[rank] = labelled_tags(batches, steps_after)
        batches.close()
    return trained, resumed


@pytest.mark.parametrize(
    "before, after",
    [
        (dict(world_size=2, batch_size=4), dict(world_size=3, batch_size=4)),  # grown
        (dict(world_size=3, batch_size=4, num_workers=2), dict(world_size=2, batch_size=3)),  # shrunk, other batch
    ],
)
def test_a_resized_stream_finishes_each_pass_without_loss_or_repeat(tmp_path, before, after):
    """Checkpoint with N workers, resume with M: the pass in progress ends with every sample trained exactly
    once, the next pass starts afresh, and no rank reads another's shards."""
    n, shard_size = 144, 12  # shard k holds tags 12k .. 12k+11
    write(tmp_path / "s", tagged_images(n), shard_size, labelled=True)
    # Two batches more than a new rank's shards hold: the rest of pass 0, then part of pass 1 (not all of it).
    steps_after = n // after["world_size"] // after["batch_size"] + 2
    trained, resumed = one_pass_after_resize(tmp_path, before, after, steps_before=5, steps_after=steps_after)
    assert len(set(trained)) == len(trained) < n  # pass 0 half done
    shards = list(range(n // shard_size))
    for rank, tags in resumed.items():
        mine = {t for t in range(n) if t // shard_size in shards[rank :: after["world_size"]]}
        left = mine - set(trained)  # what this rank must finish of pass 0, first, once each
        assert set(tags) <= mine
        assert sorted(tags[: len(left)]) == sorted(left)
        next_pass = tags[len(left) :]
        assert next_pass and len(set(next_pass)) == len(next_pass)  # pass 1 began, without repeats
    finished = trained + [
        t
        for rank, tags in resumed.items()
        for t in tags[
            : len({t for t in range(n) if t // shard_size in shards[rank :: after["world_size"]]} - set(trained))
        ]
    ]
    assert sorted(finished) == list(range(n))  # pass 0: every sample exactly once across the resize


def test_a_resized_stream_resumes_exactly_again(tmp_path):
    """After a resize the stream leaves out what the old layout trained; a checkpoint of the new layout resumed
    with that same layout continues the very same batch sequence."""
    write(tmp_path / "s", tagged_images(96), 8)
    spec = str(tmp_path / "s")
    old = ImageBatches(spec, 4, rank=0, world_size=1, seed=5, shuffle_buffer=6)
    take(old, 7)
    states = {0: old.state_dict()}
    old.close()

    def resized() -> ImageBatches:
        batches = ImageBatches(spec, 4, rank=1, world_size=2, seed=5, shuffle_buffer=6)
        batches.load_rank_states(states)
        return batches

    reference = resized()
    expected = take(reference, 14)
    reference.close()
    first = resized()
    take(first, 9)
    state = first.state_dict()
    first.close()
    again = ImageBatches(spec, 4, rank=1, world_size=2, seed=5, shuffle_buffer=6)
    again.load_rank_states({1: state, 0: {}})
    for want, got in zip(expected[9:], take(again, 5)):
        assert torch.equal(want, got)


def test_corrupt_shard_and_image_are_skipped_and_counted(tmp_path):
    out = write(tmp_path / "s", tagged_images(40), 10)  # 4 good shards
    # A corrupt image inside an otherwise valid shard.
    with wds.TarWriter(str(out / "shard-000100.tar")) as sink:
        sink.write({"__key__": "bad", "png": b"\x89PNG not really"})
        for i, a in enumerate(tagged_images(3, seed=9)):
            a[0, 0, 0], a[0, 1, 0] = (40 + i) % 256, 0
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            sink.write({"__key__": f"ok{i}", "png": buf.getvalue()})
    # A truncated shard and a file that is not a tar at all.
    good = (out / "shard-000000.tar").read_bytes()
    (out / "shard-000101.tar").write_bytes(good[: len(good) // 2 + 100])
    (out / "shard-000102.tar").write_bytes(b"this is not a tar file" * 100)
    batches = ImageBatches(str(out), 1, shuffle_buffer=4)
    tags = [tag(b[0]) for b in take(batches, 60)]
    assert set(range(43)) <= set(tags)  # every readable image still arrives
    assert batches.counters.bad_samples >= 1
    assert batches.counters.bad_shards >= 2
    # The inspect command reads everything it can, names every bad shard and exits 1.
    proc = run_cli("-m", "dcgan_dist.data", "inspect", str(out), "--preview", str(tmp_path / "p.png"))
    assert proc.returncode == 1 and (tmp_path / "p.png").is_file()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: shard ")]
    assert sorted(line.split()[2] for line in errors) == ["shard-000101.tar:", "shard-000102.tar:"]


def truncate_at_member(shard: Path, keep: int) -> None:
    """Cut a shard right before its member number `keep`: a valid-looking tar that just ends early."""
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[keep].offset
    shard.write_bytes(shard.read_bytes()[:offset])


def test_a_shard_truncated_at_a_member_boundary_is_counted_and_reported(tmp_path):
    out = write(tmp_path / "s", tagged_images(40), 10)  # 4 shards of 10; dataset.json records each count
    assert read_info(str(out)).shard_counts == {f"shard-{i:06d}.tar": 10 for i in range(4)}
    truncate_at_member(out / "shard-000002.tar", 7)  # 3 samples lost, no read error
    batches = ImageBatches(str(out), 1, shuffle_buffer=4)
    tags = [tag(b[0]) for b in take(batches, 2 * 37)]  # two passes
    assert len(set(tags)) == 37 and batches.counters.bad_shards == 0
    assert batches.counters.missing_samples == 3  # the first pass's shortfall, counted when it ended
    (out / "shard-000003.tar").unlink()  # and one shard gone altogether
    proc = run_cli("-m", "dcgan_dist.data", "inspect", str(out))
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: shard ")]
    assert errors == [
        "error: shard shard-000002.tar: 7 samples, dataset.json says 10 (truncated?)",
        "error: shard shard-000003.tar: missing, dataset.json lists it (10 samples)",
    ]


def test_shard_counts_belong_to_their_own_directory(tmp_path):
    """Two data sets joined with '::' whose shards have the same names: each is checked against its own
    dataset.json (no shortfall where nothing is missing)."""
    a = write(tmp_path / "a", tagged_images(20), 10)
    b = write(tmp_path / "b", tagged_images(8, seed=5), 4)
    batches = ImageBatches(f"{a}::{b}", 4, shuffle_buffer=4)
    take(batches, 2 * 7)  # two passes over 28 samples
    assert batches.counters.missing_samples == 0


def test_shape_mismatch_is_a_clear_error(tiny_shards):
    batches = ImageBatches(str(tiny_shards), 4, expect_chw=(3, 64, 64))
    with pytest.raises(RunError, match="the model expects 64x64 with 3"):  # every sample unusable: the run stops
        next(batches)


def test_shard_specs(tiny_shards):
    all_shards = expand_shards(str(tiny_shards))
    assert len(all_shards) == 8
    assert expand_shards(str(tiny_shards / "*.tar")) == all_shards
    assert expand_shards(str(tiny_shards / "shard-{000000..000007}.tar")) == all_shards
    assert len(expand_shards(f"{all_shards[0]}::{all_shards[1]}")) == 2
    with pytest.raises(FileNotFoundError):
        expand_shards(str(tiny_shards / "nothing-*.tar"))
    # pipe: URLs go through webdataset's own opener (this is how S3/GCS shards are read).
    piped = [f"pipe:cat {p}" for p in all_shards]
    batches = ImageBatches(piped, 32, world_size=2, rank=1, shuffle_buffer=16)
    assert next(batches)[0].shape == (32, 3, 32, 32)


def test_too_few_shards_for_the_world_is_a_clear_error(tmp_path):
    write(tmp_path / "s", tagged_images(4), 4)
    with pytest.raises(ValueError, match="1 shard"):
        ImageBatches(str(tmp_path / "s"), 2, rank=0, world_size=2)


def test_synthetic_faces_are_deterministic():
    a, b, c = draw_face(7, seed=1, size=32), draw_face(7, seed=1, size=32), draw_face(7, seed=2, size=32)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    faces = np.stack([np.asarray(draw_face(i, 0, 64)) for i in range(16)])
    assert faces.shape == (16, 64, 64, 3)
    assert faces.std(axis=0).mean() > 20  # faces differ from each other


def test_synth_and_inspect_cli(tmp_path):
    out = tmp_path / "synth"
    proc = run_cli(
        "-m",
        "dcgan_dist.data",
        "synth",
        "--out",
        str(out),
        "--num",
        "30",
        "--shard-size",
        "10",
        "--size",
        "28",
        "--channels",
        "1",
        "--processes",
        "1",
        "--json",
        check=True,
    )
    wrote = json.loads(proc.stdout)  # --json: stdout holds the result alone
    assert (wrote["command"], wrote["out"], wrote["shards"], wrote["samples"]) == ("data synth", str(out), 3, 30)
    assert (wrote["image_size"], wrote["channels"], wrote["classes"], wrote["class_counts"]) == (28, 1, None, None)
    proc = run_cli("-m", "dcgan_dist.data", "inspect", str(out), "--json", check=True)
    report = json.loads(proc.stdout)  # --json: stdout holds the result alone
    assert report["shards"] == 3 and report["samples"] == 30 and report["image_shapes"] == {"28x28x1": 30}
    assert report["samples_by_shard"] == {f"shard-{i:06d}.tar": 10 for i in range(3)}
    assert (out / "preview.png").is_file()
    # Same seed, same set; refusing to overwrite an existing set.
    again = tmp_path / "again"
    write_synthetic_shards(again, 30, 10, 28, 0, 1, processes=1, progress=False)

    def pngs(folder):
        return [s["png"] for s in iter_samples(expand_shards(str(folder)))]

    assert pngs(out) == pngs(again)
    assert run_cli("-m", "dcgan_dist.data", "synth", "--out", str(out), "--num", "5").returncode == 2


def test_synth_and_convert_write_raw_shards_with_the_same_pixels(tmp_path):
    proc = run_cli(
        "-m",
        "dcgan_dist.data",
        "synth",
        "--out",
        str(tmp_path / "raw"),
        "--num",
        "12",
        "--shard-size",
        "5",
        "--size",
        "32",
        "--format",
        "raw",
        "--processes",
        "1",
        "--json",
        check=True,
    )
    wrote = json.loads(proc.stdout)
    assert (wrote["shards"], wrote["samples"], wrote["image_size"], wrote["channels"], wrote["format"]) == (
        3,
        12,
        32,
        3,
        "raw",
    )
    assert read_info(str(tmp_path / "raw")).format == "raw"
    proc = run_cli("-m", "dcgan_dist.data", "inspect", str(tmp_path / "raw"), "--json", check=True)
    assert json.loads(proc.stdout)["formats"] == {"raw": 12}
    write_synthetic_shards(tmp_path / "png", 12, 5, 32, processes=1, progress=False)

    def images(folder):
        return [decode_sample(s).tobytes() for s in iter_samples(expand_shards(str(folder)))]

    assert images(tmp_path / "raw") == images(tmp_path / "png")
    digits = np.random.default_rng(1).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", digits)
    proc = run_cli(
        "-m",
        "dcgan_dist.data",
        "convert",
        "--src",
        str(tmp_path / "train-images-idx3-ubyte"),
        "--out",
        str(tmp_path / "idx"),
        "--shard-size",
        "3",
        "--format",
        "raw",
        "--json",
        check=True,
    )
    wrote = json.loads(proc.stdout)  # no label file beside the images: unlabelled
    assert (wrote["command"], wrote["shards"], wrote["samples"], wrote["image_size"], wrote["channels"]) == (
        "data convert",
        3,
        7,
        28,
        1,
    )
    assert wrote["class_counts"] is None
    assert images(tmp_path / "idx") == [d[:, :, None].tobytes() for d in digits]


def make_image_folder(root: Path) -> None:
    root.mkdir(parents=True)
    # 178x218 like CelebA's aligned faces: a red centre square, blue bands above and below.
    a = np.zeros((218, 178, 3), np.uint8)
    a[:, :] = (0, 0, 255)
    a[20:198, :] = (255, 0, 0)
    Image.fromarray(a).save(root / "000001.jpg", quality=98)
    Image.fromarray(np.full((40, 90, 3), 128, np.uint8)).save(root / "000002.png")
    (root / "sub").mkdir()
    Image.fromarray(np.full((64, 64), 200, np.uint8), "L").save(root / "sub" / "000003.png")
    (root / "000004.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (root / "notes.txt").write_text("not an image")


def test_convert_folder_center_crops_resizes_and_skips_corrupt(tmp_path):
    make_image_folder(tmp_path / "img_align_celeba")
    info = convert(tmp_path / "img_align_celeba", tmp_path / "out", shard_size=2, progress=False)
    assert (info.num_samples, info.skipped, info.image_size, info.channels) == (3, 1, 64, 3)
    batches = ImageBatches(str(tmp_path / "out"), 3, shuffle_buffer=1)
    images = next(batches)[0].float()
    # The centre crop of the first image is all red: the blue bands were cropped away.
    reds = [img for img in images if img[0].mean() > 200]
    assert len(reds) == 1 and reds[0][2].max() < 40


def test_convert_zip(tmp_path):
    make_image_folder(tmp_path / "imgs")
    with zipfile.ZipFile(tmp_path / "faces.zip", "w") as z:
        for p in sorted((tmp_path / "imgs").rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(tmp_path))
    proc = run_cli(
        "-m",
        "dcgan_dist.data",
        "convert",
        "--src",
        str(tmp_path / "faces.zip"),
        "--out",
        str(tmp_path / "out"),
        "--size",
        "32",
        check=True,
    )
    assert "wrote 3 images (32x32x3)" in proc.stdout and "skipped 1 unreadable" in proc.stdout
    assert "skipping imgs/000004.jpg" in proc.stdout + proc.stderr


def write_idx(path: Path, images: np.ndarray) -> None:
    payload = struct.pack(">IIII", 0x00000803, *images.shape) + images.tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def test_convert_mnist_idx(tmp_path):
    digits = np.random.default_rng(0).integers(0, 256, (25, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", digits)
    info = convert(tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "out", shard_size=10, progress=False)
    assert (info.num_samples, info.num_shards, info.image_size, info.channels) == (25, 3, 28, 1)
    got = torch.cat(take(ImageBatches(str(tmp_path / "out"), 5, shuffle_buffer=2), 5))
    want = Counter(d.tobytes() for d in digits)
    assert Counter(g[0].numpy().tobytes() for g in got) == want  # pixel-exact
    # A truncated IDX file is a clear error.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, 10, 28, 28) + b"\0" * 100)
    with pytest.raises(ValueError, match="truncated"):
        convert(tmp_path / "bad", tmp_path / "out2", progress=False)
