"""`python -m reformer` (and `torchrun -m reformer`) runs the command-line tool."""

import sys

from .cli import main

sys.exit(main())
