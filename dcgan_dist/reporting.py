"""What a run tells the person watching it: console progress, metrics.jsonl, sample grids.

Only the main process (rank 0) reports. metrics.jsonl is the local source of truth for curves: one JSON
object per logged step, values averaged over the steps since the previous log line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from .gan import eval_mode
from .images import save_gif, save_grid


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


class MetricsLog:
    """Appends one JSON object per logged step to <run.dir>/metrics.jsonl."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def emit(text: str) -> None:
    """One line to stdout. Not print(): Ray Train patches print in workers into logging, which repeats lines."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (CI, Ray job logs), one per logged step."""

    def __init__(self, start_step: int, max_steps: int, enabled: bool = True):
        self.interactive = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not self.interactive)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        fields = {k: record[k] for k in ("loss_d", "loss_g", "d_real", "d_fake") if k in record}
        if self.interactive:
            self.bar.set_postfix({**{k: f"{v:.3f}" for k, v in fields.items()}, "img/s": f"{record['images_per_s']:.0f}"})
        else:
            text = " ".join(f"{k}={v:.3f}" for k, v in fields.items())
            emit(f"step {record['step']:>7}/{self.bar.total}  {text}  images/s={record['images_per_s']:.1f}")

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text) if self.interactive else emit(text)

    def close(self) -> None:
        self.bar.close()


class Throughput:
    """Images per second between two log points (wall clock)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.images = 0

    def add(self, images: int) -> None:
        self.images += images

    def exclude(self, seconds: float) -> None:
        """Leave time spent on something else (an evaluation) out of the rate."""
        self.last += seconds

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.images / max(now - self.last, 1e-9)
        self.last, self.images = now, 0
        return rate


@torch.no_grad()
def save_samples(G: torch.nn.Module, z: torch.Tensor, path: str | Path) -> Path:
    """A grid of G(z) in eval mode."""
    with eval_mode(G) as model:
        return save_grid(model(z), path, nrow=8)


def progress_animation(sample_dir: str | Path, out: str | Path, duration_ms: int = 250) -> Path:
    """The fixed-noise grids of a run (samples/step_*.png, in step order) as one animated GIF."""
    frames = sorted(Path(sample_dir).glob("step_*.png"))
    if not frames:
        raise FileNotFoundError(f"no sample grids (step_*.png) in {sample_dir}")
    images = []
    for path in frames:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return save_gif(images, out, duration_ms=duration_ms)


class Reporter:
    """Everything rank 0 tells the outside world; on other ranks every method does nothing."""

    def __init__(self, cfg, run_dir: Path, start_step: int, is_main: bool, wandb_run_id: str | None = None):
        self.is_main, self.run_dir = is_main, run_dir
        self.sample_dir = run_dir / "samples"
        self.progress = Progress(start_step, cfg.train.max_steps, enabled=is_main)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl") if is_main else None
        self.wandb = None
        if is_main and cfg.wandb.mode != "disabled":
            from . import config as config_lib
            from .wandb_logger import WandbLogger

            self.wandb = WandbLogger(cfg, run_dir, config_lib.to_dict(cfg), run_id=wandb_run_id)
            self.message(f"W&B ({cfg.wandb.mode}): run {self.wandb.run_id} in {run_dir / 'wandb'}")

    @property
    def wandb_run_id(self) -> str | None:
        return self.wandb.run_id if self.wandb else None

    def advance(self) -> None:
        self.progress.update()

    def message(self, text: str) -> None:
        self.progress.message(text)

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.metrics.write(record)
        if "images_per_s" in record:
            self.progress.log(record)
        if "swd" in record:
            self.message(f"step {record['step']}: SWD {record['swd']:.2f}")
        if self.wandb:
            self.wandb.log(record, record["step"])

    def samples(self, G: torch.nn.Module, z: torch.Tensor, step: int) -> None:
        if not self.is_main:
            return
        path = save_samples(G, z, self.sample_dir / f"step_{step:07d}.png")
        self.message(f"step {step}: samples -> {path}")
        if self.wandb:
            self.wandb.log_image("samples", path, step, caption=f"fixed noise, step {step}")

    def close(self, final_step: int) -> None:
        if not self.is_main:
            return
        self.progress.close()
        self.metrics.close()
        if any(self.sample_dir.glob("step_*.png")):
            gif = progress_animation(self.sample_dir, self.run_dir / "progress.gif")
            emit(f"progress animation -> {gif}")
            if self.wandb:
                self.wandb.log_animation("progress", gif, final_step)
        if self.wandb:
            self.wandb.finish()
