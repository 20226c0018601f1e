"""Draw samples from a trained generator.

    python -m dcgan_dist.sample --checkpoint runs/debug sample.num=64 sample.seed=1   # a run's newest checkpoint
    python -m dcgan_dist.sample --checkpoint runs/debug/checkpoints/best.pt --out grid.png
    python -m dcgan_dist.sample --progress runs/debug      # the run's sample grids, animated

--checkpoint takes a checkpoint file, a Ray checkpoint directory, a folder of checkpoints, or a run directory
(local or Ray: its newest checkpoint). Without --out the grid goes into the run's folder, never the current
directory: <run dir>/samples/grid_step<N>_seed<K>.png (the run dir: the nearest folder with the run's config.yaml,
from the checkpoint upwards), and --progress writes <RUN_DIR>/progress.gif. A checkpoint in an
object store needs --out. The grid's settings are sample.* (and train.device), listed below; the model is the
checkpoint's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from dcgan_dist.cli import args as cli
from dcgan_dist.config import ConfigError
from dcgan_dist.data.images import save_grid
from dcgan_dist.errors import RunError
from dcgan_dist.files import atomic_write
from dcgan_dist.gan.models import generate
from dcgan_dist.gan.precision import pick_device
from dcgan_dist.storage.filesystem import RunStorage, StoreError, check_bucket, is_remote
from dcgan_dist.training.checkpoint import CheckpointError, load_generator, one_line
from dcgan_dist.training.sample_grids import progress_animation

# How far above a checkpoint its run's config.yaml may be: <run>/ray/<trial>/checkpoint_N/ is the deepest.
RUN_FOLDER_DEPTH = 5


def run_folder(checkpoint: str) -> Path:
    """The local run folder a checkpoint belongs to: the nearest folder, from the one given (or holding the file
    given) upwards, that has the run's config.yaml (a checkpoints/ file, a Ray checkpoint directory a few levels
    down); without one, the folder given or the one holding the file."""
    path = Path(checkpoint).expanduser()
    start = path if path.is_dir() else path.parent
    for folder in [start, *start.parents][:RUN_FOLDER_DEPTH]:
        if (folder / "config.yaml").is_file():
            return folder
    return start


COMMAND = cli.Command(
    "python -m dcgan_dist.sample",
    __doc__,
    settings=["sample", "train.device"],
    moved={
        "--num": "sample.num=N",
        "--seed": "sample.seed=N",
        "--nrow": "sample.nrow=N",
        "--weights": "sample.weights=auto|ema|raw",
        "--device": "train.device=auto|cpu|cuda",
    },
)
parser = COMMAND.parser
parser.add_argument(
    "--checkpoint", help="checkpoint file, Ray checkpoint directory, or run directory (newest checkpoint)"
)
parser.add_argument(
    "--out", type=cli.output_file, default=None, help="image file (default: in the run's folder, see above)"
)
parser.add_argument(
    "--progress",
    metavar="RUN_DIR",
    help="instead: animate RUN_DIR/samples/step_*.png (a folder or s3://...) into --out (GIF)",
)


@cli.one_line_errors  # what the except clauses below leave: one line, its exit code (cli/args.py)
def main(argv: list[str] | None = None) -> int:
    parsed = COMMAND.parse(argv)
    if isinstance(parsed, int):
        return parsed
    args, cfg, _ = parsed
    settings = cfg.sample
    if args.progress:
        if args.out is None and is_remote(args.progress):
            parser.error(f"--progress {args.progress} is in an object store: give --out FILE.gif")
        out = args.out or str(Path(args.progress) / "progress.gif")
        try:
            if is_remote(args.progress):
                check_bucket(args.progress)
            animation = progress_animation(RunStorage(args.progress))
        except (FileNotFoundError, StoreError) as exc:  # no grids there; a missing bucket, refused keys
            print(f"error: --progress {args.progress}: {one_line(exc)}", file=sys.stderr)
            return 2
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # a store that cannot be read, a bad grid
            reason = "one of them is not an image" if isinstance(exc, Image.UnidentifiedImageError) else one_line(exc)
            print(f"error: --progress {args.progress}: cannot read its sample grids ({reason})", file=sys.stderr)
            return 2
        except RunError as exc:  # the object store stopped answering
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            path = atomic_write(out, animation)
        except OSError as exc:
            print(cli.write_error("--out", out, exc), file=sys.stderr)
            return 2
        print(f"wrote the progress animation of {args.progress} to {path}")
        return 0
    if not args.checkpoint:
        parser.error("--checkpoint is required (or --progress RUN_DIR)")
    if args.out is None and is_remote(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint} is in an object store: give --out FILE.png")
    try:
        device = pick_device(cfg.train.device)
        G, state, which = load_generator(args.checkpoint, device, settings.weights)
    except (CheckpointError, StoreError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:  # the object store stopped answering
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = args.out or str(run_folder(args.checkpoint) / "samples" / f"grid_step{state['step']}_seed{settings.seed}.png")
    images = generate(G, settings.num, settings.seed, device)
    try:
        path = save_grid(images, out, nrow=settings.nrow or None)
    except OSError as exc:  # a read-only place, a file where a folder should be, a full disk: no file is left
        print(cli.write_error("--out", out, exc), file=sys.stderr)
        return 2
    print(f"wrote {settings.num} samples from step {state['step']} ({which} weights) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
