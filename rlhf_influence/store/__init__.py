"""The attribution store: one directory per run, one atomically written folder per round."""

from .writer import FORMAT_VERSION, AttributionStore, StoreError

__all__ = ["FORMAT_VERSION", "AttributionStore", "StoreError"]
