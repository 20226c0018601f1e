"""Shards and runs in an object store, for real: a SeaweedFS S3 server (session fixture `s3_server`), the code
under test talking to it through pyarrow, the checks through an independent client (boto3)."""

import pytest
import torch

from dcgan_dist.data import ImageBatches, ShardWriter, read_info
from dcgan_dist.training import checkpoint as ckpt
from dcgan_dist.training.metrics import parse_metrics

from .conftest import ROOT, TINY, assert_same_training_state, bucket_client, run_cli
from .test_data import tag, tagged_images

boto3 = pytest.importorskip("boto3")


def keys(env: dict, bucket: str, prefix: str) -> list[str]:
    listing = bucket_client(env).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix) :] for o in listing.get("Contents", []))


def read_object(env: dict, bucket: str, key: str) -> bytes:
    return bucket_client(env).get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.mark.parametrize("fmt", ["png", "raw"])
def test_shards_round_trip_through_the_bucket(s3_env, tmp_path, fmt):
    images = tagged_images(48, size=8)
    prefix = f"shards/tagged-{fmt}"
    with ShardWriter(f"s3://dcgan-test/{prefix}", shard_size=12, fmt=fmt, raw_chunk=5) as writer:
        for a in images:
            writer.write(a)
        writer.close()
    assert keys(s3_env, "dcgan-test", f"{prefix}/") == ["dataset.json"] + [f"shard-{i:06d}.tar" for i in range(4)]
    info = read_info(f"s3://dcgan-test/{prefix}")
    assert info.num_samples == 48 and info.shard_counts == {f"shard-{i:06d}.tar": 12 for i in range(4)}
    assert info.format == fmt
    batches = ImageBatches(
        f"s3://dcgan-test/{prefix}", 8, rank=1, world_size=2, seed=3, shuffle_buffer=8, expect_chw=(3, 8, 8)
    )
    got = {tag(img): img for img in torch.cat([next(batches)[0] for _ in range(3)])}  # rank 1's pass: 24 images
    assert len(got) == 24
    for i, image in got.items():
        assert torch.equal(image, torch.from_numpy(images[i]).permute(2, 0, 1))  # pixel-exact
    assert batches.counters.missing_samples == 0
    if fmt == "raw":
        return  # the CLI's own way into the bucket, below, is the same for every format

    # The CLI: synthetic faces straight into the bucket, then inspected there.
    proc = run_cli(
        "-m",
        "dcgan_dist.data",
        "synth",
        "--out",
        "s3://dcgan-test/shards/synth",
        "--num",
        "40",
        "--shard-size",
        "10",
        "--size",
        "32",
        "--processes",
        "1",
        check=True,
    )
    assert len(keys(s3_env, "dcgan-test", "shards/synth/")) == 5
    proc = run_cli(
        "-m",
        "dcgan_dist.data",
        "inspect",
        "s3://dcgan-test/shards/synth",
        "--preview",
        str(tmp_path / "p.png"),
        check=True,
    )
    assert "samples:  40 (dataset.json says 40)" in proc.stdout and (tmp_path / "p.png").is_file()


@pytest.fixture(scope="module")
def bucket_shards(s3_server):
    """The tiny test set (512 32x32 faces, 8 shards), drawn straight into the bucket."""
    env = {**s3_server}
    import os
    import subprocess
    import sys

    subprocess.run(
        [
            sys.executable,
            "-m",
            "dcgan_dist.data",
            "synth",
            "--out",
            "s3://dcgan-test/data/faces32",
            "--num",
            "512",
            "--shard-size",
            "64",
            "--size",
            "32",
            "--seed",
            "3",
            "--processes",
            "1",
        ],
        cwd=ROOT,
        check=True,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
    )
    return "s3://dcgan-test/data/faces32"


def test_an_upload_cut_short_leaves_no_object(s3_env, tmp_path, monkeypatch):
    """A checkpoint upload that fails half-way must not leave a whole-looking, truncated object behind: closing a
    pyarrow output stream completes the upload, so RunStorage removes what it wrote."""
    import shutil

    from dcgan_dist.storage.filesystem import RunStorage

    local = tmp_path / "state.pt"
    local.write_bytes(b"x" * (12 << 20))
    storage = RunStorage("s3://dcgan-test/cut-upload")
    storage.upload(local, "whole.pt")

    def copy_then_fail(source, target, length):
        target.write(source.read(length))
        raise OSError("link lost")

    monkeypatch.setattr(shutil, "copyfileobj", copy_then_fail)
    with pytest.raises(OSError, match="link lost"):
        storage.upload(local, "cut.pt")
    # ("" is the folder marker pyarrow leaves when it deletes the last object under a prefix)
    assert [k for k in keys(s3_env, "dcgan-test", "cut-upload/") if k] == ["whole.pt"]
    assert len(read_object(s3_env, "dcgan-test", "cut-upload/whole.pt")) == 12 << 20


