"""The `imgbatch` command, thin: parse, call the library, print, return an exit code."""

from imgbatch.cli.main import main

__all__ = ["main"]
