"""dist.launcher=ray: N data-parallel workers under Ray Train (V2), each running the Trainer.

The driver connects to the cluster in RAY_ADDRESS (set by `ray job submit`), or to a cluster started on this
machine with `ray start`, or else starts a local one. Each worker builds its DistEnv from the Ray Train
context (process group already initialised: gloo on CPU, NCCL on GPU) and runs the same Trainer as local
mode; only the checkpoint storage differs: rank 0 hands its checkpoint to `ray.train.report`, which persists
it as <storage_path>/<run.name>/step_XXXXXXX/state.pt, and every rank reports at the same steps (a barrier).
After a worker failure Ray restarts the whole group (up to dist.max_failures times) and
`ray.train.get_checkpoint()` hands every rank the latest checkpoint; rerunning with the same run.name and
storage resumes the same way.

Imported only for dist.launcher=ray: Ray is an optional dependency (pip install -e ".[ray]").
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend  # Ray's torch backend, extended by _Backend below
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

if TYPE_CHECKING:
    # ray.train and ray.train.torch choose Ray Train v2's classes when they are imported (v2 is this Ray's default),
    # which a type checker cannot follow: it would take the v1 classes they first import. It is shown v2's.
    from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer
else:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

from dcgan_dist import stopping
from dcgan_dist.config import Config, ConfigError, from_dict, to_dict
from dcgan_dist.distributed.env import DistEnv
from dcgan_dist.launch.ray_address import cluster_address
from dcgan_dist.storage.filesystem import S3_ENV, filesystem, is_remote, write_result
from dcgan_dist.training.checkpoint import (
    BEST_FILE,
    STATE_FILE,
    CheckpointError,
    load,
    ray_storage_path,
    step_name,
    to_bytes,
)
from dcgan_dist.training.metrics import NonFiniteLoss
from dcgan_dist.training.sinks.base import emit
from dcgan_dist.training.trainer import StepHook, Trainer

# Driver environment variables that workers need (Ray does not copy the driver's environment to workers): W&B's,
# MLflow's, and the object store's endpoint and credentials (storage/filesystem.py).
FORWARDED_ENV = (
    "WANDB_API_KEY",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_MODE",
    "WANDB_BASE_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_EXPERIMENT_NAME",
    "PYTHONUNBUFFERED",
    *S3_ENV,
)


class RayCheckpoints:
    """Checkpoints in Ray Train's storage: get_checkpoint() to resume, report(checkpoint=...) to save (Ray keeps
    the newest CheckpointConfig.num_to_keep), and best.pt written beside them through Ray's storage filesystem.
    scheme: what Ray's paths lack to be a location a user can give back ("s3://" for an object store)."""

    def __init__(self, scheme: str = "", start_from: str | None = None):
        self.scheme, self.start_from = scheme, start_from

    def newest_first(self):
        """This run's newest checkpoint (Ray Train hands over that one alone); for a run that has none yet, the one
        it starts from (a sweep's trial continuing another trial's weights), if any."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            if self.start_from:
                yield self.start_from, lambda: load(self.start_from)
            return

        def read() -> dict:
            with checkpoint.as_directory() as directory:
                return load(Path(directory) / STATE_FILE)

        yield f"{self.scheme}{checkpoint.path}/{STATE_FILE}", read

    def save(self, state: dict | None, step: int, metrics: dict) -> str | None:
        with tempfile.TemporaryDirectory(prefix="dcgan-ckpt-") as directory:
            checkpoint = None
            if state is not None:  # rank 0 only; the others report metrics alone (report is a barrier)
                (Path(directory) / STATE_FILE).write_bytes(to_bytes(state))
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=step_name(step))
        # Ray registers a reported checkpoint when its controller next polls the workers (every ~2 s); a worker
        # lost before that would leave it unregistered. Waiting here makes "checkpoint -> path" mean resumable.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if state is None:
            return None
        storage = ray.train.get_context().get_storage()
        return f"{self.scheme}{storage.experiment_fs_path}/{step_name(step)}/{STATE_FILE}"

    def save_best(self, state: dict) -> str:
        storage = ray.train.get_context().get_storage()
        fs, path = storage.storage_filesystem, f"{storage.experiment_fs_path}/{BEST_FILE}"
        with fs.open_output_stream(f"{path}.tmp") as f:
            f.write(to_bytes(state))
        fs.move(f"{path}.tmp", path)  # a rename on a file system; an object store's PUT is atomic anyway
        return f"{self.scheme}{path}"


class _Backend(_TorchBackend):
    """Ray Train's torch backend (process group, devices), plus graceful-stop signal handlers in every worker's
    main thread: the training function runs in another thread, where Python cannot install them."""

    def on_training_start(self, worker_group, backend_config) -> None:
        super().on_training_start(worker_group, backend_config)
        worker_group.execute(stopping.install_handlers)


class TorchConfigWithStop(TorchConfig):
    @property
    def backend_cls(self):
        return _Backend


@ray.remote(num_cpus=0)
class StopRequest:
    """The driver's stop request (`ray job stop`, Ctrl-C), waited for by a thread in every worker."""

    def __init__(self) -> None:
        self.signum, self.event = 0, asyncio.Event()

    async def request(self, signum: int) -> None:
        self.signum = self.signum or signum
        self.event.set()

    async def wait(self) -> int:
        await self.event.wait()
        return self.signum


