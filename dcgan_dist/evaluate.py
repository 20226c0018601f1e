"""`python -m dcgan_dist.evaluate`: the command lives in dcgan_dist.cli.evaluate."""

import sys

from dcgan_dist.cli.evaluate import main, run  # noqa: F401  (main: for callers in this process)

if __name__ == "__main__":
    sys.exit(run())
