"""The evaluator part: SWD of the generator against real images every train.eval_every steps, keeping the best
checkpoint (GAN samples often get worse late in a run). Rank 0 alone; the other ranks wait at their next
collective. A class-conditional model draws its images with the real images' labels, and the record gets the SWD
of each class too ("swd_per_class": {name: value})."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from dcgan_dist.data import ImageBatches
from dcgan_dist.gan.models import eval_mode, generate
from dcgan_dist.gan.quality import swd, swd_per_class
from dcgan_dist.training.checkpoint import CheckpointManager
from dcgan_dist.training.metrics import Reporter
from dcgan_dist.training.schedule import Schedule


def real_images(
    shards: str, num: int, expect_chw, seed: int, half: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`num` real images (uint8) and their labels (int64, or None for unlabelled shards); half=0/1 draws from one
    of two disjoint halves of the shards."""
    rank, world = (half, 2) if half is not None else (0, 1)
    batch = min(num, 256)
    stream = ImageBatches(
        shards, batch, rank=rank, world_size=world, seed=seed, shuffle_buffer=1000, expect_chw=expect_chw
    )
    try:
        batches = [next(stream) for _ in range(math.ceil(num / batch))]
    finally:
        stream.close()
    images = torch.cat([images for images, _ in batches])[:num]
    labels = [labels for _, labels in batches if labels is not None]
    return images, torch.cat(labels)[:num] if len(labels) == len(batches) else None


class QualityTracker:
    """Fixed real images and fixed latents, so values are comparable across steps."""

    def __init__(
        self,
        cfg,
        shards: str,
        generator: Callable[[], nn.Module],
        checkpoints: CheckpointManager,
        reporter: Reporter,
        is_main: bool,
    ):
        self.schedule = Schedule(cfg.train.eval_every, last=cfg.train.max_steps)
        self.cfg, self.shards, self.generator, self.is_main = cfg, shards, generator, is_main
        self.checkpoints, self.reporter = checkpoints, reporter
        self.chw = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
        self.seed = cfg.run.seed + 1_000_003  # not the training stream's order
        self.real: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None  # the real images' (a conditional model's images are drawn with them)
        self.conditional = bool(cfg.model.conditional)

    def __call__(self, step: int, record: dict) -> None:
        if not self.is_main:
            return
        started = time.perf_counter()
        if self.real is None:  # loaded at the first evaluation, not at start-up
            self.real, labels = real_images(self.shards, self.cfg.eval.num, self.chw, self.seed)
            self.labels = labels if self.conditional else None
        with eval_mode(self.generator()) as G:
            device = next(G.parameters()).device
            fake = generate(G, self.cfg.eval.num, seed=self.seed, device=device, labels=self.labels)
        kw = dict(nhoods_per_image=self.cfg.eval.nhoods_per_image, seed=self.seed)
        result = swd(self.real, fake, **kw).as_dict()
        if self.labels is not None:
            result["swd_per_class"] = swd_per_class(self.real, fake, self.labels, self.cfg.model.class_names, **kw)
        record.update(result)
        path = self.checkpoints.offer_best(step, "swd", result["swd"])
        self.reporter.message(
            f"step {step}: SWD {result['swd']:.2f}" + (f", the best so far -> {path}" if path else "")
        )
        self.reporter.exclude(time.perf_counter() - started)

    def close(self, step: int) -> None:
        pass
