"""`python -m eaglespec.cli`, the same as the `eaglespec` command."""

import sys

from eaglespec.cli import main

sys.exit(main())
