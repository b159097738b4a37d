"""`python -m snapstore` runs the command line."""

import sys

from snapstore.cli import main

sys.exit(main())
