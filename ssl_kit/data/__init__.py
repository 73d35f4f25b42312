"""Datasets: spec parsing, the registry of dataset kinds, in-memory and streamed loading, augmentation.

Importing the package registers every dataset kind (catalog.py) before any spec is parsed or index built."""
from . import catalog  # noqa: F401  (registers the dataset kinds)
