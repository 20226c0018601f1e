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
from .gan import Precision, make_optimizers, train_step, unwrap
from .models import build_models
from .ema import EMA
from .evaluate import SWDEvaluator
from .reporting import Meter, Reporter, Throughput, emit
from .runtime import configure_process

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


def use_fused_adam(cfg: Config, device: torch.device) -> bool:
    return cfg.optim.fused == "always" or (cfg.optim.fused == "auto" and device.type == "cuda")


def image_chw(cfg: Config) -> tuple[int, int, int]:
    return cfg.model.channels, cfg.model.image_size, cfg.model.image_size


def build_training(cfg: Config, device: torch.device):
    """(G, D, opt_g, opt_d, precision): plain modules on `device`, seeded identically on every rank."""
    G, D = build_models(cfg.model, seed=cfg.run.seed)
    G, D = G.to(device), D.to(device)
    opt_g, opt_d = make_optimizers(G, D, cfg.optim, fused=use_fused_adam(cfg, device))
    return G, D, opt_g, opt_d, Precision(cfg.train.precision, device.type)


def make_loader(cfg: Config, env: DistEnv, shards: str, state: dict | None = None) -> ImageBatches:
    """This rank's stream of uint8 training batches (resumed from `state` when given)."""
    return ImageBatches(
        shards,
        cfg.train.batch_size,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.run.seed,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        expect_chw=image_chw(cfg),
        state=state,
        pin_memory=env.device.type == "cuda",
    )


