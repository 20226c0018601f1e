"""Measure training speed: the loader, the full training step, the scaling of N Ray workers.

    python -m dcgan_dist.bench [--config FILE] [key=value ...] [--steps 20] [--warmup 5] [--baseline] [--checkpoint]
                               [--data-only | --skip-data]

Local launcher: data_images_per_s (shards -> normalised tensors on the device, the real loader; with
data.num_workers=0 also data_images_per_cpu_s, the same per CPU-second: the loader's cost per core) and
train_images_per_s (the real training step on batches from that loader: what the Trainer runs, without its
parts). --baseline also times a minimal hand-written DCGAN loop on in-memory random tensors (same
architecture, batch and precision), as in PyTorch's example, and reports the ratio.

Ray launcher (dist.launcher=ray, dist.num_workers=N): the same N Ray workers time, one after the other,
  c: rank 0 alone (1 worker; the others wait),
  a-nosync: N workers with DDP but per-worker batch norm,
  b: all N each running the identical step with no communication (the machine's contention ceiling),
  a: N workers training together (DDP gradient all-reduce + synchronised batch norm).
speedup = a/c and comm_efficiency = a/b, with the cost per step: compute and data wait (from b), gradient
all-reduce (a-nosync - b) and batch-norm synchronisation (a - a-nosync).

The last line printed is one JSON object with the figures, the device, batch size, widths and threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Config, ConfigError, from_args, from_dict, to_dict
from .data import normalise, resolve_data
from .distributed.env import DistEnv
from .gan import train_step
from .models import build_models
from .precision import pick_device
from .checkpoint import to_bytes
from .storage import RunStorage
from .trainer import NoiseRNG, build_networks, distribute, make_loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_data(cfg: Config, env: DistEnv, shards: str, steps: int, warmup: int) -> tuple[float, float]:
    """(images/s, images per CPU-second of this process) from the real loader to normalised tensors on the
    device. The second figure is the loader's cost per core when it runs in this process (data.num_workers=0),
    whatever else the machine is doing."""
    batches = make_loader(cfg, env, shards)
    try:
        for i in range(warmup + steps):
            if i == warmup:
                _sync(env.device)
                started, cpu_started = time.perf_counter(), time.process_time()
            normalise(next(batches), env.device, cfg.train.channels_last)
        _sync(env.device)
        images = steps * cfg.train.batch_size
        return images / (time.perf_counter() - started), images / (time.process_time() - cpu_started)
    finally:
        batches.close()


def measure_checkpoint(cfg: Config, device: torch.device) -> dict:
    """Writing one full checkpoint (G, D, both Adam states after a step) to run.dir, a local folder or a bucket,
    as the local launcher does; the file is removed again."""
    G, D, opt_g, opt_d, precision = build_networks(cfg, device)
    m = cfg.model
    real = torch.rand(cfg.train.batch_size, m.channels, m.image_size, m.image_size, device=device) * 2 - 1
    train_step(G, D, opt_g, opt_d, real, torch.randn(real.shape[0], m.nz, 1, 1, device=device), precision)
    state = {"G": G.state_dict(), "D": D.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict()}
    storage = RunStorage(cfg.run.dir)
    started = time.perf_counter()
    data = to_bytes(state)
    storage.write(".bench-checkpoint.pt", data)
    seconds = time.perf_counter() - started
    storage.delete(".bench-checkpoint.pt")
    return {"checkpoint_mib": len(data) / 2**20, "checkpoint_write_s": seconds}


def measure_train(cfg: Config, env: DistEnv, shards: str, steps: int, warmup: int, data_env: DistEnv | None = None) -> dict:
    """The real training step as `env` runs it (world 1: no DDP, no synchronisation), on batches from the real
    loader; data_env: whose slice of the shards to read (so that independent workers still read apart)."""
    G, D, opt_g, opt_d, precision = build_networks(cfg, env.device)
    G, D = distribute(G, D, cfg, env)
    batches = make_loader(cfg, data_env or env, shards)
    noise = NoiseRNG(env.device, cfg.run.seed + (data_env or env).rank)
    data_wait = 0.0
    try:
        for i in range(warmup + steps):
            if i == warmup:
                _sync(env.device)
                started, data_wait = time.perf_counter(), 0.0
            fetch = time.perf_counter()
            real = normalise(next(batches), env.device, cfg.train.channels_last)
            data_wait += time.perf_counter() - fetch
            train_step(G, D, opt_g, opt_d, real, noise.latents(real.shape[0], cfg.model.nz), precision)
        _sync(env.device)
        seconds = time.perf_counter() - started
    finally:
        batches.close()
    return {"images_per_s": steps * cfg.train.batch_size / seconds, "step_s": seconds / steps, "data_wait_s": data_wait / steps}


def baseline(cfg: Config, device: torch.device, steps: int, warmup: int) -> float:
    """A minimal DCGAN loop, as in PyTorch's example, on random in-memory tensors."""
    m = cfg.model
    G, D = build_models(m, seed=0)
    G, D = G.to(device), D.to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    b = cfg.train.batch_size
    real = torch.rand(b, m.channels, m.image_size, m.image_size, device=device) * 2 - 1
    ones, zeros = torch.ones(b, device=device), torch.zeros(b, device=device)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            started = time.perf_counter()
        z = torch.randn(b, m.nz, 1, 1, device=device)
        fake = G(z)
        D.zero_grad()
        loss_d = F.binary_cross_entropy_with_logits(D(real), ones) + F.binary_cross_entropy_with_logits(D(fake.detach()), zeros)
        loss_d.backward()
        opt_d.step()
        G.zero_grad()
        loss_g = F.binary_cross_entropy_with_logits(D(fake), ones)
        loss_g.backward()
        opt_g.step()
    _sync(device)
    return steps * b / (time.perf_counter() - started)


