"""Typed configuration: one dataclass schema, YAML presets in configs/, dotlist overrides.

    python -m dcgan_dist.train --config configs/debug.yaml train.max_steps=100 model.ngf=32

Every setting lives here, with its one-line description, its allowed values in its type (`Literal[...]`) or its
bounds in the field (`setting(...)`); every command's --help shows them from here. Code receives the Config (or
the part it needs) and never reads environment variables for settings. A bad key, type or value is a
`ConfigError` whose one-line message names the key and what it accepts; the CLIs turn it into exit code 2
before any work starts.
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


def setting(
    default: Any, doc: str, *, at_least: float | None = None, below: float | None = None, above: float | None = None
):
    """A setting: its default, its one-line description (shown by every command's --help), and for a number
    its bounds: at least `at_least`, strictly below `below`, strictly above `above`."""
    limits = {k: v for k, v in (("at_least", at_least), ("below", below), ("above", above)) if v is not None}
    if isinstance(default, list):  # a mutable default: each Config its own copy
        return field(default_factory=lambda: list(default), metadata={"doc": doc, "limits": limits})
    return field(default=default, metadata={"doc": doc, "limits": limits})


def section(factory: Any, doc: str):
    """A section of settings with its one-line description."""
    return field(default_factory=factory, metadata={"doc": doc})


SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes at most 64 bits (signed)
# run.seed is offset before use (the in-training SWD adds 1_000_003, bench adds a worker's rank): room for them
# below SEED_LIMIT. numpy's SeedSequence (data/loader.py slot_seed) takes any seed >= 0, no negative one.
RUN_SEED_ROOM = 2**21


@dataclass
class RunSection:
    name: str = setting(
        "dcgan", "the run's name: run.dir's default folder, W&B's run name, Ray's folder of checkpoints"
    )
    dir: str = setting(
        "runs/${run.name}",
        "output folder (or s3://bucket/prefix): config.yaml, metrics.jsonl, samples/, checkpoints/; rerunning with "
        "the same dir resumes",
    )
    seed: int = setting(
        0,
        "seed of the weights' initialisation, the data order and the in-training SWD",
        at_least=0,
        below=SEED_LIMIT - RUN_SEED_ROOM,
    )
    storage_timeout_s: float = setting(
        300.0,
        "how long an object store that stops answering is waited for per request (a line every ~10 s) before the "
        "run ends with one line (exit 1, the newest checkpoint intact, the same command resumes); 5 minutes: a "
        "store's restart or failover fits",
        above=0.0,
    )


@dataclass
class DataSection:
    shards: str = setting(
        "",
        "WebDataset shards: a folder of .tar files, a glob, a brace pattern (data/faces-{000000..000099}.tar) or "
        "a URL webdataset opens (pipe:aws s3 cp s3://bucket/faces-000000.tar -), several joined by '::'; "
        "empty: the embedded synthetic faces, generated once into data.cache_dir",
    )
    num_workers: int = setting(
        2,
        "DataLoader worker processes per training process (0: load in the process itself); never more than the "
        "CPUs the process may use (lowered, with one line)",
        at_least=0,
    )
    shuffle_buffer: int = setting(2000, "samples held in each loader worker's shuffle buffer", at_least=1)
    max_bad_fraction: float = setting(
        0.05,
        "unusable samples (undecodable, another size or channel count) are skipped and counted; more than this "
        "fraction of a pass (or of the first shard's samples at the start) stops the run with one line",
        at_least=0.0,
        below=1.0,
    )
    num_samples: int = setting(
        0,
        "samples in the data set, for epoch accounting; 0: read from the shards' dataset.json when there is one",
        at_least=0,
    )
    cache: str = setting(
        "off",
        "device or auto: keep the rank's decoded uint8 images (and labels) on the training device after the first "
        "pass (host memory on a CPU) and draw later passes there, in a seeded order per pass; taken only where they "
        "fit in half the free memory, decided once per run (printed; a resume keeps the checkpoint's decision); "
        "off: stream from the shards every pass",
    )  # a str, not a Literal: YAML reads a bare off as false (cache_mode)
    synth_num: int = setting(20000, "size of the embedded synthetic face set", at_least=1)
    cache_dir: str = setting("~/.cache/dcgan_dist", "where the synthetic faces are generated (train, bench, evaluate)")


@dataclass
class ModelSection:
    image_size: Literal[28, 32, 64, 128] = setting(64, "image side in pixels (28 for MNIST-like data)")
    channels: Literal[1, 3] = setting(3, "1: grey, 3: RGB")
    nz: int = setting(100, "latent vector length", at_least=1)
    ngf: int = setting(64, "generator width (channels of its last hidden layer)", at_least=1)
    ndf: int = setting(64, "discriminator width (channels of its first layer)", at_least=1)
    conditional: bool = setting(
        False,
        "class-conditional G and D (G: z plus the one-hot class; D: a projection discriminator); needs labelled shards",
    )
    num_classes: int = setting(
        0, "conditional: the number of classes; filled in from the shards' dataset.json at the start", at_least=0
    )
    class_names: list[str] = setting([], "conditional: the class names; filled in from the shards' dataset.json")


# The GAN objectives (gan/objectives.py holds one class for each; a test keeps the two lists equal).
LOSSES = ("bce", "hinge", "ls")


@dataclass
class GanSection:
    loss: Literal[LOSSES] = setting(  # type: ignore[valid-type]  # the registry's names, one list
        "bce",
        "the GAN objective: bce (DCGAN's non-saturating cross-entropy), hinge (SAGAN/BigGAN), ls (least squares, "
        "LSGAN)",
    )


@dataclass
class TrainSection:
    batch_size: int = setting(
        128, "images per worker and step; the global batch is batch_size * the number of workers", at_least=1
    )
    max_steps: int = setting(10000, "training steps in all (a resumed run continues to this step)", at_least=1)
    checkpoint_every: int = setting(500, "steps between checkpoints; 0: only at the end", at_least=0)
    sample_every: int = setting(500, "steps between sample grids (run.dir/samples); 0: only at the end", at_least=0)
    log_every: int = setting(50, "steps between metrics records, to the sinks (log.sinks)", at_least=1)
    keep_checkpoints: int = setting(3, "newest step checkpoints kept", at_least=1)
    device: Literal["auto", "cpu", "cuda"] = setting(
        "auto",
        "where every command computes; auto: CUDA when there is one (local), or when the Ray cluster has a GPU per "
        "worker (ray); else CPU",
    )
    num_threads: int = setting(0, "torch CPU threads per process; 0: torch's default (one per core)", at_least=0)
    ema_decay: float = setting(
        0.0, "EMA of G's weights, used for samples and evaluation; 0: off", at_least=0.0, below=1.0
    )
    eval_every: int = setting(
        0, "steps between SWD evaluations against real images (eval.*), keeping the best checkpoint; 0: off", at_least=0
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = setting(
        "auto",
        "auto: bf16 autocast where the device computes bf16 natively (Ampere+ GPUs; CPUs with AVX512-BF16 or AMX), "
        "fp32 elsewhere; fp16 adds gradient scaling; resolved at start, printed, recorded",
    )
    channels_last: Literal["auto", True, False] = setting(
        "auto", "NHWC memory layout; auto: on where convolutions are faster so (tensor-core GPUs, CPUs with oneDNN)"
    )
    compile: bool = setting(False, "torch.compile G and D (minutes of compilation first)")
    meant_for: Literal["any", "gpu"] = setting(
        "any",
        "what the settings are sized for; gpu: started on a CPU, the run says within its first seconds how long "
        "train.max_steps would take there and what to use instead (a warning in its result)",
    )


@dataclass
class EvalSection:
    num: int = setting(
        1024, "images per side (real, generated) for the SWD: in training and for the evaluate command", at_least=16
    )
    nhoods_per_image: int = setting(64, "7x7 neighbourhoods per image and pyramid level for the SWD", at_least=1)
    seed: int = setting(
        0,
        "evaluate: seed of the real images drawn, the latent vectors and the SWD projections",
        at_least=0,
        below=SEED_LIMIT - 1,
    )
    weights: Literal["auto", "ema", "raw"] = setting(
        "auto", "evaluate: the generator's weights; auto: the EMA weights when the checkpoint has them"
    )
    baseline: bool = setting(
        True,
        "evaluate: also the SWD between two disjoint halves of the real images (the floor a perfect generator "
        "would reach at this sample size)",
    )
    untrained: bool = setting(False, "evaluate: also the SWD of the freshly initialised generator, for scale")
    inception_weights: str = setting(
        "~/.cache/torch/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth",
        "evaluate: local InceptionV3 weights for FID (torch-fidelity's pt_inception-2015-12-05; the default is "
        "where torch hub keeps them); never downloaded: without them fid is null, with the reason",
    )


@dataclass
class SampleSection:
    # At most 10,000: one grid image of them all, generated in one batch (10,000 64x64 RGB images are ~500 MB of
    # floats and a 6,400-pixel-wide PNG); a larger number only hangs the command.
    num: int = setting(64, "images in the grid", at_least=1, below=10_001)
    seed: int = setting(0, "seed of the latent vectors", at_least=0, below=SEED_LIMIT)
    nrow: int = setting(0, "images per row of the grid; 0: a square grid", at_least=0)
    weights: Literal["auto", "ema", "raw"] = setting(
        "auto", "the generator's weights; auto: the EMA weights when the checkpoint has them"
    )
    label: str = setting(
        "",
        "a class-conditional model: draw this class only (its number or name, from the checkpoint's "
        "model.class_names); empty: one row per class, the same noise in every row",
    )
    interpolate: str = setting(
        "",
        "A,B: a latent walk from seed A's latent vector to seed B's (slerp), sample.steps images in a row (a "
        "conditional model: a row per class, or sample.label's); empty: no walk, sample.num images",
    )
    steps: int = setting(8, "images in a latent walk (sample.interpolate), both ends included", at_least=2, below=1025)


@dataclass
class BenchSection:
    steps: int = setting(20, "timed steps of each measurement (the loader alone: twice as many batches)", at_least=1)
    warmup: int = setting(5, "untimed steps before each measurement", at_least=0)
    measure: Literal["all", "loader", "step"] = setting(
        "all", "all: the loader alone, then the training step; loader: only the loader; step: only the training step"
    )
    baseline: bool = setting(
        False, "also time PyTorch's minimal fp32 DCGAN loop, side by side with the training step, and the ratio"
    )
    checkpoint: bool = setting(
        False, "also time writing one checkpoint to run.dir (a local folder or s3://bucket/prefix)"
    )
    report_compile: Literal["auto", True, False] = setting(
        "auto", "--gpu-report: time the torch.compile rows; auto: on CUDA only (minutes on a small CPU)"
    )
    report_swd_steps: int = setting(
        0, "--gpu-report: training steps of each SWD run; 0: 600 on CUDA, 200 on CPU", at_least=0
    )
    report_feed_images: int = setting(
        4096, "--gpu-report: synthetic faces written as PNG and as raw shards for the feeding rows", at_least=64
    )


@dataclass
class TuneSection:
    trials: int = setting(4, "trials to sample (with grid(...) spaces: repeats of the grid)", at_least=1)
    scheduler: Literal["asha", "pbt", "fifo"] = setting(
        "asha",
        "asha: the trials behind at the same step stop; pbt: the worse trials take the better ones' weights and "
        "perturbed learning rates; fifo: every trial runs to the end",
    )
    concurrent: int = setting(0, "trials side by side at most; 0: as many as the cluster has room for", at_least=0)


@dataclass
class OptimSection:
    lr: float = setting(2e-4, "Adam's learning rate, for G and D (unless lr_g / lr_d say otherwise)", above=0.0)
    beta1: float = setting(
        0.5, "Adam's beta1, for G and D (unless beta1_g / beta1_d say otherwise)", at_least=0.0, below=1.0
    )
    beta2: float = setting(
        0.999, "Adam's beta2, for G and D (unless beta2_g / beta2_d say otherwise)", at_least=0.0, below=1.0
    )
    lr_g: float | None = setting(None, "G's learning rate; null: optim.lr", above=0.0)
    lr_d: float | None = setting(None, "D's learning rate; null: optim.lr", above=0.0)
    beta1_g: float | None = setting(None, "G's Adam beta1; null: optim.beta1", at_least=0.0, below=1.0)
    beta1_d: float | None = setting(None, "D's Adam beta1; null: optim.beta1", at_least=0.0, below=1.0)
    beta2_g: float | None = setting(None, "G's Adam beta2; null: optim.beta2", at_least=0.0, below=1.0)
    beta2_d: float | None = setting(None, "D's Adam beta2; null: optim.beta2", at_least=0.0, below=1.0)
    schedule: Literal["constant", "linear", "cosine"] = setting(
        "constant",
        "learning rates over the run, a function of the step alone: constant; linear: decay to zero over the last "
        "optim.decay_steps steps; cosine: half a cosine from the rate to zero over train.max_steps",
    )
    decay_steps: int = setting(
        0, "linear schedule: the last steps over which the rates decay to zero; 0: all of train.max_steps", at_least=0
    )


@dataclass
class DistSection:
    launcher: Literal["local", "ray"] = setting("local", "local: this process, no Ray; ray: Ray Train workers")
    num_workers: int = setting(1, "training processes (ray); each reads its own slice of the shards", at_least=1)
    min_workers: int = setting(
        0,
        "ray: elastic training with between min_workers and num_workers workers, as many as the cluster has room "
        "for (the batch per worker stays train.batch_size, the learning rate optim.lr); 0: always num_workers",
        at_least=0,
    )
    resize_check_s: float = setting(60.0, "ray, elastic: how often a running group checks for room to grow", above=0.0)
    sync_bn: str = setting(
        "global",
        "synchronised batch norm of G and D: global (statistics over all workers' batches), node (over the workers "
        "on the same node), a group size N (over groups of N consecutive ranks; N divides dist.num_workers), off "
        "(each worker's own batch); true/false: global/off",
    )
    cpus_per_worker: int = setting(
        1, "ray: CPUs reserved per worker (loader processes and torch threads use them)", at_least=1
    )
    max_failures: int = setting(
        3, "ray: restarts of the worker group from the latest checkpoint after a failure", at_least=0
    )
    storage_path: str = setting(
        "",
        "ray: where Ray Train keeps checkpoints (<storage_path>/<run.name>/step_*); multi-node: shared storage "
        "(NFS path, s3://..., gs://...); empty: <run.dir>/ray",
    )


@dataclass
class WandbSection:
    mode: Literal["offline", "online", "disabled"] = setting(
        "offline", "offline: no account needed, `wandb sync` later; online; disabled"
    )
    project: str = setting("", "W&B project; empty: $WANDB_PROJECT, else dcgan_dist")
    entity: str = setting("", "W&B entity (user or team); empty: your default")
    group: str = setting("", "W&B group (a sweep puts its trials in one, named after the sweep's run.name)")


# The sinks a run's metrics go to (training/sinks/: one file each), in this order.
DEFAULT_SINKS = ("console", "jsonl", "wandb", "tensorboard")


@dataclass
class LogSection:
    sinks: list[str] = setting(
        list(DEFAULT_SINKS),
        "where metrics go, a list of: console (progress lines), jsonl (metrics.jsonl), wandb (as wandb.mode "
        "says), tensorboard (<run.dir>/tensorboard), mlflow (MLFLOW_TRACKING_URI; pip install -e '.[mlflow]')",
    )


@dataclass
class Config:
    run: RunSection = section(RunSection, "the run: its name, folder and seed")
    data: DataSection = section(DataSection, "the training images and their loader")
    model: ModelSection = section(ModelSection, "the networks (a checkpoint's own are used to sample and evaluate)")
    gan: GanSection = section(GanSection, "the GAN objective")
    train: TrainSection = section(TrainSection, "the training loop, and the device of every command")
    optim: OptimSection = section(OptimSection, "the optimiser")
    eval: EvalSection = section(EvalSection, "the SWD/FID quality metrics: in training and the evaluate command")
    sample: SampleSection = section(SampleSection, "the sample command's grid")
    bench: BenchSection = section(BenchSection, "the bench command's measurements")
    tune: TuneSection = section(TuneSection, "the tune command's sweep (its spaces: --search KEY=SPACE)")
    dist: DistSection = section(DistSection, "distributed training")
    wandb: WandbSection = section(WandbSection, "Weights & Biases logging")
    log: LogSection = section(LogSection, "where metrics go: the sinks (train.log_every: how often)")


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
            return "one of " + ", ".join(show(c) for c in choices)
        section, _, name = key.rpartition(".")
        hint = typing.get_type_hints(_section(section))[name]
        if typing.get_origin(hint) is list:
            default = _fields(_section(section))[name].default_factory()  # type: ignore[operator]
            return f"a list, e.g. {key}=[{','.join(map(str, default))}]"
        return f"a value of type {getattr(hint, '__name__', hint)}"
    except (KeyError, TypeError):
        return "another type"


def resolve_config_path(name: str) -> Path:
    """A file path, or the name of a preset in configs/ ('debug' -> configs/debug.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.expanduser().is_dir():
        raise ConfigError(f"config file '{name}' is a directory; give a YAML file or a preset ({', '.join(presets())})")
    preset = PRESET_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if preset.is_file():
        return preset
    raise ConfigError(f"config file '{name}' not found (presets: {', '.join(presets()) or 'none'})")


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []


def _parse_dotlist(overrides: list[str]) -> DictConfig:
    overrides = list(overrides)
    for i, item in enumerate(overrides):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=100)")
        if not value.strip() and key in setting_keys():  # YAML reads `key=` as null: an empty text, or refused
            section, _, name = key.rpartition(".")
            if typing.get_type_hints(_section(section))[name] is not str:
                raise ConfigError(f"config key '{key}' is empty; it expects {_expected(key)}")
            overrides[i] = f"{key}=''"
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
        for f in dataclasses.fields(section.default_factory):  # type: ignore[arg-type]  # a section class as factory
            key, value = f"{section.name}.{f.name}", getattr(getattr(cfg, section.name), f.name)
            if value is None:  # an optional setting left unset (optim.lr_g: null -> optim.lr)
                continue
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
    cfg.dist.sync_bn = sync_bn_mode(cfg.dist.sync_bn)
    cfg.data.cache = cache_mode(cfg.data.cache)
    if cfg.dist.sync_bn.isdigit() and cfg.dist.num_workers % int(cfg.dist.sync_bn):
        raise ConfigError(
            f"config key 'dist.sync_bn' is a group size of {cfg.dist.sync_bn} ranks, which does not divide "
            f"dist.num_workers ({cfg.dist.num_workers}); give a divisor of it, node, global or off"
        )
    if cfg.dist.launcher == "local" and cfg.dist.num_workers != 1:
        raise ConfigError(
            f"config key 'dist.num_workers' is {cfg.dist.num_workers} but dist.launcher=local runs one process; "
            "use dist.launcher=ray for several workers"
        )


def cache_mode(value: Any) -> str:
    """data.cache in its one spelling: 'off', 'device' or 'auto' (a bare off reads as false). ConfigError
    otherwise."""
    text = {"false": "off", "no": "off"}.get(str(value).strip().lower(), str(value).strip().lower())
    if text in ("off", "device", "auto"):
        return text
    raise ConfigError(f"config key 'data.cache' is {value!r}; it expects off, device or auto")


def sync_bn_mode(value: Any) -> str:
    """dist.sync_bn in its one spelling: 'global', 'node', 'off' or a group size ('2'); true/false (older
    configs) are global/off. ConfigError for anything else."""
    text = str(value).strip().lower()
    text = {"true": "global", "false": "off", "yes": "global", "no": "off"}.get(text, text)
    if text in ("global", "node", "off"):
        return text
    if text.isdigit() and int(text) >= 1:
        return str(int(text))
    raise ConfigError(
        f"config key 'dist.sync_bn' is {value!r}; it expects global, node, off or a group size of at least 1 "
        "(true/false: global/off)"
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
    if not run.name:
        raise ConfigError("config key 'run.name' is empty; give a plain name of letters, digits, '.', '_' and '-'")
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


def describe(key: str) -> str:
    """The one-line description of a setting or a section ('eval.num', 'eval')."""
    section, _, name = key.rpartition(".")
    return _fields(_section(section))[name].metadata.get("doc", "")


def show(value: Any) -> str:
    """A value as it is written on a command line (true, not True; null, not None)."""
    if isinstance(value, list | tuple):
        return f"[{','.join(show(v) for v in value)}]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def limits_text(key: str) -> str:
    """What a setting accepts, where the schema restricts it: 'auto | cpu | cuda', 'at least 1, below 1.0'."""
    choices = allowed_values(key)
    if choices is not None:
        return " | ".join(show(c) for c in choices)
    section, _, name = key.rpartition(".")
    if typing.get_type_hints(_section(section))[name] is bool:
        return "true | false"
    limits = _fields(_section(section))[name].metadata.get("limits", {})
    words = {"at_least": "at least", "below": "below", "above": "above"}
    return ", ".join(f"{words[k]} {v}" for k, v in limits.items())


def setting_keys(selection: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Every 'section.key' of the schema in order, or those of the sections and keys selected."""
    keys = [f"{s.name}.{name}" for s in dataclasses.fields(Config) for name in _fields(_section(s.name))]
    if selection is None:
        return keys
    return [k for chosen in selection for k in keys if k == chosen or k.partition(".")[0] == chosen]


def flat_settings(cfg: Config) -> list[tuple[str, Any]]:
    """(section.key, value) for every setting, in schema order."""
    return [
        (f"{s.name}.{f.name}", getattr(getattr(cfg, s.name), f.name))
        for s in dataclasses.fields(Config)
        for f in dataclasses.fields(s.default_factory)  # type: ignore[arg-type]  # a section class as factory
    ]


def split_args(argv: list[str], prog: str | None = None) -> tuple[str | None, list[str]]:
    """`[--config FILE] [key=value ...]` -> (file, overrides); --config may appear anywhere, once (prog: the
    command, named in the error about an unknown option)."""
    config_file: str | None = None
    overrides, i = [], 0
    while i < len(argv):
        arg, value = argv[i], None
        if arg in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file name")
            value, i = argv[i + 1], i + 1
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            see = f"see {prog} --help" if prog else "usage: [--config FILE] [key=value ...]"
            raise ConfigError(f"unknown option '{arg.split('=', 1)[0]}' ({see})")
        else:
            overrides.append(arg)
        if value is not None:
            if not value.strip():
                raise ConfigError(f"--config is empty; give a YAML file or a preset ({', '.join(presets())})")
            if config_file is not None:
                raise ConfigError(f"--config is given twice ({config_file}, {value}); give one")
            config_file = value
        i += 1
    return config_file, overrides


def from_args(argv: list[str], prog: str | None = None) -> tuple[Config, str]:
    """The Config of a command line `[--config FILE] [key=value ...]`, and the preset or file it started from.

    Without --config the quick-start preset is the base, overrides or not: `train train.max_steps=3000` after
    the quick start continues the quick-start run rather than starting the schema's 64x64 defaults elsewhere.
    """
    config_file, overrides = split_args(argv, prog)
    base = config_file or QUICKSTART_PRESET
    return build_config(base, overrides), base
