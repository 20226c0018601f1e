"""Evaluate a generator: multi-scale SWD always, FID when Inception weights are on this machine.

    python -m dcgan_dist.evaluate --checkpoint runs/debug
    python -m dcgan_dist.evaluate --checkpoint runs/debug/checkpoints/best.pt --shards data/faces \\
        eval.num=4096 eval.untrained=true

--checkpoint takes what `sample` takes (a checkpoint file, a Ray checkpoint directory, a run directory).
Prints one JSON line: swd (x1e3, mean over pyramid levels) and swd_levels, swd_real_vs_real (the same
metric between two disjoint halves of the real data: the floor a perfect generator would reach at this
sample size), fid (or null with fid_reason), and with eval.untrained=true the SWD of the freshly initialised
generator for scale. The generated set uses the EMA weights when the checkpoint has them. A class-conditional
model's images are drawn with the real images' labels, and swd_per_class gives the SWD of each class by name
(null when the real images are unlabelled: then the classes are drawn evenly).
How many images, the seed, the SWD's neighbourhoods, the weights: the eval.* settings listed below, the same
ones the in-training SWD uses (eval.num, eval.nhoods_per_image).

The checkpoint chooses the model and, without --shards, the real images only where they are plain: its
data.shards when every shard is a path or an s3:// location (a pipe: command or another URL is refused: give
--shards), or its synthetic faces, generated in the command line's data.cache_dir (never the checkpoint's).
"""

from __future__ import annotations

import json
import sys

from dcgan_dist import stopping
from dcgan_dist.cli import args as cli
from dcgan_dist.config import ConfigError
from dcgan_dist.data import check_shards
from dcgan_dist.errors import RunError
from dcgan_dist.storage.filesystem import StoreError
from dcgan_dist.training.checkpoint import CheckpointError
from dcgan_dist.training.evaluation import class_labels, measure, prepare

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


@cli.one_line_errors  # what the except clauses below leave: one line, its exit code (cli/args.py)
def main(argv: list[str] | None = None) -> int:
    parsed = COMMAND.parse(argv)
    if isinstance(parsed, int):
        return parsed
    args, setting, _ = parsed
    settings = setting.eval
    if not args.checkpoint:
        parser.error("--checkpoint is required: give a checkpoint file or a run directory")

    try:
        job = prepare(setting, args.checkpoint, args.shards)
    except (CheckpointError, StoreError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:  # the object store stopped answering
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:  # the command line's shards (or the run's): there, and of the model's size, before any work
        check_shards(job.shards, job.chw)
        class_labels(job)  # a conditional model: labelled real images are labelled with its classes
    except (OSError, ValueError) as exc:  # StoreError too: a missing bucket, refused keys
        where = f"--shards={job.shards}" if args.shards else f"data.shards={job.shards} (the run's; give --shards)"
        print(f"error: {where}: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:  # the object store stopped answering
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"evaluating step {job.step} ({job.which} weights) on {settings.num} images from {job.shards}", file=sys.stderr
    )
    try:
        result = measure(
            job,
            settings,
            warn=lambda text: print(f"warning: {text}", file=sys.stderr),
            say=lambda text: print(text, file=sys.stderr, flush=True),  # a line per stage; stdout: the JSON alone
        )
    except RunError as exc:  # the object store stopped answering, or more bad data than data.max_bad_fraction
        print(f"error: {exc}", file=sys.stderr)
        return 1
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
