"""`python tests/step_hooks.py [--signal NAME --after STEP --rank R] [train arguments]`:
`python -m dcgan_dist.train` with faults injected through the Trainer's step hooks.

--signal: rank R sends itself SIGKILL, SIGTERM or SIGINT (NAME: KILL, TERM, INT) right after step STEP, once per
run directory (a marker file there), so that the resumed or restarted run passes that step; repeated, one
signal after each STEP (the i-th --signal with the i-th --after and --rank; --rank defaults to 0). INT goes to the
whole process group, as Ctrl-C in a terminal does (run it in a session of its own).
--kill-after-checkpoint STEP --marker FILE: SIGKILL right after the checkpoint of STEP is stored, once.
--pause-after STEP --until FILE: rank 0 stops right after step STEP, creates FILE.paused and waits until FILE
exists (a test does something meanwhile), unless FILE exists already (a resumed run passes through).
--stop-after STEP --ready FILE: rank 0 creates FILE right after step STEP and waits there until its run has a stop
request (the test sends a signal or stops the job meanwhile), so that every rank stops after exactly that step; no
wait if FILE exists already.
--record DIR: every rank appends what it trained on at each step (the tags of tests.test_data.tagged_images, and
their labels when the shards are labelled) to DIR/rank<R>.jsonl.
Under dist.launcher=ray the hooks travel to the Ray workers (pickled by value, being defined in this script)."""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from dcgan_dist.cli.train import main


class SignalAfterStep:
    def __init__(self, signum: int, step: int, rank: int, marker: Path):
        self.signum, self.step, self.rank, self.marker = signum, step, rank, marker

    def __call__(self, step, env, images, labels=None) -> None:
        if step != self.step or env.rank != self.rank or self.marker.exists():
            return
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.touch()
        if self.signum == signal.SIGINT and not env.distributed:
            os.killpg(os.getpgid(0), self.signum)
        else:
            os.kill(os.getpid(), self.signum)


def kill_after_checkpoint(step: int, marker: Path) -> None:
    """SIGKILL this process right after the checkpoint of `step` is stored, before anything else runs (once per
    marker file): the moment between a checkpoint and whatever the run would write after it."""
    from dcgan_dist.training.checkpoint import CheckpointManager

    save = CheckpointManager.save

    def save_then_die(self, at: int, metrics: dict):
        where = save(self, at, metrics)
        if at == step and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return where

    CheckpointManager.save = save_then_die


class PauseUntil:
    def __init__(self, step: int, go: Path):
        self.step, self.go = step, go

    def __call__(self, step, env, images, labels=None) -> None:
        if step != self.step or env.rank != 0 or self.go.exists():
            return
        Path(f"{self.go}.paused").touch()
        while not self.go.exists():  # the test's signal to go on: a file, polled
            time.sleep(0.05)


class WaitForStop:
    def __init__(self, step: int, ready: Path):
        self.step, self.ready = step, ready

    def __call__(self, step, env, images, labels=None) -> None:
        from dcgan_dist import stopping

        if step != self.step or env.rank != 0 or self.ready.exists():
            return
        self.ready.touch()
        deadline = time.monotonic() + 300
        # The request: this process's own signal handler, or under Ray the driver's, set by a watcher thread.
        while not stopping.code() and time.monotonic() < deadline:
            time.sleep(0.05)


class RecordTags:
    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, step, env, images, labels=None) -> None:
        tags = (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()  # as tests.test_data.tag
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank{env.rank}.jsonl", "a") as f:
            record = {"step": step, "world": env.world_size, "tags": tags}
            if labels is not None:
                record["labels"] = labels.tolist()
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--signal", choices=("KILL", "TERM", "INT"), action="append", default=[])
    parser.add_argument("--after", type=int, action="append", default=[])
    parser.add_argument("--rank", type=int, action="append", default=[])
    parser.add_argument("--record", type=Path)
    parser.add_argument("--pause-after", type=int, default=0)
    parser.add_argument("--until", type=Path)
    parser.add_argument("--stop-after", type=int, default=0)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--marker", help="the once-only marker file (default: in run.dir, when that is a folder)")
    parser.add_argument(
        "--kill-after-checkpoint",
        type=int,
        metavar="STEP",
        help="SIGKILL right after the checkpoint of STEP is stored (once per --marker)",
    )
    args, train_args = parser.parse_known_args()
    if args.kill_after_checkpoint:
        kill_after_checkpoint(args.kill_after_checkpoint, Path(args.marker))
    hooks = []
    for i, name in enumerate(args.signal):
        run_dir = next(a.split("=", 1)[1] for a in train_args if a.startswith("run.dir="))
        after, rank = args.after[i], args.rank[i] if i < len(args.rank) else 0
        marker = Path(
            args.marker if args.marker and len(args.signal) == 1 else f"{run_dir}/.signalled_after_step_{after}"
        )
        hooks.append(SignalAfterStep(signal.Signals[f"SIG{name}"], after, rank, marker))
    if args.pause_after:
        hooks.append(PauseUntil(args.pause_after, args.until.absolute()))
    if args.stop_after:
        hooks.append(WaitForStop(args.stop_after, args.ready.absolute()))
    if args.record:
        hooks.append(RecordTags(args.record.absolute()))
    sys.exit(main(train_args, hooks=hooks))
