"""The metrics.jsonl sink: one JSON object per logged step, the run's own record of its curves (resume, tune and
the tests read it back with `training.metrics.read_metrics`). Appended to on a disk; numbered segments in
an object store (storage/filesystem.py AppendLog), so a log step costs the same late in a run as early. A
resumed run first drops the records past its checkpoint: no step appears twice."""

from __future__ import annotations

import json

from dcgan_dist.storage.filesystem import AppendLog
from dcgan_dist.training.sinks.base import Sink

METRICS_FILE = "metrics.jsonl"


def parse_metrics(text: str) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not one (cut short by a crash or a full disk) is left out.
    A record of a step at or before an earlier one's (a resume interrupted before it had dropped what it trains
    again) replaces that one and everything after it: each step once, the newest."""
    records: list[dict] = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            while records and records[-1]["step"] >= record["step"]:
                records.pop()
            records.append(record)
    return records


class JsonlSink(Sink):
    log: AppendLog | None = None

    def start(self, step: int) -> None:
        self.log = AppendLog(self.ctx.storage, METRICS_FILE)
        text = self.log.read().decode(errors="replace")
        if text:  # records past the checkpoint resumed from are trained again: dropped (a cut line too)
            kept = [r for r in parse_metrics(text) if r["step"] <= step]
            self.log.rewrite("".join(json.dumps(r) + "\n" for r in kept).encode())

    def scalars(self, record: dict) -> None:
        assert self.log is not None  # opened by start()
        self.log.append((json.dumps(record) + "\n").encode())


SINK = JsonlSink
