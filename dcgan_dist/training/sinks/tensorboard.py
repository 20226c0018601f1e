"""The TensorBoard sink: every number of a step's record as a scalar (losses, D scores, learning rates, images/s,
per-worker step times, SWD), the sample grids as images and the resolved config as text, in
<run.dir>/tensorboard (`tensorboard --logdir runs/` shows every run).

A resumed run appends a new event file to the same folder, opened with purge_step = the first step trained
again: TensorBoard's readers then drop what the interrupted run had logged from that step on, so no step appears
twice. Events are flushed at every log step. For a run in an object store the events are written on this
machine (beside the data cache) and uploaded into <run.dir>/tensorboard with every sample grid, at a log step
UPLOAD_EVERY_S after the last upload, and when the run ends: a run killed outright loses at most what it logged
since then (its metrics.jsonl is complete). Each upload sends the session's whole event file again (an object
cannot be appended to): kilobytes per log step, plus the grids.
"""

from __future__ import annotations

import time

import numpy as np

from dcgan_dist.config import to_yaml
from dcgan_dist.training.sinks.base import Sink, scalar_items

FOLDER = "tensorboard"
UPLOAD_EVERY_S = 120.0  # a run in an object store: its events uploaded at least this often (at a log step)


class TensorBoardSink(Sink):
    library = "tensorboard"
    writer = None

    def start(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        storage = self.ctx.storage
        if storage.remote:  # this session's own folder: its files are uploaded as they are at the end
            self.local = self.ctx.local_dir / FOLDER / f"session-{int(time.time())}"
        else:
            self.local = self.ctx.local_dir / FOLDER
        self.local.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.local), purge_step=step + 1 if step else None)
        self.uploaded = time.monotonic()
        text = to_yaml(self.ctx.cfg).replace("\n", "\n    ")
        self.writer.add_text("config", f"    {text}", global_step=step)
        self.writer.flush()

    def scalars(self, record: dict) -> None:
        if self.writer is None:
            return
        step = record["step"]
        for key, value in scalar_items(record):  # swd_per_class: swd_per_class/<class>
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()
        if time.monotonic() - self.uploaded >= UPLOAD_EVERY_S:
            self._upload()

    def image(self, key: str, image, step: int, caption: str = "") -> None:
        if self.writer is not None:
            pixels = np.asarray(image)  # a grid of RGB or of grey images
            self.writer.add_image(key, pixels, global_step=step, dataformats="HWC" if pixels.ndim == 3 else "HW")
            self.writer.flush()
            self._upload()

    def close(self, step: int, checkpoint: str | None, outcome: str) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        self._upload()

    def _upload(self) -> None:
        """A run in an object store: this session's event files as they are now, into <run.dir>/tensorboard."""
        if not self.ctx.storage.remote:
            return
        for path in sorted(self.local.iterdir()):
            if path.is_file():
                self.ctx.storage.upload(path, f"{FOLDER}/{path.name}")
        self.uploaded = time.monotonic()


SINK = TensorBoardSink
