"""Measure training speed: the loader, the full training step, the scaling of N Ray workers.

    python -m dcgan_dist.bench [--config FILE] [key=value ...] [--steps 20] [--warmup 5] [--baseline]

Local launcher: data_images_per_s (shards -> normalised tensors on the device, the real loader) and
train_images_per_s (the real training step on batches from that loader: the code `train` runs, without its
logging and checkpoints). --baseline also times a minimal hand-written DCGAN loop on in-memory random tensors
(same architecture, batch and precision) and reports the ratio.

Ray launcher (dist.launcher=ray, dist.num_workers=N): the same N Ray workers run, taking turns in short
rounds (--rounds) so that a slow spell of a shared machine hits every run alike,
  c: rank 0 alone (1 worker; the others wait),
  a-nosync: N workers with DDP but per-worker batch norm,
  b: all N each running the identical step with no communication (the machine's contention ceiling),
  a: N workers training together (DDP gradient all-reduce + synchronised batch norm).
speedup = a/c, comm_efficiency = a/b (also round by round, to show how much it moves with the machine's
noise; and split into ddp_efficiency = a-nosync/b times sync_bn_efficiency = a/a-nosync), with the cost
breakdown per step: compute and data wait (from b),
gradient all-reduce (a-nosync - b) and batch-norm synchronisation (a - a-nosync).

The last line printed is one JSON object with the figures, the device, batch size, widths and threads.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Config, ConfigError, build_config, from_dict, split_args, to_dict
from .data import normalise
from .distributed.env import DistEnv
from .distributed.shm import transport_name
from .gan import train_step
from .loop import build_training, make_loader, pick_device, prepare_models, resolve_data
from .models import build_models
from .runtime import configure_process


def _page_faults() -> int:
    """This process's minor page faults so far (see runtime.py for why they matter)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_data(cfg: Config, env: DistEnv, shards: str, steps: int, warmup: int) -> float:
    batches = make_loader(cfg, env, shards)
    try:
        for _ in range(warmup):
            normalise(next(batches), env.device)
        _sync(env.device)
        started = time.perf_counter()
        for _ in range(steps):
            normalise(next(batches), env.device, cfg.train.channels_last)
        _sync(env.device)
        return steps * cfg.train.batch_size / (time.perf_counter() - started)
    finally:
        batches.close()


class StepRunner:
    """The real training step, ready to run: models, optimizers, loader. `env` decides DDP/sync (world 1 = none).

    data_env: whose slice of the shards to read (defaults to env), so independent workers still read apart.
    """

    def __init__(self, cfg: Config, env: DistEnv, shards: str, data_env: DistEnv | None = None):
        self.cfg, self.device = cfg, env.device
        G, D, self.opt_g, self.opt_d, self.precision = build_training(cfg, self.device)
        self.G, self.D = prepare_models(G, D, cfg, env)
        self.batches = make_loader(cfg, data_env or env, shards)
        self.noise = torch.Generator(device=self.device).manual_seed(cfg.run.seed + (data_env or env).rank)
        self.seconds = self.data_wait = 0.0
        self.steps = self.page_faults = 0
        self.chunk_rates: list[float] = []  # images/s of each timed call (one per bench round)

    def run(self, steps: int, timed: bool = True) -> None:
        _sync(self.device)
        faults, started = _page_faults(), time.perf_counter()
        for _ in range(steps):
            fetch = time.perf_counter()
            real = normalise(next(self.batches), self.device, self.cfg.train.channels_last)
            if timed:
                self.data_wait += time.perf_counter() - fetch
            z = torch.randn(real.shape[0], self.cfg.model.nz, 1, 1, device=self.device, generator=self.noise)
            train_step(self.G, self.D, self.opt_g, self.opt_d, real, z, self.precision)
        _sync(self.device)
        if timed:
            elapsed = time.perf_counter() - started
            self.seconds += elapsed
            self.page_faults += _page_faults() - faults
            self.steps += steps
            self.chunk_rates.append(steps * self.cfg.train.batch_size / elapsed)

    def result(self) -> dict:
        return {"images_per_s": self.steps * self.cfg.train.batch_size / self.seconds,
                "step_s": self.seconds / self.steps, "data_wait_s": self.data_wait / self.steps,
                "page_faults_per_step": self.page_faults / self.steps}

    def close(self) -> None:
        self.batches.close()


def measure_train(cfg: Config, env: DistEnv, shards: str, steps: int, warmup: int) -> dict:
    runner = StepRunner(cfg, env, shards)
    try:
        runner.run(warmup, timed=False)
        runner.run(steps)
        return runner.result()
    finally:
        runner.close()


