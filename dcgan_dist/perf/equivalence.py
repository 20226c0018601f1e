"""The gold-standard check of synchronised batch norm under DDP.

N workers with batch B each must train exactly like 1 worker with batch N*B on the same samples: same
forward outputs, gradients, batch-norm running statistics and parameters after several optimizer steps, for
G and D. With synchronisation off they must differ (so the check can fail).

    python -m dcgan_dist.perf.equivalence [--world-size 2] [--device cpu|cuda] [--dtype float64] [--no-sync]

prints the largest absolute difference of each kind as JSON. On CUDA the workers use torch.nn.SyncBatchNorm,
over NCCL with one GPU per rank when there are enough GPUs, else over gloo with CUDA tensors, all ranks on
GPU 0 (NCCL refuses two ranks on one device); --backend insists on one. On CPU, CrossProcessBatchNorm over gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcgan_dist.config import ModelSection, OptimSection
from dcgan_dist.distributed.ddp import wrap_models
from dcgan_dist.distributed.env import DistEnv
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
    sync_bn: bool = True
    seed: int = 0
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


def _worker(rank: int, spec: Spec, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(backend_of(spec), init_method=f"file://{init_file}", rank=rank, world_size=spec.world_size)
    try:
        device = _device(spec, rank)
        if spec.device == "cuda":
            torch.cuda.set_device(device)
        env = DistEnv(rank=rank, world_size=spec.world_size, device=device)
        rows = slice(rank * spec.batch, (rank + 1) * spec.batch)
        torch.save(_train(spec, env, rows), os.path.join(out_dir, f"rank{rank}.pt"))
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
    print(json.dumps({"spec": spec.__dict__, **run(spec)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
