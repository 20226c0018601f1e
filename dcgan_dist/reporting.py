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
from tqdm import tqdm


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

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.images / max(now - self.last, 1e-9)
        self.last, self.images = now, 0
        return rate
