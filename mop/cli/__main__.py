"""`python -m mop.cli`: the same command line as `mop`."""

import sys

from mop.cli import main

sys.exit(main())
