"""The gold-standard check of synchronised batch norm under DDP.

N workers with batch B each must train exactly like 1 worker with batch N*B on the same samples: same
forward outputs, gradients, batch-norm running statistics and parameters after several optimizer steps, for
G and D. With synchronisation off they must differ (so the check can fail).

    python -m dcgan_dist.perf.equivalence [--world-size 2] [--device cpu|cuda] [--dtype float64] [--no-sync]
    python -m dcgan_dist.perf.equivalence --world-size 4 --groups 2     # or --groups node --ranks-per-node 2

prints the largest absolute difference of each kind as JSON. With --groups, BN is synchronised within groups
(dist.sync_bn node or a group size) and each group must match one process with the group's concatenated batch.
On CUDA the workers use torch.nn.SyncBatchNorm, over NCCL with one GPU per rank when there are enough GPUs, else
over gloo with CUDA tensors, all ranks on GPU 0 (NCCL refuses two ranks on one device); --backend insists on
one. On CPU, CrossProcessBatchNorm over gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcgan_dist.config import ModelSection, OptimSection
from dcgan_dist.distributed.ddp import wrap_models
from dcgan_dist.distributed.env import DistEnv
from dcgan_dist.distributed.groups import bn_groups
from dcgan_dist.gan.models import build_models, unwrap
from dcgan_dist.gan.objectives import OBJECTIVES, objective
from dcgan_dist.gan.step import make_optimizers, train_step


@dataclass
class Spec:
    world_size: int = 2
    batch: int = 4  # per worker
    steps: int = 3
    image_size: Literal[28, 32, 64, 128] = 32
    channels: Literal[1, 3] = 3
    nz: int = 8
    width: int = 4
    dtype: str = "float64"
    device: str = "cpu"
    sync_bn: bool | str = True  # dist.sync_bn: global, node, a group size ("2"), off; True/False: global/off
    seed: int = 0
    ranks_per_node: int = 0  # node mode on one machine: ranks r // ranks_per_node share a node (0: the host name)
    backend: str = ""  # "": nccl on CUDA with a GPU per rank, else gloo
    num_classes: int = 0  # > 0: the class-conditional models, random labels
    loss: str = "bce"  # gan.loss


def backend_of(spec: Spec) -> str:
    """The workers' collectives: gloo on CPU; on CUDA nccl when every rank can have its own GPU, else gloo."""
    if spec.backend:
        return spec.backend
    if spec.device == "cuda" and torch.cuda.device_count() >= spec.world_size:
        return "nccl"
    return "gloo"


def _device(spec: Spec, rank: int) -> torch.device:
    if spec.device != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", rank if backend_of(spec) == "nccl" else 0)


def _inputs(spec: Spec) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
    """Global batches (N*B) of images, latents and labels (None: unconditional) for every step, plus one more for
    the forward check."""
    gen = torch.Generator().manual_seed(spec.seed + 1)
    total = spec.world_size * spec.batch
    # A non-zero mean and a wide spread exercise the numerics of combining per-rank statistics.
    reals = [
        torch.tanh(torch.randn(total, spec.channels, spec.image_size, spec.image_size, generator=gen) + 0.3)
        for _ in range(spec.steps + 1)
    ]
    zs = [torch.randn(total, spec.nz, 1, 1, generator=gen) * 2 for _ in range(spec.steps + 1)]
    labels = [torch.randint(spec.num_classes, (total,), generator=gen) if spec.num_classes else None for _ in zs]
    return reals, zs, labels


def _train(spec: Spec, env: DistEnv, rows: slice) -> dict:
    dtype = getattr(torch, spec.dtype)
    model = ModelSection(spec.image_size, spec.channels, spec.nz, spec.width, spec.width)
    model.conditional, model.num_classes = spec.num_classes > 0, spec.num_classes
    G: torch.nn.Module  # the plain networks, then DDP-wrapped ones
    D: torch.nn.Module
    G, D = build_models(model, seed=spec.seed)
    G, D = G.to(env.device, dtype), D.to(env.device, dtype)
    opt_g, opt_d = make_optimizers(G, D, OptimSection())
    G, D = wrap_models(G, D, env, sync_bn=spec.sync_bn)
    reals, zs, labels = _inputs(spec)
    ys = [None if y is None else y[rows].to(env.device) for y in labels]
    for real, z, y in zip(reals[:-1], zs[:-1], ys[:-1]):
        real, z = real[rows].to(env.device, dtype), z[rows].to(env.device, dtype)
        train_step(G, D, opt_g, opt_d, real, z, objective=objective(spec.loss), labels=y)
    result = {
        name: {k: v.detach().cpu() for k, v in unwrap(net).state_dict().items()} for name, net in (("G", G), ("D", D))
    }
    result["grads"] = {
        f"{name}.{k}": p.grad.detach().cpu()
        for name, net in (("G", G), ("D", D))
        for k, p in unwrap(net).named_parameters()
        if p.grad is not None
    }
    with torch.no_grad():  # forward outputs in training mode (batch statistics): every rank takes part
        result["G(z)"] = G(zs[-1][rows].to(env.device, dtype), ys[-1]).cpu()
        result["D(x)"] = D(reals[-1][rows].to(env.device, dtype), ys[-1]).cpu()
    return result


