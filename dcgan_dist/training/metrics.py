"""The metrics part: step metrics averaged over all workers (the aggregator), handed to the run's sinks.

Every rank adds its step's losses; at log steps one all-reduce gives their global means (every rank makes the
same calls). Rank 0 alone has sinks (training/sinks/: console, metrics.jsonl, W&B, TensorBoard, MLflow, as
log.sinks chooses): each gets the step's record (values averaged over the steps since the previous log line,
plus whatever other parts added at that step, e.g. SWD), the images, and the end of the run. What a sink must
keep across a resume (a W&B or MLflow run id) is in the checkpoint, under `metrics`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from dcgan_dist.distributed.env import DistEnv
from dcgan_dist.errors import RunError
from dcgan_dist.storage.filesystem import AppendLog, RunStorage, is_remote
from dcgan_dist.training import sinks as sink_registry
from dcgan_dist.training.schedule import Schedule
from dcgan_dist.training.sinks.base import Sink, SinkContext, emit
from dcgan_dist.training.sinks.jsonl import METRICS_FILE, parse_metrics


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's metrics, given its metrics.jsonl or its run dir (a folder or s3://...): on a disk
    one file, in an object store its numbered segments, read as one stream."""
    where = str(path)
    if not is_remote(where) and Path(where).expanduser().is_file():  # a file of records on this disk, any name
        return parse_metrics(Path(where).expanduser().read_text(errors="replace"))
    if where.endswith(METRICS_FILE):
        where = where[: -len(METRICS_FILE)].rstrip("/") or "."
    return parse_metrics(AppendLog(RunStorage(where), METRICS_FILE).read().decode(errors="replace"))


class Meter:
    """Sums step metrics as tensors (no host sync per step); `take()` returns their means and resets."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def take(self) -> tuple[list[str], torch.Tensor]:
        """(names, one float tensor of their means since the last take), ready for a single all-reduce."""
        keys = list(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).float() / max(self.count, 1) if keys else torch.zeros(0)
        self.sums, self.count = {}, 0
        return keys, values


class NonFiniteLoss(RunError):
    """A loss was nan or inf (training diverged) at `step`, or the weights were after it; raised on every rank
    alike. The Trainer adds the run's newest checkpoint (all of them are from before `step`: one is written only
    after a check) and its optim.lr."""

    def __init__(self, step: int, losses: dict[str, float], what: str = "the losses became non-finite at"):
        super().__init__()
        self.step, self.losses, self.what = step, losses, what
        self.checkpoint: str | None = None
        self.lr: float | None = None
        self.lower: str | None = None  # what to lower, as the Trainer words it (optim.lr or optim.lr_g/lr_d)

    def __str__(self) -> str:
        values = f" ({', '.join(f'{k}={v:.4g}' for k, v in self.losses.items())})" if self.losses else ""
        lower = self.lower or f"lower optim.lr{f' (now {self.lr:g})' if self.lr is not None else ''}"
        if self.checkpoint is None:
            then = f"no checkpoint was written before it: {lower} and start again"
        else:
            then = (
                f"the newest checkpoint, {self.checkpoint}, is from before it, and resuming with the same settings "
                f"would diverge again: {lower} and run the command again to resume from it"
            )
        return f"{self.what} step {self.step}{values}: training diverged; {then}"


class Reporter:
    """What the sampler and the evaluator may do with a run's outputs (rank 0): a line for the user, an image or
    an animation for the sinks, and time to leave out of images/s. Their values go into the step's record."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def message(self, text: str) -> None:
        self._metrics.message(text)

    def image(self, key: str, image, step: int, caption: str = "") -> None:
        for sink in self._metrics.sinks.values():
            sink.image(key, image, step, caption)

    def animation(self, key: str, gif: bytes, step: int) -> None:
        for sink in self._metrics.sinks.values():
            sink.animation(key, gif, step)

    def exclude(self, seconds: float) -> None:
        self._metrics.exclude(seconds)


