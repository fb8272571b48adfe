"""Carry out a plan: the executor, one attempt, placing an image, bounds, interrupts."""