def test_a_write_the_store_never_answered_is_tried_again(s3_env):
    """No HTTP response at all (the SDK's "HTTP status -1", seen from SeaweedFS under load) is retried by RunStorage;
    other errors are not."""
    from dcgan_dist.storage.filesystem import RunStorage

    storage = RunStorage("s3://dcgan-test/no-answer")
    real, failures = (
        storage.fs,
        ["AWS Error UNKNOWN (HTTP status -1) during PutObject operation: XML_ERROR_PARSING_TEXT"],
    )

    class Unanswered:  # the real filesystem, whose next PUT gets no answer
        def __getattr__(self, name):
            return getattr(real, name)

        def open_output_stream(self, path, *args, **kwargs):
            if failures:
                raise OSError(f"When uploading object with key '{path}': {failures.pop()}")
            return real.open_output_stream(path, *args, **kwargs)

    storage.fs = Unanswered()
    storage.write("metrics.jsonl", b"{}\n")
    # Shards are read in ranged GETs, each of them tried again the same way.
    from dcgan_dist.storage.filesystem import ObjectReader

    reader = ObjectReader("s3://dcgan-test/no-answer/metrics.jsonl")
    read_at, unanswered = reader._file.read_at, [1]

    def flaky_read_at(nbytes, offset):
        if unanswered:
            unanswered.pop()
            raise OSError("AWS Error UNKNOWN (HTTP status -1) during GetObject operation: XML_ERROR_PARSING_TEXT")
        return read_at(nbytes, offset)

    reader._file = type("Flaky", (), {"read_at": staticmethod(flaky_read_at), "close": reader._file.close})()
    assert reader.read() == b"{}\n" and not unanswered
    reader.close()
    assert read_object(s3_env, "dcgan-test", "no-answer/metrics.jsonl") == b"{}\n"
    failures.append("AWS Error ACCESS_DENIED during PutObject operation: Access Denied")
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        storage.write("metrics.jsonl", b"[]\n")


def test_a_run_in_the_bucket_resumes_exactly_after_sigkill_from_the_bucket_alone(s3_env, bucket_shards, tmp_path):
    """Shards and run.dir both in the bucket; the process is SIGKILLed after step 7, and the rerun, started in an
    empty directory, resumes from the bucket's step-5 checkpoint and ends bit-identical to an uninterrupted run.
    Nothing is written on this machine; everything the run writes is in the bucket."""
    common = [
        "--config",
        "debug",
        *TINY,
        f"data.shards={bucket_shards}",
        "train.max_steps=12",
        "train.checkpoint_every=5",
        "train.sample_every=6",
        "train.log_every=1",
        "train.ema_decay=0.9",
        "data.num_workers=1",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    run_cli("-m", "dcgan_dist.train", *common, "run.dir=s3://dcgan-test/runs/whole", cwd=tmp_path, check=True)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    killed = run_cli(
        str(ROOT / "tests" / "step_hooks.py"),
        "--signal=KILL",
        "--after=7",
        f"--marker={tmp_path / 'marker'}",
        *common,
        "run.dir=s3://dcgan-test/runs/killed",
        cwd=first,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert keys(s3_env, "dcgan-test", "runs/killed/checkpoints/") == ["step_0000005.pt"]
    run_cli("-m", "dcgan_dist.train", *common, "run.dir=s3://dcgan-test/runs/killed", cwd=second, check=True)  # resumes
    for run in ("whole", "killed"):  # every shard was read whole (an unreadable one is skipped, and counted)
        records = parse_metrics(read_object(s3_env, "dcgan-test", f"runs/{run}/metrics.jsonl").decode())
        assert not [r for r in records if "bad_shards" in r or "missing_samples" in r], run
    assert_same_training_state(
        ckpt.load("s3://dcgan-test/runs/whole/checkpoints/step_0000012.pt"),
        ckpt.load("s3://dcgan-test/runs/killed/checkpoints/step_0000012.pt"),
    )
    written = keys(s3_env, "dcgan-test", "runs/killed/")
    assert {
        "config.yaml",
        "metrics.jsonl",
        "progress.gif",
        "samples/step_0000006.png",
        "samples/step_0000012.png",
        "checkpoints/step_0000010.pt",
        "checkpoints/step_0000012.pt",
    } <= set(written), written
    steps = [r["step"] for r in parse_metrics(read_object(s3_env, "dcgan-test", "runs/killed/metrics.jsonl").decode())]
    assert steps == list(range(1, 13))
    assert not any(p for p in [*first.rglob("*"), *second.rglob("*")] if p.is_file())  # no local run files
    # sample and evaluate read the run straight from the bucket.
    out = tmp_path / "grid.png"
    run_cli(
        "-m",
        "dcgan_dist.sample",
        "--checkpoint",
        "s3://dcgan-test/runs/killed",
        "--out",
        str(out),
        "sample.num=4",
        check=True,
    )
    assert out.is_file()
    proc = run_cli(
        "-m", "dcgan_dist.sample", "--progress", "s3://dcgan-test/runs/killed", "--out", str(tmp_path / "p.gif")
    )
    assert proc.returncode == 0 and (tmp_path / "p.gif").is_file()


def test_the_local_object_store_script(tmp_path):
    """cluster/object-store.sh as the README has people use it: start, the exports, a bucket to write and read."""
    import os
    import shlex
    import subprocess

    from .conftest import free_port_pair, wait_until_writable

    env = {**os.environ, "DCGAN_S3_DIR": str(tmp_path / "s3"), "DCGAN_S3_PORT": str(free_port_pair())}
    script = str(ROOT / "cluster" / "object-store.sh")
    start = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        exports = subprocess.run(["bash", script, "env"], env=env, capture_output=True, text=True).stdout
        s3 = dict(item.split("=", 1) for item in shlex.split(exports.removeprefix("export ")))
        wait_until_writable(s3)
        client = bucket_client(s3)
        client.put_object(Bucket="dcgan-test", Key="hello", Body=b"world")
        assert read_object(s3, "dcgan-test", "hello") == b"world"
    finally:
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=60)
