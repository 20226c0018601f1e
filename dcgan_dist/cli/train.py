"""Train a DCGAN.

    python -m dcgan_dist.train                                  # quick start: the debug preset on this machine
    python -m dcgan_dist.train train.max_steps=3000             # the quick-start run, trained further
    python -m dcgan_dist.train --config configs/default.yaml    # the classic 64x64 faces model
    python -m dcgan_dist.train --config debug train.max_steps=2000 run.name=longer

`--config FILE` (a path, or a preset name from configs/; default: the debug preset) then any number of
`key=value` overrides. Rerunning with the same run.dir resumes from its newest checkpoint.
`[--config FILE] [key=value ...] --help` lists every setting with the value that command line would use.
A run that trains to train.max_steps, or stops on a signal with a checkpoint, writes its outcome to
<run.dir>/result.json (final step and checkpoint, where it resumed from, the stop reason and signal, seconds);
`--json` prints it on stdout too, every other line going to stderr.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from dcgan_dist import stopping
from dcgan_dist.cli.args import (
    JSON_FLAG,
    SETTINGS_USAGE,
    TRAINING_SETTINGS,
    check_overrides,
    json_stdout,
    one_line_errors,
    print_result,
    settings_help,
    take_flag,
)
from dcgan_dist.config import Config, ConfigError, from_args, split_args
from dcgan_dist.errors import RunError
from dcgan_dist.gan.precision import pick_device
from dcgan_dist.launch.ray_address import cluster_address
from dcgan_dist.storage.filesystem import store_refusal, write_result
from dcgan_dist.storage.runlock import run_lock
from dcgan_dist.training.checkpoint import SPACE_ERRORS, CheckpointError, CheckpointWriteError
from dcgan_dist.training.trainer import StepHook, Trainer, check_settings

SETTINGS = list(TRAINING_SETTINGS)


PROG = "python -m dcgan_dist.train"


def usage(cfg: Config, base: str) -> str:
    settings = settings_help(cfg, base, SETTINGS)
    return f"usage: {PROG} [{JSON_FLAG}] {SETTINGS_USAGE}\n\n{__doc__.strip()}\n\n{settings}"


@one_line_errors  # what the except clauses below leave: one line, its exit code (cli/args.py)
def main(argv: list[str] | None = None, hooks: Sequence[StepHook] = ()) -> int:
    argv = sys.argv[1:] if argv is None else argv
    argv, as_json = take_flag(argv, JSON_FLAG)
    outcome: dict = {}
    with json_stdout(as_json):
        code = run(argv, hooks, outcome)
    if as_json and outcome:
        print_result(outcome)
    return code


def run(argv: list[str], hooks: Sequence[StepHook] = (), outcome: dict | None = None) -> int:
    """The command; outcome: filled with what result.json holds, when the run ended with one."""
    outcome = {} if outcome is None else outcome
    args = [a for a in argv if a not in ("-h", "--help")]
    try:
        cfg, base = from_args(args, PROG)
        check_overrides(split_args(args)[1], SETTINGS, PROG)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(args) < len(argv):
        print(usage(cfg, base))
        return 0
    if split_args(args)[0] is None:
        print(
            f"No --config given: using the '{base}' preset (configs/{base}.yaml), a small model that trains on a "
            "laptop CPU in minutes. The classic 64x64 model: --config configs/default.yaml",
            flush=True,
        )
    if cfg.dist.launcher == "ray":
        try:
            cluster_address(probe=True)  # a named Ray cluster that does not answer: one line in seconds, no run file
            check_settings(cfg, cfg.dist.num_workers)  # here first: an error in seconds, not after Ray starts
            # The driver holds run.dir for the whole job: Ray Train's restarts of the workers are never refused.
            with run_lock(cfg.run.dir):
                from dcgan_dist.launch.ray_train import launch  # imported late: Ray is optional, and slow to import

                return launch(cfg, argv, hooks, outcome)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except RunError as exc:  # the run's lease could not be taken
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        # Every check on the inputs before the lock: a refused command leaves no run file behind.
        check_settings(cfg, device=pick_device(cfg.train.device))
        with run_lock(cfg.run.dir) as lock:
            result = Trainer(cfg, hooks=[*hooks, lock.check]).fit()
            outcome.update({"command": "train", **dataclasses.asdict(result)})
            write_result(cfg.run.dir, outcome)
    except (CheckpointWriteError, RunError) as exc:  # mid-run: the run stops, its last checkpoint intact
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if store_refusal(exc):  # e.g. keys that expired mid-run; checked at the start, so a failure of the run
            print(f"error: {store_refusal(exc)}", file=sys.stderr)
            return 1
        if exc.errno not in SPACE_ERRORS:
            raise
        print(
            f"error: cannot write {exc.filename or 'a run file'} ({exc.strerror}): the disk is full; the run's "
            "newest checkpoint is intact",
            file=sys.stderr,
        )
        return 1
    except (ConfigError, CheckpointError) as exc:  # before any training: the run directory is as it was
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except stopping.StoppedBySignal as exc:  # before training (drawing the synthetic faces): nothing kept
        print(f"stopped by {exc} before training started; run the same command again to start", file=sys.stderr)
        return 128 + exc.signum
    if result.stopped_by:
        return stopping.report(result.stopped_by, result.step, result.checkpoint, argv)
    return 0 if result.step >= cfg.train.max_steps else 1


if __name__ == "__main__":
    sys.exit(main())
