"""The evaluate command's work: a checkpoint's generator against real images, multi-scale SWD always, FID when
Inception weights are on this machine (`python -m dcgan_dist.evaluate`; its arguments and printing are in
cli/evaluate.py).

    job = prepare(setting, "runs/debug", shards=None)   # the generator, its run's settings, the real images
    result = measure(job, setting.eval)                 # the JSON line's dict

A class-conditional model draws its images with the real images' labels (the same classes in the same
proportions) and reports the SWD of each class too ("swd_per_class": {name: value}) when the real images are
labelled with the model's classes (class_labels); on unlabelled real images its classes are drawn evenly and
"swd_per_class" is null.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import webdataset as wds
from torch import nn

from dcgan_dist.config import Config, DataSection, EvalSection
from dcgan_dist.data import ensure_synthetic, expand_shards, read_info
from dcgan_dist.data.shards import read_classes
from dcgan_dist.gan.models import build_models, generate
from dcgan_dist.gan.precision import pick_device
from dcgan_dist.gan.quality import fid, swd, swd_per_class
from dcgan_dist.storage.filesystem import is_remote
from dcgan_dist.training.checkpoint import CheckpointError, load_generator, plain_location, settings_of
from dcgan_dist.training.quality_tracking import real_images


def shards_of_checkpoint(cfg: Config, file: str, cache_dir: str) -> str:
    """The real images of a checkpoint's run, as far as a checkpoint may choose them: its data.shards when every
    shard is a plain path or an s3:// location (never a pipe: command or a URL webdataset would fetch); its
    synthetic faces (at most data.synth_num=20000 of them, the schema's default) in `cache_dir`, the command
    line's data.cache_dir, never the checkpoint's. Raises CheckpointError."""
    spec = cfg.data.shards
    if not spec:
        num = min(cfg.data.synth_num, DataSection.synth_num)  # how much work a checkpoint may ask for
        try:
            return str(ensure_synthetic(cache_dir, num, cfg.model.image_size, cfg.model.channels))
        except OSError as exc:
            raise CheckpointError(
                f"{file} trained on the synthetic faces, and data.cache_dir={cache_dir} cannot hold "
                f"them ({exc.strerror or exc}); give another data.cache_dir"
            ) from None
    refuse = (
        f"{file} names data.shards={spec}, which is not a folder, shard file or s3:// location; a checkpoint "
        "does not choose commands or URLs to read: give the real images with --shards"
    )
    if not all(plain_location(part) for part in wds.shardlists.expand_urls(spec)):  # '::' and {a..b}, nothing opened
        raise CheckpointError(refuse)
    try:
        urls = expand_shards(spec)
    except OSError as exc:
        raise CheckpointError(
            f"{file} was trained on data.shards={spec}: {exc}; give the real images with --shards"
        ) from None
    if not all(plain_location(url) for url in urls):  # a folder or glob may hold files named like URLs
        raise CheckpointError(refuse)
    # A device or a pipe (/dev/stdin, a FIFO) would be read forever or wait for a writer: files only.
    special = next((url for url in urls if not is_remote(url) and not os.path.isfile(os.path.expanduser(url))), None)
    if special:
        raise CheckpointError(
            f"{file} names data.shards={spec}, and {special} is not a regular file; give the real images with --shards"
        )
    return spec


@dataclass
class Evaluation:
    """What an evaluation reads: the checkpoint's generator, its run's settings, and the real images."""

    checkpoint: str
    G: nn.Module
    step: int
    which: str  # the weights used: ema or raw
    cfg: Config  # the checkpoint's run's settings: of which model.* and run.seed are used, and data.* as below
    shards: str
    device: torch.device

    @property
    def chw(self) -> tuple[int, int, int]:
        return (self.cfg.model.channels, self.cfg.model.image_size, self.cfg.model.image_size)


def class_labels(job: Evaluation) -> list[str] | None:
    """The class names the per-class SWD uses: the model's, when the model is conditional and the real images are
    labelled; None otherwise. Raises ValueError (one line) when the real images' classes are not the model's."""
    if not job.cfg.model.conditional:
        return None
    model = list(job.cfg.model.class_names)
    try:
        classes = read_classes(job.shards)
    except (OSError, ValueError):  # no readable dataset.json: unlabelled as far as can be told
        return None
    if classes is None:
        return None
    if list(classes) != model:
        raise ValueError(
            f"its classes ({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}) are not the model's "
            f"({', '.join(model[:12])}{', ...' if len(model) > 12 else ''}); give real images labelled as the "
            "model was trained"
        )
    return model


def prepare(setting: Config, checkpoint: str, shards: str | None = None) -> Evaluation:
    """Load the checkpoint's generator (setting: the command line's train.device, eval.weights, data.cache_dir)
    and choose the real images: `shards`, else the checkpoint's as shards_of_checkpoint allows. Raises
    CheckpointError, StoreError, ConfigError; RunError when an object store stops answering."""
    device = pick_device(setting.train.device)
    G, state, which = load_generator(checkpoint, device, setting.eval.weights)
    cfg = settings_of(state, checkpoint)
    chosen = shards or shards_of_checkpoint(cfg, checkpoint, setting.data.cache_dir)
    return Evaluation(str(checkpoint), G, state["step"], which, cfg, chosen, device)


def measure(
    job: Evaluation,
    settings: EvalSection,
    warn: Callable[[str], None] = lambda text: None,
    say: Callable[[str], None] = lambda text: None,
) -> dict:
    """The SWD (and FID, the real-vs-real baseline, the untrained generator's SWD as eval.* asks) as the JSON
    line's dict. warn: told when the real images cannot be halved for the baseline; say: a line per stage done
    (what, how long). Raises RunError."""
    chw, device = job.chw, job.device
    stages = 4 + bool(settings.baseline) + bool(settings.untrained)
    clock = [time.perf_counter(), 0]

    def done(what: str) -> None:
        now = time.perf_counter()
        clock[1] += 1
        say(f"[{clock[1]}/{stages}] {what} ({now - clock[0]:.1f} s)")
        clock[0] = now

    try:  # dataset.json's count, where there is one: only for the warning below
        info = read_info(job.shards)
    except (OSError, ValueError):
        info = None
    per_side = info.num_samples // 2 if info and settings.baseline else info.num_samples if info else None
    if per_side is not None and settings.num > per_side:
        warn(
            f"eval.num={settings.num} is more than the {per_side} real images available "
            f"{'per half (eval.baseline=true) ' if settings.baseline else ''}in {job.shards}: some images are "
            "drawn more than once (fewer distinct ones than eval.num says); give fewer (eval.num) or more real images"
        )
    try:
        real_a, labels_a = real_images(job.shards, settings.num, chw, settings.seed, half=0)
        real_b = None if not settings.baseline else real_images(job.shards, settings.num, chw, settings.seed, half=1)[0]
    except ValueError as exc:  # a single shard cannot be halved
        warn(f"{exc}; comparing with all shards, no real-vs-real baseline")
        (real_a, labels_a), real_b = real_images(job.shards, settings.num, chw, settings.seed), None
        stages -= 1
    done(f"{settings.num} real images read{' per half' if real_b is not None else ''}")
    names = class_labels(job)
    labels = None
    if job.cfg.model.conditional:  # the real images' labels; unlabelled ones: every class alike
        drawn = torch.Generator().manual_seed(settings.seed + 2)
        evenly = torch.randint(0, job.cfg.model.num_classes, (settings.num,), generator=drawn)
        labels = labels_a if names is not None and labels_a is not None else evenly
    fake = generate(job.G, settings.num, seed=settings.seed + 1, device=device, labels=labels)
    done(f"{settings.num} images generated")
    kw = dict(nhoods_per_image=settings.nhoods_per_image, seed=settings.seed)
    result = {"checkpoint": job.checkpoint, "step": job.step, "weights": job.which, "num": settings.num}
    result.update(nhoods_per_image=settings.nhoods_per_image, seed=settings.seed)
    result.update(swd(real_a, fake, **kw).as_dict())
    done(f"SWD {result['swd']:.3f}")
    if job.cfg.model.conditional:
        per_class = None
        if names is not None and labels_a is not None:
            per_class = swd_per_class(real_a, fake, labels_a, names, **kw)
            done("SWD per class")
        result["swd_per_class"] = per_class
    result["swd_real_vs_real"] = swd(real_a, real_b, **kw).mean if real_b is not None else None
    if real_b is not None:
        done(f"real-vs-real SWD {result['swd_real_vs_real']:.3f} (the floor)")
    if settings.untrained:
        # The generator as training starts: batch statistics (train mode). In eval mode an untrained G, whose
        # running statistics are still the initial ones, draws one flat image for every z: a degenerate baseline.
        G0, _ = build_models(job.cfg.model, seed=job.cfg.run.seed)
        untrained = generate(G0.to(device).train(), settings.num, settings.seed + 1, device, labels=labels)
        result["swd_untrained"] = swd(real_a, untrained, **kw).mean
        done(f"untrained generator's SWD {result['swd_untrained']:.3f}")
    value, reason = fid(real_a, fake, settings.inception_weights, device)
    done(f"FID {value:.2f}" if value is not None else f"FID: not computed ({reason})")
    result["fid"] = value
    if reason:
        result["fid_reason"] = reason
    return result
