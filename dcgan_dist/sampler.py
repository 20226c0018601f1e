"""The sampler part: a grid of the same fixed latent vectors every train.sample_every steps, and at the end of
a run the grids animated into progress.gif. Rank 0 alone; no collective."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .images import animate, save_grid
from .metrics import Metrics
from .models import eval_mode
from .schedule import Schedule

NUM_FIXED_SAMPLES = 64


def sample_grids(run_dir: str | Path) -> list[Path]:
    """A run's sample grids (samples/step_*.png), in step order."""
    return sorted((Path(run_dir) / "samples").glob("step_*.png"))


def progress_animation(run_dir: str | Path, out: str | Path) -> Path:
    """A run's fixed-noise grids as one animated GIF."""
    frames = sample_grids(run_dir)
    if not frames:
        raise FileNotFoundError(f"no sample grids (samples/step_*.png) in {run_dir}")
    return animate(frames, out)


class Sampler:
    def __init__(self, cfg, run_dir: Path, generator: Callable[[], nn.Module], metrics: Metrics, device: torch.device,
                 is_main: bool):
        self.schedule = Schedule(cfg.train.sample_every, last=cfg.train.max_steps)
        self.run_dir, self.generator, self.metrics, self.is_main = run_dir, generator, metrics, is_main
        noise = torch.Generator().manual_seed(cfg.run.seed)
        self.z = torch.randn(NUM_FIXED_SAMPLES, cfg.model.nz, 1, 1, generator=noise).to(device)

    @torch.no_grad()
    def __call__(self, step: int, record: dict) -> None:
        if not self.is_main:
            return
        with eval_mode(self.generator()) as G:
            path = save_grid(G(self.z), self.run_dir / "samples" / f"step_{step:07d}.png", nrow=8)
        self.metrics.message(f"step {step}: samples -> {path}")
        self.metrics.log_image("samples", path, step, caption=f"fixed noise, step {step}")

    def close(self, step: int) -> None:
        if self.is_main and sample_grids(self.run_dir):
            gif = progress_animation(self.run_dir, self.run_dir / "progress.gif")
            self.metrics.message(f"progress animation -> {gif}")
            self.metrics.log_animation("progress", gif, step)
