"""The sampler part: a grid of the same fixed latent vectors every train.sample_every steps, and at the end of
a run the grids animated into progress.gif, all in the run's storage. Rank 0 alone; no collective."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from PIL import UnidentifiedImageError
from PIL.Image import DecompressionBombError
from torch import nn

from dcgan_dist.data.images import encode, gif, grid_image
from dcgan_dist.gan.models import eval_mode
from dcgan_dist.storage.filesystem import RunStorage
from dcgan_dist.training.metrics import Reporter
from dcgan_dist.training.schedule import Schedule

NUM_FIXED_SAMPLES = 64
_GRID_NAME = re.compile(r"^step_\d+\.png$")


def sample_grids(storage: RunStorage) -> list[str]:
    """A run's sample grids (samples/step_*.png), in step order."""
    return sorted(
        f"samples/{name}" for name, is_dir in storage.list("samples") if not is_dir and _GRID_NAME.match(name)
    )


def progress_animation(storage: RunStorage) -> bytes:
    """A run's fixed-noise grids as one animated GIF."""
    frames = sample_grids(storage)
    if not frames:
        raise FileNotFoundError(f"no sample grids (samples/step_*.png) in {storage.location}")
    return gif([storage.read(name) for name in frames])


class SampleGrids:
    def __init__(
        self,
        cfg,
        storage: RunStorage,
        generator: Callable[[], nn.Module],
        reporter: Reporter,
        device: torch.device,
        is_main: bool,
    ):
        self.schedule = Schedule(cfg.train.sample_every, last=cfg.train.max_steps)
        self.storage, self.generator, self.reporter, self.is_main = storage, generator, reporter, is_main
        noise = torch.Generator().manual_seed(cfg.run.seed)
        self.z = torch.randn(NUM_FIXED_SAMPLES, cfg.model.nz, 1, 1, generator=noise).to(device)

    @torch.no_grad()
    def __call__(self, step: int, record: dict) -> None:
        if not self.is_main:
            return
        with eval_mode(self.generator()) as G:
            image = grid_image(G(self.z), nrow=8)
        where = self.storage.write(f"samples/step_{step:07d}.png", encode(image))
        self.reporter.message(f"step {step}: samples -> {where}")
        self.reporter.image("samples", image, step, caption=f"fixed noise, step {step}")

    def close(self, step: int) -> None:
        if self.is_main and sample_grids(self.storage):
            try:
                data = progress_animation(self.storage)
            except (UnidentifiedImageError, DecompressionBombError) as exc:  # a file in samples/ that is no grid
                self.reporter.message(
                    f"warning: no progress animation: a file in {self.storage.where('samples')} is "
                    f"not an image ({type(exc).__name__})"
                )
                return
            self.reporter.message(f"progress animation -> {self.storage.write('progress.gif', data)}")
            self.reporter.animation("progress", data, step)
