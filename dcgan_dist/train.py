"""`python -m dcgan_dist.train`: the command lives in dcgan_dist.cli.train."""

import sys

from dcgan_dist.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
