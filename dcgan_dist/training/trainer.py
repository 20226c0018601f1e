"""The Trainer: builds a run's parts, restores them from the newest checkpoint, then trains.

    Trainer(cfg).fit()                                  # local: this process
    Trainer(cfg, env, RayCheckpoints(...)).fit()        # every Ray Train worker (launch/ray_train.py)

`fit` is the whole training loop: a batch, `train_step`, then every part whose schedule is due (metrics,
evaluator, sampler, checkpoints; see schedule.py for why only the step number decides). The same code runs in
every process; `env` says which rank this is and on which device it runs.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import nn

from dcgan_dist import config as config_lib
from dcgan_dist import stopping
from dcgan_dist.config import Config, ConfigError
from dcgan_dist.data import ImageBatches, check_shards, normalise, resolve_data
from dcgan_dist.data import shards as shard_sets
from dcgan_dist.data.loader import check_batch, dataset_size, loader_death_as_run_error, slot_seed
from dcgan_dist.distributed.ddp import wrap_models
from dcgan_dist.distributed.env import DistEnv
from dcgan_dist.distributed.groups import BNGroups, bn_groups
from dcgan_dist.gan.ema import EMA
from dcgan_dist.gan.models import build_models, unwrap
from dcgan_dist.gan.objectives import objective
from dcgan_dist.gan.precision import Precision, Speed, pick_device, resolved
from dcgan_dist.gan.step import make_optimizers, set_hyperparameters, set_learning_rates, train_step
from dcgan_dist.storage.filesystem import RunStorage, StoreError, StoreUnreachable, check_bucket, is_remote, set_timeout
from dcgan_dist.training import sinks
from dcgan_dist.training.checkpoint import CheckpointManager, CheckpointStorage, StorageCheckpoints
from dcgan_dist.training.cpu_estimate import CpuEstimate
from dcgan_dist.training.memory_estimate import check_memory
from dcgan_dist.training.metrics import Metrics, NonFiniteLoss
from dcgan_dist.training.quality_tracking import QualityTracker
from dcgan_dist.training.sample_grids import SampleGrids
from dcgan_dist.training.schedule import Part, Schedule

log = logging.getLogger("dcgan_dist")

# Called right after every training step (before the parts act) with the step number, this process's DistEnv and
# the step's uint8 images (as the loader gave them); tests inject faults and record what was trained here.
StepHook = Callable[[int, DistEnv, torch.Tensor, torch.Tensor | None], None]  # (step, env, images, labels)


@dataclass
class TrainResult:
    """What a training run did; `python -m dcgan_dist.train` writes it (dataclasses.asdict: every field) to
    <run.dir>/result.json, and with --json to stdout."""

    step: int  # the last step trained (the final checkpoint's)
    checkpoint: str | None  # the final checkpoint
    run_dir: str
    metrics: dict  # the last logged record
    seconds: float  # in the training loop
    stopped_by: int = 0  # the signal that stopped the run early (after a checkpoint), 0: it ran to max_steps
    preempted: bool = False  # that signal reached a training process itself (under Ray: a preempted worker)
    max_steps: int = 0
    start_step: int = 0  # where this command started: 0, or the step of the checkpoint it resumed from
    resumed_from: str | None = None  # that checkpoint
    stop_reason: str = "max_steps"  # max_steps | signal | already_trained
    signal: str | None = None  # the stopping signal's name (SIGTERM, SIGINT)
    # What the run warned about, as data: {"kind": "cpu_estimate", ...} (training/cpu_estimate.py)
    warnings: list[dict] = field(default_factory=list)


def check_settings(
    cfg: Config, world_size: int = 1, check_run_dir: bool = True, probe: bool = True, device: torch.device | None = None
) -> None:
    """What the settings point at, checked before any run file exists: the shards (they exist, enough for every
    worker, the model's image size and channels; probe: decoding the first shard's first samples), the batch (no
    larger than the data set), with `device` that the model, batch and loader fit in its free memory, and run.dir
    (it can be made and written), a conditional model's labels, and that log.sinks names sinks whose libraries are
    installed. Raises ConfigError: one line naming the setting."""
    for name in cfg.log.sinks:
        try:
            sink = sinks.sink_class(name)
        except ValueError as exc:
            raise ConfigError(f"log.sinks={config_lib.show(cfg.log.sinks)}: {exc}") from None
        if sink.library and importlib.util.find_spec(sink.library) is None:
            install = f'pip install -e ".[{sink.extra}]"' if sink.extra else "pip install -e ."
            raise ConfigError(
                f"log.sinks has {name}, but {sink.library} is not installed: {install}, or leave {name} out"
            )
    chw = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    if cfg.data.shards:
        try:
            check_shards(cfg.data.shards, chw, world_size, probe, cfg.data.max_bad_fraction)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"data.shards={cfg.data.shards}: {exc}") from None
        cfg = with_classes(cfg, cfg.data.shards)  # the embedded synthetic set: once it is made (Trainer)
    elif cfg.model.conditional:  # the embedded synthetic faces carry no labels: refused before they are drawn
        raise ConfigError(
            "model.conditional=true needs labelled shards, and data.shards is empty (the embedded "
            "synthetic faces, unlabelled): give data.shards (data convert/synth with labels)"
        )
    try:
        num_samples = cfg.data.num_samples or (dataset_size(cfg.data.shards) if cfg.data.shards else cfg.data.synth_num)
        check_batch(cfg.train.batch_size, world_size, num_samples)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if device is not None:
        check_memory(cfg, device, resolved(cfg, device)[1].precision)
    if check_run_dir:
        for key, location in (("run.dir", cfg.run.dir), ("dist.storage_path", cfg.dist.storage_path)):
            try:  # a bucket is never created by training; the keys and the endpoint are checked here too
                if is_remote(location):
                    check_bucket(location)
            except StoreError as exc:
                raise ConfigError(f"{key}={location}: {exc}") from None
        try:
            RunStorage(cfg.run.dir).check_writable()
        except OSError as exc:
            reason = exc.strerror or (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(f"run.dir={cfg.run.dir}: cannot write there ({reason}); choose another run.dir") from None


def with_classes(cfg: Config, shards: str) -> Config:
    """cfg with model.num_classes and model.class_names of the shards (their dataset.json) when model.conditional;
    ConfigError (one line) when the shards carry no labels. cfg as it is for an unconditional model."""
    if not cfg.model.conditional:
        return cfg
    try:
        classes = shard_sets.read_classes(shards)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.shards={shards}: {exc}") from None
    if not classes:
        raise ConfigError(
            f"model.conditional=true but the shards ({shards}) carry no class labels (no classes in their "
            "dataset.json): give labelled shards (data convert/synth with labels) or model.conditional=false"
        )
    return replace(cfg, model=replace(cfg.model, num_classes=len(classes), class_names=list(classes)))


def lower_rates(optim_cfg) -> str:
    """What a diverged run's message tells the user to lower: the keys that set the rates, with their values."""
    o = optim_cfg
    if o.lr_g is None and o.lr_d is None:
        return f"lower optim.lr (now {o.lr:g})"
    g, d = (o.lr if v is None else v for v in (o.lr_g, o.lr_d))
    return f"lower optim.lr_g and optim.lr_d (now {g:g} and {d:g})"


