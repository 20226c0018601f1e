"""`python -m dcgan_dist.sample`: the command lives in dcgan_dist.cli.sample."""

import sys

from dcgan_dist.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
