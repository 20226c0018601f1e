"""Checkpoints: the one owner of their format, schedule, retention, best-by-metric and location.

A checkpoint is one dict, composed by `CheckpointManager` from the `state_dict()` of every stateful part of a
run, and read back into the same parts with `load_state_dict`:

    {"format_version": 2, "step": 1500, "config": {...},            # the run's resolved settings
     "G": ..., "D": ..., "ema": ..., "opt_g": ..., "opt_d": ..., "precision": ..., "metrics": ...,   # `states`
     "best": {"step": 1000, "swd": 31.9} or None,                   # best-by-metric so far
     "ranks": {0: {"data": ..., "rng": ...}, 1: {...}}}             # every rank's own `rank_states`

Where checkpoints go is a storage: `StorageCheckpoints` (<run.dir>/checkpoints, on a disk or in an object
store: the local launcher) or Ray Train's storage (`ray_launcher.RayCheckpoints`), both with the same three
methods. `load_checkpoint(path)` reads any of them back for resume, `sample` and `evaluate`: a checkpoint
file, a Ray checkpoint directory, a folder of checkpoints, or a run directory (local or Ray).

Loading never runs code: torch.load(weights_only=True), so every state holds only tensors and plain Python
values.
"""

from __future__ import annotations

import errno
import io
import re
import sys
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from . import config as config_lib
from .distributed.env import DistEnv
from .models import Generator
from .schedule import Schedule
from .storage import RunStorage, check_bucket, is_remote


FORMAT_VERSION = 2
SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file-size limit
STATE_FILE = "state.pt"  # inside a Ray Train checkpoint directory
BEST_FILE = "best.pt"
_STEP_NAME = re.compile(r"^step_(\d+)(\.pt)?$")  # step_0001500.pt (local) or step_0001500/ (Ray)


def step_name(step: int) -> str:
    return f"step_{step:07d}"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message is one line that says why."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (a full disk); the one before it is intact."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class CheckpointStorage(Protocol):
    """Where a run's checkpoints live. `save` is called on every rank (rank 0 passes the state, the others
    None); `save_best` on rank 0 alone."""

    def latest(self) -> tuple[str, dict] | None: ...
    def save(self, state: dict | None, step: int, metrics: dict) -> str | None: ...
    def save_best(self, state: dict) -> str: ...


def to_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load(location: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """One checkpoint file (a path, or an s3:// URI). Raises CheckpointError for anything that is not a dcgan_dist
    checkpoint."""
    location = str(location)
    try:
        data = RunStorage(location).read("")  # the file itself (and its retries, in an object store)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {location} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {location} ({str(exc).splitlines()[0][:200]})") from None
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, not a torch file, or objects that are not data
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{location} is not a readable dcgan_dist checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{location} is not a dcgan_dist checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{location} has checkpoint format {state['format_version']}; this version of "
                              f"dcgan_dist reads format {FORMAT_VERSION}")
    return state


def _step_entries(storage: RunStorage, folder: str = "") -> list[tuple[int, str]]:
    """(step, name of its file) of the step checkpoints in a folder, oldest first: step_*.pt files (the local
    launcher) and step_*/state.pt directories (Ray Train)."""
    found = []
    for name, is_dir in storage.list(folder):
        if (match := _STEP_NAME.match(name)) and is_dir != name.endswith(".pt"):
            path = f"{folder}/{name}" if folder else name
            found.append((int(match.group(1)), f"{path}/{STATE_FILE}" if is_dir else path))
    return sorted(found)


def ray_storage_path(cfg: config_lib.Config) -> str:
    """Where Ray Train keeps a run's checkpoints: dist.storage_path (a URI, or a path made absolute), else
    <run.dir>/ray; the run's own folder in it is <run.name>."""
    spec = cfg.dist.storage_path or f"{cfg.run.dir.rstrip('/')}/ray"
    return spec if "://" in spec else str(Path(spec).expanduser().resolve())


