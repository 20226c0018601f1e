"""`python tests/kill_after_step.py STEP RANK [train arguments]`: `python -m dcgan_dist.train` in which rank RANK
SIGKILLs itself right after step STEP, once per run directory (a marker file there), so that the resumed or
restarted run passes that step. The kill is injected through the Trainer's step hooks; under dist.launcher=ray
the hook travels to the Ray workers (pickled by value, being defined in this script)."""

import os
import signal
import sys
from pathlib import Path

from dcgan_dist.train import main


class KillAfterStep:
    def __init__(self, step: int, rank: int, marker: Path):
        self.step, self.rank, self.marker = step, rank, marker

    def __call__(self, step, env) -> None:
        if step != self.step or env.rank != self.rank or self.marker.exists():
            return
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.touch()
        sys.stdout.write(f"fault injection: rank {env.rank} kills itself after step {step}\n")
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    step, rank, *args = sys.argv[1:]
    run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("run.dir=")))
    sys.exit(main(args, hooks=[KillAfterStep(int(step), int(rank), run_dir / f".killed_after_step_{step}")]))
