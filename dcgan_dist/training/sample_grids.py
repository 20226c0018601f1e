"""The sampler part: a grid of the same fixed latent vectors every train.sample_every steps, and at the end of
a run the grids animated into progress.gif, all in the run's storage. Rank 0 alone; no collective.

A class-conditional model's grid has one row per class, every row drawn from the same CONDITIONAL_COLUMNS latent
vectors: along a column the style is held and the class changes, down a row the class is held."""

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
CONDITIONAL_COLUMNS = 8  # a conditional model's grid: this many fixed latent vectors, drawn as every class
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


def fixed_latents(model_cfg, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(latent vectors, labels) of the fixed grid: NUM_FIXED_SAMPLES vectors and no labels for an unconditional
    model; for a conditional one the first CONDITIONAL_COLUMNS vectors of the same stream repeated for each class
    (row k: class k), with their labels."""
    noise = torch.Generator().manual_seed(seed)
    if not model_cfg.conditional:
        return torch.randn(NUM_FIXED_SAMPLES, model_cfg.nz, 1, 1, generator=noise), None
    z = torch.randn(CONDITIONAL_COLUMNS, model_cfg.nz, 1, 1, generator=noise)
    classes = model_cfg.num_classes
    labels = torch.arange(classes, dtype=torch.int64).repeat_interleave(CONDITIONAL_COLUMNS)
    return z.repeat(classes, 1, 1, 1), labels


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
        self.z, self.labels = fixed_latents(cfg.model, cfg.run.seed)
        self.z = self.z.to(device)
        self.labels = self.labels.to(device) if self.labels is not None else None
        self.nrow = CONDITIONAL_COLUMNS if self.labels is not None else 8
        names = list(cfg.model.class_names) if self.labels is not None else []
        self.rows = f" (rows: {', '.join(names)})" if names else ""

    @torch.no_grad()
    def __call__(self, step: int, record: dict) -> None:
        if not self.is_main:
            return
        with eval_mode(self.generator()) as G:
            image = grid_image(G(self.z) if self.labels is None else G(self.z, labels=self.labels), nrow=self.nrow)
        where = self.storage.write(f"samples/step_{step:07d}.png", encode(image))
        self.reporter.message(f"step {step}: samples -> {where}")
        self.reporter.image("samples", image, step, caption=f"fixed noise{self.rows}, step {step}")

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
