"""Manifest -> shots: expansion, the normalized request and its key, references, --only."""
