"""`python -m qbackend`: the same as the `qbackend` command."""

import sys

from qbackend.app.cli import main

sys.exit(main())
