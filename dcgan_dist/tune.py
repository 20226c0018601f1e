"""`python -m dcgan_dist.tune`: the command lives in dcgan_dist.cli.tune."""

import sys

from dcgan_dist.cli.tune import main

if __name__ == "__main__":
    sys.exit(main())