def resolve_speed(cfg: Config, env: DistEnv) -> tuple[Config, Speed]:
    """cfg with train.precision/channels_last made concrete for this device ("auto" resolved); with several
    workers every rank takes rank 0's decision (one collective), so that all train alike and the checkpoint's
    config describes every rank."""
    cfg, speed = resolved(cfg, env.device)
    if env.distributed:
        speed = env.gather_objects(speed)[0]
        cfg = replace(cfg, train=replace(cfg.train, precision=speed.precision, channels_last=speed.channels_last))
    return cfg, speed


def build_networks(cfg: Config, device: torch.device):
    """(G, D, opt_g, opt_d, precision): plain modules on `device`, seeded identically on every rank. cfg: with
    train.precision resolved (resolve_speed)."""
    G, D = build_models(cfg.model, seed=cfg.run.seed)
    G, D = G.to(device), D.to(device)
    opt_g, opt_d = make_optimizers(G, D, cfg.optim, fused=device.type == "cuda")
    return G, D, opt_g, opt_d, Precision(cfg.train.precision, device.type)


def distribute(
    G: nn.Module, D: nn.Module, cfg: Config, env: DistEnv, groups: BNGroups | None = None
) -> tuple[nn.Module, nn.Module]:
    """What runs the steps: memory layout, synchronised batch norm + DDP (several workers), torch.compile.
    cfg: with train.channels_last resolved (resolve_speed); groups: the BN groups made already (bn_groups), else
    made here from dist.sync_bn."""
    if cfg.train.channels_last:
        # Module.to takes memory_format (documented, and passed on to every tensor); torch's overloads leave it out.
        G = G.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        D = D.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    G, D = wrap_models(G, D, env, sync_bn=cfg.dist.sync_bn, groups=groups)
    if cfg.train.compile:  # a module compiles to a module (OptimizedModule); torch types the result as a callable
        G, D = cast(nn.Module, torch.compile(G)), cast(nn.Module, torch.compile(D))
    return G, D


