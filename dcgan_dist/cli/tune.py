"""Hyper-parameter sweeps: Ray Tune over trials that are each a full multi-worker Ray Train run.

    python -m dcgan_dist.tune --config debug train.eval_every=100 --search "optim.lr=loguniform(1e-4,1e-3)" \\
        --search "model.ngf=choice(32,64)" tune.trials=8 tune.scheduler=asha
    python -m dcgan_dist.tune --config debug --search "optim.lr=loguniform(1e-4,1e-3)" tune.trials=4 tune.scheduler=pbt

Every trial trains the settings of the command line with its own values of the searched keys, on
dist.num_workers workers (DDP, synchronised batch norm), and is scored by the in-training SWD against real
images (train.eval_every; lower is better). A trial reports to Tune at every evaluation, with a checkpoint
(train.checkpoint_every follows train.eval_every in a sweep). ASHA stops the trials that are behind at the
same step; PBT replaces the worse trials' weights with the better ones' and perturbs their learning rates.

Spaces: loguniform(a,b), uniform(a,b), randint(a,b) (b excluded), choice(v1,v2,...), grid(v1,v2,...).
What is searched is a flag, --search KEY=SPACE (repeated; KEY is any setting); how (trials, scheduler,
concurrency) are the tune.* settings below, and every other setting is each trial's, as for dcgan_dist.train.

The sweep lives in run.dir (a folder or s3://bucket/prefix): Tune's state and per-trial checkpoints in
<run.dir>/tune, each trial's run (metrics.jsonl, samples, Ray checkpoints, best.pt) in <run.dir>/trials/<trial>.
Rerunning the same command resumes an interrupted sweep. W&B groups the trials under run.name.
The outcome (each trial's parameters, best SWD and steps, PBT's exploit events, the best checkpoint) is in
<run.dir>/result.json; `--json` prints it on stdout, every other line going to stderr.
Trials run side by side as far as the cluster has room: dist.num_workers x dist.cpus_per_worker CPUs (and a
GPU per worker on CUDA) each.
"""

from __future__ import annotations

import sys

from dcgan_dist.cli import args as cli
from dcgan_dist.config import ConfigError

COMMAND = cli.Command(
    "python -m dcgan_dist.tune",
    __doc__,
    settings=["tune", *cli.TRAINING_SETTINGS],
    moved={
        "--trials": "tune.trials=N",
        "--scheduler": "tune.scheduler=asha|pbt|fifo",
        "--concurrent": "tune.concurrent=N",
    },
    fixed=["dist.launcher=ray"],  # every trial is a Ray Train run
)
COMMAND.parser.add_argument("--json", action="store_true", help=cli.JSON_HELP)
COMMAND.parser.add_argument(
    "--search", action="append", default=[], metavar="KEY=SPACE", help="a setting and its space (repeated)"
)


@cli.one_line_errors  # ConfigError -> 2, RunError (the sweep's lease could not be taken) -> 1
def main(argv: list[str] | None = None) -> int:
    parsed = COMMAND.parse(argv)
    if isinstance(parsed, int):
        return parsed
    args, base, _ = parsed
    outcome: dict = {}
    with cli.json_stdout(args.json):
        code = run(args, base, outcome)
    if args.json and outcome:
        cli.print_result(outcome)
    return code


def run(args, base, outcome: dict) -> int:
    tune = base.tune
    # Imported once the command line is known to be good: a bad one is refused without Ray, which is slow to import.
    from dcgan_dist.launch.sweep import apply, parse_search, scheduler, sweep

    if not base.train.eval_every:
        raise ConfigError("a sweep scores trials by the in-training SWD: set train.eval_every (e.g. 100)")
    # Every evaluation is reported to Tune with a checkpoint, so that PBT and a resumed sweep continue there.
    base = apply(base, {"train.checkpoint_every": base.train.eval_every})
    searches = [parse_search(item, base) for item in args.search]
    if not searches:
        raise ConfigError("nothing to search: give --search KEY=SPACE (e.g. --search 'optim.lr=loguniform(1e-4,1e-3)')")
    chosen = scheduler(tune.scheduler, base, searches)
    from dcgan_dist.launch.ray_address import cluster_address
    from dcgan_dist.storage.runlock import run_lock
    from dcgan_dist.training.trainer import check_settings

    cluster_address(probe=True)  # a named Ray cluster that does not answer: one line in seconds, no sweep file
    check_settings(base, base.dist.num_workers)
    with run_lock(base.run.dir):  # one sweep per run.dir; its trials' Ray workers do not lock
        return sweep(base, searches, tune.trials, tune.scheduler, chosen, tune.concurrent, outcome)


if __name__ == "__main__":
    sys.exit(main())
