"""`python -m imgbatch` is the `imgbatch` command (and says so in its usage and version)."""

from imgbatch.cli.main import run

run()