# --- Ray -----------------------------------------------------------------------------------------------------


def _ray_bench_worker(config: dict) -> dict:
    from .ray_launcher import worker_env

    steps, warmup = config.pop("_steps"), config.pop("_warmup")
    cfg = from_dict(config)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    env = worker_env(cfg)
    alone = DistEnv(rank=0, world_size=1, device=env.device)
    shards = resolve_data(cfg.data, cfg.model)[0] if env.is_main else None
    shards = env.gather_objects(shards)[0]  # rank 0 generates the synthetic set once; the others reuse it
    out = {}
    # One after the other; the barriers keep every worker's run b (and a) side by side.
    out["c"] = measure_train(cfg, alone, shards, steps, warmup, data_env=env) if env.is_main else None
    env.barrier()
    out["a_nosync"] = measure_train(replace(cfg, dist=replace(cfg.dist, sync_bn=False)), env, shards, steps, warmup)
    out["b"] = measure_train(cfg, alone, shards, steps, warmup, data_env=env)
    env.barrier()
    out["a"] = measure_train(cfg, env, shards, steps, warmup)
    for name in ("a_nosync", "b", "a"):  # rates add up over workers; times are averaged
        totals = {k: sum(env.gather_scalars(v)) for k, v in out[name].items()}
        out[name] = {k: v if k == "images_per_s" else v / env.world_size for k, v in totals.items()}
    return out


