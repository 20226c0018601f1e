"""Evaluate a generator: multi-scale SWD always, FID when Inception weights are on this machine.

    python -m dcgan_dist.evaluate --checkpoint runs/debug [--shards DIR] [--num 4096] [--untrained]

--checkpoint takes what `sample` takes (a checkpoint file, a Ray checkpoint directory, a run directory).
Prints one JSON line: swd (x1e3, mean over pyramid levels) and swd_levels, swd_real_vs_real (the same
metric between two disjoint halves of the real data: the floor a perfect generator would reach at this
sample size), fid (or null with fid_reason), and with --untrained the SWD of the freshly initialised
generator for scale. The generated set uses the EMA weights when the checkpoint has them.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .checkpoint import CheckpointError, load_generator
from .config import from_dict
from .data import expand_shards, resolve_data
from .errors import RunError
from .evaluator import real_images
from .models import build_models, generate
from .quality import fid, swd
from .storage import StoreError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcgan_dist.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint file, Ray checkpoint dir, or run directory")
    parser.add_argument("--shards", default=None, help="real images (default: the run's data.shards)")
    parser.add_argument("--num", type=int, default=4096, help="images per set")
    parser.add_argument("--weights", default="auto", choices=("auto", "ema", "raw"))
    parser.add_argument("--inception-weights", default=None, help="local InceptionV3 weights for FID")
    parser.add_argument("--nhoods-per-image", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--untrained", action="store_true", help="also report the SWD of the untrained generator")
    parser.add_argument("--no-baseline", action="store_true", help="skip the real-vs-real SWD")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    try:
        G, state, which = load_generator(args.checkpoint, args.device, args.weights)
        cfg = from_dict(state["config"])
        shards = args.shards or resolve_data(cfg.data, cfg.model)[0]
        expand_shards(shards)  # they exist, and their object store answers: one line here otherwise
    except (CheckpointError, StoreError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:  # the object store stopped answering
        print(f"error: {exc}", file=sys.stderr)
        return 1
    chw = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    print(f"evaluating step {state['step']} ({which} weights) on {args.num} images from {shards}", file=sys.stderr)

    try:
        real_a = real_images(shards, args.num, chw, args.seed, half=0)
        real_b = None if args.no_baseline else real_images(shards, args.num, chw, args.seed, half=1)
    except ValueError as exc:  # a single shard cannot be halved
        print(f"warning: {exc}; comparing with all shards, no real-vs-real baseline", file=sys.stderr)
        real_a, real_b = real_images(shards, args.num, chw, args.seed), None
    except RunError as exc:  # the object store stopped answering
        print(f"error: {exc}", file=sys.stderr)
        return 1
    fake = generate(G, args.num, seed=args.seed + 1, device=args.device)
    kw = dict(nhoods_per_image=args.nhoods_per_image, seed=args.seed)
    result = {"checkpoint": str(args.checkpoint), "step": state["step"], "weights": which, "num": args.num}
    result.update(swd(real_a, fake, **kw).as_dict())
    result["swd_real_vs_real"] = swd(real_a, real_b, **kw).mean if real_b is not None else None
    if args.untrained:
        # The generator as training starts: batch statistics (train mode). In eval mode an untrained G, whose
        # running statistics are still the initial ones, draws one flat image for every z: a degenerate baseline.
        G0, _ = build_models(cfg.model, seed=cfg.run.seed)
        untrained = generate(G0.to(args.device).train(), args.num, args.seed + 1, args.device)
        result["swd_untrained"] = swd(real_a, untrained, **kw).mean
    value, reason = fid(real_a, fake, args.inception_weights, args.device)
    result["fid"] = value
    if reason:
        result["fid_reason"] = reason
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
