"""`python -m dcgan_dist.bench`: the command lives in dcgan_dist.cli.bench."""

import sys

from dcgan_dist.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