def candidates(location: str | Path) -> list[str]:
    """The checkpoint files that `location` names, newest first: the file itself; a Ray checkpoint directory's
    state.pt; the step checkpoints of a folder of them; or of a run directory: in its checkpoints/ (the local
    launcher), or in the Ray storage its config.yaml names (by default <this run directory>/ray/<run.name>).
    A path or an s3:// URI (StoreError when its bucket is missing or its store refuses this machine)."""
    if is_remote(str(location)):
        check_bucket(str(location))
    storage = RunStorage(str(location))
    if storage.is_file(""):
        return [storage.location]
    if not storage.exists("") and not storage.list(""):
        raise CheckpointError(f"checkpoint path {storage.location} does not exist")
    if storage.is_file(STATE_FILE):
        return [storage.where(STATE_FILE)]
    places: list[tuple[RunStorage, str]] = [(storage, ""), (storage, "checkpoints")]
    if storage.is_file("config.yaml"):
        try:
            cfg = config_lib.from_yaml(storage.read("config.yaml").decode())
            ray_storage = RunStorage(ray_storage_path(cfg)) if cfg.dist.storage_path else storage.sub("ray")
            places.append((ray_storage, cfg.run.name))
        except config_lib.ConfigError:
            pass  # written by another version: checkpoints/ is all that can be looked at
    for where, folder in places:
        entries = _step_entries(where, folder)
        if entries:
            return [where.where(name) for _, name in reversed(entries)]
    raise CheckpointError(f"no checkpoints in {storage.location} (looked for step_*.pt, step_*/{STATE_FILE}, "
                          "checkpoints/ and the Ray storage named in its config.yaml)")


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_checkpoint(location: str | Path, map_location: str | torch.device = "cpu",
                    warn: Callable[[str], None] = _to_stderr) -> tuple[str, dict[str, Any]]:
    """The newest readable checkpoint that `location` names (see `candidates`)."""
    return _load_newest(candidates(location), map_location, warn)


def _load_newest(files: list[str], map_location, warn: Callable[[str], None]) -> tuple[str, dict[str, Any]]:
    """The first of `files` (newest first) that loads; an unreadable one (e.g. from a full disk) is reported and
    passed over for the one before it."""
    for i, file in enumerate(files):
        try:
            return file, load(file, map_location)
        except CheckpointError as exc:
            if i == len(files) - 1:
                raise
            warn(f"warning: {exc}; trying the one before")
    raise AssertionError("no files")


def load_generator(location: str | Path, device: str | torch.device = "cpu", weights: str = "auto") -> tuple[Generator, dict, str]:
    """The generator of a checkpoint (anything `load_checkpoint` reads), in eval mode.

    weights: "ema" (the moving average; an error if the run kept none), "raw", or "auto" (EMA when present).
    Returns (generator, checkpoint state, which weights).
    """
    file, state = load_checkpoint(location, map_location=device)
    cfg = config_lib.from_dict(state["config"])
    which = "ema" if weights == "ema" or (weights == "auto" and state.get("ema") is not None) else "raw"
    if which == "ema" and state.get("ema") is None:
        raise CheckpointError(f"{file} has no EMA weights (train.ema_decay was 0)")
    G = Generator(cfg.model.nz, cfg.model.ngf, cfg.model.channels, cfg.model.image_size).to(device)
    G.load_state_dict(state["ema" if which == "ema" else "G"])
    return G.eval(), state, which


class StorageCheckpoints:
    """Checkpoint files in a run's storage (the local launcher): checkpoints/step_XXXXXXX.pt, the newest `keep` of
    them, and checkpoints/best.pt, in a local folder or an object store. A file is whole or absent (a temporary
    name and a rename on a disk; an object store's PUT is atomic)."""

    def __init__(self, storage: RunStorage, keep: int, warn: Callable[[str], None] = _to_stderr):
        self.storage, self.keep, self.warn = storage, keep, warn

    def latest(self) -> tuple[str, dict] | None:
        entries = _step_entries(self.storage)
        if not entries:
            return None
        return _load_newest([self.storage.where(name) for _, name in reversed(entries)], "cpu", self.warn)

    def save(self, state: dict | None, step: int, metrics: dict) -> str | None:
        if state is None:
            return None
        where = self._write(f"{step_name(step)}.pt", state)
        for _, old in _step_entries(self.storage)[: -self.keep]:
            self.storage.delete(old)
        return where

    def save_best(self, state: dict) -> str:
        return self._write(BEST_FILE, state)

    def _write(self, name: str, state: dict) -> str:
        data = to_bytes(state)
        try:
            return self.storage.write(name, data)
        except OSError as exc:  # nothing was renamed or put: the earlier files are as they were
            entries = _step_entries(self.storage)
            kept = (f"the newest complete one is {self.storage.where(entries[-1][1])}" if entries
                    else "no earlier checkpoint exists")
            need = f"it needs {len(data) / 2**20:.1f} MiB free there; " if exc.errno in SPACE_ERRORS else ""
            reason = exc.strerror or str(exc).splitlines()[0][:200]
            raise CheckpointWriteError(f"cannot write checkpoint {self.storage.where(name)} ({reason}): {need}{kept}") from None


