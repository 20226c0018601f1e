"""Typed configuration: one dataclass schema, YAML presets in configs/, dotlist overrides.

    python -m dcgan_dist.train --config configs/debug.yaml train.max_steps=100 model.ngf=32

Every setting lives here, with its allowed values in its type (`Literal[...]`) or its bounds in the field
(`bounded(...)`). Code receives the Config (or the part it needs) and never reads environment variables for
settings. A bad key, type or value is a `ConfigError` whose one-line message names the key and what it
accepts; the CLIs turn it into exit code 2 before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Presets shipped with the repository; `--config debug` is short for `--config configs/debug.yaml`.
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
# What every command uses when no --config is given: small enough to train on a laptop CPU in minutes.
QUICKSTART_PRESET = "debug"


def bounded(default: Any, *, at_least: float | None = None, below: float | None = None, above: float | None = None):
    """A numeric setting with bounds: at least `at_least`, strictly below `below`, strictly above `above`."""
    limits = {k: v for k, v in (("at_least", at_least), ("below", below), ("above", above)) if v is not None}
    return field(default=default, metadata={"limits": limits})


@dataclass
class RunSection:
    name: str = "dcgan"
    # Output folder: config.yaml, metrics.jsonl, samples/, checkpoints/. Rerunning with the same dir resumes.
    dir: str = "runs/${run.name}"
    seed: int = 0
    # An object store that stops answering (down, frozen, unreachable, throttling) is waited for this long per
    # request, with a line every ~10 s, before the run ends with one line (exit 1; the newest checkpoint is intact
    # and the same command resumes). 5 minutes: a store's restart or failover fits; a dead one idles workers little.
    storage_timeout_s: float = bounded(300.0, above=0.0)


@dataclass
class DataSection:
    # WebDataset shards: a directory of .tar files, a glob, a brace pattern (data/faces-{000000..000099}.tar),
    # or any URL webdataset opens (pipe:aws s3 cp s3://bucket/faces-000000.tar -). Several joined by "::".
    # Empty: the embedded synthetic faces, generated once into data.cache_dir.
    shards: str = ""
    num_workers: int = bounded(2, at_least=0)  # DataLoader worker processes per training process
    shuffle_buffer: int = bounded(2000, at_least=1)  # samples held in each loader worker's shuffle buffer
    # Unusable samples (undecodable, another size or channel count, an unsupported mode) are skipped and counted;
    # more than this fraction of a pass (or of the first shard's samples at the start) stops the run with one line.
    max_bad_fraction: float = bounded(0.05, at_least=0.0, below=1.0)
    # Samples in the data set, for epoch accounting; 0 = read from the shards' dataset.json when there is one.
    num_samples: int = bounded(0, at_least=0)
    synth_num: int = bounded(20000, at_least=1)  # size of the embedded synthetic face set
    cache_dir: str = "~/.cache/dcgan_dist"  # where the synthetic set is generated


@dataclass
class ModelSection:
    image_size: Literal[28, 32, 64, 128] = 64  # 28 for MNIST-like data
    channels: Literal[1, 3] = 3  # grey or RGB
    nz: int = bounded(100, at_least=1)  # latent vector length
    ngf: int = bounded(64, at_least=1)  # generator width (channels of its last hidden layer)
    ndf: int = bounded(64, at_least=1)  # discriminator width (channels of its first layer)


@dataclass
class TrainSection:
    batch_size: int = bounded(128, at_least=1)  # per worker; the global batch is batch_size * the number of workers
    max_steps: int = bounded(10000, at_least=1)
    checkpoint_every: int = bounded(500, at_least=0)  # 0: only at the end
    sample_every: int = bounded(500, at_least=0)  # 0: only at the end
    log_every: int = bounded(50, at_least=1)
    keep_checkpoints: int = bounded(3, at_least=1)  # newest step checkpoints kept
    # auto: CUDA when there is one (local), or when the Ray cluster has a GPU per worker (ray); else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = bounded(0, at_least=0)  # torch CPU threads per process; 0 = torch's default
    ema_decay: float = bounded(0.0, at_least=0.0, below=1.0)  # EMA of G's weights for samples and evaluation; 0 = off
    eval_every: int = bounded(
        0, at_least=0
    )  # SWD against real images every N steps, keeping the best checkpoint; 0 = off
    # auto: bf16 autocast where the device computes bf16 natively (Ampere+ GPUs; CPUs with AVX512-BF16 or
    # AMX), fp32 elsewhere; fp16 adds gradient scaling. Resolved at start (precision.py), printed, recorded.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # NHWC memory layout; auto: on where convolutions are faster so (tensor-core GPUs, CPUs with oneDNN).
    channels_last: Literal["auto", True, False] = "auto"
    compile: bool = False  # torch.compile G and D (minutes of compilation first)


@dataclass
class EvalSection:
    num: int = bounded(1024, at_least=16)  # images per side (real, generated) for the in-training SWD
    nhoods_per_image: int = bounded(64, at_least=1)  # 7x7 neighbourhoods per image and pyramid level
    inception_weights: str = ""  # local InceptionV3 weights for FID (evaluate command); never downloaded


@dataclass
class OptimSection:
    lr: float = bounded(2e-4, above=0.0)
    beta1: float = bounded(0.5, at_least=0.0, below=1.0)
    beta2: float = bounded(0.999, at_least=0.0, below=1.0)


@dataclass
class DistSection:
    launcher: Literal["local", "ray"] = "local"  # local: this process, no Ray; ray: Ray Train workers
    num_workers: int = bounded(1, at_least=1)  # training processes (ray); each reads its own slice of the shards
    # ray: elastic training with between min_workers and num_workers workers, as many as the cluster has room
    # for (Ray Train restarts the group smaller after losing a node, larger when capacity returns). The batch
    # per worker stays train.batch_size, the learning rate stays optim.lr. 0: always num_workers.
    min_workers: int = bounded(0, at_least=0)
    resize_check_s: float = bounded(60.0, above=0.0)  # ray, elastic: how often a running group checks for room to grow
    sync_bn: bool = True  # batch norm statistics over the global batch (all workers), for G and D
    cpus_per_worker: int = bounded(
        1, at_least=1
    )  # ray: CPUs reserved per worker (loader processes and torch threads use them)
    max_failures: int = bounded(
        3, at_least=0
    )  # ray: restarts of the worker group from the latest checkpoint after a failure
    # ray: where Ray Train keeps checkpoints (<storage_path>/<run.name>/step_*). Multi-node: shared storage
    # (NFS path, s3://..., gs://...). Empty: <run.dir>/ray.
    storage_path: str = ""


@dataclass
class WandbSection:
    mode: Literal["offline", "online", "disabled"] = "offline"  # offline: no account needed; `wandb sync` later
    project: str = ""  # empty: $WANDB_PROJECT, else "dcgan_dist"
    entity: str = ""
    group: str = ""  # W&B group (a sweep puts its trials in one, named after the sweep's run.name)


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    dist: DistSection = field(default_factory=DistSection)
    wandb: WandbSection = field(default_factory=WandbSection)


class ConfigError(ValueError):
    """A bad setting; the message is one line that names the key."""


def _section(path: str) -> Any:
    """The dataclass of the section at a dotted path of the schema ('' = the whole Config)."""
    node: Any = Config
    for part in [p for p in path.split(".") if p]:
        node = {f.name: f for f in dataclasses.fields(node)}[part].default_factory
    return node


def _fields(section: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section)}


def _check_keys(tree: Any, prefix: str = "") -> None:
    """Reject keys that the schema does not have, naming the valid ones."""
    if not isinstance(tree, dict):
        return
    fields = _fields(_section(prefix))
    for key, value in tree.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            where = f"in '{prefix}'" if prefix else "at the top level"
            raise ConfigError(f"unknown config key '{full}'; valid keys {where}: {', '.join(fields)}")
        is_section = dataclasses.is_dataclass(fields[key].default_factory)
        if isinstance(value, dict):
            if not is_section:
                raise ConfigError(f"config key '{full}' takes a single value, not a mapping")
            _check_keys(value, full)
        elif is_section:
            raise ConfigError(f"config key '{full}' is a section; set its keys: {', '.join(_fields(_section(full)))}")


def allowed_values(key: str) -> tuple[Any, ...] | None:
    """The values a `Literal[...]` setting accepts (None for other settings)."""
    section, _, name = key.rpartition(".")
    hint = typing.get_type_hints(_section(section))[name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def _expected(key: str) -> str:
    try:
        choices = allowed_values(key)
        if choices is not None:
            return "one of " + ", ".join(str(c) for c in choices)
        section, _, name = key.rpartition(".")
        hint = typing.get_type_hints(_section(section))[name]
        return f"a value of type {getattr(hint, '__name__', hint)}"
    except (KeyError, TypeError):
        return "another type"


def resolve_config_path(name: str) -> Path:
    """A file path, or the name of a preset in configs/ ('debug' -> configs/debug.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    preset = PRESET_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if preset.is_file():
        return preset
    raise ConfigError(f"config file '{name}' not found (presets: {', '.join(presets()) or 'none'})")


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []


def _parse_dotlist(overrides: list[str]) -> DictConfig:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=100)")
    try:
        return OmegaConf.from_dotlist(overrides)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:  # YAML refuses control characters, for one
        bad = next((item for item in overrides if not _parses(item)), None)
        what = f"override {bad!r}" if bad is not None else f"overrides {overrides}"  # repr: one line, whatever it holds
        raise ConfigError(f"cannot parse {what}: {_first_line(exc)}") from None