def _worker(rank: int, spec: Spec, init_file: str, out_dir: str, groups_check: bool = False) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(backend_of(spec), init_method=f"file://{init_file}", rank=rank, world_size=spec.world_size)
    try:
        device = _device(spec, rank)
        if spec.device == "cuda":
            torch.cuda.set_device(device)
        node = f"node{rank // spec.ranks_per_node}" if spec.ranks_per_node else ""
        env = DistEnv(rank=rank, world_size=spec.world_size, device=device, node_id=node)
        rows = slice(rank * spec.batch, (rank + 1) * spec.batch)
        work = _group_forward if groups_check else _train
        torch.save(work(spec, env, rows), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Results saved: leave without interpreter finalization. A gloo worker thread may still be releasing the last
    # collective's tensors (Python-owned: that takes the GIL); during finalization that aborts the process
    # ("terminate called without an active exception", SIGABRT), and the check failed although it had passed.
    os._exit(0)


def run(spec: Spec) -> dict:
    """{"backend": the workers' collectives (gloo or nccl), "max_abs_diff": {kind: largest absolute difference
    between the N-worker run and the 1-worker run with the global batch}}."""
    # One process with the global batch; _inputs() depends only on the global batch size and seed, so it
    # sees exactly the samples that the N workers share out.
    backend = backend_of(spec)  # decided here, with the GPUs this process sees, for every worker alike
    spec = Spec(**{**spec.__dict__, "backend": backend})
    single = Spec(**{**spec.__dict__, "world_size": 1, "batch": spec.world_size * spec.batch})
    device = _device(spec, 0)
    reference = _train(single, DistEnv(device=device), slice(None))
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker,
            args=(spec, os.path.join(tmp, "init"), tmp),
            nprocs=spec.world_size,
            start_method="spawn",
            join=True,
        )
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(spec.world_size)]

    def max_diff(a: dict, b: dict, keys=None) -> float:
        return max(((a[k].double() - b[k].double()).abs().max().item() for k in (keys or a)), default=0.0)

    def is_param(name: str) -> bool:
        return name.endswith(("weight", "bias"))

    out = {}
    for net in ("G", "D"):
        params = [k for k in reference[net] if is_param(k)]
        buffers = [k for k in reference[net] if k.startswith("net") and ("running" in k)]
        out[f"{net}_params"] = max(max_diff(reference[net], r[net], params) for r in ranks)
        out[f"{net}_running_stats"] = max(max_diff(reference[net], r[net], buffers) for r in ranks)
        out[f"{net}_grads"] = max(
            max_diff(reference["grads"], r["grads"], [k for k in reference["grads"] if k.startswith(net + ".")])
            for r in ranks
        )
        # Ranks must agree with each other exactly, parameters and running statistics alike.
        out[f"{net}_rank_disagreement"] = max(max_diff(ranks[0][net], r[net], params + buffers) for r in ranks[1:])
    out["G_forward"] = (reference["G(z)"] - torch.cat([r["G(z)"] for r in ranks])).abs().max().item()
    out["D_forward"] = (reference["D(x)"] - torch.cat([r["D(x)"] for r in ranks])).abs().max().item()
    return {"backend": backend, "max_abs_diff": out}


def _group_forward(spec: Spec, env: DistEnv, rows, mean_over: int = 0) -> dict:
    """One training-mode forward and backward of G and D (DDP-wrapped, BN synchronised per spec.sync_bn when
    env is distributed): outputs, BN running statistics and (DDP-averaged) gradients. `rows`: this process's
    samples of the global batch (a slice or a list of indices); the loss is a mean over `mean_over` samples
    (0: spec.batch)."""
    dtype = getattr(torch, spec.dtype)
    model = ModelSection(spec.image_size, spec.channels, spec.nz, spec.width, spec.width)
    G: torch.nn.Module
    D: torch.nn.Module
    G, D = build_models(model, seed=spec.seed)
    G, D = G.to(env.device, dtype), D.to(env.device, dtype)
    groups = bn_groups(env, spec.sync_bn)
    G, D = wrap_models(G, D, env, sync_bn=spec.sync_bn, groups=groups)
    reals, zs, _ = _inputs(spec)
    gen = torch.Generator().manual_seed(spec.seed + 2)
    total = spec.world_size * spec.batch
    weights = [
        torch.randn(total, *shape, generator=gen) for shape in ((spec.channels, spec.image_size, spec.image_size), ())
    ]
    out: dict[str, Any] = {"groups": groups.ranks}
    for name, net, x, w in (("G", G, zs[0], weights[0]), ("D", D, reals[0], weights[1])):
        y = net(x[rows].to(env.device, dtype))
        # Each process's loss is a mean over its own samples, as in training; DDP averages the gradients.
        (y.reshape(w[rows].shape) * w[rows].to(env.device, dtype)).sum().div(mean_over or spec.batch).backward()
        out[f"{name}(x)"] = y.detach().cpu().reshape(len(w[rows]), -1)
        out[f"{name}_running"] = {k: v.detach().cpu() for k, v in unwrap(net).state_dict().items() if "running" in k}
        out[f"{name}_grads"] = {
            k: p.grad.detach().cpu() for k, p in unwrap(net).named_parameters() if p.grad is not None
        }
    return out


