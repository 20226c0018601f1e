"""Bad data never hangs and never passes silently: each bad input is one line and an exit code, with 0, 1 and 2
loader processes; unusable samples are skipped and counted up to data.max_bad_fraction; stopped or killed
shard writers leave nothing that training takes for a data set."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcgan_dist.data import ImageBatches, ShardWriter, read_info
from dcgan_dist.data import shards as shards_module
from dcgan_dist.data.shards import UNFINISHED_KEY, decode_sample
from dcgan_dist.data.synth import ensure_synthetic
from dcgan_dist.errors import RunError

from .conftest import ROOT, TINY, run_cli

HANG = 60  # seconds: a run that has not exited by then hangs


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def rgb(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_set(
    folder: Path, shards: list[list[bytes]], image_size: int = 32, channels: int = 3, dataset_json: bool = True
) -> Path:
    """Hand-made shards of the given PNG bytes, and (dataset_json) a dataset.json that counts them rightly."""
    folder.mkdir(parents=True)
    counts = {}
    for s, images in enumerate(shards):
        write_tar(folder / f"shard-{s:06d}.tar", [(f"{s:03d}{i:06d}.png", data) for i, data in enumerate(images)])
        counts[f"shard-{s:06d}.tar"] = len(images)
    if dataset_json:
        (folder / "dataset.json").write_text(
            json.dumps(
                {
                    "num_samples": sum(counts.values()),
                    "image_size": image_size,
                    "channels": channels,
                    "format": "png",
                    "num_shards": len(shards),
                    "shard_counts": counts,
                }
            )
        )
    return folder


def train(run_dir: Path, shards: Path | str, *extra: str, timeout: float = HANG) -> subprocess.CompletedProcess:
    return run_cli(
        "-m",
        "dcgan_dist.train",
        *TINY,
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        "train.max_steps=30",
        "train.checkpoint_every=10",
        "train.sample_every=0",
        *extra,
        timeout=timeout,
    )


def no_run_files(run_dir: Path) -> bool:
    return not run_dir.exists() or not any(run_dir.iterdir())


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 2, proc.stderr
    assert lines and lines[-1].startswith("error: "), proc.stderr
    return lines


def bad_later_shards(folder: Path, kind: str) -> Path:
    """Four shards of 32 whose first (and third) are good 32x32 RGB images, so the start probe passes; the second
    and fourth hold, every other sample, what `kind` says. A loader slot of 2 workers reads shards 0+2 or 1+3."""
    good = [[png(rgb(100 * s + i)) for i in range(32)] for s in range(2)]
    if kind == "mixed sizes":
        bad = [[png(rgb(7 * s + i, 64 if i % 2 else 32)) for i in range(32)] for s in range(2)]
    elif kind == "greyscale in RGB":
        bad = [
            [png(rgb(7 * s + i)[:, :, 0], "L") if i % 2 else png(rgb(7 * s + i)) for i in range(32)] for s in range(2)
        ]
    else:  # undecodable
        bad = [[b"\x89PNG not really" if i % 2 else png(rgb(7 * s + i)) for i in range(32)] for s in range(2)]
    return write_set(folder, [good[0], bad[0], good[1], bad[1]])


# Every loader layout with one kind; the other kinds differ only in what the line says.
@pytest.mark.parametrize(
    "kind, num_workers",
    [("mixed sizes", 0), ("mixed sizes", 1), ("mixed sizes", 2), ("greyscale in RGB", 2), ("undecodable", 0)],
)
def test_bad_data_in_a_later_shard_ends_the_run_in_one_line(tmp_path, kind, num_workers):
    """A loader process's finding reaches the training process as one line naming the shard, the sample and what
    is wrong; the loader processes are shut down and the run exits 1 within seconds (it used to hang)."""
    data = bad_later_shards(tmp_path / "data", kind)
    proc = train(tmp_path / "run", data, f"data.num_workers={num_workers}")
    assert proc.returncode == 1, proc.stderr
    line = error_lines(proc)[-1]
    assert "unusable sample(s) of " in line and "more than data.max_bad_fraction=0.05" in line, line
    assert "shard-000001.tar" in line or "shard-000003.tar" in line, line
    detail = {
        "mixed sizes": "64x64 with 3 channel(s), the model expects 32x32 with 3",
        "greyscale in RGB": "32x32 with 1 channel(s), the model expects 32x32 with 3",
        "undecodable": "cannot decode",
    }[kind]
    assert detail in line, line
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))  # it stopped within the first pass


def test_a_loader_slot_of_unreadable_shards_ends_the_run_in_one_line(tmp_path):
    data = bad_later_shards(tmp_path / "data", "mixed sizes")
    for s in (1, 3):
        (data / f"shard-{s:06d}.tar").write_bytes(b"not a tar file " * 100)
    proc = train(tmp_path / "run", data, "data.num_workers=2")
    assert proc.returncode == 1, proc.stderr
    line = error_lines(proc)[-1]
    assert line.startswith("error: no readable samples in the 2 shard(s) of rank 0, loader slot 1 "), line


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_few_bad_samples_are_skipped_counted_and_reported_once(tmp_path, num_workers):
    """Below data.max_bad_fraction the run trains to the end; each unusable sample is counted in metrics.jsonl and
    stderr carries one line per loader slot, not one per sample."""
    shards = [[png(rgb(100 * s + i, 64 if i == 5 else 32)) for i in range(64)] for s in range(4)]  # 4 of 256
    data = write_set(tmp_path / "data", shards)
    proc = train(tmp_path / "run", data, f"data.num_workers={num_workers}", "train.max_steps=20", "train.log_every=20")
    assert proc.returncode == 0, proc.stderr
    warnings = proc.stderr.strip().splitlines()
    assert 1 <= len(warnings) <= max(num_workers, 1), proc.stderr
    assert all(w.startswith("skipping unusable samples (rank 0, loader slot ") for w in warnings), proc.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # 320 samples trained: a pass and a quarter; the loader counts what it has read by then (into the second pass)
    assert records[-1]["step"] == 20 and 4 <= records[-1]["bad_samples"] <= 8


def test_a_killed_loader_process_ends_the_run_in_one_line(tmp_path, tiny_shards):
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dcgan_dist.train",
            *TINY,
            "data.num_workers=1",
            f"data.shards={tiny_shards}",
            f"run.dir={tmp_path / 'run'}",
            "train.max_steps=100000",
            "train.log_every=5",
            "train.checkpoint_every=5",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in run.stdout:  # training, so the loader process is running
        if line.startswith("step"):
            break
    children = subprocess.run(["pgrep", "-a", "-P", str(run.pid)], capture_output=True, text=True).stdout
    pids = [line.split()[0] for line in children.splitlines()]
    assert len(pids) == 1, children  # the one loader process
    (loader,) = pids
    os.kill(int(loader), signal.SIGKILL)
    _, stderr = run.communicate(timeout=HANG)
    assert run.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    # torch says it where the training process notices first: reading a batch, or anywhere (its SIGCHLD handler)
    assert line.startswith("error: the data loader failed") and "resumes from the newest checkpoint" in line, line
    assert list((tmp_path / "run" / "checkpoints").glob("step_*.pt"))


BEFORE_WORK = {
    # the first shard: half its images greyscale in an RGB set
    "greyscale in the first shard": lambda d: write_set(
        d, [[png(rgb(i)[:, :, 0], "L") if i % 2 else png(rgb(i)) for i in range(32)]] * 2
    ),
    # dataset.json says 32x32; the images are 64x64
    "dataset.json misstates the size": lambda d: write_set(
        d, [[png(rgb(i, 64)) for i in range(32)]] * 2, image_size=32
    ),
    "every shard unreadable": lambda d: (
        write_set(d, [[png(rgb(i))] for i in range(2)], dataset_json=False)
        and [(d / f"shard-{s:06d}.tar").write_bytes(b"garbage" * 50) for s in range(2)]
    ),
}


@pytest.mark.parametrize("case", BEFORE_WORK)
def test_bad_data_in_the_first_shard_is_refused_before_work(tmp_path, case):
    BEFORE_WORK[case](tmp_path / "data")
    proc = train(tmp_path / "run", tmp_path / "data", "data.num_workers=1")
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(f"error: data.shards={tmp_path / 'data'}: ")
    expected = {
        "greyscale in the first shard": "16 of the first 32 samples of shard-000000.tar are unusable",
        "dataset.json misstates the size": "the shards hold 64x64 images with 3 channel(s) (shard-000000.tar "
        "(dataset.json says otherwise)) but the model is 32x32",
        "every shard unreadable": "cannot read the first shard",
    }[case]
    assert expected in lines[0], lines[0]
    assert no_run_files(tmp_path / "run")  # no run file


def test_inspect_checks_what_training_checks(tmp_path):
    data = bad_later_shards(tmp_path / "data", "mixed sizes")
    proc = run_cli("-m", "dcgan_dist.data", "inspect", str(data), "--preview", str(tmp_path / "p.png"), "--json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)  # --json: the result alone on stdout
    assert report["bad_by_shard"] == {"shard-000001.tar": 16, "shard-000003.tar": 16} and report["bad_samples"] == 32
    assert report["errors"] == [] and len(report["first_bad"]) == 5
    # On the console the first 5 are named, one line each (the rest counted).
    assert len([line for line in proc.stderr.splitlines() if line.startswith("warning: ")]) == 5, proc.stderr


def test_a_batch_larger_than_the_data_set_is_refused_before_work(tmp_path, tiny_shards):
    proc = train(tmp_path / "run", tiny_shards, "train.batch_size=100000000")
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert line.startswith(
        "error: train.batch_size=100000000 x 1 worker(s) is a global batch of 100000000, larger "
        "than the data set (512 samples)"
    ), line
    assert no_run_files(tmp_path / "run")
    # Without dataset.json the size is unknown: the memory the batch needs decides (memory.check_memory).
    (tmp_path / "nojson").mkdir()
    for shard in sorted(tiny_shards.glob("*.tar")):
        (tmp_path / "nojson" / shard.name).symlink_to(shard)
    proc = train(tmp_path / "run", tmp_path / "nojson", "train.batch_size=100000000")
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert line.startswith("error: train.batch_size=100000000: training needs at least "), line
    assert "the activations of a batch of 100000000" in line and "lower train.batch_size" in line, line
    assert no_run_files(tmp_path / "run")


def test_memory_error_is_not_a_bad_sample(tmp_path, monkeypatch):
    data = write_set(tmp_path / "data", [[png(rgb(i)) for i in range(8)]])

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(shards_module.Image, "open", out_of_memory)
    with pytest.raises(MemoryError):
        decode_sample({"__key__": "k", "__url__": "u", "png": png(rgb(0))})
    batches = ImageBatches(str(data), 4, shuffle_buffer=4, expect_chw=(3, 32, 32))
    with pytest.raises(RunError, match=r"^out of memory in the data loader \(rank 0, loader slot 0\)"):
        next(batches)
    assert batches.counters.bad_samples == 0


def grey16(value: int) -> bytes:
    return png(np.full((4, 4), value, np.uint16))  # Pillow: mode I;16, a 16-bit greyscale PNG


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("case", ["I;16", "I;16 black", "1", "LA", "P", "P of greys", "RGBA", "CMYK", "F"])
def test_image_modes_decode_to_8_bits_or_count_as_unusable(case):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    greys = Image.new("P", (4, 4), 2)
    greys.putpalette([v for i in range(256) for v in (255 - i,) * 3])
    cases = {
        "I;16": (grey16(32896), [128]),  # 0x8080: the middle of the 16-bit range, not clipped to 255
        "I;16 black": (grey16(0), [0]),
        "1": (encoded(Image.new("1", (4, 4), 1)), [255]),
        "LA": (encoded(Image.new("LA", (4, 4), (77, 3))), [77]),
        "P": (encoded(palette), [10, 200, 30]),
        "P of greys": (encoded(greys), [253]),  # a greyscale image saved with a palette: one channel
        "RGBA": (encoded(Image.new("RGBA", (4, 4), (1, 2, 3, 0))), [1, 2, 3]),
        "CMYK": (encoded(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG"), [255, 255, 255]),
        "F": (encoded(Image.new("F", (4, 4), 0.5), "TIFF"), None),  # float: no faithful 8-bit form
    }
    data, pixel = cases[case]
    sample = {"__key__": "k", "__url__": "u", "png": data}
    if pixel is None:
        with pytest.raises(ValueError, match="unsupported image mode F"):
            decode_sample(sample)
        return
    array = decode_sample(sample)
    assert array.dtype == np.uint8 and array.shape == (4, 4, len(pixel))
    assert np.abs(array.astype(int) - pixel).max() <= (2 if case == "CMYK" else 0), array[0, 0]


def test_dataset_json_keys_unknown_to_this_version_are_ignored_one_by_one(tmp_path):
    with ShardWriter(tmp_path / "data", shard_size=10) as writer:
        for i in range(30):
            writer.write(rgb(i))
        writer.close()
    meta = tmp_path / "data" / "dataset.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "written_by": "a newer version"}))
    assert read_info(str(tmp_path / "data")).shard_counts["shard-000001.tar"] == 10
    shard = tmp_path / "data" / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[4].offset
    shard.write_bytes(shard.read_bytes()[:offset])  # truncated at a member boundary: a valid, shorter tar
    proc = run_cli("-m", "dcgan_dist.data", "inspect", str(tmp_path / "data"))
    assert proc.returncode == 1
    assert "error: shard shard-000001.tar: 4 samples, dataset.json says 10 (truncated?)" in proc.stderr.splitlines()
    meta.write_text('{"num_samples": 30,')  # cut short: not JSON
    proc = train(tmp_path / "run", tmp_path / "data")
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert f"{meta} is not valid JSON" in line, line
    assert no_run_files(tmp_path / "run")


def wait_for(condition, proc: subprocess.Popen, timeout: float = HANG) -> None:
    """Until `condition()` holds (polling the file system), while `proc` runs."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def start_synth(out: Path, processes: int) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dcgan_dist.data",
            "synth",
            "--out",
            str(out),
            "--num",
            "3000",
            "--shard-size",
            "20",
            "--size",
            "32",
            "--processes",
            str(processes),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_stopped_or_killed_synth_leaves_nothing_training_takes(tmp_path):
    # SIGTERM: the drawing processes end, the shards written are removed, one line, 128 + 15.
    synth = start_synth(tmp_path / "stopped", processes=2)  # drawing processes that must end too
    wait_for(lambda: len(list((tmp_path / "stopped").glob("*.tar"))) >= 3, synth)
    synth.send_signal(signal.SIGTERM)
    _, stderr = synth.communicate(timeout=HANG)
    assert synth.returncode == 143 and stderr.strip().splitlines() == ["stopped by SIGTERM; nothing was kept"]
    assert not any((tmp_path / "stopped").iterdir())
    # SIGKILL: nothing can clean up; the folder stays marked, and training and inspect refuse it.
    synth = start_synth(tmp_path / "killed", processes=1)
    wait_for(lambda: len(list((tmp_path / "killed").glob("*.tar"))) >= 3, synth)
    synth.kill()
    synth.communicate(timeout=HANG)
    assert UNFINISHED_KEY in json.loads((tmp_path / "killed" / "dataset.json").read_text())  # the placeholder
    for command in (
        ["dcgan_dist.train", *TINY, f"data.shards={tmp_path / 'killed'}", f"run.dir={tmp_path / 'run'}"],
        ["dcgan_dist.data", "inspect", str(tmp_path / "killed")],
    ):
        proc = run_cli("-m", *command)
        assert proc.returncode == 2
        (line,) = error_lines(proc)
        assert f"{tmp_path / 'killed'} holds what a stopped `python -m dcgan_dist.data synth/convert` left" in line
    assert no_run_files(tmp_path / "run")


def test_sigterm_while_drawing_the_embedded_faces_stops_in_one_line_and_keeps_nothing(tmp_path):
    cache = tmp_path / "cache"
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dcgan_dist.train",
            *TINY,
            "data.synth_num=3000",
            f"data.cache_dir={cache}",
            f"run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: len(list(cache.glob(".synth-faces-*.tmp-*/*.tar"))) >= 2, run)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=HANG)
    assert run.returncode == 143
    assert stderr.strip().splitlines() == [
        "stopped by SIGTERM before training started; run the same command again to start"
    ]
    assert [p.name for p in cache.iterdir()] == [".synth-faces-32px-rgb-n3000-seed0.lock"]
    # A folder a killed process left is not reused; the next run draws a complete set.
    stale = cache / ".synth-faces-32px-rgb-n40-seed0.tmp-999999"
    stale.mkdir()
    (stale / "shard-000000.tar").write_bytes(b"half a shard")
    final = ensure_synthetic(str(cache), 40, 32, 3)
    assert not stale.exists() and read_info(str(final)).num_samples == 40
    assert sorted(p.name for p in final.iterdir()) == ["dataset.json", "shard-000000.tar"]
