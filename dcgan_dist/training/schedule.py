"""When the parts of a training run act: the one place where that is decided.

Parts make collectives (metric means, checkpoint gathering, Ray reports), and a collective that one rank
enters and another skips hangs the run. So every decision to act is a `Schedule` of the step number alone,
which every rank knows alike, and of a stop that every rank has agreed on; nothing that differs between ranks
(time, rank, metric values, a signal one of them received) can enter it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Schedule:
    """Due at every multiple of `every` (0: none), at the `last` step of the run and, with `on_stop`, at the step
    where the run stops early (a graceful stop, agreed by every rank: see stopping.py)."""

    every: int
    last: int
    on_stop: bool = False

    def due(self, step: int, stopping: bool = False) -> bool:
        return step == self.last or (stopping and self.on_stop) or (self.every > 0 and step % self.every == 0)


class Part(Protocol):
    """One job of a training run (metrics, samples, evaluation, checkpoints), called after a training step
    when its schedule says so. `record` is the step's metrics record: parts add to it, and the metrics part
    writes it at the end of the step."""

    schedule: Schedule

    def __call__(self, step: int, record: dict) -> None: ...

    def close(self, step: int) -> None: ...