def run_groups(spec: Spec) -> dict:
    """Synchronised BN within groups (spec.sync_bn: node or a group size) against one process per group with
    the group's concatenated batch: {"groups": the ranks of each group, "max_abs_diff": {kind: largest
    difference}, "global_diff": {kind: the same against one process with the whole global batch}} for the
    kinds G_forward, D_forward (outputs), G_running_stats, D_running_stats and G_grads, D_grads (DDP's average
    over all ranks against the group-size-weighted mean of the groups' gradients)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker,
            args=(spec, os.path.join(tmp, "init"), tmp, True),
            nprocs=spec.world_size,
            start_method="spawn",
            join=True,
        )
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(spec.world_size)]
    groups: list[list[int]] = ranks[0]["groups"] or [[r] for r in range(spec.world_size)]

    def one_process(members: list[int]) -> dict:
        rows = [i for r in members for i in range(r * spec.batch, (r + 1) * spec.batch)]
        return _group_forward(spec, DistEnv(), rows, mean_over=len(rows))  # the mean over the group's samples

    def diffs(refs: list[tuple[list[int], dict]]) -> dict:
        out: dict[str, float] = {}
        for net in ("G", "D"):
            out[f"{net}_forward"] = max(
                (ref[f"{net}(x)"][i * spec.batch : (i + 1) * spec.batch] - ranks[r][f"{net}(x)"]).abs().max().item()
                for members, ref in refs
                for i, r in enumerate(members)
            )
            out[f"{net}_running_stats"] = max(
                (ref[f"{net}_running"][k].double() - ranks[r][f"{net}_running"][k].double()).abs().max().item()
                for members, ref in refs
                for r in members
                for k in ref[f"{net}_running"]
            )
            grads = ranks[0][f"{net}_grads"]
            expected = {k: sum(len(m) / spec.world_size * ref[f"{net}_grads"][k] for m, ref in refs) for k in grads}
            out[f"{net}_grads"] = max(
                (expected[k] - rank[f"{net}_grads"][k]).abs().max().item() for rank in ranks for k in grads
            )
        return out

    everyone = list(range(spec.world_size))
    return {
        "groups": groups,
        "max_abs_diff": diffs([(g, one_process(g)) for g in groups]),
        "global_diff": diffs([(everyone, one_process(everyone))]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcgan_dist.perf.equivalence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="per worker")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--no-sync", action="store_true", help="plain per-rank batch norm (expected to differ)")
    parser.add_argument("--num-classes", type=int, default=0, help="> 0: the class-conditional models")
    parser.add_argument("--loss", default="bce", choices=tuple(OBJECTIVES), help="the GAN objective (gan.loss)")
    parser.add_argument(
        "--groups",
        default="",
        help="node or a group size: BN synchronised within groups, checked against one process per group with "
        "the group's concatenated batch (one forward and backward), and against the global batch (must differ)",
    )
    parser.add_argument("--ranks-per-node", type=int, default=0, help="--groups node: pretended nodes of this many")
    parser.add_argument(
        "--backend",
        default="",
        choices=("", "gloo", "nccl"),
        help="default: nccl on CUDA with a GPU per rank, else gloo",
    )
    args = parser.parse_args(argv)
    spec = Spec(
        world_size=args.world_size,
        batch=args.batch,
        steps=args.steps,
        device=args.device,
        dtype=args.dtype,
        image_size=args.image_size,
        width=args.width,
        sync_bn=not args.no_sync,
        backend=args.backend,
        num_classes=args.num_classes,
        loss=args.loss,
    )
    if args.groups:
        spec.sync_bn, spec.ranks_per_node = args.groups, args.ranks_per_node
        print(json.dumps({"spec": spec.__dict__, **run_groups(spec)}))
        return 0
    print(json.dumps({"spec": spec.__dict__, **run(spec)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
