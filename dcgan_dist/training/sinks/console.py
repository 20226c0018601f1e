"""The console sink: progress lines (a tqdm bar on a terminal; plain lines otherwise: CI, Ray job logs, nohup),
each with an ETA from the measured rate, and the run's messages."""

from __future__ import annotations

import sys

from tqdm import tqdm

from dcgan_dist.training.sinks.base import Sink, duration, emit


class Progress:
    """A tqdm bar on a terminal (its own ETA); plain log lines otherwise, one per logged step, with an ETA."""

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


class ConsoleSink(Sink):
    progress: Progress | None = None

    def start(self, step: int) -> None:
        self.progress = Progress(step, self.ctx.cfg.train.max_steps)

    def step_done(self) -> None:
        if self.progress:
            self.progress.bar.update()

    def scalars(self, record: dict) -> None:
        if self.progress and "images_per_s" in record:
            self.progress.log(record)

    def message(self, text: str) -> bool:
        if self.progress is None:
            return False
        self.progress.message(text)
        return True

    def close(self, step: int, checkpoint: str | None, outcome: str) -> None:
        if self.progress:
            self.progress.close()


SINK = ConsoleSink
