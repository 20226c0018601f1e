"""The metrics.jsonl sink: one JSON object per logged step, the run's own record of its curves (resume, tune and
the tests read it back with `training.metrics.read_metrics`). Appended to on a disk; numbered segments in
an object store (storage/filesystem.py AppendLog), so a log step costs the same late in a run as early. A
resumed run first drops the records past its checkpoint: no step appears twice."""

from __future__ import annotations

import json

from dcgan_dist.storage.filesystem import AppendLog
from dcgan_dist.training.sinks.base import Sink

METRICS_FILE = "metrics.jsonl"


class JsonlSink(Sink):
    log: AppendLog | None = None

    def start(self, step: int) -> None:
        from dcgan_dist.training.metrics import parse_metrics  # the reader beside the aggregator

        self.log = AppendLog(self.ctx.storage, METRICS_FILE)
        text = self.log.read().decode(errors="replace")
        if text:  # records past the checkpoint resumed from are trained again: dropped (a cut line too)
            kept = [r for r in parse_metrics(text) if r["step"] <= step]
            self.log.rewrite("".join(json.dumps(r) + "\n" for r in kept).encode())

    def scalars(self, record: dict) -> None:
        assert self.log is not None  # opened by start()
        self.log.append((json.dumps(record) + "\n").encode())


SINK = JsonlSink
