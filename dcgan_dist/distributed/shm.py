"""Collectives through shared memory for CPU workers that share one host.

Why: a CPU GAN step makes ~26 blocking batch-norm collectives plus the gradient all-reduce. Through gloo
each one is a round of TCP messages and thread wake-ups; on a busy 2-core VM a 2-rank all-gather of a few
hundred floats takes ~0.5 ms back to back but ~2 ms between compute (the waiting threads have gone to sleep),
which cost a quarter of the step. Here ranks on one host exchange data through a /dev/shm segment and wait
by spinning on per-rank counters (then yielding, then sleeping, so long waits do not burn a core): a few
microseconds per exchange. NCCL and MPI do the same within a node.

Used automatically (dist.cpu_transport=auto) when every rank of the default group runs on this host on an
x86-64 CPU: x86's store order is what makes "write the payload, then bump the counter" safe without explicit
fences, which Python cannot issue. Other set-ups (several hosts, GPUs, other CPUs) keep gloo/NCCL.

Results are bit-identical on every rank: each element of a sum is computed once, by one rank, adding the
ranks' values in rank order, and every rank copies the same result.
"""

from __future__ import annotations

import mmap
import os
import platform
import secrets
import socket
import time

import numpy as np
import torch
import torch.distributed as dist

SHM_DIR = "/dev/shm"
_LINE = 64  # bytes: each rank's counter on its own cache line
_SLOT_BYTES = 1 << 20  # per rank and parity; larger tensors go through in pieces


class PeerGone(RuntimeError):
    pass


