"""`python -m dcgan_dist.data`: the command lives in dcgan_dist.cli.data."""

import sys

from dcgan_dist.cli.data import main

if __name__ == "__main__":
    sys.exit(main())
