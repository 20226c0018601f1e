"""Checkpoints: the one owner of their format, schedule, retention, best-by-metric and location.

A checkpoint is one dict, composed by `CheckpointManager` from the `state_dict()` of every stateful part of a
run, and read back into the same parts with `load_state_dict`:

    {"format_version": 2, "step": 1500, "config": {...},            # the run's resolved settings
     "G": ..., "D": ..., "ema": ..., "opt_g": ..., "opt_d": ..., "precision": ..., "metrics": ...,   # `states`
     "best": {"step": 1000, "swd": 31.9} or None,                   # best-by-metric so far
     "ranks": {0: {"data": ..., "rng": ...}, 1: {...}}}             # every rank's own `rank_states`

Where checkpoints go is a storage: `StorageCheckpoints` (<run.dir>/checkpoints, on a disk or in an object
store: the local launcher) or Ray Train's storage (`launch/ray_train.py`'s RayCheckpoints), both with the same three
methods. `load_checkpoint(path)` reads any of them back for resume, `sample` and `evaluate`: a checkpoint
file, a Ray checkpoint directory, a folder of checkpoints, or a run directory (local or Ray).

Loading never runs code: torch.load(weights_only=True), so every state holds only tensors and plain Python
values. A checkpoint is untrusted data all the same: before anything of it is used, it must fit the run that
reads it (`CheckpointManager.restore`, `load_generator`: tensor shapes, every part present, states the parts
accept), and no location it or a run directory's config.yaml names is used unless it is a plain path or an s3://
location (`plain_location`).
"""

from __future__ import annotations

import copy
import errno
import functools
import io
import math
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import torch

from dcgan_dist import config as config_lib
from dcgan_dist.distributed.env import DistEnv
from dcgan_dist.errors import RunError
from dcgan_dist.gan.models import Generator, build_models
from dcgan_dist.storage.filesystem import RunStorage, check_bucket, is_remote
from dcgan_dist.training.schedule import Schedule

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


class AnotherModelError(CheckpointError):
    """A resume whose model settings differ from its checkpoint's: the command line's doing, so refused at once
    rather than passed over for an older checkpoint (they all have the run's model)."""


