"""Typed configuration: one dataclass schema, YAML presets in configs/, dotlist overrides.

    python -m dcgan_dist.train --config configs/debug.yaml train.max_steps=100 model.ngf=32

Every setting lives here. Code receives the Config (or the part it needs) and never reads environment
variables for settings. A bad key or type is a `ConfigError` whose one-line message names the key and,
for an unknown key, the valid ones; the CLIs turn it into exit code 2 before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Presets shipped with the repository; `--config debug` is short for `--config configs/debug.yaml`.
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class RunSection:
    name: str = "dcgan"
    # Output folder: config.yaml, metrics.jsonl, samples/, checkpoints/. Rerunning with the same dir resumes.
    dir: str = "runs/${run.name}"
    seed: int = 0


@dataclass
class DataSection:
    # WebDataset shards: a directory of .tar files, a glob, a brace pattern (data/faces-{000000..000099}.tar),
    # or any URL webdataset opens (pipe:aws s3 cp s3://bucket/faces-000000.tar -). Several joined by "::".
    # Empty: the embedded synthetic faces, generated once into data.cache_dir.
    shards: str = ""
    num_workers: int = 2  # DataLoader worker processes per training process
    shuffle_buffer: int = 2000  # samples held in each loader worker's shuffle buffer
    # Samples in the data set, for epoch accounting; 0 = read from the shards' dataset.json when there is one.
    num_samples: int = 0
    synth_num: int = 20000  # size of the embedded synthetic face set
    cache_dir: str = "~/.cache/dcgan_dist"  # where the synthetic set is generated


@dataclass
class ModelSection:
    image_size: int = 64  # 28 (MNIST-like), 32, 64 or 128
    channels: int = 3  # 1 (grey) or 3 (RGB)
    nz: int = 100  # latent vector length
    ngf: int = 64  # generator width (channels of its last hidden layer)
    ndf: int = 64  # discriminator width (channels of its first layer)


@dataclass
class TrainSection:
    batch_size: int = 128  # per worker; the global batch is batch_size * dist.num_workers
    max_steps: int = 10000
    checkpoint_every: int = 500
    sample_every: int = 500
    log_every: int = 50
    keep_checkpoints: int = 3  # newest step checkpoints kept on disk
    device: str = "auto"  # local launcher: auto (CUDA if present, else CPU), cpu or cuda
    num_threads: int = 0  # torch CPU threads per process; 0 = torch's default
    keep_freed_memory: bool = True  # glibc malloc keeps freed memory for reuse (no page faults each step; runtime.py)
    ema_decay: float = 0.0  # EMA of G's weights for samples and evaluation (e.g. 0.999); 0 = off
    eval_every: int = 0  # SWD against real images every N steps, keeping checkpoints/best.pt; 0 = off
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast; fp16 adds gradient scaling). bf16/fp16 are for GPUs
    channels_last: bool = False  # NHWC memory layout (faster convolutions on tensor-core GPUs)
    compile: bool = False  # torch.compile G and D (minutes of compilation first)


@dataclass
class EvalSection:
    num: int = 1024  # images per side (real, generated) for the in-training SWD
    nhoods_per_image: int = 64  # 7x7 neighbourhoods per image and pyramid level
    inception_weights: str = ""  # local InceptionV3 weights for FID (evaluate command); never downloaded


@dataclass
class OptimSection:
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    fused: str = "auto"  # fused Adam: auto (on CUDA), always, never


@dataclass
class DistSection:
    launcher: str = "local"  # local: this process, no Ray; ray: Ray Train workers (cluster in RAY_ADDRESS, else a local one)
    num_workers: int = 1  # training processes (ray); each reads its own slice of the shards
    use_gpu: bool = False  # ray: one GPU per worker, NCCL
    sync_bn: bool = True  # batch norm statistics over the global batch (all workers), for G and D
    # CPU workers: how gradients and batch-norm statistics travel. auto: shared memory when every worker is on
    # this host (x86-64), else gloo; shm: shared memory or fail; gloo: always gloo.
    cpu_transport: str = "auto"
    cpus_per_worker: int = 1  # ray: CPUs reserved per worker (loader processes and torch threads use them)
    max_failures: int = 3  # ray: restarts of the worker group from the latest checkpoint after a failure
    # ray: where Ray Train keeps checkpoints (<storage_path>/<run.name>/checkpoint_*). Multi-node: shared storage
    # (NFS path, s3://..., gs://...). Empty: <run.dir>/ray.
    storage_path: str = ""


@dataclass
class WandbSection:
    mode: str = "offline"  # offline (no account needed; `wandb sync` later), online or disabled
    project: str = ""  # empty: $WANDB_PROJECT, else "dcgan_dist"
    entity: str = ""


@dataclass
class FaultSection:
    """Opt-in fault injection for testing recovery; off by default."""

    crash_at_step: int = 0  # 0 = off; else the process SIGKILLs itself right after finishing this step
    crash_rank: int = 0  # which worker crashes


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
    fault: FaultSection = field(default_factory=FaultSection)


# Settings whose values come from a fixed set.
CHOICES: dict[str, tuple[Any, ...]] = {
    "model.image_size": (28, 32, 64, 128),
    "model.channels": (1, 3),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "optim.fused": ("auto", "always", "never"),
    "dist.launcher": ("local", "ray"),
    "dist.cpu_transport": ("auto", "shm", "gloo"),
    "wandb.mode": ("offline", "online", "disabled"),
}
# Settings that must be at least this large.
MINIMUM: dict[str, int] = {
    "model.nz": 1,
    "model.ngf": 1,
    "model.ndf": 1,
    "train.batch_size": 1,
    "train.max_steps": 1,
    "train.log_every": 1,
    "train.keep_checkpoints": 1,
    "train.checkpoint_every": 0,
    "train.sample_every": 0,
    "train.num_threads": 0,
    "train.eval_every": 0,
    "eval.num": 16,
    "eval.nhoods_per_image": 1,
    "data.num_workers": 0,
    "data.shuffle_buffer": 1,
    "data.synth_num": 1,
    "data.num_samples": 0,
    "dist.num_workers": 1,
    "dist.cpus_per_worker": 1,
    "dist.max_failures": 0,
    "fault.crash_at_step": 0,
}


class ConfigError(ValueError):
    """A bad setting; the message is one line that names the key."""


def _schema_class(path: str) -> Any:
    """The dataclass of the section at a dotted path of the schema ('' = the whole Config)."""
    node: Any = Config
    for part in [p for p in path.split(".") if p]:
        node = {f.name: f for f in dataclasses.fields(node)}[part].default_factory
    return node


def _section_keys(path: str) -> list[str]:
    return [f.name for f in dataclasses.fields(_schema_class(path))]


def _check_keys(tree: Any, prefix: str = "") -> None:
    """Reject keys that the schema does not have, naming the valid ones."""
    if not isinstance(tree, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(_schema_class(prefix))}
    for key, value in tree.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            where = f"in '{prefix}'" if prefix else "at the top level"
            raise ConfigError(f"unknown config key '{full}'; valid keys {where}: {', '.join(fields)}")
        is_section = str(fields[key].type).endswith("Section")
        if isinstance(value, dict):
            if not is_section:
                raise ConfigError(f"config key '{full}' takes a single value, not a mapping")
            _check_keys(value, full)
        elif is_section:
            raise ConfigError(f"config key '{full}' is a section; set its keys: {', '.join(_section_keys(full))}")


def resolve_config_path(name: str) -> Path:
    """A file path, or the name of a preset in configs/ ('debug' -> configs/debug.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    preset = PRESET_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if preset.is_file():
        return preset
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []
    raise ConfigError(f"config file '{name}' not found (presets: {', '.join(presets) or 'none'})")


def _parse_dotlist(overrides: list[str]) -> DictConfig:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=100)")
    try:
        return OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {overrides}: {_first_line(exc)}") from None


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
    for layer in layers:
        _check_keys(OmegaConf.to_container(layer, resolve=False))
    merged = OmegaConf.structured(Config)
    for layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            expected = _expected_type(key)
            raise ConfigError(f"config key '{key}' expects {expected}: {_first_line(exc)}") from None
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {_first_line(exc)}") from None
    validate(cfg)
    return cfg


