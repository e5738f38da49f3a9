"""Data sets: synthetic phantoms, crop stores, splits and the tensors the engine trains on.

Importing this package registers the built-in data sets.
"""
from bench.datasets import loading  # noqa: F401  (registers "synthetic")
