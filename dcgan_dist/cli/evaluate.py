"""Evaluate a generator: multi-scale SWD always, FID when Inception weights are on this machine.

    python -m dcgan_dist.evaluate --checkpoint runs/debug
    python -m dcgan_dist.evaluate --checkpoint runs/debug/checkpoints/best.pt --shards data/faces \\
        eval.num=4096 eval.untrained=true

--checkpoint takes what `sample` takes (a checkpoint file, a Ray checkpoint directory, a run directory).
Prints one JSON line: swd (x1e3, mean over pyramid levels) and swd_levels, swd_real_vs_real (the same
metric between two disjoint halves of the real data: the floor a perfect generator would reach at this
sample size), fid (or null with fid_reason), and with eval.untrained=true the SWD of the freshly initialised
generator for scale. The generated set uses the EMA weights when the checkpoint has them.
How many images, the seed, the SWD's neighbourhoods, the weights: the eval.* settings listed below, the same
ones the in-training SWD uses (eval.num, eval.nhoods_per_image).

The checkpoint chooses the model and, without --shards, the real images only where they are plain: its
data.shards when every shard is a path or an s3:// location (a pipe: command or another URL is refused: give
--shards), or its synthetic faces, generated in the command line's data.cache_dir (never the checkpoint's).
"""

from __future__ import annotations

import json
import os
import sys

import webdataset as wds

from dcgan_dist import stopping
from dcgan_dist.cli import args as cli
from dcgan_dist.config import Config, ConfigError, DataSection
from dcgan_dist.data import check_shards, ensure_synthetic, expand_shards
from dcgan_dist.errors import RunError
from dcgan_dist.gan.models import build_models, generate
from dcgan_dist.gan.precision import pick_device
from dcgan_dist.gan.quality import fid, swd
from dcgan_dist.storage.filesystem import StoreError, is_remote
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


COMMAND = cli.Command(
    "python -m dcgan_dist.evaluate",
    __doc__,
    settings=["eval", "train.device", "data.cache_dir"],
    moved={
        "--num": "eval.num=N",
        "--nhoods-per-image": "eval.nhoods_per_image=N",
        "--seed": "eval.seed=N",
        "--weights": "eval.weights=auto|ema|raw",
        "--inception-weights": "eval.inception_weights=PATH",
        "--untrained": "eval.untrained=true",
        "--no-baseline": "eval.baseline=false",
        "--cache-dir": "data.cache_dir=DIR",
        "--device": "train.device=auto|cpu|cuda",
    },
)
parser = COMMAND.parser
parser.add_argument("--checkpoint", help="checkpoint file, Ray checkpoint dir, or run directory (required)")
parser.add_argument(
    "--shards",
    default=None,
    type=cli.not_empty,
    help="real images (default: the run's data.shards when it is a folder, file or s3:// location)",
)


def main(argv: list[str] | None = None) -> int:
    parsed = COMMAND.parse(argv)
    if isinstance(parsed, int):
        return parsed
    args, setting, _ = parsed
    settings = setting.eval
    if not args.checkpoint:
        parser.error("--checkpoint is required: give a checkpoint file or a run directory")

    try:
        device = pick_device(setting.train.device)
        G, state, which = load_generator(args.checkpoint, device, settings.weights)
        cfg = settings_of(state, args.checkpoint)  # of which model.* and run.seed are used, and data.* as below
        chw = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
        shards = args.shards or shards_of_checkpoint(cfg, args.checkpoint, setting.data.cache_dir)
    except (CheckpointError, StoreError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:  # the object store stopped answering
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:  # the command line's shards (or the run's): there, and of the model's size, before any work
        check_shards(shards, chw)
    except (OSError, ValueError) as exc:  # StoreError too: a missing bucket, refused keys
        where = f"--shards={shards}" if args.shards else f"data.shards={shards} (the run's; give --shards)"
        print(f"error: {where}: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:  # the object store stopped answering
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"evaluating step {state['step']} ({which} weights) on {settings.num} images from {shards}", file=sys.stderr)

    try:
        try:
            real_a = real_images(shards, settings.num, chw, settings.seed, half=0)
            real_b = None if not settings.baseline else real_images(shards, settings.num, chw, settings.seed, half=1)
        except ValueError as exc:  # a single shard cannot be halved
            print(f"warning: {exc}; comparing with all shards, no real-vs-real baseline", file=sys.stderr)
            real_a, real_b = real_images(shards, settings.num, chw, settings.seed), None
    except RunError as exc:  # the object store stopped answering, or more bad data than data.max_bad_fraction
        print(f"error: {exc}", file=sys.stderr)
        return 1
    fake = generate(G, settings.num, seed=settings.seed + 1, device=device)
    kw = dict(nhoods_per_image=settings.nhoods_per_image, seed=settings.seed)
    result = {"checkpoint": str(args.checkpoint), "step": state["step"], "weights": which, "num": settings.num}
    result.update(nhoods_per_image=settings.nhoods_per_image, seed=settings.seed)
    result.update(swd(real_a, fake, **kw).as_dict())
    result["swd_real_vs_real"] = swd(real_a, real_b, **kw).mean if real_b is not None else None
    if settings.untrained:
        # The generator as training starts: batch statistics (train mode). In eval mode an untrained G, whose
        # running statistics are still the initial ones, draws one flat image for every z: a degenerate baseline.
        G0, _ = build_models(cfg.model, seed=cfg.run.seed)
        untrained = generate(G0.to(device).train(), settings.num, settings.seed + 1, device)
        result["swd_untrained"] = swd(real_a, untrained, **kw).mean
    value, reason = fid(real_a, fake, settings.inception_weights, device)
    result["fid"] = value
    if reason:
        result["fid_reason"] = reason
    print(json.dumps(result))
    return 0


def run(argv: list[str] | None = None) -> int:
    """main, with a stop while the synthetic faces are drawn (SIGTERM, Ctrl-C) as one line: nothing of them kept."""
    try:
        return main(argv)
    except stopping.StoppedBySignal as exc:
        print(f"stopped by {exc}; nothing was kept", file=sys.stderr)
        return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(run())
