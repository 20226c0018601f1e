"""On a CPU, early in a run: how long train.max_steps will take at the rate of its first steps.

Written to <run.dir>/estimate.json on every CPU run (rank 0). When the settings are meant for a GPU
(`train.meant_for=gpu`, the default preset) or the estimate is long (over LONG_ON_CPU_S), the run also says so in a
line with what to do instead, and the estimate becomes a warning of the run's result (TrainResult.warnings:
`{"kind": "cpu_estimate", ...}`), where a program reads it rather than the console.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from dcgan_dist.config import Config
from dcgan_dist.storage.filesystem import RunStorage
from dcgan_dist.training.sinks.base import duration

ESTIMATE_FILE = "estimate.json"
# Measured over the steps after the first (which pays for warm-up), for at least this long and this many steps,
# and written well within a run's first 30 s even at seconds per step.
ESTIMATE_MIN_S, ESTIMATE_MIN_STEPS, ESTIMATE_MAX_S = 2.0, 3, 3.0
# An estimate longer than this on a CPU is said in a line, with the way to something faster.
LONG_ON_CPU_S = 30 * 60
SUGGESTION = "for a CPU try --config debug, or a GPU"


class CpuEstimate:
    """Once per run, on rank 0 of a CPU run: `step(n)` after every training step until the estimate is made;
    `at_end(n)` when the run reached max_steps before it was measured long enough (from the steps there were).
    active=False (a GPU, or not rank 0): does nothing."""

    def __init__(
        self, cfg: Config, global_batch: int, storage: RunStorage, say: Callable[[str], None], active: bool
    ) -> None:
        self.cfg, self.global_batch, self.storage, self.say = cfg, global_batch, storage, say
        self.done = not active
        self.started: float | None = None  # the wall clock at the end of the first step
        self.steps = 0  # steps since
        self.warnings: list[dict] = []

    def step(self, step: int) -> None:
        if self.done:
            return
        now = time.perf_counter()
        if self.started is None:  # the first step pays for warm-up: the clock starts after it
            self.started = now
            return
        self.steps += 1
        elapsed = now - self.started
        if (self.steps < ESTIMATE_MIN_STEPS and elapsed < ESTIMATE_MAX_S) or elapsed < ESTIMATE_MIN_S:
            return
        self._make(step, elapsed)

    def at_end(self, step: int) -> None:
        if self.done or self.started is None or not self.steps:
            return
        self._make(step, time.perf_counter() - self.started)

    def _make(self, step: int, elapsed: float) -> None:
        self.done = True
        rate = self.steps * self.global_batch / elapsed
        max_steps = self.cfg.train.max_steps
        total_s = max_steps * self.global_batch / rate
        remaining_s = (max_steps - step) * self.global_batch / rate
        long = total_s > LONG_ON_CPU_S
        meant_for_gpu = self.cfg.train.meant_for == "gpu"
        estimate = {
            "device": "cpu",
            "images_per_s": rate,
            "measured_steps": self.steps,
            "measured_s": elapsed,
            "global_batch": self.global_batch,
            "step": step,
            "max_steps": max_steps,
            "estimated_total_s": total_s,
            "estimated_remaining_s": remaining_s,
            "long": long,
            "meant_for": self.cfg.train.meant_for,
        }
        self.storage.write(ESTIMATE_FILE, (json.dumps(estimate) + "\n").encode())
        if not (long or meant_for_gpu):
            return
        why = "these settings are meant for a GPU: " if meant_for_gpu else ""
        message = (
            f"warning: {why}at {rate:.0f} images/s on this CPU, train.max_steps={max_steps} would take "
            f"~{duration(total_s)} ({duration(remaining_s)} from here); {SUGGESTION}"
        )
        self.warnings.append({"kind": "cpu_estimate", **estimate, "suggestion": SUGGESTION, "message": message})
        self.say(message)
