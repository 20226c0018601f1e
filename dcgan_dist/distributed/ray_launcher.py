"""dist.launcher=ray: N data-parallel workers under Ray Train (V2), each running loop.train.

The driver connects to the cluster in RAY_ADDRESS (set by `ray job submit`), or to a cluster started on this
machine with `ray start`, or else starts a local one. Each worker builds its DistEnv from the Ray Train
context (process group already initialised: gloo on CPU, NCCL on GPU) and runs the same training code as
local mode; only the checkpoint store differs: rank 0 hands its checkpoint to `ray.train.report`, which
persists it under <storage_path>/<run.name>/, and every rank reports at the same steps (a barrier).
After a worker failure Ray restarts the whole group (up to dist.max_failures times) and
`ray.train.get_checkpoint()` hands every rank the latest checkpoint; rerunning with the same run.name and
storage resumes the same way.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt
from ..config import Config, from_dict, to_dict
from ..reporting import emit
from .env import DistEnv

STATE_FILE = "state.pt"
# Driver environment variables that workers need (Ray does not copy the driver's environment to workers).
FORWARDED_ENV = ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE", "WANDB_BASE_URL", "PYTHONUNBUFFERED")


class RayStore:
    """Checkpoints through Ray Train: get_checkpoint() to resume, report(checkpoint=...) to save."""

    def __init__(self, env: DistEnv):
        self.env = env

    def latest(self, map_location: str | torch.device = "cpu") -> tuple[str, dict[str, Any]] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            state = ckpt.load(Path(directory) / STATE_FILE, map_location)
        return f"{checkpoint.path}/{STATE_FILE}", state

    def save(self, state: dict[str, Any] | None, step: int, metrics: dict[str, Any]) -> str | None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="dcgan-ckpt-") as directory:
            checkpoint = None
            if state is not None:  # rank 0 only; the others report metrics alone (report is a barrier)
                ckpt.save_atomic(state, Path(directory) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)  # synchronous upload: the temp dir may go after
        return f"Ray Train checkpoint (step {step})" if state is not None else None

    def report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(metrics)


def worker_env(cfg: Config) -> DistEnv:
    """This Ray Train worker's rank and device (the process group is already initialised by Ray)."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.dist.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistEnv(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        device=device,
        node_id=ray.get_runtime_context().get_node_id(),
    )


def scaling_config(cfg: Config):
    """dist.num_workers workers, each reserving dist.cpus_per_worker CPUs (and one GPU with dist.use_gpu)."""
    from ray.train import ScalingConfig

    per_worker = {"CPU": cfg.dist.cpus_per_worker, **({"GPU": 1} if cfg.dist.use_gpu else {})}
    return ScalingConfig(num_workers=cfg.dist.num_workers, use_gpu=cfg.dist.use_gpu, resources_per_worker=per_worker)


def worker_runtime_env(cfg: Config) -> dict | None:
    """Environment for the worker processes (the driver's does not reach them): W&B settings, and for CPU
    workers MALLOC_ARENA_MAX=1. Why: Ray Train runs the training function in a thread, and glibc gives each
    thread its own malloc arena, whose 64 MiB heaps go back to the OS whenever they empty, whatever mallopt
    says; in the main arena train.keep_freed_memory holds (12,900 page faults per step -> 0, see runtime.py).
    glibc reads it at process start, hence here rather than in the worker. GPU workers keep glibc's default:
    their activations live on the GPU, and one arena would serialise the allocations of their other threads."""
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if cfg.train.keep_freed_memory and not cfg.dist.use_gpu:
        env_vars["MALLOC_ARENA_MAX"] = "1"
    return {"env_vars": env_vars} if env_vars else None


def train_worker(config: dict) -> dict:
    """Body of every Ray Train worker."""
    from ..loop import train

    cfg = from_dict(config)
    env = worker_env(cfg)
    device = env.device
    emit(f"worker rank {env.rank}/{env.world_size}: node {env.node_id} ({socket.gethostname()}), "
         f"device {device}, pid {os.getpid()}")
    placement = env.gather_objects({"rank": env.rank, "node_id": env.node_id, "host": socket.gethostname()})
    result = train(cfg, env, RayStore(env))
    return {"step": result.step, "metrics": result.metrics, "workers": placement, "train_seconds": result.seconds}


def _storage_path(cfg: Config) -> str:
    if cfg.dist.storage_path:
        spec = cfg.dist.storage_path
        return spec if "://" in spec else str(Path(spec).expanduser().resolve())
    return str(Path(cfg.run.dir).expanduser().resolve() / "ray")


def launch(cfg: Config) -> int:
    """Run training on Ray; prints where the final checkpoint is. Returns a process exit code."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    if not Path(cfg.run.dir).is_absolute() and "working_dir_files" in os.getcwd():
        print(f"warning: run.dir={cfg.run.dir} is relative to this job's temporary working directory "
              f"({os.getcwd()}); pass an absolute run.dir (or dist.storage_path on shared storage) to keep outputs",
              flush=True)
    # Workers may start in other directories (and other nodes): give them absolute paths.
    config = to_dict(cfg)
    config["run"]["dir"] = str(Path(cfg.run.dir).expanduser().resolve())
    storage = _storage_path(cfg)
    config["dist"]["storage_path"] = storage

    started = time.perf_counter()
    ray.init(log_to_driver=True)
    ray_seconds = time.perf_counter() - started
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    print(f"Ray cluster: {len(nodes)} node(s), {resources.get('CPU', 0):g} CPU(s), {resources.get('GPU', 0):g} GPU(s) "
          f"(connected in {ray_seconds:.1f} s)", flush=True)

    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=cfg.run.name,  # fixed, so a rerun finds the run's snapshot and resumes
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            worker_runtime_env=worker_runtime_env(cfg),
        ),
    )
    print(f"Training {cfg.dist.num_workers} worker(s) x batch {cfg.train.batch_size}; Ray storage: {storage}/{cfg.run.name}",
          flush=True)
    fit_started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError and friends: the cause is in the worker logs above
        print(f"error: training failed: {type(exc).__name__}: {exc}", flush=True)
        return 1
    fit_seconds = time.perf_counter() - fit_started
    info = result.return_value or {}
    for worker in info.get("workers", []):
        print(f"worker rank {worker['rank']} ran on node {worker['node_id']} ({worker['host']})")
    train_seconds = info.get("train_seconds", 0.0)
    print(f"Ray time: {ray_seconds:.1f} s to connect, {fit_seconds:.1f} s in fit() of which "
          f"{train_seconds:.1f} s in the training loop ({fit_seconds - train_seconds:.1f} s of start-up and reporting)")
    if result.checkpoint is None:
        print("No checkpoint was written.")
        return 1
    print(f"Final checkpoint (step {info.get('step', '?')}): {result.checkpoint.path}/{STATE_FILE}")
    return 0
