"""The Weights & Biases sink: scalars, sample grids, the progress animation and the resolved config.

wandb.mode: offline (default; files under <run.dir>/wandb, upload later with
`wandb sync <run.dir>/wandb/offline-run-*`), online (needs WANDB_API_KEY or `wandb login`), or disabled (then
this sink does nothing). WANDB_API_KEY, WANDB_PROJECT and WANDB_ENTITY are read by wandb itself; wandb.project /
wandb.entity in the config win when set. The run id is in the sink's state (saved in checkpoints), so a resumed
run continues the same W&B run. For a run in an object store W&B's files stay on this machine, beside the data
cache (`wandb sync` uploads them from there).
"""

from __future__ import annotations

import io
import os
from typing import Any

from dcgan_dist.config import to_dict
from dcgan_dist.training.sinks.base import RunIdSink


class WandbSink(RunIdSink):
    service = "W&B"
    run: Any = None

    def start(self, step: int) -> None:
        cfg = self.ctx.cfg
        if cfg.wandb.mode == "disabled":
            return
        import wandb

        where = self.ctx.local_dir
        where.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.wandb.project or os.environ.get("WANDB_PROJECT") or "dcgan_dist",
            entity=cfg.wandb.entity or None,
            group=cfg.wandb.group or None,
            name=cfg.run.name,
            id=self.run_id,
            resume="allow" if self.run_id else None,
            mode=cfg.wandb.mode,
            dir=str(where),
            config=to_dict(cfg),
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run_id = self.run.id
        self.ctx.say(f"W&B ({cfg.wandb.mode}): run {self.run_id} in {where / 'wandb'}")

    def scalars(self, record: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def image(self, key: str, image, step: int, caption: str = "") -> None:
        if self.run is not None:
            self.run.log({key: self._wandb.Image(image, caption=caption)}, step=step)

    def animation(self, key: str, gif: bytes, step: int) -> None:
        if self.run is not None:
            self.run.log({key: self._wandb.Video(io.BytesIO(gif), format="gif")}, step=step)

    def close(self, step: int, checkpoint: str | None, outcome: str) -> None:
        if self.run is not None:
            if outcome == "stopped":
                self.run.mark_preempting()  # W&B shows it preempted, not finished; a resume continues it
            self.run.finish(exit_code=1 if outcome == "failed" else 0)
            self.run = None


SINK = WandbSink
