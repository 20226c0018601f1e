"""Read back what wandb wrote for an offline run (the .wandb record log), to check it in tests."""

from __future__ import annotations

import json
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER = 7  # ":W&B", 2 magic bytes, 1 version byte
BLOCK = 32768  # LevelDB log format: records never straddle a block's last 6 bytes
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    out, pos, pending = [], HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:
            pos += left_in_block
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue  # zero padding
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        else:  # LAST
            pending += chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        out.append(record)
        pending = b""
    return out


def history(path: str | Path) -> list[dict]:
    """The logged rows: {key: value} with JSON-decoded values (media entries are dicts)."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows
