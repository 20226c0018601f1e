"""The metrics part: step metrics averaged over all workers, then metrics.jsonl, console progress and W&B.

Every rank adds its step's losses; at log steps one all-reduce gives their global means. Rank 0 alone writes:
metrics.jsonl is the local source of truth for curves, one JSON object per logged step (values averaged over
the steps since the previous log line, plus whatever other parts added at that step, e.g. SWD). A resumed
run drops the records past its checkpoint first, so no step appears twice.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dcgan_dist.distributed.env import DistEnv
from dcgan_dist.errors import RunError
from dcgan_dist.storage.filesystem import RunStorage
from dcgan_dist.training.schedule import Schedule
from dcgan_dist.training.wandb_logger import WandbLogger

METRICS_FILE = "metrics.jsonl"


def duration(seconds: float) -> str:
    """3h05m, 12m30s, 45s: an ETA a person reads at a glance."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def emit(text: str) -> None:
    """One line to stdout. Not print(): Ray Train patches print in workers into logging, which repeats lines."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def parse_metrics(text: str) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not one (cut short by a crash or a full disk) is left out."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def read_metrics(path: str | Path) -> list[dict]:
    return parse_metrics(Path(path).read_text())


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

    def __str__(self) -> str:
        values = f" ({', '.join(f'{k}={v:.4g}' for k, v in self.losses.items())})" if self.losses else ""
        lower = f"lower optim.lr{f' (now {self.lr:g})' if self.lr is not None else ''}"
        if self.checkpoint is None:
            then = f"no checkpoint was written before it: {lower} and start again"
        else:
            then = (
                f"the newest checkpoint, {self.checkpoint}, is from before it, and resuming with the same settings "
                f"would diverge again: {lower} and run the command again to resume from it"
            )
        return f"{self.what} step {self.step}{values}: training diverged; {then}"


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (CI, Ray job logs), one per logged step."""

    def __init__(self, start_step: int, max_steps: int):
        self.interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not self.interactive
        )

    def log(self, record: dict) -> None:
        fields = {k: record[k] for k in ("loss_d", "loss_g", "d_real", "d_fake") if k in record}
        if self.interactive:
            self.bar.set_postfix(
                {**{k: f"{v:.3f}" for k, v in fields.items()}, "img/s": f"{record['images_per_s']:.0f}"}
            )
        else:
            text = " ".join(f"{k}={v:.3f}" for k, v in fields.items())
            emit(
                f"step {record['step']:>7}/{self.bar.total}  {text}  images/s={record['images_per_s']:.1f}  "
                f"eta {duration(record['eta_s'])}"
            )

    def message(self, text: str) -> None:
        tqdm.write(text) if self.interactive else emit(text)

    def close(self) -> None:
        self.bar.close()


class Metrics:
    """The metrics part. Every rank: `add` each step, `__call__` at log steps (a collective). Rank 0: `write`
    the step's record, `message`, and W&B images; the W&B run id is its state (a resumed run continues it)."""

    def __init__(
        self, cfg, env: DistEnv, storage: RunStorage, global_batch: int, num_samples: int, optimizers, batches
    ):
        self.cfg, self.env, self.storage = cfg, env, storage
        self.schedule = Schedule(cfg.train.log_every, last=cfg.train.max_steps, on_stop=True)
        self.global_batch, self.num_samples = global_batch, num_samples
        self.optimizers, self.batches = optimizers, batches
        self.meter, self.seconds, self.steps = Meter(), 0.0, 0
        self.window_started, self.excluded = time.perf_counter(), 0.0
        self.wandb_run_id: str | None = None
        # Images trained on so far, over every worker: the global batch changes when an elastic run is resized.
        self.images_seen: int | None = None
        self.progress: Progress | None = None
        self.lines: list[str] = []  # metrics.jsonl, written whole at every log step (an object cannot be appended to)
        self.wandb: WandbLogger | None = None
        self.step = 0
        # The losses since the last finiteness check, kept rather than tested each step (a test is a device sync,
        # or extra kernels every step); checked where the host reads the device anyway: at log steps (the means'
        # .tolist()) and before a checkpoint (saving reads every weight). (step, loss_d, loss_g) of the latest
        # steps, and older ones stacked on the device in blocks (first step, (n, 2) tensor): memory stays small
        # however far apart the checks are.
        self.unchecked: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.unchecked_blocks: list[tuple[int, torch.Tensor]] = []

    def state_dict(self) -> dict:
        return {"wandb_run_id": self.wandb_run_id, "images_seen": self.images_seen}

    def load_state_dict(self, state: dict) -> None:
        run_id, images_seen = state.get("wandb_run_id"), state.get("images_seen")
        # A checkpoint is untrusted data: the id names W&B's files and run, so only an id of the kind W&B makes.
        if run_id is not None and not (isinstance(run_id, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,128}", run_id)):
            raise ValueError(f"W&B run id {str(run_id)[:80]!r} is not one W&B would make")
        if images_seen is not None and not (isinstance(images_seen, int) and images_seen >= 0):
            raise ValueError(f"images seen {images_seen!r} is not a count")
        self.wandb_run_id, self.images_seen = run_id, images_seen

    def start(self, step: int) -> None:
        """Rank 0 opens its outputs (after a restore, so that W&B continues the same run)."""
        self.window_started, self.step = time.perf_counter(), step
        if self.images_seen is None:  # a new run, or a checkpoint from before images were counted
            self.images_seen = step * self.global_batch
        if not self.env.is_main:
            return
        self.progress = Progress(step, self.cfg.train.max_steps)
        if self.storage.is_file(METRICS_FILE):  # records past the checkpoint resumed from are trained again: drop them
            kept = [r for r in parse_metrics(self.storage.read(METRICS_FILE).decode()) if r["step"] <= step]
            self.lines = [json.dumps(r) for r in kept]
            self._flush()
        if self.cfg.wandb.mode != "disabled":
            # W&B's own files stay on this machine: the run directory, or beside the data cache for a run in an
            # object store (`wandb sync` uploads them from there).
            where = (
                self.storage.local_dir()
                or Path(self.cfg.data.cache_dir).expanduser() / "wandb-runs" / self.cfg.run.name
            )
            self.wandb = WandbLogger(self.cfg, where, run_id=self.wandb_run_id)
            self.wandb_run_id = self.wandb.run_id
            self.message(f"W&B ({self.cfg.wandb.mode}): run {self.wandb_run_id} in {where / 'wandb'}")

    def _flush(self) -> None:
        self.storage.write(METRICS_FILE, "".join(line + "\n" for line in self.lines).encode())

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
        if self.progress:
            self.progress.bar.update()

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
        self.lines.append(json.dumps(record))
        self._flush()
        if "images_per_s" in record:
            assert self.progress is not None  # made by start() on rank 0
            self.progress.log(record)
        if self.wandb:
            self.wandb.log(record, record["step"])

    def message(self, text: str) -> None:
        if self.env.is_main:
            self.progress.message(text) if self.progress else emit(text)

    def log_image(self, key: str, image, step: int, caption: str) -> None:
        if self.wandb:
            self.wandb.log_image(key, image, step, caption)

    def log_animation(self, key: str, gif: bytes, step: int) -> None:
        if self.wandb:
            self.wandb.log_animation(key, gif, step)

    def close(self, step: int) -> None:
        if self.progress:
            self.progress.close()
        if self.wandb:
            self.wandb.finish()
