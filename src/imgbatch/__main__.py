"""`python -m imgbatch` is the `imgbatch` command."""

from imgbatch.cli.main import main

main()