def _expected_type(key: str) -> str:
    section, _, name = key.rpartition(".")
    try:
        fields = {f.name: f for f in dataclasses.fields(_schema_class(section))}
        return f"a value of type {fields[name].type}"
    except (KeyError, TypeError):
        return "another type"


def get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: Config) -> None:
    for key, choices in CHOICES.items():
        if get(cfg, key) not in choices:
            valid = ", ".join(str(c) for c in choices)
            raise ConfigError(f"config key '{key}' is {get(cfg, key)!r}; valid choices: {valid}")
    for key, low in MINIMUM.items():
        if get(cfg, key) < low:
            raise ConfigError(f"config key '{key}' is {get(cfg, key)}; it must be at least {low}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"config key 'optim.lr' is {cfg.optim.lr}; it must be positive")
    for key in ("optim.beta1", "optim.beta2", "train.ema_decay"):
        if not 0.0 <= get(cfg, key) < 1.0:
            raise ConfigError(f"config key '{key}' is {get(cfg, key)}; it must be in [0, 1)")
    if cfg.dist.launcher == "local" and cfg.dist.num_workers != 1:
        raise ConfigError(
            f"config key 'dist.num_workers' is {cfg.dist.num_workers} but dist.launcher=local runs one process; "
            "use dist.launcher=ray for several workers"
        )


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (for checkpoints, Ray's train_loop_config, W&B)."""
    return dataclasses.asdict(cfg)


def from_dict(tree: dict[str, Any]) -> Config:
    """Inverse of to_dict, validated the same way as files and overrides."""
    _check_keys(tree)
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(tree))
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)


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
