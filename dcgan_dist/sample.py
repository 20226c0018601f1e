"""Draw samples from a trained generator.

    python -m dcgan_dist.sample --checkpoint runs/debug/checkpoints/step_0001500.pt --num 64 --out grid.png [--seed K]
    python -m dcgan_dist.sample --progress runs/debug --out progress.gif      # the run's sample grids, animated

--checkpoint also takes a run directory (its newest checkpoint is used).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import from_dict
from .images import save_grid
from .reporting import progress_animation
from .models import Generator


def load_generator(path: str | Path, device: str | torch.device = "cpu", weights: str = "auto") -> tuple[Generator, dict, str]:
    """The generator of a checkpoint file, a Ray checkpoint directory, or a run directory (newest checkpoint).

    weights: "ema" (the moving average; an error if the run kept none), "raw", or "auto" (EMA when present).
    Returns (generator in eval mode, checkpoint state, which weights).
    """
    path = Path(path)
    if path.is_dir() and (path / "state.pt").is_file():  # a Ray Train checkpoint directory
        path = path / "state.pt"
    if path.is_dir():
        found = ckpt.load_latest(path / "checkpoints" if (path / "checkpoints").is_dir() else path, map_location=device)
        if found is None:
            raise FileNotFoundError(f"no checkpoints in {path}")
        path, state = found
    else:
        state = ckpt.load(path, map_location=device)
    cfg = from_dict(state["config"])
    which = "ema" if weights == "ema" or (weights == "auto" and "generator_ema" in state) else "raw"
    if which == "ema" and "generator_ema" not in state:
        raise ValueError(f"{path} has no EMA weights (train.ema_decay was 0)")
    G = Generator(cfg.model.nz, cfg.model.ngf, cfg.model.channels, cfg.model.image_size).to(device)
    G.load_state_dict(state["generator_ema" if which == "ema" else "generator"])
    return G.eval(), state, which


@torch.no_grad()
def generate(G: Generator, num: int, seed: int = 0, device: str | torch.device = "cpu", batch: int = 256) -> torch.Tensor:
    """`num` images in [-1, 1]; the same seed gives the same images."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(num, G.nz, 1, 1, generator=gen)
    return torch.cat([G(z[i : i + batch].to(device)).cpu() for i in range(0, num, batch)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcgan_dist.sample", description="Sample a grid from a checkpoint.")
    parser.add_argument("--checkpoint", help="checkpoint file, Ray checkpoint directory, or run directory (newest checkpoint)")
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--out", default="samples.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nrow", type=int, default=0, help="images per row (default: square grid)")
    parser.add_argument("--weights", default="auto", choices=("auto", "ema", "raw"), help="auto: EMA when the run kept one")
    parser.add_argument("--progress", metavar="RUN_DIR", help="instead: animate RUN_DIR/samples/step_*.png into --out (GIF)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.progress:
        out = args.out if args.out != "samples.png" else "progress.gif"
        try:
            path = progress_animation(Path(args.progress) / "samples", out)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote the progress animation of {args.progress} to {path}")
        return 0
    if not args.checkpoint:
        parser.error("--checkpoint is required (or --progress RUN_DIR)")
    try:
        G, state, which = load_generator(args.checkpoint, args.device, args.weights)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    images = generate(G, args.num, args.seed, args.device)
    path = save_grid(images, args.out, nrow=args.nrow or None)
    print(f"wrote {args.num} samples from step {state['step']} ({which} weights) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
