"""The attribution store: one directory per run, one atomically written folder per round."""

from . import schema
from .manifest import FORMAT_VERSION, RunManifest, StoredGradients, StoreError, TrainingSettings
from .writer import AttributionStore

__all__ = [
    "FORMAT_VERSION",
    "AttributionStore",
    "RunManifest",
    "StoreError",
    "StoredGradients",
    "TrainingSettings",
    "schema",
]
