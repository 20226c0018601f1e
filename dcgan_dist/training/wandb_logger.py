"""Weights & Biases on rank 0: scalars, sample grids, the progress animation and the resolved config.

wandb.mode: offline (default; files under <run.dir>/wandb, upload later with
`wandb sync <run.dir>/wandb/offline-run-*`), online (needs WANDB_API_KEY or `wandb login`), or disabled.
WANDB_API_KEY, WANDB_PROJECT and WANDB_ENTITY are read
by wandb itself; wandb.project / wandb.entity in the config win when set. The run id is saved in checkpoints, so a
resumed run continues the same W&B run. metrics.jsonl stays the local record either way.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from dcgan_dist.config import to_dict


class WandbLogger:
    def __init__(self, cfg, run_dir: Path, run_id: str | None = None):
        self.run = None
        if cfg.wandb.mode == "disabled":
            return
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.wandb.project or os.environ.get("WANDB_PROJECT") or "dcgan_dist",
            entity=cfg.wandb.entity or None,
            group=cfg.wandb.group or None,
            name=cfg.run.name,
            id=run_id,
            resume="allow" if run_id else None,
            mode=cfg.wandb.mode,
            dir=str(run_dir),
            config=to_dict(cfg),
            settings=wandb.Settings(console="off", silent=True),
        )

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def log_image(self, key: str, image, step: int, caption: str = "") -> None:
        """A PIL image."""
        if self.run is not None:
            self.run.log({key: self._wandb.Image(image, caption=caption)}, step=step)

    def log_animation(self, key: str, gif: bytes, step: int) -> None:
        if self.run is not None:
            self.run.log({key: self._wandb.Video(io.BytesIO(gif), format="gif")}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
