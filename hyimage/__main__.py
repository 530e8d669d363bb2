"""`python -m hyimage`: the `hyimage` command (what torchrun runs with -m hyimage)."""

import sys

from hyimage.cli import main

sys.exit(main())
