"""Write a run's attribution: a manifest, and per round a Parquet table and metrics JSON.

Layout::

    RUN/attribution/
      manifest.json            format version, what the run scored and how
      round_000001/
        records.parquet        one row per record: prompt, response, reward, influence, kept ...
        metrics.json           the round's logged metrics

Each round is written under a temporary name and renamed into place, so a killed run leaves
only whole rounds. No pickle anywhere: Parquet and JSON are readable without this package.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
ROUND_PREFIX = "round_"


class StoreError(Exception):
    """A directory that is not a readable attribution store; the message says what is wrong."""


class AttributionStore:
    """The attribution directory of one run."""

    @classmethod
    def open(cls, path: str | os.PathLike) -> AttributionStore:
        """Open an existing store for reading: a run directory or its ``attribution`` folder.

        Raises:
            StoreError: not a run, no manifest, a manifest from a newer format version.
        """
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"{path} is not a directory")
        if not (path / "manifest.json").is_file() and (path / "attribution" / "manifest.json").is_file():
            path = path / "attribution"
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise StoreError(f"{path} is not an rlhf-influence run (no attribution/manifest.json)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{manifest_path} is unreadable: {exc}") from None
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(
                f"{manifest_path} has format version {version!r}; this rlhf-influence reads up to "
                f"{FORMAT_VERSION}: upgrade rlhf-influence"
            )
        store = cls(path)
        store.manifest = manifest
        return store

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest: dict[str, Any] = {}

    def round_dir(self, round_index: int) -> Path:
        return self.path / f"{ROUND_PREFIX}{round_index:06d}"

    def rounds(self) -> list[int]:
        """Indices of the complete rounds on disk, ascending."""
        if not self.path.is_dir():
            return []
        out = []
        for entry in self.path.iterdir():
            name = entry.name
            if entry.is_dir() and name.startswith(ROUND_PREFIX) and name[len(ROUND_PREFIX) :].isdigit():
                out.append(int(name[len(ROUND_PREFIX) :]))
        return sorted(out)

    def write_manifest(self, info: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = {"format": "rlhf-influence attribution store", "format_version": FORMAT_VERSION, **info}
        tmp = self.path / f".manifest.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.replace(tmp, self.path / "manifest.json")

    def write_round(self, round_index: int, records: dict[str, list], metrics: dict[str, Any]) -> Path:
        """Write one round atomically. ``records`` maps column name to one value per record."""
        final = self.round_dir(round_index)
        if final.exists():
            raise FileExistsError(f"round {round_index} is already in the store at {final}")
        tmp = self.path / f".{final.name}.tmp-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir(parents=True)
        try:
            pq.write_table(pa.table(records), tmp / "records.parquet")
            (tmp / "metrics.json").write_text(
                json.dumps({"round": round_index, **metrics}, indent=2, sort_keys=True)
            )
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def read_records(self, round_index: int) -> pa.Table:
        """The records table of a round (raises StoreError if it is missing or damaged)."""
        path = self.round_dir(round_index) / "records.parquet"
        try:
            return pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"round {round_index}: cannot read {path}: {exc}") from None

    def read_metrics(self, round_index: int) -> dict[str, Any]:
        path = self.round_dir(round_index) / "metrics.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"round {round_index}: cannot read {path}: {exc}") from None