def plain_location(value: str) -> bool:
    """A local path or an s3:// location: the only kind of location that is used when a run names it (a checkpoint's
    config, a run directory's config.yaml) rather than the command line. Any other URL scheme is refused, because
    webdataset runs pipe: URLs as shell commands and fetches http(s), gs, hf, ais... URLs (its gopen_schemes), and
    "-" is standard input."""
    return is_remote(value) or (value not in ("", "-") and urlparse(value).scheme == "")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one line (torch's load_state_dict errors span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class CheckpointStorage(Protocol):
    """Where a run's checkpoints live. `newest_first` yields (where, read) for each checkpoint a resume may start
    from, newest first; read() returns its state or raises CheckpointError. `save` is called on every rank (rank 0
    passes the state, the others None); `save_best` on rank 0 alone."""

    def newest_first(self) -> Iterator[tuple[str, Callable[[], dict]]]: ...
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
    storage = RunStorage(location)
    try:
        if not storage.remote and storage.exists("") and not storage.is_file(""):
            # A pipe or a device in a run's checkpoint folder would be read forever or wait for a writer.
            raise CheckpointError(f"{location} is not a checkpoint file (a folder, a pipe or a device)")
        data = storage.read("")  # the file itself (and its retries, in an object store)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {location} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {location} ({str(exc).splitlines()[0][:200]})") from None
    return parse(data, location, map_location)


def parse(data: bytes, location: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's bytes (read from `location`, named in errors) as its state dict; raises CheckpointError."""
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, not a torch file, or objects that are not data
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{location} is not a readable dcgan_dist checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{location} is not a dcgan_dist checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{location} has checkpoint format {state['format_version']}; this version of "
            f"dcgan_dist reads format {FORMAT_VERSION}"
        )
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
    launcher), or in the Ray storage its config.yaml names (by default <this run directory>/ray/<run.name>; looked
    at only when that is a plain path or an s3:// location and run.name a plain name). A path or an s3:// URI
    (StoreError when its bucket is missing or its store refuses this machine)."""
    if is_remote(str(location)):
        check_bucket(str(location))
    try:
        return _candidates(str(location))
    except OSError as exc:  # an object store that cannot be reached, a folder that cannot be listed
        raise CheckpointError(f"cannot read checkpoint path {location} ({one_line(exc, 200)})") from None


def _candidates(location: str) -> list[str]:
    storage = RunStorage(location)
    if storage.is_file(""):
        return [storage.location]
    if not storage.exists("") and not storage.list(""):
        raise CheckpointError(f"checkpoint path {storage.location} does not exist")
    if storage.is_file(STATE_FILE):
        return [storage.where(STATE_FILE)]
    places: list[tuple[RunStorage, str]] = [(storage, ""), (storage, "checkpoints")]
    not_looked = ""
    if storage.is_file("config.yaml"):
        try:
            cfg = config_lib.from_yaml(storage.read("config.yaml").decode(errors="replace"))
        except config_lib.ConfigError:
            cfg = None  # written by another version: checkpoints/ is all that can be looked at
        if cfg is None:
            pass
        elif cfg.dist.storage_path and not plain_location(cfg.dist.storage_path):
            not_looked = (
                f"; its config.yaml names dist.storage_path={cfg.dist.storage_path}, not a folder or s3:// "
                "location, so it was not looked at: give the checkpoint itself"
            )
        elif cfg.run.name in ("", ".", "..") or "/" in cfg.run.name or "\\" in cfg.run.name:
            not_looked = (
                f"; its config.yaml names run.name={cfg.run.name!r}, not a plain name, so the Ray storage "
                "was not looked at: give the checkpoint itself"
            )
        else:
            ray_storage = RunStorage(ray_storage_path(cfg)) if cfg.dist.storage_path else storage.sub("ray")
            places.append((ray_storage, cfg.run.name))
    for where, folder in places:
        entries = _step_entries(where, folder)
        if entries:
            return [where.where(name) for _, name in reversed(entries)]
    raise CheckpointError(
        f"no checkpoints in {storage.location} (looked for step_*.pt, step_*/{STATE_FILE}, "
        f"checkpoints/ and the Ray storage named in its config.yaml){not_looked}"
    )


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_checkpoint(
    location: str | Path, map_location: str | torch.device = "cpu", warn: Callable[[str], None] = _to_stderr
) -> tuple[str, dict[str, Any]]:
    """The newest readable checkpoint that `location` names (see `candidates`)."""
    return first_that_fits(
        [(file, functools.partial(load, file, map_location)) for file in candidates(location)],
        lambda file, state: (file, state),
        warn,
    )


def first_that_fits(
    saved: list[tuple[str, Callable[[], dict]]], use: Callable[[str, dict], Any], warn: Callable[[str], None]
) -> Any:
    """use(where, state) of the newest of `saved` ((where, read) pairs, newest first) that can be read and that
    `use` accepts (it raises CheckpointError for one that does not fit); each one passed over is reported in a
    line. Raises the CheckpointError of the last one when none fits, or None when `saved` is empty."""
    for i, (where, read) in enumerate(saved):
        try:
            return use(where, read())
        except CheckpointError as exc:
            if i == len(saved) - 1:
                if i > 0:
                    raise CheckpointError(
                        f"{exc}; none of the {len(saved)} checkpoints there fits (each reported above)"
                    ) from None
                raise
            warn(f"warning: {exc}; trying the one before")
    return None


def settings_of(state: dict, where: str) -> config_lib.Config:
    """The settings a checkpoint carries, validated like any config (for its model's shape)."""
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{where} carries no settings (its 'config' is missing)")
    try:
        cfg = config_lib.from_dict(state["config"])
    except config_lib.ConfigError as exc:
        raise CheckpointError(f"{where} carries settings this version cannot use ({exc})") from None
    if not -(2**63) <= cfg.run.seed < 2**64:  # what torch.manual_seed takes: no run trained with another
        raise CheckpointError(f"{where} carries settings this version cannot use (run.seed={cfg.run.seed})")
    return cfg


def load_generator(
    location: str | Path,
    device: str | torch.device = "cpu",
    weights: str = "auto",
    warn: Callable[[str], None] = _to_stderr,
) -> tuple[Generator, dict, str]:
    """The generator of a checkpoint (anything `load_checkpoint` reads: the newest that fits), in eval mode.

    weights: "ema" (the moving average; an error if the run kept none), "raw", or "auto" (EMA when present).
    Returns (generator, checkpoint state, which weights). Of the checkpoint's settings only model.* is used.
    """

    def generator(file: str, state: dict) -> tuple[Generator, dict, str]:
        cfg = settings_of(state, file)
        which = "ema" if weights == "ema" or (weights == "auto" and state.get("ema") is not None) else "raw"
        if which == "ema" and state.get("ema") is None:
            raise CheckpointError(f"{file} has no EMA weights (train.ema_decay was 0)")
        tensors = state.get("ema" if which == "ema" else "G")
        m = cfg.model
        # The shapes are compared on the meta device first: the settings alone must not decide how much memory
        # is allocated (model.ngf=10**6 in a crafted file), only weights that are really there.
        try:
            with torch.device("meta"):
                expected = build_models(m)[0].state_dict()
        except ValueError as exc:  # settings no model is built from (a conditional model without its classes)
            raise CheckpointError(f"{file}: {exc}") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise CheckpointError(
                f"{file} does not fit its model settings (its {which} weights are not a dict of tensors)"
            )
        misfits = [
            k
            for k in expected.keys() | tensors.keys()
            if k not in expected or k not in tensors or tensors[k].shape != expected[k].shape
        ]
        if misfits:
            k = sorted(misfits)[0]
            got = tuple(tensors[k].shape) if k in tensors else "missing"
            want = tuple(expected[k].shape) if k in expected else "not in the model"
            raise CheckpointError(
                f"{file} does not fit its model settings ({which} weights: {k} is {got}, the model "
                f"{m.image_size}x{m.image_size} nz={m.nz} ngf={m.ngf} needs {want}; "
                f"{len(misfits)} tensor(s) differ)"
            )
        G = build_models(m)[0].to(device)
        try:
            G.load_state_dict(tensors)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{file} does not fit its model settings ({one_line(exc)})") from None
        return G.eval(), state, which

    files = candidates(location)
    return first_that_fits([(file, functools.partial(load, file)) for file in files], generator, warn)


# Parts a checkpoint may lack: the EMA generator (a run that turns EMA on continues a checkpoint without one).
OPTIONAL_STATES = ("ema",)


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A checkpoint's per-parameter optimiser state (Adam's moments and step counts) into `optimizer`. The group
    settings stay the run's own, as the optimiser was built from the command line's settings and this device
    (lr, betas, eps, weight_decay, amsgrad, maximize, fused...): a checkpoint does not choose the algorithm. Every
    moment must have its parameter's shape: torch loads any shape and fails only at the next step, after the run's
    files were written."""
    built = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, built):
        group.update(settings)
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(
                        f"a '{key}' of shape {tuple(value.shape)} for a parameter of shape {tuple(param.shape)}"
                    )


class StorageCheckpoints:
    """Checkpoint files in a run's storage (the local launcher): checkpoints/step_XXXXXXX.pt, the newest `keep` of
    them, and checkpoints/best.pt, in a local folder or an object store. A file is whole or absent (a temporary
    name and a rename on a disk; an object store's PUT is atomic)."""

    def __init__(self, storage: RunStorage, keep: int, warn: Callable[[str], None] = _to_stderr):
        self.storage, self.keep, self.warn = storage, keep, warn

    def newest_first(self) -> Iterator[tuple[str, Callable[[], dict]]]:
        for _, name in reversed(_step_entries(self.storage)):
            where = self.storage.where(name)
            yield where, functools.partial(load, where)

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
            kept = (
                f"the newest complete one is {self.storage.where(entries[-1][1])}"
                if entries
                else "no earlier checkpoint exists"
            )
            need = f"it needs {len(data) / 2**20:.1f} MiB free there; " if exc.errno in SPACE_ERRORS else ""
            reason = exc.strerror or str(exc).splitlines()[0][:200]
            raise CheckpointWriteError(
                f"cannot write checkpoint {self.storage.where(name)} ({reason}): {need}{kept}"
            ) from None


class CheckpointManager:
    """Composes, saves and restores a run's checkpoints; every rank holds one. As a part of the training loop
    it saves a full checkpoint whenever its schedule is due.

    states: the run's stateful parts, saved by rank 0 (identical on every rank, or kept on rank 0 alone);
    rank_states: each rank's own parts (data-stream position, noise RNG), gathered into rank 0's checkpoint
    (a collective, so `save` is called on every rank at the same steps). On restore a part with
    `load_rank_states` gets every rank's saved state (the checkpoint may come from another number of workers).
    """

    def __init__(
        self,
        storage: CheckpointStorage,
        env: DistEnv,
        config: dict,
        states: dict[str, Stateful],
        rank_states: dict[str, Stateful],
        schedule: Schedule,
        say: Callable[[str], None] = print,
    ):
        self.storage, self.env, self.config = storage, env, config
        self.states, self.rank_states, self.schedule, self.say = states, rank_states, schedule, say
        self.best: dict | None = None  # {"step": ..., metric: value}
        self.last_saved: str | None = None

    def _compose(self, step: int, names) -> dict:
        state = {"format_version": FORMAT_VERSION, "step": step, "config": self.config, "best": self.best}
        state.update({name: self.states[name].state_dict() for name in names})
        return state

    def restore(self) -> int:
        """Load the newest checkpoint that fits into the parts; the step to continue from (0 for a new run). One
        that cannot be read or does not fit (a tensor of another shape, a part missing, a state a part refuses) is
        reported and passed over for the one before it, and leaves nothing of itself in the parts; when none fits,
        CheckpointError, before anything of the run has been written. Every rank takes the same decision (one
        collective per checkpoint tried), so that no rank trains while another gave up."""
        saved = list(self.storage.newest_first())
        fresh: dict | None = None
        for i, (where, read) in enumerate(saved):
            error, loaded = None, False
            try:
                state = read()
                self.check_compatible(state, where)
                fresh = fresh or self._snapshot()
                loaded = True
                step = self._load(state)
            except AnotherModelError as exc:
                error = ("another model", str(exc))
            except CheckpointError as exc:
                error = ("unreadable", str(exc))
            except RunError as exc:  # the object store stopped answering: no verdict on this checkpoint
                error = ("store", str(exc))
            except Exception as exc:  # noqa: BLE001 - whatever a part raised about data it cannot take: no fit
                error = ("does not fit", f"{where} does not fit this run ({one_line(exc)})")
            errors = [e for e in self.env.gather_objects(error) if e]
            if not errors:
                self.last_saved = where
                if self.env.is_main:
                    self.say(f"Resuming from {where} (step {step})")
                return step
            if loaded and fresh is not None:  # loaded: the snapshot was taken first
                self._load_parts(fresh)  # the parts as they were built, nothing of this checkpoint left in them
            kind, message = next((e for e in errors if e[0] in ("store", "another model")), errors[0])
            if kind == "store":  # on every rank: an older checkpoint must not be taken for a newer one not read
                raise RunError(message)
            if kind == "another model":
                raise AnotherModelError(message)
            if i == len(saved) - 1:
                tried = f"; none of the {len(saved)} checkpoints there fits (each reported above)" if i else ""
                raise CheckpointError(
                    f"{message}{tried}; use another run.dir, or move the checkpoints that do not fit "
                    "away to start afresh"
                )
            if self.env.is_main:
                self.say(f"warning: {message}; trying the one before")
        return 0

    def _snapshot(self) -> dict:
        """Every part's state as built (before any checkpoint was loaded into it)."""
        return {
            "states": {name: copy.deepcopy(part.state_dict()) for name, part in self.states.items()},
            "rank": {name: copy.deepcopy(part.state_dict()) for name, part in self.rank_states.items()},
        }

    def _load_parts(self, snapshot: dict) -> None:
        for name, part in self.states.items():
            part.load_state_dict(snapshot["states"][name])
        for name, part in self.rank_states.items():
            part.load_state_dict(snapshot["rank"][name])

    def _load(self, state: dict) -> int:
        """A checkpoint's state into the parts; raises (anything) where it does not fit them."""
        missing = [key for key in ("step", "best", "ranks") if key not in state]
        if missing:
            raise ValueError(f"it has no {', '.join(missing)}")
        step, best = state["step"], state["best"]
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step {step!r} is not a step number")
        if best is not None and not (
            isinstance(best, dict)
            and isinstance(best.get("step"), int)
            and all(isinstance(v, (int, float)) for v in best.values())
        ):
            raise ValueError(f"its best-so-far record {best!r} is not a step and a metric")
        for name, part in self.states.items():
            if state.get(name) is None:
                if name in OPTIONAL_STATES:
                    continue
                raise ValueError(f"it has no '{name}' state")
            try:
                if isinstance(part, torch.optim.Optimizer):
                    _load_optimizer_state(part, state[name])
                else:
                    part.load_state_dict(state[name])
            except Exception as exc:  # noqa: BLE001 - named here, turned into "does not fit" by restore
                raise ValueError(f"{name}: {one_line(exc)}") from None
        ranks = state["ranks"]
        if not isinstance(ranks, dict) or not ranks:
            raise ValueError("it has no per-rank states")
        for name, part in self.rank_states.items():
            saved = {int(rank): parts[name] for rank, parts in ranks.items()}
            if hasattr(part, "load_rank_states"):  # a part that can take over other ranks' work (the data stream)
                part.load_rank_states(saved)
            elif self.env.rank in saved:
                part.load_state_dict(saved[self.env.rank])
            # else: more workers than when the checkpoint was written; this rank's part starts afresh
        self.best = best
        return step

    def check_compatible(self, state: dict, where: str) -> None:
        config = state.get("config")
        old = config.get("model") if isinstance(config, dict) else None
        if not isinstance(old, dict):
            raise CheckpointError(f"{where} does not fit this run (it carries no model settings)")
        new = self.config["model"]
        if old != new:
            diff = ", ".join(f"model.{k}: {old.get(k)} -> {v}" for k, v in new.items() if old.get(k) != v)
            raise AnotherModelError(
                f"{where} was trained with another model ({diff}); use a new run.dir or the same model settings"
            )

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
        if not math.isfinite(value) or (self.best is not None and value >= self.best[metric]):
            return None  # nan compares false with everything: it would replace any best, with diverged weights
        self.best = {"step": step, metric: value}
        weights = [name for name in ("G", "D", "ema") if name in self.states]
        return self.storage.save_best(self._compose(step, weights))
