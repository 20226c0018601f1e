"""Synchronised batch norm under DDP: N workers x batch B == 1 worker x batch N*B (real gloo process groups)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dcgan_dist.distributed import CrossProcessBatchNorm, convert_sync_batchnorm
from dcgan_dist.perf.equivalence import Spec, run, run_groups

# float64: what remains is summation-order rounding; measured ~1e-15 on CPU. Tolerance stated here:
FLOAT64_TOLERANCE = 1e-12


def test_two_workers_equal_one_worker_with_the_global_batch():
    result = run(Spec(world_size=2, batch=4, steps=3, dtype="float64", sync_bn=True))
    diffs = result["max_abs_diff"]
    for kind in ("params", "running_stats", "grads"):
        for net in ("G", "D"):
            assert diffs[f"{net}_{kind}"] < FLOAT64_TOLERANCE, (kind, net, diffs)
    assert diffs["G_forward"] < FLOAT64_TOLERANCE and diffs["D_forward"] < FLOAT64_TOLERANCE, diffs
    assert diffs["G_rank_disagreement"] == 0.0 and diffs["D_rank_disagreement"] == 0.0  # identical on every rank


def test_without_sync_the_runs_differ():
    diffs = run(Spec(world_size=2, batch=4, steps=3, dtype="float64", sync_bn=False))["max_abs_diff"]
    assert diffs["G_forward"] > 1e-3 and diffs["D_forward"] > 1e-3, diffs
    assert diffs["G_running_stats"] > 1e-4 and diffs["D_grads"] > 1e-3, diffs


KINDS = ("forward", "running_stats", "grads")


def test_four_workers_in_two_groups_equal_each_groups_concatenated_batch():
    """dist.sync_bn=2: ranks 0,1 and 2,3 each normalise over their pair's samples. Outputs and running
    statistics equal one process's with the pair's concatenated batch; gradients, which DDP still averages over
    all four, equal the mean of the two pairs' gradients. Negative control: they are not the global batch's."""
    result = run_groups(Spec(world_size=4, batch=3, dtype="float64", sync_bn="2"))
    assert result["groups"] == [[0, 1], [2, 3]]
    for net in ("G", "D"):
        for kind in KINDS:
            assert result["max_abs_diff"][f"{net}_{kind}"] < FLOAT64_TOLERANCE, result
        assert result["global_diff"][f"{net}_forward"] > 1e-3, result
        assert result["global_diff"][f"{net}_running_stats"] > 1e-5 and result["global_diff"][f"{net}_grads"] > 1e-3


def test_node_groups_follow_the_nodes():
    """dist.sync_bn=node with two ranks per (pretended) node: the groups are the nodes; the same equality."""
    result = run_groups(Spec(world_size=4, batch=3, dtype="float64", sync_bn="node", ranks_per_node=2))
    assert result["groups"] == [[0, 1], [2, 3]]
    assert max(result["max_abs_diff"].values()) < FLOAT64_TOLERANCE, result
    assert result["global_diff"]["G_forward"] > 1e-3 and result["global_diff"]["D_forward"] > 1e-3, result


@pytest.mark.slow
def test_three_workers_float32():
    diffs = run(Spec(world_size=3, batch=3, steps=2, dtype="float32", sync_bn=True))["max_abs_diff"]
    assert max(diffs.values()) < 1e-4, diffs


def _large_mean_worker(rank: int, init_file: str, x: torch.Tensor, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        bn = CrossProcessBatchNorm(x.shape[1])
        local = x[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
        y = bn(local)
        weights = torch.arange(x.numel()).view_as(x).float()[rank * 4 : (rank + 1) * 4]
        (y * weights).sum().backward()  # the two ranks' losses add up to the reference's loss
        torch.save(
            {"y": y.detach(), "grad": local.grad, "running_var": bn.running_var}, os.path.join(out_dir, f"{rank}.pt")
        )
    finally:
        dist.destroy_process_group()


def test_float32_statistics_survive_a_large_mean(tmp_path):
    """Activations around 1000 with unit spread: combining raw sums of squares in float32 would be off by ~1."""
    x = 1000 + torch.randn(8, 5, 6, 6, generator=torch.Generator().manual_seed(0))
    mp.start_processes(
        _large_mean_worker, args=(str(tmp_path / "init"), x, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    ref_bn = nn.BatchNorm2d(5).double()
    xd = x.double().requires_grad_(True)
    y = ref_bn(xd)
    (y * torch.arange(y.numel()).view_as(y).double()).sum().backward()
    assert (torch.cat([g["y"] for g in got]).double() - y).abs().max() < 1e-3
    assert (torch.cat([g["grad"] for g in got]).double() - xd.grad).abs().max() < 1e-2 * xd.grad.abs().max()
    assert torch.allclose(got[0]["running_var"].double(), ref_bn.running_var, rtol=1e-3)


def test_conversion_keeps_weights_and_state_dict_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    with torch.no_grad():
        model[1].weight.fill_(2.0)
        model[1].running_mean.fill_(0.5)
    keys = list(model.state_dict())
    converted = convert_sync_batchnorm(model, "cpu")
    assert isinstance(converted[1], CrossProcessBatchNorm) and isinstance(converted[2][0], CrossProcessBatchNorm)
    assert list(converted.state_dict()) == keys  # checkpoints load into plain models and back
    assert converted[1].weight[0] == 2.0 and converted[1].running_mean[0] == 0.5
    # Without a process group (one process) it is ordinary batch norm.
    x = torch.randn(4, 4, 5, 5)
    plain = nn.BatchNorm2d(4)
    plain.load_state_dict(converted[1].state_dict())
    assert torch.allclose(converted[1](x), plain(x), atol=1e-6)
    assert isinstance(convert_sync_batchnorm(nn.BatchNorm2d(2), "cuda"), nn.SyncBatchNorm)