# --- the baseline: a minimal DCGAN loop, as in PyTorch's example, on random in-memory tensors ----------------


def baseline(cfg: Config, device: torch.device, steps: int, warmup: int) -> float:
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
    from .distributed.ray_launcher import worker_env

    steps, warmup, rounds = config.pop("_steps"), config.pop("_warmup"), config.pop("_rounds")
    cfg = from_dict(config)
    configure_process(cfg.train)
    env = worker_env(cfg)
    alone = DistEnv(rank=0, world_size=1, device=env.device)
    shards, _ = resolve_data(cfg) if env.is_main else (None, 0)
    shards = env.gather_objects(shards)[0]  # rank 0 generates the synthetic set once; the others reuse it
    runners = {
        "c": StepRunner(cfg, alone, shards, data_env=env) if env.is_main else None,  # 1 worker, the others wait
        "a_nosync": StepRunner(replace(cfg, dist=replace(cfg.dist, sync_bn=False)), env, shards),  # DDP only
        "b": StepRunner(cfg, alone, shards, data_env=env),  # every worker alone, no communication at all
        "a": StepRunner(cfg, env, shards),  # DDP + synchronised batch norm
    }
    # The runs take turns in short rounds, so a slow spell of a shared machine hits all of them alike. Order:
    # b and a each follow a run in which every worker was busy; after c (the other workers idle), the worker
    # that ran c was the faster one in b in 12 of 14 runs.
    chunk = max(1, steps // rounds)
    for timed, n in ((False, warmup),) + ((True, chunk),) * rounds:
        for name, runner in runners.items():
            if runner is not None:
                runner.run(n, timed)
            if name in ("c", "b"):
                env.barrier()
    out = {"transport": transport_name(env.device.type), "b_rank_step_s": env.gather_scalars(runners["b"].result()["step_s"])}
    # a/b round by round (rates add up over workers): how much the figure moves with the machine's noise.
    a_rounds, b_rounds = (map(sum, zip(*env.gather_objects(runners[k].chunk_rates))) for k in ("a", "b"))
    out["ratio_rounds"] = [a / b for a, b in zip(a_rounds, b_rounds)]
    for name, runner in runners.items():
        if name == "c":
            out["c"] = runner.result() if runner else None
            continue
        # Rates add up over workers; times are averaged.
        r = {k: sum(env.gather_scalars(v)) for k, v in runner.result().items()}
        out[name] = {k: v if k == "images_per_s" else v / env.world_size for k, v in r.items()}
    for runner in runners.values():
        if runner is not None:
            runner.close()
    return out


def bench_ray(cfg: Config, steps: int, warmup: int, rounds: int) -> dict:
    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from .distributed.ray_launcher import scaling_config, worker_runtime_env

    ray.init(log_to_driver=True)
    config = {**to_dict(cfg), "_steps": steps, "_warmup": warmup, "_rounds": rounds}
    trainer = TorchTrainer(
        _ray_bench_worker, train_loop_config=config,
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(name=f"bench-{int(time.time())}", storage_path=str((Path(cfg.run.dir) / "bench").resolve()),
                             worker_runtime_env=worker_runtime_env(cfg)),
    )
    r = trainer.fit().return_value
    a, b, a_nosync, c = r["a"]["images_per_s"], r["b"]["images_per_s"], r["a_nosync"]["images_per_s"], r["c"]["images_per_s"]
    breakdown = {
        "compute_s": r["b"]["step_s"] - r["b"]["data_wait_s"],
        "data_wait_s": r["a"]["data_wait_s"],
        "grad_allreduce_s": r["a_nosync"]["step_s"] - r["b"]["step_s"],
        "bn_sync_s": r["a"]["step_s"] - r["a_nosync"]["step_s"],
        "step_s": r["a"]["step_s"],
    }
    # Workers that wait for each other go at the pace of the slowest; on a machine whose cores are not equally
    # fast, that alone caps a/b below 1 however cheap the communication.
    rank_steps = r["b_rank_step_s"]
    imbalance_bound = len(rank_steps) / max(rank_steps) / sum(1 / t for t in rank_steps)
    return {"transport": r["transport"], "rank_step_s_alone": rank_steps, "imbalance_bound": imbalance_bound,
            "train_images_per_s": a, "single_worker_images_per_s": c, "independent_images_per_s": b,
            "ddp_without_sync_bn_images_per_s": a_nosync, "speedup": a / c, "comm_efficiency": a / b,
            # comm_efficiency = ddp_efficiency x sync_bn_efficiency: what lock-step data parallelism itself costs
            # (DDP's gradient all-reduce, per-worker BN), and what synchronising batch norm adds on top.
            "ddp_efficiency": a_nosync / b, "sync_bn_efficiency": a / a_nosync,
            "comm_efficiency_rounds": r["ratio_rounds"],
            "step_breakdown": breakdown, "page_faults_per_step": r["a"]["page_faults_per_step"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcgan_dist.bench", description=__doc__.split("\n\n")[0],
                                     epilog="Settings: [--config FILE] [key=value ...], as for dcgan_dist.train.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="ray: the runs a, a-nosync, b, c take turns this many times")
    parser.add_argument("--baseline", action="store_true", help="also time a minimal hand-written DCGAN loop")
    parser.add_argument("--skip-data", action="store_true", help="do not measure the loader alone")
    args, rest = parser.parse_known_args(argv)
    try:
        config_file, overrides = split_args(rest)
        cfg = build_config(config_file or "default", overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_process(cfg.train)  # before the baseline too: both loops run with the same allocator settings
    threads = cfg.train.num_threads or torch.get_num_threads()
    m = cfg.model
    result: dict = {
        "launcher": cfg.dist.launcher,
        "batch_size": cfg.train.batch_size,
        "image_size": m.image_size,
        "ngf": m.ngf,
        "ndf": m.ndf,
        "precision": cfg.train.precision,
        "threads": threads,
        "keep_freed_memory": cfg.train.keep_freed_memory,
        "dist_workers": cfg.dist.num_workers,
        "loader_workers": cfg.data.num_workers,
        "steps": args.steps,
    }
    device = torch.device("cuda") if cfg.dist.launcher == "ray" and cfg.dist.use_gpu else pick_device(cfg.train.device)
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({threads} threads)"
    shards, _ = resolve_data(cfg)
    env = DistEnv(device=device)
    rows = []
    if not args.skip_data:
        result["data_images_per_s"] = measure_data(cfg, env, shards, args.steps * 2, args.warmup)
        rows.append(("loader alone (shards -> normalised tensors)", result["data_images_per_s"]))
    if cfg.dist.launcher == "ray":
        result.update(bench_ray(cfg, args.steps, args.warmup, args.rounds))
        n = cfg.dist.num_workers
        rows += [("c: 1 worker", result["single_worker_images_per_s"]),
                 (f"b: {n} workers, no communication", result["independent_images_per_s"]),
                 (f"a-nosync: {n} workers, DDP, per-worker BN", result["ddp_without_sync_bn_images_per_s"]),
                 (f"a: {n} workers, DDP + synchronised BN", result["train_images_per_s"])]
    else:
        train = measure_train(cfg, env, shards, args.steps, args.warmup)
        result["train_images_per_s"], result["page_faults_per_step"] = train["images_per_s"], train["page_faults_per_step"]
        rows.append(("training step (real loader)", result["train_images_per_s"]))
    if args.baseline:
        result["baseline_images_per_s"] = baseline(cfg, device, args.steps, args.warmup)
        result["vs_baseline"] = result["train_images_per_s"] / result["baseline_images_per_s"]
        rows.append(("baseline: minimal loop, random tensors", result["baseline_images_per_s"]))

    print(f"\n{'':2}{'measurement':<48}{'images/s':>12}")
    for name, value in rows:
        print(f"  {name:<48}{value:>12.1f}")
    print(f"  page faults per training step: {result['page_faults_per_step']:.0f} "
          f"(train.keep_freed_memory={str(cfg.train.keep_freed_memory).lower()})")
    if "vs_baseline" in result:
        print(f"  training step / baseline: {result['vs_baseline']:.3f}")
    if "speedup" in result:
        bd = result["step_breakdown"]
        print(f"  speedup a/c: {result['speedup']:.3f}   comm_efficiency a/b: {result['comm_efficiency']:.3f}   "
              f"(collectives: {result['transport']})")
        print(f"    = DDP alone, a-nosync/b: {result['ddp_efficiency']:.3f}"
              f"  x  synchronised BN, a/a-nosync: {result['sync_bn_efficiency']:.3f}")
        rounds = result["comm_efficiency_rounds"]
        print(f"  comm_efficiency round by round ({len(rounds)} rounds): median {statistics.median(rounds):.3f}, "
              f"range {min(rounds):.3f}-{max(rounds):.3f}")
        print(f"  each worker alone (b), s/step: {', '.join(f'{t:.3f}' for t in result['rank_step_s_alone'])}: their "
              f"imbalance alone caps comm_efficiency at {result['imbalance_bound']:.3f}")
        print("  per step: " + ", ".join(f"{k[:-2]} {v * 1000:.1f} ms" for k, v in bd.items()))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
