"""Hyper-parameter sweeps: Ray Tune over trials that are each a full multi-worker Ray Train run.

    python -m dcgan_dist.tune --config debug --search "optim.lr=loguniform(1e-4,1e-3)" \\
        --search "model.ngf=choice(32,64)" --trials 8 --scheduler asha
    python -m dcgan_dist.tune --config debug --search "optim.lr=loguniform(1e-4,1e-3)" --trials 4 --scheduler pbt

Every trial trains the settings of the command line with its own values of the searched keys, on
dist.num_workers workers (DDP, synchronised batch norm), and is scored by the in-training SWD against real
images (train.eval_every; lower is better). A trial reports to Tune at every evaluation, with a checkpoint
(train.checkpoint_every follows train.eval_every in a sweep). ASHA stops the trials that are behind at the
same step; PBT replaces the worse trials' weights with the better ones' and perturbs their learning rates.

Spaces: loguniform(a,b), uniform(a,b), randint(a,b) (b excluded), choice(v1,v2,...), grid(v1,v2,...).

The sweep lives in run.dir (a folder or s3://bucket/prefix): Tune's state and per-trial checkpoints in
<run.dir>/tune, each trial's run (metrics.jsonl, samples, Ray checkpoints, best.pt) in <run.dir>/trials/<trial>.
Rerunning the same command resumes an interrupted sweep. W&B groups the trials under run.name.
Trials run side by side as far as the cluster has room: dist.num_workers x dist.cpus_per_worker CPUs (and a
GPU per worker on CUDA) each.
"""

from __future__ import annotations

import argparse
import sys

from dcgan_dist.config import ConfigError, build_config, split_args
from dcgan_dist.errors import RunError
from dcgan_dist.launch.sweep import apply, parse_search, scheduler, sweep


def main(argv: list[str] | None = None) -> int:
    # The docstring's first paragraph is the description; the rest (examples, spaces) is printed once, after it.
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        prog="python -m dcgan_dist.tune",
        description=summary,
        epilog=details,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [--config FILE] --search KEY=SPACE [--search ...] [--trials N] [--scheduler {asha,pbt,fifo}]"
        " [--concurrent N] [key=value ...]",
    )
    parser.add_argument("--search", action="append", default=[], metavar="KEY=SPACE", help="a key and its space")
    parser.add_argument("--trials", type=int, default=4, help="trials to sample (a grid: repeats of the grid)")
    parser.add_argument("--scheduler", choices=("asha", "pbt", "fifo"), default="asha")
    parser.add_argument(
        "--concurrent",
        type=int,
        default=0,
        help="trials side by side at most (default: as many as the cluster has room for)",
    )
    args, rest = parser.parse_known_args(argv)
    try:
        file, overrides = split_args(rest)
        base = build_config(file or "debug", [*overrides, "dist.launcher=ray"])  # every trial is a Ray Train run
        if not base.train.eval_every:
            raise ConfigError("a sweep scores trials by the in-training SWD: set train.eval_every (e.g. 100)")
        if args.trials < 1:
            raise ConfigError("--trials must be at least 1")
        # Every evaluation is reported to Tune with a checkpoint, so that PBT and a resumed sweep continue there.
        base = apply(base, {"train.checkpoint_every": base.train.eval_every})
        searches = [parse_search(item, base) for item in args.search]
        if not searches:
            raise ConfigError(
                "nothing to search: give --search KEY=SPACE (e.g. --search 'optim.lr=loguniform(1e-4,1e-3)')"
            )
        chosen = scheduler(args.scheduler, base, searches)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from dcgan_dist.storage.runlock import run_lock
    from dcgan_dist.training.trainer import check_settings

    try:
        check_settings(base, base.dist.num_workers)
        with run_lock(base.run.dir):  # one sweep per run.dir; its trials' Ray workers do not lock
            return sweep(base, searches, args.trials, args.scheduler, chosen, args.concurrent)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:  # the sweep's lease could not be taken
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
