"""`python -m loraft.cli ARGS` (how torchrun, accelerate launch and the UI start loraft): the `loraft` command."""

import sys

from loraft.cli import main

if __name__ == "__main__":
    sys.exit(main())
