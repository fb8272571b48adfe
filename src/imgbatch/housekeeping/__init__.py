"""Cleaning up: gc of unreferenced images, apply --prune of orphaned shots."""