def prepare_models(G: torch.nn.Module, D: torch.nn.Module, cfg: Config, env: DistEnv):
    """Memory layout, synchronised batch norm + DDP (several workers), torch.compile: what runs the steps."""
    if cfg.train.channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G, D = wrap_models(G, D, env, sync_bn=cfg.dist.sync_bn, cpu_transport=cfg.dist.cpu_transport)
    if cfg.train.compile:
        G, D = torch.compile(G), torch.compile(D)
    return G, D


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
    configure_process(cfg.train)
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
    G, D, opt_g, opt_d, precision = build_training(cfg, device)
    ema = EMA(G, cfg.train.ema_decay) if cfg.train.ema_decay > 0 and env.is_main else None
    # Latent noise comes from its own generator (per rank), so its state can be checkpointed exactly.
    noise = torch.Generator(device=device).manual_seed(slot_seed(cfg.run.seed, env.rank, 7))
    fixed_noise = torch.randn(NUM_FIXED_SAMPLES, cfg.model.nz, 1, 1, generator=torch.Generator().manual_seed(cfg.run.seed))
    fixed_noise = fixed_noise.to(device)

    step, rank_state, extras = 0, None, {}
    latest = store.latest(map_location=device)
    if latest is not None:
        where, state = latest
        _check_compatible(state, cfg, where)
        G.load_state_dict(state["generator"])
        D.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        if ema is not None and "generator_ema" in state:
            ema.load_state_dict(state["generator_ema"])
        precision.load_state_dict(state.get("precision", {}))
        step, extras = int(state["step"]), state.get("extras", {})
        rank_state = state["ranks"].get(env.rank)
        if rank_state is not None:
            ckpt.restore_rng_state(rank_state["rng"], noise)
        else:  # more workers than when the checkpoint was written: this rank starts a fresh noise/data stream
            say(f"rank {env.rank}: no saved stream state (the checkpoint had {len(state['ranks'])} worker(s))")
        say(f"Resuming from {where} (step {step})")
    last_checkpoint = latest[0] if latest else None
    G, D = prepare_models(G, D, cfg, env)

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

    batches = make_loader(cfg, env, shards, state=rank_state["data"] if rank_state else None)
    reporter = Reporter(cfg, run_dir, step, env.is_main, wandb_run_id=extras.get("wandb_run_id"))
    evaluator = SWDEvaluator(cfg, shards, image_chw(cfg)) if env.is_main and cfg.train.eval_every else None
    best = extras.get("best_swd")
    meter, throughput, step_timer, last_record = Meter(), Throughput(), Meter(), {}
    train_started = time.perf_counter()
    first_step = step

    try:
        while step < cfg.train.max_steps:
            step_started = time.perf_counter()
            real = normalise(next(batches), device, channels_last=cfg.train.channels_last)
            z = torch.randn(real.shape[0], cfg.model.nz, 1, 1, device=device, generator=noise)
            meter.add(train_step(G, D, opt_g, opt_d, real, z, precision))
            if ema is not None:
                ema.update(G)
            step += 1
            step_timer.add({"step_time": torch.tensor(time.perf_counter() - step_started)})
            throughput.add(global_batch)
            reporter.advance()
            final = step == cfg.train.max_steps
            sample_model = ema.model if ema is not None else unwrap(G)

            # Every rank takes these decisions from the step number alone: they involve collectives.
            log_now = step % cfg.train.log_every == 0 or final
            eval_now = cfg.train.eval_every > 0 and (step % cfg.train.eval_every == 0 or final)
            checkpoint_now = final or (cfg.train.checkpoint_every > 0 and step % cfg.train.checkpoint_every == 0)

            record: dict = {"step": step}
            if log_now:
                names, means = meter.take()
                record.update(zip(names, env.all_reduce_mean(means).tolist()))  # global means over all workers
                record["images_per_s"] = throughput.rate()
                _, mean_step_time = step_timer.take()
                for rank, seconds in enumerate(env.gather_scalars(float(mean_step_time[0]))):
                    record[f"step_time_s/rank{rank}"] = seconds
                record["lr_g"], record["lr_d"] = opt_g.param_groups[0]["lr"], opt_d.param_groups[0]["lr"]
                if num_samples:
                    record["epoch"] = step * global_batch / num_samples
                if batches.counters.bad_samples or batches.counters.bad_shards:
                    record["bad_samples"] = batches.counters.bad_samples
                    record["bad_shards"] = batches.counters.bad_shards
                if device.type == "cuda":
                    record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if eval_now and evaluator is not None:  # rank 0 alone; the others wait at their next collective
                eval_started = time.perf_counter()
                record.update(evaluator.evaluate(sample_model))
                throughput.exclude(time.perf_counter() - eval_started)
                if best is None or record["swd"] < best:
                    best = record["swd"]
                    state = _model_state(step, G, D, ema, cfg, {"swd": best})
                    path = ckpt.save_atomic(state, run_dir / "checkpoints" / "best.pt")
                    reporter.message(f"step {step}: SWD {best:.2f} is the best so far -> {path}")
            if log_now or (eval_now and evaluator is not None):
                last_record = {**last_record, **record} if not log_now else record
                reporter.log(record)

            if env.is_main and ((cfg.train.sample_every and step % cfg.train.sample_every == 0) or final):
                reporter.samples(sample_model, fixed_noise, step)

            if checkpoint_now:
                # Each rank's stream position and noise state travel in rank 0's checkpoint (a collective).
                ranks = env.gather_objects({"data": batches.state_dict(), "rng": ckpt.rng_state(noise)})
                state = None
                if env.is_main:
                    state = _model_state(step, G, D, ema, cfg, {"wandb_run_id": reporter.wandb_run_id, "best_swd": best})
                    state.update(opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(), ranks=dict(enumerate(ranks)),
                                 precision=precision.state_dict())
                saved = store.save(state, step, record)
                if saved:
                    last_checkpoint = saved
                    reporter.message(f"step {step}: checkpoint -> {saved}")
            elif log_now:
                store.report(record)

            _maybe_crash(cfg, env, step, run_dir)
    finally:
        batches.close()
        reporter.close(final_step=step)

    seconds = time.perf_counter() - train_started
    rate = (step - first_step) * global_batch / max(seconds, 1e-9)
    say(f"Done: step {step} in {seconds:.1f} s of training ({rate:.1f} images/s, {time.perf_counter() - started:.1f} s in all)")
    say(f"  checkpoint: {last_checkpoint}\n  samples:    {sample_dir}\n  metrics:    {run_dir / 'metrics.jsonl'}")
    return TrainResult(step, last_checkpoint, str(run_dir), last_record, seconds)


def _model_state(step: int, G, D, ema: EMA | None, cfg: Config, extras: dict) -> dict:
    """The weights part of a checkpoint (all a `best` checkpoint needs); resume state is added by the caller."""
    state = {
        "format_version": ckpt.FORMAT_VERSION,
        "step": step,
        "generator": unwrap(G).state_dict(),
        "discriminator": unwrap(D).state_dict(),
        "config": config_lib.to_dict(cfg),
        "extras": extras,
    }
    if ema is not None:
        state["generator_ema"] = ema.state_dict()
    return state