def bench_ray(cfg: Config, steps: int, warmup: int) -> dict:
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from .ray_launcher import connect, resolve_device, scaling_config, worker_runtime_env

    connect()
    cfg = replace(cfg, train=replace(cfg.train, device=resolve_device(cfg)))
    config = {**to_dict(cfg), "_steps": steps, "_warmup": warmup}
    trainer = TorchTrainer(
        _ray_bench_worker, train_loop_config=config,
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(name=f"bench-{int(time.time())}", storage_path=str((Path(cfg.run.dir) / "bench").resolve()),
                             worker_runtime_env=worker_runtime_env()),
    )
    r = trainer.fit().return_value
    a, b, a_nosync, c = (r[k]["images_per_s"] for k in ("a", "b", "a_nosync", "c"))
    breakdown = {
        "compute_s": r["b"]["step_s"] - r["b"]["data_wait_s"],
        "data_wait_s": r["a"]["data_wait_s"],
        "grad_allreduce_s": r["a_nosync"]["step_s"] - r["b"]["step_s"],
        "bn_sync_s": r["a"]["step_s"] - r["a_nosync"]["step_s"],
        "step_s": r["a"]["step_s"],
    }
    return {"worker_device": cfg.train.device, "train_images_per_s": a, "single_worker_images_per_s": c, "independent_images_per_s": b,
            "ddp_without_sync_bn_images_per_s": a_nosync, "speedup": a / c, "comm_efficiency": a / b,
            "step_breakdown": breakdown}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcgan_dist.bench", description=__doc__.split("\n\n")[0],
                                     epilog="Settings: [--config FILE] [key=value ...], as for dcgan_dist.train.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--baseline", action="store_true", help="also time a minimal hand-written DCGAN loop")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--skip-data", action="store_true", help="do not measure the loader alone")
    which.add_argument("--data-only", action="store_true", help="measure the loader alone, not the training step")
    parser.add_argument("--checkpoint", action="store_true",
                        help="also time writing one checkpoint to run.dir (a local folder or s3://bucket/prefix)")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg, _ = from_args(rest)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    threads = torch.get_num_threads()
    m = cfg.model
    result: dict = {
        "launcher": cfg.dist.launcher, "batch_size": cfg.train.batch_size, "image_size": m.image_size,
        "ngf": m.ngf, "ndf": m.ndf, "precision": cfg.train.precision, "threads": threads,
        "dist_workers": cfg.dist.num_workers, "loader_workers": cfg.data.num_workers, "steps": args.steps,
    }
    device = pick_device(cfg.train.device if cfg.dist.launcher == "local" else "cpu")
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({threads} threads)"
    shards = resolve_data(cfg.data, cfg.model)[0]
    env = DistEnv(device=device)
    rows = []
    if not args.skip_data:
        result["data_images_per_s"], per_cpu_s = measure_data(cfg, env, shards, args.steps * 2, args.warmup)
        rows.append(("loader alone (shards -> normalised tensors)", result["data_images_per_s"]))
        if cfg.data.num_workers == 0:  # else the loader's processes do the work, and their CPU time is not counted
            result["data_images_per_cpu_s"] = per_cpu_s
            rows.append(("loader alone, per CPU-second of this process", per_cpu_s))
    if args.checkpoint:
        result.update(measure_checkpoint(cfg, device))
    if args.data_only:
        pass  # the loader's figure above is all that was asked for
    elif cfg.dist.launcher == "ray":
        result.update(bench_ray(cfg, args.steps, args.warmup))
        n = cfg.dist.num_workers
        rows += [("c: 1 worker", result["single_worker_images_per_s"]),
                 (f"b: {n} workers, no communication", result["independent_images_per_s"]),
                 (f"a-nosync: {n} workers, DDP, per-worker BN", result["ddp_without_sync_bn_images_per_s"]),
                 (f"a: {n} workers, DDP + synchronised BN", result["train_images_per_s"])]
    else:
        result["train_images_per_s"] = measure_train(cfg, env, shards, args.steps, args.warmup)["images_per_s"]
        rows.append(("training step (real loader)", result["train_images_per_s"]))
    if args.baseline and not args.data_only:
        result["baseline_images_per_s"] = baseline(cfg, device, args.steps, args.warmup)
        result["vs_baseline"] = result["train_images_per_s"] / result["baseline_images_per_s"]
        rows.append(("baseline: minimal loop, random tensors", result["baseline_images_per_s"]))

    print(f"\n{'':2}{'measurement':<48}{'images/s':>12}")
    for name, value in rows:
        print(f"  {name:<48}{value:>12.1f}")
    if "vs_baseline" in result:
        print(f"  training step / baseline: {result['vs_baseline']:.3f}")
    if "checkpoint_write_s" in result:
        print(f"  checkpoint, {result['checkpoint_mib']:.1f} MiB to {cfg.run.dir}: {result['checkpoint_write_s']:.2f} s")
    if "speedup" in result:
        print(f"  speedup a/c: {result['speedup']:.3f}   comm_efficiency a/b: {result['comm_efficiency']:.3f}")
        print("  per step: " + ", ".join(f"{k[:-2]} {v * 1000:.1f} ms" for k, v in result["step_breakdown"].items()))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