class Metrics:
    """The metrics part (the aggregator). Every rank: `add` each step, `__call__` at log steps (a collective).
    Rank 0: `write` the step's record to the sinks, `message`; `reporter` is what the other parts get. Its state:
    images seen, and each sink's (a W&B or MLflow run id), so that a resumed run continues them."""

    def __init__(
        self, cfg, env: DistEnv, storage: RunStorage, global_batch: int, num_samples: int, optimizers, batches
    ):
        self.cfg, self.env, self.storage = cfg, env, storage
        self.schedule = Schedule(cfg.train.log_every, last=cfg.train.max_steps, on_stop=True)
        self.global_batch, self.num_samples = global_batch, num_samples
        self.optimizers, self.batches = optimizers, batches
        self.meter, self.seconds, self.steps = Meter(), 0.0, 0
        self.window_started, self.excluded = time.perf_counter(), 0.0
        # Images trained on so far, over every worker: the global batch changes when an elastic run is resized.
        self.images_seen: int | None = None
        # Rank 0's sinks, made here (cheap) so that a restore can give them their state; opened by start().
        self.sinks: dict[str, Sink] = {}
        if env.is_main:
            local = storage.local_dir() or Path(cfg.data.cache_dir).expanduser() / "runs" / cfg.run.name
            self.sinks = sink_registry.make(list(cfg.log.sinks), SinkContext(cfg, storage, local, self.message))
        self.started = False
        self.reporter = Reporter(self)
        # The newest checkpoint at the end of the run (the Trainer sets where to ask), for the sinks' close.
        self.last_checkpoint: Callable[[], str | None] = lambda: None
        # How the run ended (sinks.base.OUTCOMES), for the sinks' close; the Trainer sets it as the run unwinds.
        self.outcome = "finished"
        self.step = 0
        # The losses since the last finiteness check, kept rather than tested each step (a test is a device sync,
        # or extra kernels every step); checked where the host reads the device anyway: at log steps (the means'
        # .tolist()) and before a checkpoint (saving reads every weight). (step, loss_d, loss_g) of the latest
        # steps, and older ones stacked on the device in blocks (first step, (n, 2) tensor): memory stays small
        # however far apart the checks are.
        self.unchecked: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.unchecked_blocks: list[tuple[int, torch.Tensor]] = []

    def state_dict(self) -> dict:
        return {
            "images_seen": self.images_seen,
            "sinks": {name: sink.state_dict() for name, sink in self.sinks.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        images_seen = state.get("images_seen")
        if images_seen is not None and not (isinstance(images_seen, int) and images_seen >= 0):
            raise ValueError(f"images seen {images_seen!r} is not a count")
        saved = state.get("sinks")
        if saved is None:  # a checkpoint from before the sinks: the W&B run id was the only one
            saved = {"wandb": {"run_id": state.get("wandb_run_id")}}
        if not isinstance(saved, dict):
            raise ValueError("the sinks' state is not a mapping")
        for name, sink in self.sinks.items():
            sink_state = saved.get(name) or {}
            if not isinstance(sink_state, dict):
                raise ValueError(f"the {name} sink's state is not a mapping")
            sink.load_state_dict(sink_state)
        self.images_seen = images_seen

    def start(self, step: int) -> None:
        """Rank 0 opens its sinks (after a restore, so that W&B and MLflow continue the same run)."""
        self.window_started, self.step = time.perf_counter(), step
        if self.images_seen is None:  # a new run, or a checkpoint from before images were counted
            self.images_seen = step * self.global_batch
        for sink in self.sinks.values():
            sink.start(step)
        self.started = True

    def add(self, losses: dict[str, torch.Tensor], seconds: float) -> None:
        """One step's losses (tensors, not read here: no device sync per step) and its time on the host."""
        self.meter.add(losses)
        self.step += 1
        self.unchecked.append((self.step, losses["loss_d"], losses["loss_g"]))
        if len(self.unchecked) == 256:
            self.unchecked_blocks.append(self._stack_unchecked())
        self.seconds += seconds
        self.steps += 1
        assert self.images_seen is not None  # counted from by start()
        self.images_seen += self.global_batch
        console = self.sinks.get("console")
        if console is not None:
            console.step_done()  # type: ignore[attr-defined]  # the console sink's bar

    def exclude(self, seconds: float) -> None:
        """Leave time spent on something else than training (an evaluation) out of images_per_s."""
        self.excluded += seconds

    def _stack_unchecked(self) -> tuple[int, torch.Tensor]:
        block = (self.unchecked[0][0], torch.stack([torch.stack(pair) for _, *pair in self.unchecked]))
        self.unchecked = []
        return block

    def check_finite(self) -> None:
        """NonFiniteLoss on every rank when any rank had a nan or inf loss since the last check, naming the first
        such step (one small collective)."""
        if self.unchecked:
            self.unchecked_blocks.append(self._stack_unchecked())
        first, values = 0, {}
        for start, losses in self.unchecked_blocks:  # losses: (steps, 2)
            bad = (~torch.isfinite(losses)).any(dim=1).nonzero().flatten().tolist()
            if bad:
                first, values = start + bad[0], dict(zip(("loss_d", "loss_g"), losses[bad[0]].tolist()))
                break
        self.unchecked_blocks = []
        firsts = [int(f) for f in self.env.gather_scalars(float(first)) if f]
        if firsts:
            step = min(firsts)
            raise NonFiniteLoss(step, values if first == step else {})

    def __call__(self, step: int, record: dict) -> None:
        """Global means of the losses since the last log step, throughput, per-rank step times, data counters."""
        self.check_finite()
        names, means = self.meter.take()
        record.update(zip(names, self.env.all_reduce_mean(means).tolist()))  # .tolist() waits for the device
        now = time.perf_counter()
        # Wall clock since the last log step (work queued on a GPU is done by now), evaluations left out.
        record["images_per_s"] = self.steps * self.global_batch / max(now - self.window_started - self.excluded, 1e-9)
        # Each rank's own time per step on the host (loading and the step; on a GPU, launching it): a slow
        # worker shows here, since in lock step all of them go at its pace.
        for rank, total in enumerate(self.env.gather_scalars(self.seconds)):
            record[f"step_time_s/rank{rank}"] = total / max(self.steps, 1)
        self.seconds, self.steps, self.window_started, self.excluded = 0.0, 0, now, 0.0
        record["lr_g"], record["lr_d"] = (opt.param_groups[0]["lr"] for opt in self.optimizers)
        record["workers"], record["images"] = self.env.world_size, self.images_seen
        # At the rate since the last log step: what every progress line (a bar or plain log lines) shows.
        record["eta_s"] = (self.cfg.train.max_steps - step) * self.global_batch / max(record["images_per_s"], 1e-9)
        if self.num_samples and self.images_seen is not None:
            record["epoch"] = self.images_seen / self.num_samples
        # Data problems so far, summed over every rank's loader (0 for a healthy data set: then left out).
        counters = ("bad_samples", "bad_shards", "missing_samples")
        local = torch.tensor([float(getattr(self.batches.counters, n)) for n in counters], device=self.env.device)
        totals = (self.env.all_reduce_mean(local) * self.env.world_size).round().long().tolist()
        record.update({n: v for n, v in zip(counters, totals) if v})
        if self.env.device.type == "cuda":
            record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30

    def write(self, record: dict) -> None:
        if not self.env.is_main:
            return
        for sink in self.sinks.values():
            sink.scalars(record)

    def message(self, text: str) -> None:
        if self.env.is_main and not any(sink.message(text) for sink in self.sinks.values()):
            emit(text)

    def close(self, step: int) -> None:
        """Every sink closes, even when one fails (the first error is raised after)."""
        error: BaseException | None = None
        checkpoint = self.last_checkpoint()
        for sink in reversed(list(self.sinks.values())):
            try:
                sink.close(step, checkpoint, self.outcome)
            except Exception as exc:  # noqa: BLE001 - the others still close
                error = error or exc
        if error is not None:
            raise error