def _parses(override: str) -> bool:
    try:
        OmegaConf.from_dotlist([override])
        return True
    except (OmegaConfBaseException, yaml.YAMLError):
        return False


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def build_config(config_file: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults <- YAML file <- dotlist overrides, validated; returns the typed Config."""
    layers: list[DictConfig] = []
    if config_file:
        path = resolve_config_path(config_file)
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors and the like
            raise ConfigError(f"cannot read config file '{path}': {_first_line(exc)}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections")
        layers.append(loaded)
    layers.append(_parse_dotlist(list(overrides)))
    cfg = _merge(layers)
    check_run_location(cfg.run)
    return cfg


def _merge(layers: list[DictConfig]) -> Config:
    for layer in layers:
        _check_keys(OmegaConf.to_container(layer, resolve=False))
    merged = OmegaConf.structured(Config)
    for layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            raise ConfigError(f"config key '{key}' expects {_expected(key)}: {_first_line(exc)}") from None
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {_first_line(exc)}") from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """The bounds declared with `bounded(...)` and the rules that relate settings (types and Literal values
    are checked by OmegaConf while merging)."""
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            key, value = f"{section.name}.{f.name}", getattr(getattr(cfg, section.name), f.name)
            # Every float setting: nan passes any bound check (comparisons with nan are false) and inf is
            # no learning rate, decay or interval either.
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config key '{key}' is {value}; it must be a finite number")
            limits = f.metadata.get("limits", {})
            if "at_least" in limits and value < limits["at_least"]:
                raise ConfigError(f"config key '{key}' is {value}; it must be at least {limits['at_least']}")
            if "below" in limits and value >= limits["below"]:
                raise ConfigError(f"config key '{key}' is {value}; it must be below {limits['below']}")
            if "above" in limits and value <= limits["above"]:
                raise ConfigError(f"config key '{key}' is {value}; it must be above {limits['above']}")
    if cfg.dist.min_workers > cfg.dist.num_workers:
        raise ConfigError(
            f"config key 'dist.min_workers' is {cfg.dist.min_workers}, more than dist.num_workers "
            f"({cfg.dist.num_workers}); elastic training runs between the two"
        )
    if cfg.dist.launcher == "local" and cfg.dist.num_workers != 1:
        raise ConfigError(
            f"config key 'dist.num_workers' is {cfg.dist.num_workers} but dist.launcher=local runs one process; "
            "use dist.launcher=ray for several workers"
        )


# run.name is one path component (run.dir defaults to runs/<run.name>; Ray keeps checkpoints in
# <storage>/<run.name>): no separators, no control characters, nothing a shell or an object store reads otherwise.
_RUN_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# Folders a run must not write into (config.yaml, metrics.jsonl, samples/... beside the system's own files): the
# file system's root and the system's top-level folders, themselves and everything under the pseudo file systems
# and the system's own trees. A folder below the others (/var/lib/dcgan/runs, /home/me/runs, /tmp/x) is fine.
_SYSTEM_TREES = ("/proc", "/sys", "/dev", "/boot", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/usr")
_SYSTEM_DIRS = ("/", "/home", "/root", "/var", "/tmp", "/opt", "/srv", "/mnt", "/media", "/run", "/snap")


def check_run_location(run: RunSection) -> None:
    """run.name is a plain name and run.dir is not a system folder (nor the home folder itself); ConfigError
    otherwise. For what a user typed (files and overrides): configs stored by older runs are read as they are."""
    if not _RUN_NAME.match(run.name) or run.name in (".", ".."):
        raise ConfigError(
            f"config key 'run.name' is {run.name!r}; it must be a plain name of letters, digits, '.', "
            "'_' and '-' (at most 128, not '.' or '..')"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in run.dir):
        raise ConfigError(f"config key 'run.dir' is {run.dir!r}; it holds a control character: give a plain path")
    if run.dir.startswith("s3://"):
        return
    if not run.dir.strip():
        raise ConfigError(
            "config key 'run.dir' is empty; give a folder (default: runs/<run.name>) or s3://bucket/prefix"
        )
    where = os.path.realpath(os.path.expanduser(run.dir))  # symbolic links followed: where the files would land
    home = os.path.realpath(os.path.expanduser("~"))
    system = (
        where in _SYSTEM_DIRS or where == home or any(where == t or where.startswith(t + "/") for t in _SYSTEM_TREES)
    )
    if system:
        raise ConfigError(
            f"run.dir={run.dir}: {where} is a system folder{' (your home folder)' if where == home else ''}; "
            "a run writes config.yaml, metrics.jsonl, samples/ and checkpoints/ into run.dir: choose a "
            "folder of its own, e.g. runs/<name>"
        )


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (for checkpoints, Ray's train_loop_config, W&B)."""
    return dataclasses.asdict(cfg)


def from_dict(tree: dict[str, Any]) -> Config:
    """Inverse of to_dict, validated the same way as files and overrides."""
    return _merge([OmegaConf.create(tree)])


def from_yaml(text: str) -> Config:
    """Inverse of to_yaml (a run's config.yaml, wherever it is stored)."""
    try:
        loaded = OmegaConf.create(text)
    except Exception as exc:  # YAML syntax errors and the like
        raise ConfigError(f"cannot read the config: {_first_line(exc)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError("a config must hold a mapping of sections")
    return _merge([loaded])


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flat_settings(cfg: Config) -> list[tuple[str, Any]]:
    """(section.key, value) for every setting, in schema order."""
    return [
        (f"{s.name}.{f.name}", getattr(getattr(cfg, s.name), f.name))
        for s in dataclasses.fields(Config)
        for f in dataclasses.fields(s.default_factory)
    ]


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """`[--config FILE] [key=value ...]` -> (file, overrides); --config may appear anywhere."""
    config_file, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file name")
            config_file, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option '{arg}'; usage: [--config FILE] [key=value ...]")
        else:
            overrides.append(arg)
        i += 1
    return config_file, overrides


def from_args(argv: list[str]) -> tuple[Config, str]:
    """The Config of a command line `[--config FILE] [key=value ...]`, and the preset or file it started from.

    Without --config the quick-start preset is the base, overrides or not: `train train.max_steps=3000` after
    the quick start continues the quick-start run rather than starting the schema's 64x64 defaults elsewhere.
    """
    config_file, overrides = split_args(argv)
    base = config_file or QUICKSTART_PRESET
    return build_config(base, overrides), base
