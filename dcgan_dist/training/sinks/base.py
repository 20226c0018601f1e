"""What every sink is: a small class that receives a run's step records, images and end, on rank 0 alone.

A sink is built before the checkpoint is restored (`load_state_dict` gets what it saved), opens its outputs in
`start`, and closes them in `close`. Everything it must remember across a resume (a tracking server's run id)
is in `state_dict`, which travels in every checkpoint. Any method may be left as it is here (nothing happens).
"""

from __future__ import annotations

import numbers
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcgan_dist.storage.filesystem import RunStorage


def duration(seconds: float) -> str:
    """3h05m, 12m30s, 45s: an ETA a person reads at a glance."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def emit(text: str) -> None:
    """One line to stdout. Not print(): Ray Train patches print in workers into logging, which repeats lines."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def scalar_items(record: dict, prefix: str = "") -> list[tuple[str, float]]:
    """A step record's numbers as (name, value) for a sink that takes scalars only (TensorBoard, MLflow): "step"
    and what is not a number (bools, text) left out; a nested dict (swd_per_class: {class: value}) flattened to
    swd_per_class/<class>."""
    items: list[tuple[str, float]] = []
    for key, value in record.items():
        if not prefix and key == "step":
            continue
        if isinstance(value, dict):
            items += scalar_items(value, f"{prefix}{key}/")
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            items.append((f"{prefix}{key}", float(value)))
    return items


@dataclass
class SinkContext:
    """What a sink may use: the run's settings (cfg, train.max_steps etc.), its storage (run.dir, local or s3://),
    a folder on this machine for files a library must write locally (the run dir itself when it is local), and
    `say` for a line to the user."""

    cfg: Any
    storage: RunStorage
    local_dir: Path
    say: Callable[[str], None]


OUTCOMES = ("finished", "stopped", "failed")  # how a run ends, as Sink.close hears it


class Sink:
    library: str | None = None  # the module it needs, checked before a run starts (an optional extra)
    extra: str | None = None  # the pip extra that installs it (pyproject.toml); None: a dependency of the package

    def __init__(self, ctx: SinkContext):
        self.ctx = ctx

    def start(self, step: int) -> None:
        """Open the outputs; step: the step training continues from (0 for a new run, else its checkpoint's)."""

    def scalars(self, record: dict) -> None:
        """A logged step's record: {"step": N, name: number, ...} (metrics.jsonl's line)."""

    def image(self, key: str, image, step: int, caption: str = "") -> None:
        """A PIL image (a sample grid)."""

    def animation(self, key: str, gif: bytes, step: int) -> None:
        """An animated GIF (the progress animation, at the end of a run)."""

    def message(self, text: str) -> bool:
        """A line for the user; True when this sink showed it (the console)."""
        return False

    def close(self, step: int, checkpoint: str | None, outcome: str) -> None:
        """The end of the run (also a failing one): the last step trained, the newest checkpoint, and how it
        ended (OUTCOMES: finished at train.max_steps, stopped by a signal (a resume continues it), failed)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class RunIdSink(Sink):
    """A sink that continues a run of its own service (W&B, MLflow) across resumes: the run id is its state. A
    checkpoint is untrusted data: the id names the service's files and run, so only an id of the kind they make."""

    service = ""
    run_id: str | None = None

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        run_id = state.get("run_id")
        if run_id is not None and not (isinstance(run_id, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,128}", run_id)):
            raise ValueError(f"{self.service} run id {str(run_id)[:80]!r} is not one {self.service} would make")
        self.run_id = run_id