class ShmCollectives:
    """gather_rows (all-gather) / all_reduce_ (sum) over the ranks of the default process group, through one shared segment.

    Layout: W counters (one cache line each), then for each parity p in (0, 1): W input slots and one
    output area of _SLOT_BYTES. Exchange k uses parity k % 2, so a rank may fill its next slot while slower
    ranks still read the previous one; exchange k + 2 cannot start before every rank has finished k
    (it needs everyone's counter to have reached k + 1).
    """

    def __init__(self, path: str, rank: int, world: int, create: bool, timeout_s: float = 1800.0):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.counters_bytes = world * _LINE
        self.area_bytes = (world + 1) * _SLOT_BYTES
        size = self.counters_bytes + 2 * self.area_bytes
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                # Reserve the pages now: on a full tmpfs (Docker's 64 MB /dev/shm) this fails here with an
                # OSError, and set-up falls back to gloo, instead of a SIGBUS at the first write.
                os.posix_fallocate(fd, 0, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        whole = torch.frombuffer(self._mm, dtype=torch.uint8)
        # Per parity: [world, _SLOT_BYTES] input slots and the output area, as torch views (any dtype for the
        # reduction) and the slots again as NumPy views of the same bytes (cheapest to index for small gathers).
        self._slots, self._out = [], []
        for parity in (0, 1):
            start = self.counters_bytes + parity * self.area_bytes
            self._slots.append(whole[start : start + world * _SLOT_BYTES].view(world, _SLOT_BYTES))
            self._out.append(whole[start + world * _SLOT_BYTES : start + self.area_bytes])
        self._np_slots = [slots.numpy() for slots in self._slots]
        self._counters = np.frombuffer(self._mm, dtype=np.int64, count=self.counters_bytes // 8)[:: _LINE // 8]
        self._sequence = 0  # exchanges made by this rank
        self.pids: list[int] = []
        self.check_pids = False

    # --- set-up ---------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, rank: int, world: int) -> "ShmCollectives | None":
        """Collective over the default group: a shared segment if every rank is on this host, else None."""
        here = (socket.gethostname(), _boot_id(), os.path.isdir(SHM_DIR))
        if not all(h == here for h in _gather(here)) or not here[2]:
            return None
        name = [f"{SHM_DIR}/dcgan-dist-{os.getpid()}-{secrets.token_hex(6)}" if rank == 0 else None]
        dist.broadcast_object_list(name, src=0)
        shm, ok = None, True
        if rank == 0:
            shm, ok = _map(name[0], rank, world, create=True)
        dist.barrier()  # the file exists (or rank 0 failed: every rank still meets here)
        if rank != 0:
            shm, ok = _map(name[0], rank, world, create=False)
        flags = _gather((ok, os.getpid()))
        dist.barrier()  # everyone has mapped it (or failed): the name can go, the mapping stays
        if rank == 0:
            try:
                os.unlink(name[0])
            except OSError:
                pass
        if not all(f[0] for f in flags):
            return None
        shm.pids = [f[1] for f in flags]
        # Liveness checks need the peers' pids to be visible here (not so across PID namespaces).
        shm.check_pids = all(_alive(pid) for pid in shm.pids)
        return shm

    # --- waiting ----------------------------------------------------------------------------------------------

    def _arrive_and_wait(self) -> int:
        """Announce this rank's next exchange and wait until every rank has announced it; returns its number."""
        self._sequence += 1
        k = self._sequence
        self._counters[self.rank] = k  # after the payload writes (x86 keeps stores in order)
        counters = self._counters
        if counters.min() >= k:
            return k
        # Spin, yielding the core to any other runnable thread (free when there is none); after 20 ms (a rank
        # busy elsewhere, e.g. writing a checkpoint) sleep in short naps and check that the others still live.
        started, spins = time.monotonic(), 0
        while counters.min() < k:
            spins += 1
            if spins % 64:
                os.sched_yield()
                continue
            waited = time.monotonic() - started
            if waited < 0.02:
                os.sched_yield()
            else:
                time.sleep(0.0001)
                if spins % 4096 == 0:
                    self._check_peers(waited, k)
        return k

    def _check_peers(self, waited: float, k: int) -> None:
        for r, pid in enumerate(self.pids if self.check_pids else []):
            if r != self.rank and self._counters[r] < k and not _alive(pid):
                raise PeerGone(f"rank {r} (pid {pid}) exited while rank {self.rank} waited for it in a collective")
        if waited > self.timeout_s:
            raise TimeoutError(f"rank {self.rank} waited {waited:.0f} s for the other ranks in a shared-memory collective")

    # --- collectives ------------------------------------------------------------------------------------------

    def gather_rows(self, local: np.ndarray) -> np.ndarray:
        """[world, n] array of every rank's 1-D `local` (same length and dtype on every rank, at most 1 MiB)."""
        nbytes = local.nbytes
        if nbytes > _SLOT_BYTES:
            raise ValueError(f"gather of {nbytes} bytes; the shared-memory transport takes up to {_SLOT_BYTES}")
        slots = self._np_slots[(self._sequence + 1) % 2]
        slots[self.rank, :nbytes] = np.ascontiguousarray(local).view(np.uint8)
        self._arrive_and_wait()
        return slots[:, :nbytes].view(local.dtype).copy()

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks of a contiguous tensor, in pieces of up to 1 MiB; same bits on every rank."""
        flat = tensor.view(-1)
        per_piece = _SLOT_BYTES // flat.element_size()
        for start in range(0, flat.numel(), per_piece):
            self._reduce_piece(flat[start : start + per_piece])
        return tensor

    def _reduce_piece(self, piece: torch.Tensor) -> None:
        n, dtype = piece.numel(), piece.dtype
        nbytes = n * piece.element_size()
        parity = (self._sequence + 1) % 2
        slots, out = self._slots[parity], self._out[parity]
        slots[self.rank, :nbytes].copy_(piece.view(torch.uint8))
        self._arrive_and_wait()
        # Reduce-scatter: this rank sums its share of the elements over all ranks, in rank order.
        share = -(-n // self.world)
        lo, hi = min(n, self.rank * share), min(n, (self.rank + 1) * share)
        if hi > lo:
            inputs = slots[:, :nbytes].view(dtype)[:, lo:hi]
            acc = out[:nbytes].view(dtype)[lo:hi]
            acc.copy_(inputs[0])
            for r in range(1, self.world):
                acc.add_(inputs[r])
        # A second exchange, as a barrier: every share is summed before anyone reads `out`. (The next exchange
        # reuses this parity: its writers have passed this barrier, so all reads of these slots are done.)
        self._arrive_and_wait()
        piece.view(torch.uint8).copy_(out[:nbytes])

    def close(self) -> None:
        self._slots = self._out = self._np_slots = self._counters = None
        try:
            self._mm.close()
        except BufferError:
            pass  # a view still exists somewhere; the mapping goes with the process


def _map(path: str, rank: int, world: int, create: bool) -> tuple[ShmCollectives | None, bool]:
    """(the mapped segment, True), or (None, False) where it cannot be made or mapped here."""
    try:
        return ShmCollectives(path, rank, world, create), True
    except (OSError, ValueError):  # ValueError: a segment shorter than expected (its creator failed)
        if create:
            try:
                os.unlink(path)
            except OSError:
                pass
        return None, False


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shm_supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(SHM_DIR)


# --- which transport this process uses ----------------------------------------------------------------------

_ACTIVE: ShmCollectives | None = None
_ACTIVE_GROUP = None  # the default process group _ACTIVE was made for


def setup_cpu_transport(mode: str, device_type: str) -> ShmCollectives | None:
    """Called by every rank after the default process group exists. mode: auto | shm | gloo.

    Returns the transport (also kept for `active_transport`), or None where gloo stays in use.
    """
    global _ACTIVE, _ACTIVE_GROUP
    if mode == "gloo" or device_type != "cpu" or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    if _ACTIVE is not None and _ACTIVE_GROUP is dist.group.WORLD:
        return _ACTIVE
    teardown_cpu_transport()  # made for an earlier process group
    wanted = shm_supported()
    if not all(_gather(wanted)):
        if mode == "shm":
            raise RuntimeError("dist.cpu_transport=shm needs x86-64 CPUs and /dev/shm on every rank; use auto or gloo")
        return None
    _ACTIVE, _ACTIVE_GROUP = ShmCollectives.create(dist.get_rank(), dist.get_world_size()), dist.group.WORLD
    if _ACTIVE is None and mode == "shm":
        raise RuntimeError("dist.cpu_transport=shm: the ranks do not share one host (or /dev/shm); use auto or gloo")
    return _ACTIVE


def active_transport(group=None) -> ShmCollectives | None:
    """The shared-memory transport for `group`, if one is set up (default group only)."""
    if _ACTIVE is None or _ACTIVE_GROUP is not dist.group.WORLD or (group is not None and group is not dist.group.WORLD):
        return None
    return _ACTIVE


def transport_name(device_type: str) -> str:
    """What this process's gradient and batch-norm collectives go through: shm, gloo or nccl."""
    if active_transport() is not None:
        return "shm"
    return "nccl" if device_type == "cuda" else "gloo"


def teardown_cpu_transport() -> None:
    global _ACTIVE, _ACTIVE_GROUP
    if _ACTIVE is not None:
        _ACTIVE.close()
    _ACTIVE = _ACTIVE_GROUP = None


def _gather(value) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def shm_allreduce_hook(state, bucket):  # no annotations: DDP checks them, and this module's are strings
    """DDP communication hook: the gradient bucket's mean over ranks, through shared memory."""
    tensor = bucket.buffer()
    state.all_reduce_(tensor).div_(state.world)
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(tensor)
    return future
