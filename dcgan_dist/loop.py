"""The training loop around `train_step`: data, schedules (log, sample, checkpoint), resume.

`train(cfg, env)` is the same code on every worker and in local mode; `env` says which process this is and
on which device it runs. Rank 0 alone writes files.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import config as config_lib
from .config import Config
from .data import ImageBatches, ensure_synthetic, normalise, read_info
from .data.loader import slot_seed
from .distributed.ddp import wrap_models
from .distributed.env import DistEnv
from .gan import make_optimizers, train_step, unwrap
from .images import save_grid
from .models import build_models
from .reporting import Meter, MetricsLog, Progress, Throughput, emit

NUM_FIXED_SAMPLES = 64


@dataclass
class TrainResult:
    step: int
    checkpoint: str | None
    run_dir: str
    metrics: dict
    seconds: float


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_data(cfg: Config) -> tuple[str, int]:
    """(shard spec, number of samples or 0 if unknown). Empty data.shards = the embedded synthetic faces."""
    spec = cfg.data.shards
    if not spec:
        spec = str(ensure_synthetic(cfg.data.cache_dir, cfg.data.synth_num, cfg.model.image_size, cfg.model.channels))
    num = cfg.data.num_samples
    if not num:
        info = read_info(spec)
        num = info.num_samples if info else 0
    return spec, num


def _check_compatible(saved: dict, cfg: Config, path: str) -> None:
    old_model = saved["config"]["model"]
    new_model = config_lib.to_dict(cfg)["model"]
    if old_model != new_model:
        diff = ", ".join(f"model.{k}: {old_model.get(k)} -> {v}" for k, v in new_model.items() if old_model.get(k) != v)
        raise RuntimeError(f"{path} was trained with another model ({diff}); use a new run.dir or the same model settings")


def _maybe_crash(cfg: Config, env: DistEnv, step: int, run_dir: Path) -> None:
    """Fault injection (fault.crash_at_step): SIGKILL this process once, right after `step`."""
    if cfg.fault.crash_at_step != step or env.rank != cfg.fault.crash_rank:
        return
    marker = run_dir / f".crashed_at_step_{step}"
    if marker.exists():
        return  # crash once per run dir, so the restarted run can pass this step
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    emit(f"fault injection: rank {env.rank} kills itself after step {step}")
    os.kill(os.getpid(), signal.SIGKILL)


def train(cfg: Config, env: DistEnv | None = None, store=None) -> TrainResult:
    """Train to cfg.train.max_steps, resuming from the store's latest checkpoint.

    env: this process's rank/device (default: one local process). store: where checkpoints go and where
    metrics are reported (default: step files in <run.dir>/checkpoints; the Ray launcher passes its own).
    Every rank runs this function; collectives (DDP, synchronised batch norm, metric reduction, checkpoint
    state gathering, Ray reports) happen at the same steps on all of them.
    """
    env = env or DistEnv(device=pick_device(cfg.train.device))
    device = env.device
    started = time.perf_counter()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed % 2**32)
    torch.manual_seed(cfg.run.seed)

    run_dir = Path(cfg.run.dir).expanduser()
    sample_dir = run_dir / "samples"
    store = store or ckpt.DirectoryStore(run_dir / "checkpoints", cfg.train.keep_checkpoints, env.is_main)
    if env.is_main:
        config_lib.save(cfg, run_dir / "config.yaml")

    def say(text: str) -> None:  # before and after the progress bar
        if env.is_main:
            emit(text)

    shards, num_samples = resolve_data(cfg)
    G, D = build_models(cfg.model, seed=cfg.run.seed)
    G, D = G.to(device), D.to(device)
    opt_g, opt_d = make_optimizers(G, D, cfg.optim)
    # Latent noise comes from its own generator (per rank), so its state can be checkpointed exactly.
    noise = torch.Generator(device=device).manual_seed(slot_seed(cfg.run.seed, env.rank, 7))
    fixed_noise = torch.randn(NUM_FIXED_SAMPLES, cfg.model.nz, 1, 1, generator=torch.Generator().manual_seed(cfg.run.seed))
    fixed_noise = fixed_noise.to(device)

    step, rank_state = 0, None
    latest = store.latest(map_location=device)
    if latest is not None:
        where, state = latest
        _check_compatible(state, cfg, where)
        G.load_state_dict(state["generator"])
        D.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        step = int(state["step"])
        rank_state = state["ranks"].get(env.rank)
        if rank_state is not None:
            ckpt.restore_rng_state(rank_state["rng"], noise)
        else:  # more workers than when the checkpoint was written: this rank starts a fresh noise/data stream
            say(f"rank {env.rank}: no saved stream state (the checkpoint had {len(state['ranks'])} worker(s))")
        say(f"Resuming from {where} (step {step})")
    last_checkpoint = latest[0] if latest else None
    G, D = wrap_models(G, D, env, sync_bn=cfg.dist.sync_bn)

    if step >= cfg.train.max_steps:
        say(f"Already trained to step {step} (train.max_steps={cfg.train.max_steps}); nothing to do. "
            f"Raise train.max_steps to train further.")
        return TrainResult(step, last_checkpoint, str(run_dir), {}, 0.0)

    params = sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())
    global_batch = cfg.train.batch_size * env.world_size
    say(f"Run dir: {run_dir}  |  {env.world_size} worker(s), device {device}"
        + (f", synchronised batch norm: {cfg.dist.sync_bn}" if env.distributed else "")
        + f"  |  G {params[0]/1e6:.2f}M params, D {params[1]/1e6:.2f}M params")
    say(f"Data: {shards} ({num_samples or 'unknown number of'} samples), "
        f"{cfg.model.image_size}x{cfg.model.image_size}x{cfg.model.channels}, global batch {global_batch}"
        + (f", {num_samples / global_batch:.1f} steps per epoch" if num_samples else ""))

    batches = ImageBatches(
        shards,
        cfg.train.batch_size,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.run.seed,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        expect_chw=(cfg.model.channels, cfg.model.image_size, cfg.model.image_size),
        state=rank_state["data"] if rank_state else None,
        pin_memory=device.type == "cuda",
    )
    metrics_log = MetricsLog(run_dir / "metrics.jsonl") if env.is_main else None
    progress = Progress(step, cfg.train.max_steps, enabled=env.is_main)
    meter, throughput, last_record = Meter(), Throughput(), {}
    train_started = time.perf_counter()
    first_step = step

    try:
        while step < cfg.train.max_steps:
            real = normalise(next(batches), device)
            z = torch.randn(real.shape[0], cfg.model.nz, 1, 1, device=device, generator=noise)
            meter.add(train_step(G, D, opt_g, opt_d, real, z))
            step += 1
            throughput.add(global_batch)
            progress.update()
            final = step == cfg.train.max_steps

            log_now = step % cfg.train.log_every == 0 or final
            checkpoint_now = bool(cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or final
            record = {"step": step}
            if log_now:  # a collective: every rank logs at the same steps
                names, means = meter.take()
                record.update(zip(names, env.all_reduce_mean(means).tolist()))  # global means over all workers
                record["images_per_s"] = throughput.rate()
                if num_samples:
                    record["epoch"] = step * global_batch / num_samples
                if batches.counters.bad_samples or batches.counters.bad_shards:
                    record["bad_samples"] = batches.counters.bad_samples
                    record["bad_shards"] = batches.counters.bad_shards
                last_record = record
                if metrics_log:
                    metrics_log.write(record)
                progress.log(record)

            if env.is_main and ((cfg.train.sample_every and step % cfg.train.sample_every == 0) or final):
                path = save_samples(G, fixed_noise, sample_dir / f"step_{step:07d}.png")
                progress.message(f"step {step}: samples -> {path}")

            if checkpoint_now:
                # Each rank's stream position and noise state travel in rank 0's checkpoint (a collective).
                ranks = env.gather_objects({"data": batches.state_dict(), "rng": ckpt.rng_state(noise)})
                state = None
                if env.is_main:
                    state = {
                        "format_version": ckpt.FORMAT_VERSION,
                        "step": step,
                        "generator": unwrap(G).state_dict(),
                        "discriminator": unwrap(D).state_dict(),
                        "opt_g": opt_g.state_dict(),
                        "opt_d": opt_d.state_dict(),
                        "ranks": dict(enumerate(ranks)),
                        "config": config_lib.to_dict(cfg),
                    }
                saved = store.save(state, step, record)
                if saved:
                    last_checkpoint = saved
                    progress.message(f"step {step}: checkpoint -> {saved}")
            elif log_now:
                store.report(record)

            _maybe_crash(cfg, env, step, run_dir)
    finally:
        batches.close()
        progress.close()
        if metrics_log:
            metrics_log.close()

    seconds = time.perf_counter() - train_started
    rate = (step - first_step) * global_batch / max(seconds, 1e-9)
    say(f"Done: step {step} in {seconds:.1f} s of training ({rate:.1f} images/s, {time.perf_counter() - started:.1f} s in all)")
    say(f"  checkpoint: {last_checkpoint}\n  samples:    {sample_dir}\n  metrics:    {run_dir / 'metrics.jsonl'}")
    return TrainResult(step, last_checkpoint, str(run_dir), last_record, seconds)


@torch.no_grad()
def save_samples(G: torch.nn.Module, z: torch.Tensor, path: str | Path) -> Path:
    """A grid of G(z) in eval mode (running batch-norm statistics: no cross-rank collective, no state change)."""
    model = unwrap(G)
    was_training = model.training
    model.eval()
    try:
        return save_grid(model(z), path, nrow=8)
    finally:
        model.train(was_training)
