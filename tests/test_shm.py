"""The shared-memory transport for CPU workers on one host (real processes, real gloo groups for set-up)."""

import os
import pickle
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcgan_dist.distributed import shm


def _spawn(fn, world: int, tmp_path, *args) -> list:
    mp.start_processes(fn, args=(world, str(tmp_path), *args), nprocs=world, start_method="spawn")
    return [pickle.loads((tmp_path / f"{r}.pkl").read_bytes()) for r in range(world)]


def _init(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)


def _save(tmp: str, rank: int, obj) -> None:
    with open(f"{tmp}/{rank}.pkl", "wb") as f:
        pickle.dump(obj, f)


def _collectives_worker(rank: int, world: int, tmp: str) -> None:
    _init(rank, world, tmp)
    try:
        transport = shm.setup_cpu_transport("shm", "cpu")
        out = {"active": shm.active_transport() is transport}
        gen = torch.Generator().manual_seed(100 + rank)
        # Alternate small gathers and large (multi-piece) reductions, so that both parities are reused.
        for i in range(3):
            out[f"gather{i}"] = transport.gather_rows(np.arange(5, dtype=np.float64) + 10 * rank + i)
            t = torch.randn(700_000, generator=gen)  # 2.8 MB: three pieces of at most 1 MiB
            out[f"input{i}"] = t.clone()
            out[f"reduced{i}"] = transport.all_reduce_(t)
        _save(tmp, rank, out)
    finally:
        shm.teardown_cpu_transport()
        dist.destroy_process_group()


def test_gather_and_reduce_are_exact_and_identical_on_every_rank(tmp_path):
    world = 3
    results = _spawn(_collectives_worker, world, tmp_path)
    for i in range(3):
        expected_rows = np.stack([np.arange(5, dtype=np.float64) + 10 * r + i for r in range(world)])
        for res in results:
            assert res["active"]
            np.testing.assert_array_equal(res[f"gather{i}"], expected_rows)
        # The sum in rank order, in float32: what every rank must hold, to the bit.
        expected = results[0][f"input{i}"].clone()
        for r in range(1, world):
            expected += results[r][f"input{i}"]
        for res in results:
            assert torch.equal(res[f"reduced{i}"], expected)


def _peer_exits_worker(rank: int, world: int, tmp: str) -> None:
    _init(rank, world, tmp)
    transport = shm.setup_cpu_transport("shm", "cpu")
    if rank == 1:
        os._exit(0)  # gone without a word, as a killed worker would be
    started = time.monotonic()
    try:
        transport.gather_rows(np.zeros(4, dtype=np.float32))
        outcome = "returned"
    except shm.PeerGone as exc:
        outcome = str(exc)
    _save(tmp, rank, {"outcome": outcome, "seconds": time.monotonic() - started})
    os._exit(0)  # the process group's peer is gone: skip gloo's teardown


def test_a_rank_that_dies_is_reported_instead_of_waited_for(tmp_path):
    mp.start_processes(_peer_exits_worker, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")
    res = pickle.loads((tmp_path / "0.pkl").read_bytes())
    assert "rank 1" in res["outcome"] and "exited" in res["outcome"], res
    assert res["seconds"] < 30


def _other_host_worker(rank: int, world: int, tmp: str, mode: str) -> None:
    if rank == 1:
        socket.gethostname = lambda: "some-other-node"  # as seen from a worker on another machine
    _init(rank, world, tmp)
    try:
        try:
            outcome = "shm" if shm.setup_cpu_transport(mode, "cpu") is not None else "gloo"
        except RuntimeError as exc:
            outcome = f"error: {exc}"
        _save(tmp, rank, outcome)
    finally:
        shm.teardown_cpu_transport()
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["auto", "shm"])
def test_ranks_on_different_hosts_keep_gloo(tmp_path, mode):
    outcomes = _spawn(_other_host_worker, 2, tmp_path, mode)
    if mode == "auto":
        assert outcomes == ["gloo", "gloo"]
    else:
        assert all(o.startswith("error: dist.cpu_transport=shm") for o in outcomes), outcomes


def _full_shm_worker(rank: int, world: int, tmp: str) -> None:
    if rank == 0:
        def full(fd, offset, length):
            raise OSError(28, "No space left on device")  # as on a full /dev/shm
        os.posix_fallocate = full
    _init(rank, world, tmp)
    try:
        _save(tmp, rank, "shm" if shm.setup_cpu_transport("auto", "cpu") is not None else "gloo")
    finally:
        shm.teardown_cpu_transport()
        dist.destroy_process_group()


def test_a_segment_that_cannot_be_made_falls_back_to_gloo_on_every_rank(tmp_path):
    assert _spawn(_full_shm_worker, 2, tmp_path) == ["gloo", "gloo"]


def _gloo_mode_worker(rank: int, world: int, tmp: str) -> None:
    _init(rank, world, tmp)
    try:
        _save(tmp, rank, [shm.setup_cpu_transport("gloo", "cpu"), shm.setup_cpu_transport("auto", "cuda"),
                          shm.active_transport()])
    finally:
        dist.destroy_process_group()


def test_gloo_mode_and_gpus_use_no_shared_memory(tmp_path):
    assert _spawn(_gloo_mode_worker, 2, tmp_path) == [[None, None, None]] * 2
