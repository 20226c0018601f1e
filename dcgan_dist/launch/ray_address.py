"""Which Ray cluster a driver (dist.launcher=ray, tune) joins, checked in seconds before Ray is imported.

Users have the address in several forms: RAY_ADDRESS as `cluster/ray-cluster.sh env` prints it for
`ray job submit` (the job server, `http://HOST:8265`), a GCS address (`HOST:6379`, what Ray itself sets inside
a `ray job submit` job), `auto`, or nothing (a cluster `ray start` left in <ray temp dir>/ray_current_cluster
or, for cluster/ray-cluster.sh's nodes, in their own temp dirs under $RAY_CLUSTER_DIR; else a private local
instance). `ray.init` takes only some of them, and waits many minutes, saying little, for
a cluster that does not answer: a stale ray_current_cluster left by a cluster that was killed (not `ray stop`ped)
or a machine that restarted. Here every form becomes a GCS address whose port answers, or None (start a private
instance), or a ConfigError whose one line says what was found and what to do.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from dcgan_dist.config import ConfigError

# Where a job server's cluster's GCS is on its host: Ray's default head port (`ray start --head --port`), or the
# cluster script's RAY_GCS_PORT.
GCS_PORT = 6379
ANSWER_TIMEOUT_S = 3.0
GCS_TIMEOUT_S = 15.0
# Ray's own GCS client, in a process of its own (it retries for minutes, logging each try): does it get in?
GCS_PROBE = """
import sys
from ray._raylet import GcsClient
GcsClient(address=sys.argv[1]).internal_kv_get(b"dcgan-probe", None, timeout=5)
print("ok")
"""
START_HINT = "start it (cluster/ray-cluster.sh local, or ray start --head)"


def ray_temp_dir() -> Path:
    """Ray's temp dir as Ray finds it (RAY_TMPDIR, TMPDIR, /tmp) + ray: where ray_current_cluster is."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray"


def address_file() -> Path:
    return ray_temp_dir() / "ray_current_cluster"


def script_dir() -> str:
    """Where cluster/ray-cluster.sh keeps its nodes' state (its STATE): $RAY_CLUSTER_DIR, default
    /tmp/dcgan-ray-<GCS port> (any port here)."""
    return os.environ.get("RAY_CLUSTER_DIR") or "/tmp/dcgan-ray-*"


def _running(pid_file: Path) -> bool:
    """Whether the process in a pid file still runs."""
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except PermissionError:
        return True
    except (OSError, ValueError):
        return False
    return True


def script_address_files() -> list[Path]:
    """The address files of the nodes cluster/ray-cluster.sh started on this machine that still run, newest first.
    Each node has its own --temp-dir, <script_dir()>/<node>, where `ray start` writes its ray_current_cluster (not
    in Ray's temp dir), beside <node>.pid. A node whose process has gone (`ray stop --force`, a reboot) is no
    cluster: its file is passed over (ray.init never reads it, so it cannot make a driver wait)."""
    state = os.environ.get("RAY_CLUSTER_DIR")
    found = Path(state or "/tmp").glob("*/ray_current_cluster" if state else "dcgan-ray-*/*/ray_current_cluster")
    stamped = []
    for path in found:
        try:
            if _running(path.parent.parent / f"{path.parent.name}.pid"):
                stamped.append((path.stat().st_mtime, path))
        except OSError:
            continue
    return [path for _, path in sorted(stamped, key=lambda item: item[0], reverse=True)]


def address_files() -> list[Path]:
    """Where a cluster started on this machine records its address: Ray's temp dir, then the cluster script's."""
    return [address_file(), *script_address_files()]


def answers(address: str, timeout: float = ANSWER_TIMEOUT_S) -> str:
    """'' when something accepts a TCP connection at HOST:PORT within timeout, else why not."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return ""
    except TimeoutError:
        return f"no answer in {timeout:g} s"
    except (OSError, ValueError) as exc:
        return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _host_port(address: str) -> str:
    """A bare GCS address, HOST:PORT; ConfigError when it is not one."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not host or not port.isdigit():
        raise ConfigError(
            f"RAY_ADDRESS={address} is not a Ray address: give HOST:PORT (the head's GCS, e.g. 127.0.0.1:6379), "
            "http://HOST:8265 (the job server), auto, or unset it for a private local Ray instance"
        )
    return address


def recorded() -> list[tuple[Path, str]]:
    """(file, address) of every cluster a `ray start` on this machine recorded (address_files), one per address."""
    found: dict[str, Path] = {}
    for path in address_files():
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text:
            found.setdefault(text, path)
    return [(path, address) for address, path in found.items()]


def from_file() -> str | None:
    """The address a `ray start` on this machine recorded (the first of address_files that has one), if any."""
    found = recorded()
    return found[0][1] if found else None


