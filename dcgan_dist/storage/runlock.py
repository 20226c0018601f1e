"""One run at a time in a run directory: the lock a run holds on run.dir from before it reads its checkpoint until it
ends, so that a second command started on the same run.dir is refused in one line instead of overwriting the
first's checkpoints, config.yaml and metrics.jsonl.

    with run_lock(cfg.run.dir) as lock:       # ConfigError (exit 2) when another run holds it, naming it
        Trainer(cfg, hooks=[lock.check]).fit()

Who locks: the process that owns the run. Local: the training process. Ray: the driver, for the whole job; its
workers do not lock, so Ray Train restarting them (a failure, a preemption, an elastic resize) is never refused by
their own driver's lock.

- A folder: <run.dir>/.lock, locked with fcntl.flock, which the kernel drops when the last descriptor of the open
  file goes, so when the process ends however it ends (SIGKILL, OOM kill): a killed run's lock is free at once and
  the next run takes it. Forked children (the loader's worker processes) close their copy of the descriptor at
  once (os.register_at_fork): they outlive a killed parent by seconds and would keep its lock held. Not POSIX
  record locks (lockf): the process loses those when it closes any descriptor of the file, as reading the lock file
  does. The file holds the holder's pid, host and start time for the refusal line; a run that ends removes it.
- An object store (s3://bucket/prefix): <run.dir>/.lock is a lease object {holder, token, renewed, lease_s},
  renewed by a thread every lease_s / 4. A lease not renewed for lease_s (LEASE_S, 60 s) is stale, its run dead, and
  the next run takes it over; at once when the holder was a process of this same machine (boot and pid namespace)
  that has ended, as after a SIGKILL and a rerun on the same host. pyarrow's S3 client sends no conditional PUT
  (If-None-Match), so taking a lease is:
  read it (free or stale), write ours, wait CONFIRM_S, read it back, and go on only if ours is still there. Two runs
  starting together both write; the later write wins and the other run, reading back after CONFIRM_S, sees it and
  is refused. The race window left: a run whose read-then-write takes longer than CONFIRM_S (a stalled process) can
  overwrite a lease confirmed meanwhile; the heartbeat then finds the lease is not its own and stops that run
  (`check` raises RunError). Staleness compares the holder's clock with the reader's: hosts whose clocks differ by
  a large part of LEASE_S (no NTP) could take over a live lease.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeGuard

from dcgan_dist.config import ConfigError
from dcgan_dist.errors import RunError
from dcgan_dist.storage.filesystem import RunStorage

LOCK_FILE = ".lock"
LEASE_S = 60.0  # an object-store lease not renewed for this long is stale (its run is gone)
CONFIRM_S = 3.0  # how long a new lease must stay ours before the run goes on (see the module's docstring)

_held_here: set[str] = set()  # run dirs this process holds: a second lock from here is refused without trying
_lock_fds: set[int] = set()  # the descriptors of the folder locks held


def _close_lock_fds_in_child() -> None:
    for fd in _lock_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _lock_fds.clear()


os.register_at_fork(after_in_child=_close_lock_fds_in_child)


def _holder() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "processes": _process_space(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
    }


def _process_space() -> str:
    """Which machine, boot and pid namespace this process lives in: where a pid names the same process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{socket.gethostname()}/{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""  # not Linux: never judged from here


def _gone(holder: dict) -> bool:
    """The holder is a process of this machine, boot and pid namespace that has ended (a zombie has too)."""
    if not holder.get("processes") or holder["processes"] != _process_space():
        return False
    pid = int(holder.get("pid", 0))
    if pid == os.getpid():
        return True  # a run before this one that had the same pid (a restarted container's process)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a run that is starting"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('started', '?')}"


class _FolderLock:
    def __init__(self, location: str):
        self.location = location
        self.path = Path(location).expanduser().absolute() / LOCK_FILE
        self.fd: int | None = None
        self.lost: dict | None = None  # a folder lock cannot be taken away

    def acquire(self) -> None:
        key = str(self.path.resolve())
        if key in _held_here:
            raise ConfigError(f"run.dir={self.location} is in use by another run in this process")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:  # another user's run, a read-only folder
                raise ConfigError(
                    f"run.dir={self.location}: cannot open its lock file {self.path} ({exc.strerror}); "
                    "choose another run.dir"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without locks (some FUSE mounts)
                    os.close(fd)
                    print(
                        f"warning: cannot lock run.dir={self.location} ({exc.strerror}): nothing stops a second "
                        "run there from overwriting this one's files",
                        file=sys.stderr,
                        flush=True,
                    )
                    return
                holder = _read_json(os.pread(fd, 4096, 0))
                os.close(fd)
                raise ConfigError(
                    f"run.dir={self.location} is in use by another run ({_describe(holder)}); wait "
                    "for it to end or stop it, or choose another run.dir"
                ) from None
            # A run that ended removed the file it had locked, maybe just before we locked it: lock the new one.
            try:
                mine, there = os.fstat(fd), os.stat(self.path)
                if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _read_json(os.pread(fd, 4096, 0))
        if previous:  # a run that was killed: the kernel dropped its lock, its note stayed
            print(
                f"run.dir={self.location}: taking over the lock of a run that ended without releasing it "
                f"({_describe(previous)})",
                flush=True,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        self.fd = fd
        _lock_fds.add(fd)
        _held_here.add(key)

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: a run waiting on this file then retries the new one
        _lock_fds.discard(self.fd)
        os.close(self.fd)  # closing it drops the lock
        _held_here.discard(str(self.path.resolve()))
        self.fd = None


def _read_json(data: bytes) -> dict | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class _Lease:
    def __init__(self, location: str, lease_s: float, confirm_s: float):
        self.location, self.lease_s, self.confirm_s = location, lease_s, confirm_s
        self.storage = RunStorage(location)
        self.token = uuid.uuid4().hex
        self.lost: dict | None = None  # the lease that replaced ours, if the heartbeat found one
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            return _read_json(self.storage.read(LOCK_FILE))
        except FileNotFoundError:
            return None

    def _write(self) -> None:
        self.storage.write(
            LOCK_FILE,
            json.dumps({**self.holder, "token": self.token, "renewed": time.time(), "lease_s": self.lease_s}).encode(),
        )

    def _refuse(self, lease: dict) -> ConfigError:
        about = _describe(lease)
        if "renewed" in lease:
            expires = time.strftime("%H:%M:%S UTC", time.gmtime(float(lease["renewed"]) + float(lease["lease_s"])))
            about += f"; its lease is renewed every {float(lease['lease_s']) / 4:g} s and expires at {expires} if not"
        return ConfigError(
            f"run.dir={self.location} is in use by another run ({about}); wait for it to end or stop "
            "it, or choose another run.dir"
        )

    def _live(self, lease: dict | None) -> TypeGuard[dict]:
        if not lease or lease.get("token") == self.token:
            return False
        try:
            fresh = time.time() - float(lease["renewed"]) <= float(lease["lease_s"])
            # A run killed on this machine (a SIGKILL, an OOM kill) is known gone without waiting for its lease.
            return fresh and not _gone(lease)
        except (KeyError, TypeError, ValueError):
            return False  # not a lease this code wrote: nothing holds it

    def acquire(self) -> None:
        try:
            self._acquire()
        except OSError as exc:  # the store did not answer (after its retries): nothing was started
            raise RunError(
                f"run.dir={self.location}: cannot take the run's lease in the object store "
                f"({str(exc).splitlines()[0][:200]}); run the command again when it answers"
            ) from None

    def _acquire(self) -> None:
        if self.storage.location in _held_here:  # its lease has this process's pid: it would look like a dead run's
            raise ConfigError(f"run.dir={self.location} is in use by another run in this process")
        self.holder = _holder()
        current = self._read()
        if self._live(current):
            raise self._refuse(current)
        if current and current.get("token"):
            print(
                f"run.dir={self.location}: taking over the stale lease of a run that ended without releasing it "
                f"({_describe(current)})",
                flush=True,
            )
        self._write()
        time.sleep(self.confirm_s)  # a run that read the lease free at the same time writes its own meanwhile
        current = self._read()
        if not current or current.get("token") != self.token:
            raise self._refuse(current or {})
        self._thread = threading.Thread(target=self._renew, name="dcgan-run-lease", daemon=True)
        self._thread.start()
        _held_here.add(self.storage.location)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                current = self._read()
                if current and current.get("token") != self.token:
                    self.lost = current
                    print(
                        f"warning: the lease on run.dir={self.location} was taken over by another run "
                        f"({_describe(current)})",
                        file=sys.stderr,
                        flush=True,
                    )
                    return
                self._write()
            except (OSError, RunError) as exc:  # the store did not answer (StoreUnreachable past run.storage_timeout_s
                # is a RunError: the run's own next write ends it in one line): the lease may lapse;
                # try at the next beat
                print(
                    f"warning: cannot renew the lease on {self.storage.where(LOCK_FILE)}: {str(exc)[:200]}",
                    file=sys.stderr,
                    flush=True,
                )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            _held_here.discard(self.storage.location)
        try:
            current = self._read()
            if current and current.get("token") == self.token:
                self.storage.delete(LOCK_FILE)
        except (OSError, RunError):  # the store did not answer (it may be why the run ends): the error is the run's
            pass  # the lease expires by itself


class RunLock:
    """A held lock on a run directory (see the module's docstring); `check` is a Trainer step hook that stops the run
    when an object-store lease was taken over (a heartbeat that could not renew it in time)."""

    def __init__(self, location: str, lease_s: float = LEASE_S, confirm_s: float = CONFIRM_S):
        self.location = location
        self._lock = _Lease(location, lease_s, confirm_s) if location.startswith("s3://") else _FolderLock(location)

    @property
    def lost(self) -> dict | None:
        return self._lock.lost

    def acquire(self) -> RunLock:
        self._lock.acquire()
        return self

    def release(self) -> None:
        self._lock.release()

    def check(self, step: int, *_) -> None:
        if self._lock.lost:
            raise RunError(
                f"run.dir={self.location}: this run's lease was taken over by another run "
                f"({_describe(self._lock.lost)}) at step {step}; stopped without writing more: see which "
                "run should own this run.dir"
            )


@contextmanager
def run_lock(location: str, lease_s: float = LEASE_S, confirm_s: float = CONFIRM_S) -> Iterator[RunLock]:
    """Hold the lock on run.dir `location` inside the block; ConfigError when another run holds it."""
    lock = RunLock(location, lease_s, confirm_s).acquire()
    try:
        yield lock
    finally:
        lock.release()