def _watch(stop: ray.actor.ActorHandle) -> None:
    stopping.request(ray.get(stop.wait.remote()), from_driver=True)


class Preempted(RuntimeError):
    """A worker received SIGTERM (its node is going away): every rank has checkpointed the same step, and
    raising lets Ray Train restart the workers from that checkpoint (dist.max_failures)."""


def ray_storage(storage_path: str) -> dict:
    """RunConfig's storage for a path or URI: an s3:// location goes through this project's S3 filesystem (the
    endpoint and credentials of the standard variables, which Ray's own would not read), other URIs to Ray."""
    if is_remote(storage_path):
        fs, path = filesystem(storage_path)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": storage_path}


def worker_env(cfg: Config) -> DistEnv:
    """This Ray Train worker's rank and device (the process group is already initialised by Ray)."""
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.train.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistEnv(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        device=device,
        node_id=ray.get_runtime_context().get_node_id(),
        cpu_group=dist.new_group(backend="gloo") if device.type == "cuda" else None,  # every rank, in order
    )


def scaling_config(cfg: Config):
    """dist.num_workers workers (or, elastic, between dist.min_workers and it), each reserving
    dist.cpus_per_worker CPUs (and one GPU with train.device=cuda)."""
    use_gpu = cfg.train.device == "cuda"
    per_worker = {"CPU": cfg.dist.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return ScalingConfig(
        num_workers=workers(cfg),
        use_gpu=use_gpu,
        resources_per_worker=per_worker,
        elastic_resize_monitor_interval_s=cfg.dist.resize_check_s,
    )


def workers(cfg: Config) -> int | tuple[int, int]:
    """Ray Train's num_workers: a number, or (min, max) for elastic training."""
    low, high = cfg.dist.min_workers, cfg.dist.num_workers
    return (low, high) if 0 < low < high else high


def worker_runtime_env() -> dict | None:
    """Environment for the worker processes (the driver's does not reach them): W&B settings."""
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    return {"env_vars": env_vars} if env_vars else None


def resolve_device(cfg: Config) -> Literal["cpu", "cuda"]:
    """train.device for Ray workers, decided once in the driver: auto = cuda when the cluster has a GPU for every
    worker now (an autoscaling cluster whose GPU nodes are not up yet needs train.device=cuda)."""
    if cfg.train.device != "auto":
        return cfg.train.device
    fewest = cfg.dist.min_workers or cfg.dist.num_workers
    return "cuda" if ray.cluster_resources().get("GPU", 0) >= fewest else "cpu"


def train_worker(
    config: dict, stop: ray.actor.ActorHandle | None, hooks: Sequence[StepHook] = (), start_from: str | None = None
) -> dict:
    """Body of every Ray Train worker. stop: the driver's StopRequest (None: no stop requests but signals);
    start_from: a checkpoint to start from when the run has none of its own."""
    if stop is not None:
        threading.Thread(target=_watch, args=(stop,), daemon=True, name="dcgan-stop-watch").start()
    cfg = from_dict(config)
    env = worker_env(cfg)
    emit(
        f"worker rank {env.rank}/{env.world_size}: node {env.node_id} ({socket.gethostname()}), "
        f"device {env.device}, pid {os.getpid()}"
    )
    placement = env.gather_objects({"rank": env.rank, "node_id": env.node_id, "host": socket.gethostname()})
    # A setting that does not work here (one node may lack the shards) ends every rank alike, without restarts
    # that could not get further; the same goes for a checkpoint they all read.
    trainer, error = None, None
    try:
        trainer = Trainer(
            cfg, env, RayCheckpoints("s3://" if is_remote(cfg.dist.storage_path) else "", start_from), hooks
        )
    except ConfigError as exc:
        error = str(exc)
    errors = [e for e in env.gather_objects(error) if e]
    if errors:
        return {"error": errors[0]}
    assert trainer is not None  # made on every rank (no errors)
    try:
        result = trainer.fit()
    except CheckpointError as exc:
        return {"error": str(exc)}
    except NonFiniteLoss as exc:  # raised on every rank alike (a divergence): restarting would only fail again
        return {"error": str(exc), "exit_code": 1}
    # Any other RunError (bad data, the store gone) may be one rank's alone: it propagates, so that Ray Train ends
    # the whole group (a rank that returned would leave the others waiting in a collective) and restarts it.
    if result.preempted:
        raise Preempted(
            f"a worker received {signal.Signals(result.stopped_by).name}: stopped after step "
            f"{result.step} with a checkpoint; Ray restarts the workers from it"
        )
    return {**dataclasses.asdict(result), "workers": placement, "train_seconds": result.seconds}


def connect() -> float:
    """Join the Ray cluster (RAY_ADDRESS in any of the forms users have, one started here with `ray start`, or a
    new private local one); seconds taken. A named cluster that does not answer is a ConfigError, in seconds."""
    started = time.perf_counter()
    given = os.environ.get("RAY_ADDRESS", "")
    address = cluster_address()
    if address and address != given:  # say which cluster the address given (or none) led to
        print(f"Ray: joining the cluster at {address} (RAY_ADDRESS={given or 'unset'})", flush=True)
    # Ray reads RAY_ADDRESS again (Ray Train, Tune): the address found, never the job server's URL.
    if address:
        os.environ["RAY_ADDRESS"] = address
    else:
        os.environ.pop("RAY_ADDRESS", None)
    ray.init(address=address or "local", log_to_driver=True)
    return time.perf_counter() - started


def settle(grace_s: float = 1.0) -> None:
    """Let the workers' last lines reach this driver's output, then leave the cluster, so that the summary printed
    after this is the last thing in the log (Ray forwards worker output asynchronously)."""
    time.sleep(grace_s)
    ray.shutdown()


def worker_config(cfg: Config) -> Config:
    """The settings as the workers get them: they may start in other directories (and on other nodes), so with
    absolute paths, the Ray storage spelled out and the device decided (needs a connection to the cluster)."""
    config = to_dict(cfg)
    if not is_remote(cfg.run.dir):
        config["run"]["dir"] = str(Path(cfg.run.dir).expanduser().resolve())
    config["dist"]["storage_path"] = ray_storage_path(cfg)
    config["train"]["device"] = resolve_device(cfg)
    return from_dict(config)


def torch_trainer(
    cfg: Config,
    stop: ray.actor.ActorHandle | None = None,
    hooks: Sequence[StepHook] = (),
    callbacks: Sequence[ray.train.UserCallback] = (),
    start_from: str | None = None,
) -> TorchTrainer:
    """Ray Train's trainer for a run of `worker_config` settings: its workers, storage and failure handling.
    callbacks run in Ray Train's controller (a sweep's trial passes its reports on to Ray Tune there)."""

    def worker(config: dict) -> dict:
        return train_worker(config, stop, hooks, start_from)

    # Ray Train's drain watcher only stores a notice that this training function does not read (a preempted
    # worker gets SIGTERM and checkpoints: stopping.py); its actor logs an error-level line in every successful
    # job (max_restarts > 0 with arguments in the object store). Propagated by Ray to its controller.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

    return TorchTrainer(
        worker,
        train_loop_config=to_dict(cfg),
        torch_config=TorchConfigWithStop(),
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=cfg.run.name,  # fixed, so a rerun finds the run's snapshot and resumes
            **ray_storage(cfg.dist.storage_path),
            failure_config=FailureConfig(max_failures=cfg.dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            worker_runtime_env=worker_runtime_env(),
            callbacks=list(callbacks) or None,
        ),
    )


def launch(cfg: Config, argv: list[str], hooks: Sequence[StepHook] = (), outcome: dict | None = None) -> int:
    """Run training on Ray; prints where the final checkpoint is and writes <run.dir>/result.json (also into
    `outcome`). Returns a process exit code.

    argv: the command line's settings (for the resume command a stopped run prints); hooks are called in every
    worker after every step (they travel to the workers pickled)."""
    if not is_remote(cfg.run.dir) and not Path(cfg.run.dir).is_absolute() and "working_dir_files" in os.getcwd():
        print(
            f"warning: run.dir={cfg.run.dir} is relative to this job's temporary working directory "
            f"({os.getcwd()}); pass an absolute run.dir (or dist.storage_path on shared storage) to keep outputs",
            flush=True,
        )
    ray_seconds = connect()
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    print(
        f"Ray cluster: {len(nodes)} node(s), {resources.get('CPU', 0):g} CPU(s), {resources.get('GPU', 0):g} GPU(s) "
        f"(connected in {ray_seconds:.1f} s)",
        flush=True,
    )
    cfg = worker_config(cfg)
    storage = cfg.dist.storage_path
    # On the driver's node: the driver's stop request must not go away with a preempted worker node.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # mypy leaves out what a class decorator returns: ray.remote made StopRequest an ActorClass, with options().
    stop = StopRequest.options(scheduling_strategy=here).remote()  # type: ignore[attr-defined]
    trainer = torch_trainer(cfg, stop, hooks)
    count = workers(cfg)
    print(
        f"Training {count} worker(s) x batch {cfg.train.batch_size} on {cfg.train.device}; "
        f"Ray storage: {storage}/{cfg.run.name}",
        flush=True,
    )
    fit_started = time.perf_counter()
    try:
        result = _fit_forwarding_stop_signals(trainer, stop)
    except Exception as exc:  # TrainingFailedError and friends: the cause is in the worker logs above
        print(f"error: training failed: {type(exc).__name__}: {exc}", flush=True)
        return 1
    fit_seconds = time.perf_counter() - fit_started
    settle()
    info = result.return_value or {}
    if "error" in info:
        print(f"error: {info['error']}", file=sys.stderr, flush=True)
        return info.get("exit_code", 2)
    for worker_info in info.get("workers", []):
        print(f"worker rank {worker_info['rank']} ran on node {worker_info['node_id']} ({worker_info['host']})")
    train_seconds = info.get("train_seconds", 0.0)
    print(
        f"Ray time: {ray_seconds:.1f} s to connect, {fit_seconds:.1f} s in fit() of which "
        f"{train_seconds:.1f} s in the training loop ({fit_seconds - train_seconds:.1f} s of start-up and reporting)"
    )
    if result.checkpoint is None:
        print("No checkpoint was written.")
        return 1
    print(f"Final checkpoint (step {info.get('step', '?')}): {info.get('checkpoint')}")
    result = {"command": "train", **{k: v for k, v in info.items() if k not in ("train_seconds", "preempted")}}
    result.update(launcher="ray", fit_seconds=fit_seconds)
    if outcome is not None:
        outcome.update(result)
    write_result(cfg.run.dir, result)
    if info.get("stopped_by"):
        return stopping.report(info["stopped_by"], info["step"], info["checkpoint"], argv)
    return 0 if info.get("step", 0) >= cfg.train.max_steps else 1


def _fit_forwarding_stop_signals(trainer: TorchTrainer, stop: ray.actor.ActorHandle):
    """trainer.fit(), while SIGTERM/SIGINT to the driver (`ray job stop`, Ctrl-C) ask every worker for a graceful
    stop; a second signal ends the driver as before. fit() runs in a thread of its own, so that Ray Train does not
    put its own SIGINT handler (an abort, no checkpoint) in the main thread's place."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            outcome["error"] = exc

    fitting = threading.Thread(target=run, name="dcgan-fit", daemon=True)
    with stopping.handle_signals():
        fitting.start()
        forwarded = False
        while fitting.is_alive():
            fitting.join(timeout=0.2)
            if stopping.code() and not forwarded:
                signum = stopping.signal_of(stopping.code())
                print(
                    f"{signal.Signals(signum).name}: asking the workers to stop after their step, with a checkpoint "
                    "(send it again to stop at once)",
                    file=sys.stderr,
                    flush=True,
                )
                stop.request.remote(signum)
                forwarded = True
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
