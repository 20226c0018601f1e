"""Draw samples from a trained generator.

    python -m dcgan_dist.sample --checkpoint runs/debug sample.num=64 sample.seed=1   # a run's newest checkpoint
    python -m dcgan_dist.sample --checkpoint runs/debug/checkpoints/best.pt --out grid.png
    python -m dcgan_dist.sample --progress runs/debug      # the run's sample grids, animated
    python -m dcgan_dist.sample --checkpoint runs/mnist sample.label=7          # a conditional model: one class
    python -m dcgan_dist.sample --checkpoint runs/mnist sample.interpolate=3,9 sample.steps=10   # a latent walk

--checkpoint takes a checkpoint file, a Ray checkpoint directory, a folder of checkpoints, or a run directory
(local or Ray: its newest checkpoint). Without --out the grid goes into the run's folder, never the current
directory: <run dir>/samples/grid_step<N>_seed<K>.png (the run dir: the nearest folder with the run's config.yaml,
from the checkpoint upwards), and --progress writes <RUN_DIR>/progress.gif. A checkpoint in an
object store needs --out. The grid's settings are sample.* (and train.device), listed below; the model is the
checkpoint's.

A class-conditional model (the checkpoint's model.conditional) draws one row per class, the same latent vectors
in every row (style held, class changed; sample.nrow images a row, 0: 8), or with sample.label=K (a number or a
name of its model.class_names) sample.num images of class K (<run dir>/samples/grid_step<N>_seed<K>_<class>.png).
sample.interpolate=A,B walks from seed A's latent vector to seed B's by slerp in sample.steps images, both ends
included: its ends are the images of `sample.num=1 sample.seed=A` and of seed B (one row; a conditional model:
one row per class, or sample.label's) (<run dir>/samples/walk_step<N>_seed<A>-<B>.png).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import cast

import torch
from PIL import Image

from dcgan_dist.cli import args as cli
from dcgan_dist.config import SEED_LIMIT, ConfigError, SampleSection
from dcgan_dist.data.images import save_grid
from dcgan_dist.errors import RunError
from dcgan_dist.files import atomic_write
from dcgan_dist.gan.latent import draw, latents, slerp_walk
from dcgan_dist.gan.models import Generator, generate, unwrap
from dcgan_dist.gan.precision import pick_device
from dcgan_dist.storage.filesystem import RunStorage, StoreError, check_bucket, is_remote
from dcgan_dist.training.checkpoint import CheckpointError, load_generator, one_line, settings_of
from dcgan_dist.training.sample_grids import CONDITIONAL_COLUMNS, progress_animation

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


def walk_seeds(text: str) -> tuple[int, int] | None:
    """sample.interpolate's two seeds (None when empty); ConfigError unless it is A,B."""
    if not text.strip():
        return None
    parts = text.replace(" ", "").split(",")
    if len(parts) == 2 and all(p.isdigit() and int(p) < SEED_LIMIT for p in parts):
        return int(parts[0]), int(parts[1])
    raise ConfigError(f"sample.interpolate={text}: give two seeds as A,B (e.g. sample.interpolate=3,9)")


def class_index(text: str, names: list[str], checkpoint: str) -> int:
    """A class given by name or number, of a conditional model's classes; ConfigError naming them otherwise."""
    if text in names:
        return names.index(text)
    if text.isdigit() and int(text) < len(names):
        return int(text)
    listed = ", ".join(f"{i} {name}" if name != str(i) else name for i, name in enumerate(names))
    raise ConfigError(f"sample.label={text} is not a class of {checkpoint}; its classes: {listed}")


def file_part(text: str) -> str:
    """A class name as part of a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:40]


def images_to_draw(G, model, settings: SampleSection, label: int | None, device) -> tuple:
    """(images in [-1, 1], images per row) for the sample settings, on a model of `model` (its settings)."""
    classes = [label] if label is not None else list(range(model.num_classes)) if model.conditional else []

    def as_class(k: int, num: int) -> torch.Tensor:
        return torch.full((num,), k, dtype=torch.int64)

    seeds = walk_seeds(settings.interpolate)
    if seeds is not None:
        nz = cast(Generator, unwrap(G)).nz
        z = slerp_walk(latents(nz, 1, seeds[0])[0], latents(nz, 1, seeds[1])[0], settings.steps)
        rows = [draw(G, z, as_class(k, len(z)), device) for k in classes] if classes else [draw(G, z, None, device)]
        return torch.cat(rows), settings.steps
    if not classes:
        return generate(G, settings.num, settings.seed, device), settings.nrow or None
    if label is not None:
        return generate(
            G, settings.num, settings.seed, device, labels=as_class(label, settings.num)
        ), settings.nrow or None
    columns = settings.nrow or CONDITIONAL_COLUMNS  # every row: the same latent vectors, as class k
    rows = [generate(G, columns, settings.seed, device, labels=as_class(k, columns)) for k in classes]
    return torch.cat(rows), columns


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
        "--label": "sample.label=K (a class number or name)",
        "--interpolate": "sample.interpolate=A,B",
        "--steps": "sample.steps=N",
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
        seeds = walk_seeds(settings.interpolate)
        device = pick_device(cfg.train.device)
        G, state, which = load_generator(args.checkpoint, device, settings.weights)
        model = settings_of(state, args.checkpoint).model
        label = None
        if settings.label and not model.conditional:
            raise ConfigError(
                f"sample.label={settings.label}: {args.checkpoint} is an unconditional model (it has no classes); "
                "leave sample.label out"
            )
        if settings.label:
            label = class_index(settings.label, list(model.class_names), args.checkpoint)
    except (CheckpointError, StoreError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:  # the object store stopped answering
        print(f"error: {exc}", file=sys.stderr)
        return 1
    step = state["step"]
    name = f"grid_step{step}_seed{settings.seed}" if seeds is None else f"walk_step{step}_seed{seeds[0]}-{seeds[1]}"
    if label is not None:
        name += f"_{file_part(model.class_names[label])}"
    out = args.out or str(run_folder(args.checkpoint) / "samples" / f"{name}.png")
    images, per_row = images_to_draw(G, model, settings, label, device)
    try:
        path = save_grid(images, out, nrow=per_row)
    except OSError as exc:  # a read-only place, a file where a folder should be, a full disk: no file is left
        print(cli.write_error("--out", out, exc), file=sys.stderr)
        return 2
    what = f"a {settings.steps}-image walk from seed {seeds[0]} to {seeds[1]}" if seeds else f"{len(images)} samples"
    if label is not None:
        what += f" of class {model.class_names[label]}"
    elif model.conditional:
        what += f", one row per class ({', '.join(model.class_names)})"
    print(f"wrote {what} from step {step} ({which} weights) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
