"""`python -m qbackend`: the same as the `qbackend` command."""

from qbackend.app.cli import process_main

process_main()
