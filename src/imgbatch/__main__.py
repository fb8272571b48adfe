"""`python -m imgbatch` is the `imgbatch` command."""

from imgbatch.cli import main

main()
