"""Full training state on disk: G, D, both optimisers, step, RNG states, data position, config.

Files are `<run.dir>/checkpoints/step_XXXXXXX.pt`, written to a temporary name, flushed and renamed, so a
crash mid-write never leaves a truncated checkpoint under a real name. The newest readable one is resumed.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:07d}.pt"


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the step checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    # weights_only=False: the state holds RNG states and plain Python containers written by this program.
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a dcgan_dist checkpoint (format {FORMAT_VERSION})")
    return state


def load_latest(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; unreadable ones (e.g. from a full disk) are reported and passed over."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, load(path, map_location)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: try the previous one
            print(f"warning: cannot read checkpoint {path} ({exc}); trying an older one", flush=True)
    return None


def prune(directory: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints."""
    for _, path in list_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)


def rng_state(noise_generator: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "noise": noise_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], noise_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    noise_generator.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DirectoryStore:
    """Checkpoints as step files in a directory (the local launcher). Only the main process writes."""

    def __init__(self, directory: str | Path, keep: int, is_main: bool = True):
        self.directory, self.keep, self.is_main = Path(directory), keep, is_main

    def latest(self, map_location: str | torch.device = "cpu") -> tuple[str, dict[str, Any]] | None:
        found = load_latest(self.directory, map_location)
        return (str(found[0]), found[1]) if found else None

    def save(self, state: dict[str, Any] | None, step: int, metrics: dict[str, Any]) -> str | None:
        if not self.is_main or state is None:
            return None
        path = save_atomic(state, checkpoint_path(self.directory, step))
        prune(self.directory, self.keep)
        return str(path)

    def report(self, metrics: dict[str, Any]) -> None:
        """Metrics between checkpoints: nothing to do locally (metrics.jsonl has them)."""
