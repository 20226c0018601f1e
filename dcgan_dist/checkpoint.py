"""Checkpoints: the one owner of their format, schedule, retention, best-by-metric and location.

A checkpoint is one dict, composed by `CheckpointManager` from the `state_dict()` of every stateful part of a
run, and read back into the same parts with `load_state_dict`:

    {"format_version": 2, "step": 1500, "config": {...},            # the run's resolved settings
     "G": ..., "D": ..., "ema": ..., "opt_g": ..., "opt_d": ..., "precision": ..., "metrics": ...,   # `states`
     "best": {"step": 1000, "swd": 31.9} or None,                   # best-by-metric so far
     "ranks": {0: {"data": ..., "rng": ...}, 1: {...}}}             # every rank's own `rank_states`

Where checkpoints go is a storage: `LocalCheckpoints` (files in <run.dir>/checkpoints, the local launcher)
or Ray Train's storage (`ray_launcher.RayCheckpoints`); an object store is one more storage with the same three
methods. `load_checkpoint(path)` reads any of them back for resume, `sample` and `evaluate`: a checkpoint
file, a Ray checkpoint directory, a folder of checkpoints, or a run directory (local or Ray).

Loading never runs code: torch.load(weights_only=True), so every state holds only tensors and plain Python
values.
"""

from __future__ import annotations

import errno
import io
import logging
import re
import sys
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from . import config as config_lib
from .distributed.env import DistEnv
from .files import atomic_write
from .models import Generator
from .schedule import Schedule

log = logging.getLogger("dcgan_dist.checkpoint")

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


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """One checkpoint file. Raises CheckpointError for anything that is not a dcgan_dist checkpoint."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - truncated, not a torch file, or objects that are not data
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable dcgan_dist checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a dcgan_dist checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {state['format_version']}; this version of dcgan_dist "
                              f"reads format {FORMAT_VERSION}")
    return state


def _step_entries(directory: Path) -> list[tuple[int, Path]]:
    """(step, checkpoint file) of the step checkpoints in a folder, oldest first: step_*.pt files (local)
    and step_*/state.pt directories (Ray Train)."""
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        if match := _STEP_NAME.match(entry.name):
            path = entry / STATE_FILE if entry.is_dir() else entry
            if path.is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def ray_storage_path(cfg: config_lib.Config) -> str:
    """Where Ray Train keeps a run's checkpoints: dist.storage_path (a URI, or a path made absolute), else
    <run.dir>/ray; the run's own folder in it is <run.name>."""
    spec = cfg.dist.storage_path
    if "://" in spec:
        return spec
    return str(Path(spec or Path(cfg.run.dir) / "ray").expanduser().resolve())


def _checkpoint_folders(path: Path) -> list[Path]:
    """Where a folder may hold step checkpoints: in itself; a run directory in checkpoints/ (local launcher) or
    in Ray Train's storage, which the run's config.yaml names (by default <this run directory>/ray)."""
    folders = [path, path / "checkpoints"]
    if (path / "config.yaml").is_file():
        try:
            cfg = config_lib.build_config(str(path / "config.yaml"))
            storage = Path(ray_storage_path(cfg)) if cfg.dist.storage_path else path / "ray"
            folders.append(storage / cfg.run.name)
        except config_lib.ConfigError:
            pass  # written by another version: checkpoints/ is all that can be looked at
    return folders


def candidates(path: str | Path) -> list[Path]:
    """The checkpoint files that `path` names, newest first: the file itself, a Ray checkpoint directory's
    state.pt, or the step checkpoints of a folder of checkpoints or of a run directory."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / STATE_FILE).is_file():
        return [path / STATE_FILE]
    for folder in _checkpoint_folders(path):
        entries = _step_entries(folder)
        if entries:
            return [p for _, p in reversed(entries)]
    raise CheckpointError(f"no checkpoints in {path} (looked for step_*.pt, step_*/{STATE_FILE}, checkpoints/ and "
                          "the Ray storage named in its config.yaml)")


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    warn: Callable[[str], None] = _to_stderr) -> tuple[Path, dict[str, Any]]:
    """The newest readable checkpoint that `path` names (see `candidates`)."""
    return _load_newest(candidates(path), map_location, warn)


def _load_newest(files: list[Path], map_location, warn: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
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


def load_generator(path: str | Path, device: str | torch.device = "cpu", weights: str = "auto") -> tuple[Generator, dict, str]:
    """The generator of a checkpoint (anything `load_checkpoint` reads), in eval mode.

    weights: "ema" (the moving average; an error if the run kept none), "raw", or "auto" (EMA when present).
    Returns (generator, checkpoint state, which weights).
    """
    file, state = load_checkpoint(path, map_location=device)
    cfg = config_lib.from_dict(state["config"])
    which = "ema" if weights == "ema" or (weights == "auto" and state.get("ema") is not None) else "raw"
    if which == "ema" and state.get("ema") is None:
        raise CheckpointError(f"{file} has no EMA weights (train.ema_decay was 0)")
    G = Generator(cfg.model.nz, cfg.model.ngf, cfg.model.channels, cfg.model.image_size).to(device)
    G.load_state_dict(state["ema" if which == "ema" else "G"])
    return G.eval(), state, which


class LocalCheckpoints:
    """Checkpoint files in one directory (the local launcher): step_XXXXXXX.pt, the newest `keep` of them,
    and best.pt. Each is written to a temporary name and renamed, so a crash never leaves half a file."""

    def __init__(self, directory: str | Path, keep: int, warn: Callable[[str], None] = _to_stderr):
        self.directory, self.keep, self.warn = Path(directory), keep, warn

    def latest(self) -> tuple[str, dict] | None:
        entries = _step_entries(self.directory)
        if not entries:
            return None
        file, state = _load_newest([p for _, p in reversed(entries)], "cpu", self.warn)
        return str(file), state

    def save(self, state: dict | None, step: int, metrics: dict) -> str | None:
        if state is None:
            return None
        path = self._write(self.directory / f"{step_name(step)}.pt", state)
        for _, old in _step_entries(self.directory)[: -self.keep]:
            old.unlink(missing_ok=True)
        return str(path)

    def save_best(self, state: dict) -> str:
        return str(self._write(self.directory / BEST_FILE, state))

    def _write(self, path: Path, state: dict) -> Path:
        data = to_bytes(state)
        try:
            return atomic_write(path, data)
        except OSError as exc:  # nothing was renamed: the earlier files are as they were
            entries = _step_entries(self.directory)
            kept = f"the newest complete one is {entries[-1][1]}" if entries else "no earlier checkpoint exists"
            need = f"it needs {len(data) / 2**20:.1f} MiB free there; " if exc.errno in SPACE_ERRORS else ""
            raise CheckpointWriteError(f"cannot write checkpoint {path} ({exc.strerror or exc}): {need}{kept}") from None


class CheckpointManager:
    """Composes, saves and restores a run's checkpoints; every rank holds one. As a part of the training loop
    it saves a full checkpoint whenever its schedule is due.

    states: the run's stateful parts, saved by rank 0 (identical on every rank, or kept on rank 0 alone);
    rank_states: each rank's own parts (data-stream position, noise RNG), gathered into rank 0's checkpoint
    (a collective, so `save` is called on every rank at the same steps).
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
        mine = state["ranks"].get(self.env.rank)
        if mine is None:  # more workers than when the checkpoint was written: this rank starts fresh streams
            log.warning("rank %d: no saved stream state (the checkpoint had %d worker(s))", self.env.rank, len(state["ranks"]))
        else:
            for name, part in self.rank_states.items():
                part.load_state_dict(mine[name])
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
