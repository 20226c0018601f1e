"""Which Ray cluster a driver joins (launch/ray_address.py) without Ray: fake address files in a tmp dir, a
listening socket for a live cluster. cluster/ray-cluster.sh's nodes record their address in their own temp dirs
(RAY_CLUSTER_DIR/<node>), not in Ray's: `auto` and an unset RAY_ADDRESS find them too; a stale file still ends in
one line."""

import os
import socket

import pytest

from dcgan_dist.config import ConfigError
from dcgan_dist.launch.ray_address import cluster_address


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """(Ray's temp dir, the cluster script's state dir), both empty, for this process."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_CLUSTER_DIR", str(tmp_path / "state"))
    (tmp_path / "tmp" / "ray").mkdir(parents=True)
    (tmp_path / "state").mkdir()
    return tmp_path / "tmp" / "ray", tmp_path / "state"


@pytest.fixture
def live():
    """A GCS address that accepts connections."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"127.0.0.1:{server.getsockname()[1]}"


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: refused


def script_node(state, name: str, address: str, pid: int) -> None:
    """What cluster/ray-cluster.sh leaves for a node: <node>.pid and <node>/ray_current_cluster."""
    (state / name).mkdir()
    (state / name / "ray_current_cluster").write_text(address)
    (state / f"{name}.pid").write_text(f"{pid}\n")


GONE_PID = 2**22 + 1  # above Linux's largest pid_max: no such process


def test_nothing_recorded(dirs):
    assert cluster_address("") is None
    with pytest.raises(ConfigError, match="auto but no Ray cluster"):
        cluster_address("auto")


def test_auto_and_unset_find_the_cluster_scripts_nodes(dirs, live):
    _, state = dirs
    script_node(state, "head", live, os.getpid())
    script_node(state, "worker1", live, os.getpid())
    assert cluster_address("auto") == live
    assert cluster_address("") == live
    assert cluster_address() == live  # RAY_ADDRESS unset


def test_a_stopped_script_node_is_no_cluster(dirs):
    _, state = dirs
    script_node(state, "head", dead_address(), GONE_PID)  # `ray stop --force`: its process has gone
    assert cluster_address("") is None
    with pytest.raises(ConfigError, match="auto but no Ray cluster"):
        cluster_address("auto")


def test_a_running_script_node_that_does_not_answer_is_stale(dirs):
    _, state = dirs
    address = dead_address()
    script_node(state, "head", address, os.getpid())
    for env in ("", "auto"):
        with pytest.raises(ConfigError, match=f"names a Ray cluster at {address} that does not answer") as err:
            cluster_address(env)
        assert "\n" not in str(err.value) and str(state / "head" / "ray_current_cluster") in str(err.value)


def test_rays_own_file_first_stale_or_live(dirs, live):
    """Ray's own ray_current_cluster (what ray.init would read) comes first, live or stale."""
    ray_dir, state = dirs
    script_node(state, "head", live, os.getpid())
    address = dead_address()
    (ray_dir / "ray_current_cluster").write_text(address)
    with pytest.raises(ConfigError, match=f"ray_current_cluster names a Ray cluster at {address}"):
        cluster_address("")
    (ray_dir / "ray_current_cluster").write_text(live)
    assert cluster_address("") == live == cluster_address("auto")