def gcs_refusal(address: str, timeout: float = GCS_TIMEOUT_S) -> str:
    """'' when Ray's GCS client gets an answer from address with this process's authentication settings
    (RAY_AUTH_MODE, the token) within timeout, else why not (ray.init would retry for many minutes)."""
    probe = subprocess.Popen(
        [sys.executable, "-c", GCS_PROBE, address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a Ctrl-C meant for the command is the command's to handle
    )
    watchdog = threading.Timer(timeout, probe.kill)
    watchdog.start()
    refused, missing = False, False
    try:
        assert probe.stderr is not None and probe.stdout is not None
        for line in probe.stderr:  # Ray's client logs every failed try: a refused token is known at the first
            missing = missing or "No module named 'ray" in line
            if "InvalidAuthToken" in line or "Unauthenticated" in line:
                refused = True
                probe.kill()
                break
        answered = probe.stdout.read().strip() == "ok"
        probe.wait()
    finally:
        watchdog.cancel()
        if probe.poll() is None:
            probe.kill()
            probe.wait()
    if answered and probe.returncode == 0:
        return ""
    if missing:
        return 'Ray is not installed for this Python: pip install -e ".[ray]"'
    if refused:
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        return (
            f"it refuses this client's authentication (RAY_AUTH_MODE={mode}): export the RAY_AUTH_MODE and token "
            "the cluster uses (cluster/ray-cluster.sh env prints them; the head's token file copied here)"
        )
    return f"something answers there, but not a Ray GCS that this client can reach in {timeout:g} s"


def cluster_address(env: str | None = None, probe: bool = False) -> str | None:
    """The GCS address to pass to ray.init (checked: it answers), or None to start a private local instance.
    env: RAY_ADDRESS (default: this process's); probe: also check with Ray's own client that the GCS lets this
    process in (a few seconds). ConfigError when no cluster answers where one is named."""
    found = _cluster_address((os.environ.get("RAY_ADDRESS", "") if env is None else env).strip())
    if probe and found and "://" not in found:
        why = gcs_refusal(found)
        if why:
            raise ConfigError(f"the Ray cluster at {found} does not let this driver in: {why}")
    return found


def _cluster_address(env: str) -> str | None:
    if env == "local":
        return None
    if env and env != "auto":
        scheme = urlsplit(env).scheme if "://" in env else ""  # another scheme than these: not a Ray address
        if scheme in ("http", "https"):
            return _from_job_server(env)
        if scheme == "ray":  # Ray Client: ray.init takes it as it is; its port must answer all the same
            netloc = urlsplit(env).netloc
            why = answers(netloc)
            if why:
                raise ConfigError(f"RAY_ADDRESS={env}: the Ray Client server does not answer ({why}): {START_HINT}")
            return env
        why = answers(_host_port(env))
        if why:
            raise ConfigError(
                f"RAY_ADDRESS={env}: no Ray cluster answers there ({why}): {START_HINT}, fix RAY_ADDRESS, or unset it "
                "for a private local Ray instance"
            )
        return env
    found = recorded()
    if not found:
        if env == "auto":
            raise ConfigError(
                f"RAY_ADDRESS=auto but no Ray cluster was started on this machine ({address_file()} is missing, and "
                f"no node of cluster/ray-cluster.sh runs in {script_dir()}): {START_HINT}, or unset RAY_ADDRESS "
                "for a private local Ray instance"
            )
        return None
    path, address = found[0]  # Ray's own file first (what ray.init itself would read), else the newest node's
    why = answers(address)
    if why:
        raise ConfigError(
            f"{path} names a Ray cluster at {address} that does not answer ({why}): it was stopped without `ray stop` "
            f"(or the machine restarted); {START_HINT} again, or delete that file to use a private local Ray instance"
        )
    return address


def _from_job_server(url: str) -> str:
    """The job server's URL (what `ray job submit` takes) -> its cluster's GCS address: the one `ray start`
    recorded on this machine when it is on the same host, else the default head port on that host."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    candidates = [
        address
        for _, address in recorded()
        if address.rpartition(":")[0] in (host, "127.0.0.1" if host == "localhost" else host)
    ]
    candidates.append(f"{host}:{os.environ.get('RAY_GCS_PORT') or GCS_PORT}")
    reasons = []
    for candidate in dict.fromkeys(candidates):
        why = answers(candidate)
        if not why:
            return candidate
        reasons.append(f"{candidate}: {why}")
    raise ConfigError(
        f"RAY_ADDRESS={url} is a job server (for `ray job submit`) and its cluster's GCS does not answer "
        f"({'; '.join(reasons)}): {START_HINT}, or set RAY_ADDRESS=HOST:PORT (the head's --port)"
    )