def make_loader(cfg: Config, env: DistEnv, shards: str) -> ImageBatches:
    """This rank's stream of uint8 training batches."""
    return ImageBatches(
        shards,
        cfg.train.batch_size,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.run.seed,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        expect_chw=(cfg.model.channels, cfg.model.image_size, cfg.model.image_size),
        pin_memory=env.device.type == "cuda",
        max_bad_fraction=cfg.data.max_bad_fraction,
        cache=cfg.data.cache,
        device=env.device,
    )


def _closer(part: Part, current_step: Callable[[], int]):
    """An ExitStack exit callback that closes `part`; while the run is already failing, an error in closing
    (the GIF on a full disk, say) is logged instead of replacing the error that says what went wrong."""

    def close(exc_type, exc, tb) -> bool:
        try:
            part.close(current_step())
        except Exception as error:  # noqa: BLE001 - any: the original error is the one to report
            if exc_type is None:
                raise
            if not (isinstance(exc, StoreUnreachable) and isinstance(error, StoreUnreachable)):  # said once is enough
                log.warning("%s could not finish its outputs: %s", type(part).__name__, error)
        return False

    return close


class NoiseRNG:
    """This rank's latent-noise stream: its own generator, so its state can be checkpointed exactly (torch's
    global generators travel along, for anything else that draws from them)."""

    def __init__(self, device: torch.device, seed: int):
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def latents(self, n: int, nz: int) -> torch.Tensor:
        return torch.randn(n, nz, 1, 1, device=self.generator.device, generator=self.generator)

    def state_dict(self) -> dict:
        state: dict[str, Any] = {"noise": self.generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["noise"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """One training process's run: data, networks, the parts, and the loop.

    env: this process's rank/device (default: one local process on train.device). checkpoint_storage: where
    checkpoints go (default: <run.dir>/checkpoints; the Ray launcher passes Ray Train's storage). hooks: called
    after every step.
    """

    def __init__(
        self,
        cfg: Config,
        env: DistEnv | None = None,
        checkpoint_storage: CheckpointStorage | None = None,
        hooks: Sequence[StepHook] = (),
    ):
        set_timeout(cfg.run.storage_timeout_s)  # how long an object store that stops answering is waited for
        self.env = env = env or DistEnv(device=pick_device(cfg.train.device))
        # "auto" made concrete here, once: config.yaml, the checkpoints and W&B record what was used.
        cfg, self.speed = resolve_speed(cfg, env)
        self.cfg, self.hooks = cfg, list(hooks)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        torch.manual_seed(cfg.run.seed)
        # Rank 0 alone writes run.dir; under Ray the driver has read a first sample already (once, not per restart).
        check_settings(cfg, env.world_size, check_run_dir=env.is_main, probe=not env.distributed, device=env.device)
        self.storage = RunStorage(cfg.run.dir)  # a local folder or s3://bucket/prefix: every file the run writes
        self.shards, self.num_samples = resolve_data(cfg.data, cfg.model)
        self.cfg = cfg = with_classes(cfg, self.shards)  # before any run file: config.yaml and checkpoints carry them
        self.objective = objective(cfg.gan.loss)
        self.G, self.D, self.opt_g, self.opt_d, self.precision = build_networks(cfg, env.device)
        self.ema = EMA(self.G, cfg.train.ema_decay) if cfg.train.ema_decay > 0 and env.is_main else None
        self.noise = NoiseRNG(env.device, slot_seed(cfg.run.seed, env.rank, 7))
        self.batches = make_loader(cfg, env, self.shards)
        self.global_batch = cfg.train.batch_size * env.world_size

        self.metrics = Metrics(
            cfg, env, self.storage, self.global_batch, self.num_samples, (self.opt_g, self.opt_d), self.batches
        )
        self.say = self.metrics.message  # rank 0 only
        self.estimate = CpuEstimate(
            cfg, self.global_batch, self.storage, self.say, env.is_main and env.device.type == "cpu"
        )
        states = {
            "G": self.G,
            "D": self.D,
            "opt_g": self.opt_g,
            "opt_d": self.opt_d,
            "precision": self.precision,
            "metrics": self.metrics,
            **({"ema": self.ema} if self.ema else {}),
        }
        storage = checkpoint_storage or StorageCheckpoints(
            self.storage.sub("checkpoints"), cfg.train.keep_checkpoints, warn=self.say
        )
        self.checkpoints = CheckpointManager(
            storage,
            env,
            config_lib.to_dict(cfg),
            states,
            {"data": self.batches, "rng": self.noise},
            Schedule(cfg.train.checkpoint_every, last=cfg.train.max_steps, on_stop=True),
            self.say,
        )
        self.metrics.last_checkpoint = lambda: self.checkpoints.last_saved  # for the sinks (MLflow's tag)
        self.parts: list[Part] = [self.metrics]
        if cfg.train.eval_every:
            self.parts.append(
                QualityTracker(
                    cfg, self.shards, self.sample_model, self.checkpoints, self.metrics.reporter, env.is_main
                )
            )
        self.parts += [
            SampleGrids(cfg, self.storage, self.sample_model, self.metrics.reporter, env.device, env.is_main),
            self.checkpoints,
        ]

    def sample_model(self) -> nn.Module:
        """The generator that samples and evaluation use: the EMA when the run keeps one."""
        return self.ema.model if self.ema is not None else unwrap(self.G)

    def fit(self) -> TrainResult:
        """Train to train.max_steps, continuing from the newest checkpoint."""
        cfg, env = self.cfg, self.env
        step = first = self.checkpoints.restore()
        resumed_from = self.checkpoints.last_saved if first else None
        # This command line's rates and betas, not the checkpoint's; the rates as the schedule has them at `step`.
        set_hyperparameters(self.opt_g, self.opt_d, cfg.optim, step, cfg.train.max_steps)
        if env.is_main:  # after the restore: a refused resume leaves the run's record as it was
            self.storage.write("config.yaml", config_lib.to_yaml(cfg).encode())
        if step >= cfg.train.max_steps:
            self.say(
                f"Already trained to step {step} (train.max_steps={cfg.train.max_steps}); nothing to do. "
                "Raise train.max_steps to train further."
            )
            return TrainResult(
                step,
                self.checkpoints.last_saved,
                self.storage.location,
                {},
                0.0,
                max_steps=cfg.train.max_steps,
                start_step=first,
                resumed_from=resumed_from,
                stop_reason="already_trained",
            )
        self.bn_groups = bn_groups(env, cfg.dist.sync_bn)  # a collective: every rank, here
        G, D = distribute(self.G, self.D, cfg, env, self.bn_groups)
        self.describe()
        self.metrics.start(step)
        last_record: dict = {}
        stop = 0
        started = time.perf_counter()
        channels_last = bool(cfg.train.channels_last)  # resolved (resolve_speed): True or False
        with ExitStack() as closing:  # on the way out, whatever happens: parts last to first, then the loader
            closing.enter_context(stopping.handle_signals())
            closing.callback(self.batches.close)
            closing.push(self._name_last_checkpoint)
            closing.push(loader_death_as_run_error)  # runs after the parts close: a dead loader process -> RunError
            for part in self.parts:
                closing.push(_closer(part, lambda: step))
            closing.push(self._outcome(lambda: bool(stop) and step < cfg.train.max_steps))  # before the parts close
            while step < cfg.train.max_steps and not stop:
                step_started = time.perf_counter()
                images, labels = next(self.batches)
                real = normalise(images, env.device, channels_last)
                z = self.noise.latents(real.shape[0], cfg.model.nz)
                conditions = (
                    labels.to(env.device, non_blocking=True) if labels is not None and cfg.model.conditional else None
                )
                set_learning_rates(self.opt_g, self.opt_d, cfg.optim, step, cfg.train.max_steps)
                losses = train_step(G, D, self.opt_g, self.opt_d, real, z, self.precision, self.objective, conditions)
                if self.ema is not None:
                    self.ema.update(G)
                step += 1
                self.metrics.add(losses, time.perf_counter() - step_started)
                self.estimate.step(step)
                for hook in self.hooks:
                    hook(step, env, images, labels)  # the batch as the loader gave it
                stop = env.agree_max(stopping.code())  # a graceful stop: after this step, on every rank
                if stop:
                    self.say(
                        f"{signal.Signals(stopping.signal_of(stop)).name}: stopping after step {step}, "
                        "with a checkpoint (send it again to stop at once)"
                    )

                record = {"step": step}
                due = [part for part in self.parts if part.schedule.due(step, bool(stop))]  # alike on every rank
                if self.checkpoints in due:  # no checkpoint of diverged weights
                    self.check_finite(step)
                for part in due:
                    if part is not self.checkpoints:
                        part(step, record)
                if len(record) > 1:
                    # Stored before the step's checkpoint: a run killed between the two resumes from the checkpoint
                    # before, which drops and trains again every record after it; never past a record not written.
                    self.metrics.write(record)
                    last_record = record
                if self.checkpoints in due:
                    self.checkpoints(step, record)

        seconds = time.perf_counter() - started
        if step >= cfg.train.max_steps:  # reached before the estimate was measured long enough: from what there was
            self.estimate.at_end(step)
        rate = (step - first) * self.global_batch / max(seconds, 1e-9)
        stopped = stopping.signal_of(stop) if step < cfg.train.max_steps else 0  # at the last step: finished
        self.say(f"{'Stopped' if stopped else 'Done'}: step {step} in {seconds:.1f} s ({rate:.1f} images/s)")
        # A samples folder is named only once a grid is in it (a short run may stop before the first).
        samples = self.storage.where("samples") if self.env.is_main and self.storage.list("samples") else "none yet"
        self.say(
            f"  checkpoint: {self.checkpoints.last_saved}\n  samples:    {samples}\n"
            f"  metrics:    {self.storage.where('metrics.jsonl')}"
        )
        return TrainResult(
            step,
            self.checkpoints.last_saved,
            self.storage.location,
            last_record,
            seconds,
            stopped,
            bool(stopped) and stopping.own_signal(stop),
            max_steps=cfg.train.max_steps,
            start_step=first,
            resumed_from=resumed_from,
            stop_reason="signal" if stopped else "max_steps",
            signal=signal.Signals(stopped).name if stopped else None,
            warnings=self.estimate.warnings,
        )

    def _outcome(self, stopped: Callable[[], bool]):
        """An ExitStack exit callback that tells the metrics part (and so its sinks) how the run ended: stopped by a
        signal (after a step, or at once by a second SIGINT), failed (any other error), or finished."""

        def record(exc_type, exc, tb) -> bool:
            if exc_type is None:
                self.metrics.outcome = "stopped" if stopped() else "finished"
            elif issubclass(exc_type, (KeyboardInterrupt, stopping.StoppedBySignal)):
                self.metrics.outcome = "stopped"
            else:
                self.metrics.outcome = "failed"
            return False

        return record

    def check_finite(self, step: int) -> None:
        """NonFiniteLoss on every rank alike when a loss since the last check, or now a weight, is nan or inf: a
        step's losses are computed before its updates, so the weights after the last one are looked at too (one
        device sync, at checkpoint steps only)."""
        self.metrics.check_finite()
        weights = [p for net in (self.G, self.D) for p in net.parameters()]
        finite = torch.stack([torch.isfinite(p).all() for p in weights]).all()
        if self.env.agree_max(int(not finite.item())):
            raise NonFiniteLoss(step, {}, "the weights became non-finite in")

    def _name_last_checkpoint(self, exc_type, exc, tb) -> bool:
        """An ExitStack exit callback: a divergence says which checkpoint to resume from, with which rates."""
        if isinstance(exc, NonFiniteLoss):
            exc.checkpoint, exc.lr = self.checkpoints.last_saved, self.cfg.optim.lr
            exc.lower = lower_rates(self.cfg.optim)
        return False

    def describe(self) -> None:
        cfg, env = self.cfg, self.env
        params = [sum(p.numel() for p in net.parameters()) / 1e6 for net in (self.G, self.D)]
        m = cfg.model
        self.say(
            f"Run dir: {self.storage.location}  |  {env.world_size} worker(s), device {env.device}"
            + (f", synchronised batch norm: {self.bn_groups.describe(env.rank)}" if env.distributed else "")
            + f"  |  G {params[0]:.2f}M params, D {params[1]:.2f}M params"
        )
        self.say(f"Speed: {self.speed.reason}")
        self.say(
            f"Data: {self.shards} ({self.num_samples or 'unknown number of'} samples), "
            f"{m.image_size}x{m.image_size}x{m.channels}, global batch {self.global_batch}"
            + (f", {self.num_samples / self.global_batch:.1f} steps per epoch" if self.num_samples else "")
        )