class CheckpointManager:
    """Composes, saves and restores a run's checkpoints; every rank holds one. As a part of the training loop
    it saves a full checkpoint whenever its schedule is due.

    states: the run's stateful parts, saved by rank 0 (identical on every rank, or kept on rank 0 alone);
    rank_states: each rank's own parts (data-stream position, noise RNG), gathered into rank 0's checkpoint
    (a collective, so `save` is called on every rank at the same steps). On restore a part with
    `load_rank_states` gets every rank's saved state (the checkpoint may come from another number of workers).
    """

    def __init__(self, storage: CheckpointStorage, env: DistEnv, config: dict, states: dict[str, Stateful],
                 rank_states: dict[str, Stateful], schedule: Schedule, say: Callable[[str], None] = print):
        self.storage, self.env, self.config = storage, env, config
        self.states, self.rank_states, self.schedule, self.say = states, rank_states, schedule, say
        self.best: dict | None = None  # {"step": ..., metric: value}
        self.last_saved: str | None = None

    def _compose(self, step: int, names) -> dict:
        state = {"format_version": FORMAT_VERSION, "step": step, "config": self.config, "best": self.best}
        state.update({name: self.states[name].state_dict() for name in names})
        return state

    def restore(self) -> int:
        """Load the newest checkpoint into the parts; the step to continue from (0 for a new run)."""
        latest = self.storage.latest()
        if latest is None:
            return 0
        where, state = latest
        self.check_compatible(state, where)
        for name, part in self.states.items():
            if state.get(name) is not None:
                part.load_state_dict(state[name])
        self.best = state["best"]
        for name, part in self.rank_states.items():
            saved = {int(rank): parts[name] for rank, parts in state["ranks"].items()}
            if hasattr(part, "load_rank_states"):  # a part that can take over other ranks' work (the data stream)
                part.load_rank_states(saved)
            elif self.env.rank in saved:
                part.load_state_dict(saved[self.env.rank])
            # else: more workers than when the checkpoint was written; this rank's part starts afresh
        self.last_saved = where
        if self.env.is_main:
            self.say(f"Resuming from {where} (step {state['step']})")
        return int(state["step"])

    def check_compatible(self, state: dict, where: str) -> None:
        old, new = state["config"]["model"], self.config["model"]
        if old != new:
            diff = ", ".join(f"model.{k}: {old.get(k)} -> {v}" for k, v in new.items() if old.get(k) != v)
            raise CheckpointError(f"{where} was trained with another model ({diff}); "
                                  "use a new run.dir or the same model settings")

    def __call__(self, step: int, record: dict) -> None:
        saved = self.save(step, record)
        if saved:
            self.say(f"step {step}: checkpoint -> {saved}")

    def close(self, step: int) -> None:
        pass

    def save(self, step: int, metrics: dict) -> str | None:
        """A full checkpoint (every rank calls this at the same steps). Returns where rank 0 wrote it."""
        ranks = self.env.gather_objects({name: part.state_dict() for name, part in self.rank_states.items()})
        state = None
        if self.env.is_main:
            state = self._compose(step, self.states)
            state["ranks"] = dict(enumerate(ranks))
        saved = self.storage.save(state, step, metrics)
        if saved:
            self.last_saved = saved
        return saved

    def offer_best(self, step: int, metric: str, value: float) -> str | None:
        """Rank 0: save the weights as the best checkpoint when `value` (lower is better) beats the best so far."""
        if self.best is not None and value >= self.best[metric]:
            return None
        self.best = {"step": step, metric: value}
        weights = [name for name in ("G", "D", "ema") if name in self.states]
        return self.storage.save_best(self._compose(step, weights))
