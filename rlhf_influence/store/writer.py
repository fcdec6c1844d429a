"""The attribution store: writes and reads a run's rounds in the layout of :mod:`.schema`.

Each round is written under a temporary name and renamed into place, so a killed run leaves
only whole rounds. No pickle anywhere: Parquet, JSON and safetensors are readable without this
package.
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
import torch
from safetensors.torch import load_file, save_file

from ..iif.records import ScoredRecords
from .manifest import RunManifest, StoreError
from .schema import (
    MANIFEST_FILE,
    METRICS_FILE,
    MODEL_INFO_FILE,
    RECORD_COLUMNS,
    RECORDS_FILE,
    ROUND_PREFIX,
    STORE_DIR,
    TEMPORARY_PREFIXES,
    TENSOR_DIMS,
    records_from_stored,
)


def current_umask() -> int:
    """The process's umask, read without changing it (Linux), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give ``path`` and everything under it the modes a plain ``open``/``mkdir`` would have.

    safetensors writes its files 0600 and ``tempfile.mkdtemp`` makes 0700 folders whatever the
    umask, so a teammate could not read a shared run or cache.
    """
    mask = current_umask()
    targets = [path, *path.rglob("*")] if path.is_dir() else [path]
    for target in targets:
        if target.is_symlink():
            continue
        target.chmod((0o777 if target.is_dir() else 0o666) & ~mask)


def plain_base_state(peft_base_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's weights under a PEFT wrapper, named as in the plain model (no LoRA ones)."""
    return {k.replace(".base_layer.", "."): v for k, v in peft_base_state.items() if "lora_" not in k}


def save_base_model(peft_base, path: Path) -> None:
    """Save the frozen base model under a PEFT wrapper as a plain transformers checkpoint."""
    from transformers import AutoModelForCausalLM

    state = plain_base_state(peft_base.state_dict())
    with torch.random.fork_rng(devices=[]):  # building the model must not move training's random stream
        plain = AutoModelForCausalLM.from_config(peft_base.config, dtype=next(iter(state.values())).dtype)
    plain.load_state_dict(state, strict=True)
    plain.save_pretrained(path)


class AttributionStore:
    """The attribution directory of one run."""

    @classmethod
    def open(cls, path: str | os.PathLike) -> AttributionStore:
        """Open an existing store for reading: a run directory or its ``attribution`` folder.

        Raises:
            StoreError: not a run, no manifest, a manifest from a newer format version or damaged.
        """
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"{path} is not a directory")
        if not (path / MANIFEST_FILE).is_file() and (path / STORE_DIR / MANIFEST_FILE).is_file():
            path = path / STORE_DIR
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise StoreError(f"{path} is not an rlhf-influence run (no attribution/manifest.json)")
        try:
            data = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{manifest_path} is unreadable: {exc}") from None
        store = cls(path)
        store._manifest = RunManifest.from_json(data, source=str(manifest_path))
        rounds = store.rounds()
        missing = sorted(set(range(1, rounds[-1] + 1)) - set(rounds)) if rounds else []
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            raise StoreError(
                f"{path} is damaged: round(s) {shown} missing among rounds 1..{rounds[-1]} (rounds are written "
                "in sequence, so one was removed or lost)"
            )
        return store

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._manifest: RunManifest | None = None

    @property
    def manifest(self) -> RunManifest:
        """The run's manifest, read at :meth:`open` (or as :meth:`write_manifest` wrote it)."""
        if self._manifest is None:
            raise StoreError(f"{self.path}: no manifest read or written yet")
        return self._manifest

    @property
    def run_dir(self) -> Path:
        """The run's directory: the store's parent when the store is the run's ``attribution`` folder."""
        return self.path.parent if self.path.name == STORE_DIR else self.path

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

    def stale_temporaries(self) -> list[Path]:
        """Half-written rounds (and manifests) that a killed run left under their temporary names."""
        if not self.path.is_dir():
            return []
        return sorted(
            p for p in self.path.iterdir() if p.name.startswith(TEMPORARY_PREFIXES) and ".tmp-" in p.name
        )

    def remove_stale_temporaries(self) -> list[str]:
        """Remove what :meth:`stale_temporaries` finds (a writer opening the store does); their names."""
        removed = []
        for path in self.stale_temporaries():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
        return removed

    def write_manifest(self, manifest: RunManifest) -> None:
        """Write ``manifest.json`` atomically (under a temporary name, then renamed)."""
        if not isinstance(manifest, RunManifest):
            raise TypeError(f"write_manifest takes a RunManifest, got {type(manifest).__name__}")
        text = json.dumps(manifest.to_json(), indent=2, sort_keys=True, default=str)
        RunManifest.from_json(json.loads(text), source="the manifest to write")  # reads back, or StoreError
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{MANIFEST_FILE}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, self.path / MANIFEST_FILE)
        self._manifest = manifest

    def write_model_files(self, files: dict[str, Any]) -> None:
        """Keep what rebuilds a round's policy later: tokenizer, LoRA config, base model or its name."""
        self.path.mkdir(parents=True, exist_ok=True)
        files["tokenizer"].save_pretrained(self.path / "tokenizer")
        files["peft_config"].save_pretrained(self.path / "adapter")
        base = files.get("base_model")
        if base is not None:
            save_base_model(base, self.path / "base_model")
            honour_umask(self.path / "base_model")
        info = {
            "base_model_saved": base is not None,
            "base_model_reference": files.get("base_model_reference"),
        }
        (self.path / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2))

    def write_round(
        self,
        round_index: int,
        records: dict[str, list],
        metrics: dict[str, Any],
        tensors: dict[str, dict[str, Any]] | None = None,
    ) -> Path:
        """Write one round atomically. ``records`` maps column name to one value per record;
        ``tensors`` maps a file name to named tensors (saved as ``<name>.safetensors``)."""
        final = self.round_dir(round_index)
        if final.exists():
            raise FileExistsError(f"round {round_index} is already in the store at {final}")
        tmp = self.path / f".{final.name}.tmp-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir(parents=True)
        try:
            pq.write_table(pa.table(records), tmp / RECORDS_FILE)
            for name, named in (tensors or {}).items():
                save_file({k: v.contiguous() for k, v in named.items()}, str(tmp / f"{name}.safetensors"))
            (tmp / METRICS_FILE).write_text(
                json.dumps({"round": round_index, **metrics}, indent=2, sort_keys=True)
            )
            honour_umask(tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def read_records(self, round_index: int) -> pa.Table:
        """The records table of a round, checked against :data:`RECORD_COLUMNS` (StoreError if damaged)."""
        path = self.round_dir(round_index) / RECORDS_FILE
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"round {round_index}: cannot read {path}: {exc}") from None
        if table.num_rows == 0:
            raise StoreError(f"round {round_index}: {path} holds no records")
        for name, (is_kind, kind) in RECORD_COLUMNS.items():
            if name not in table.column_names:
                raise StoreError(f"round {round_index}: {path} lacks the column {name!r}")
            column = table.column(name)
            if not is_kind(column.type):
                raise StoreError(
                    f"round {round_index}: {path} column {name!r} holds {column.type}, not {kind}"
                )
            if column.null_count:
                raise StoreError(
                    f"round {round_index}: {path} column {name!r} has {column.null_count} empty value(s)"
                )
        return table

    def read_tensors(self, round_index: int, name: str) -> dict[str, torch.Tensor]:
        """``gradients`` (``projected``: [N, D']) or ``adapter`` (LoRA weights at the round start)."""
        path = self.round_dir(round_index) / f"{name}.safetensors"
        if not path.is_file():
            raise StoreError(f"round {round_index} has no {name}.safetensors (the run stored none)")
        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise StoreError(f"round {round_index}: cannot read {path}: {exc}") from None
        for key, dims in TENSOR_DIMS.get(name, {}).items():
            if key not in tensors or tensors[key].dim() != dims:
                raise StoreError(f"round {round_index}: {path} lacks a {dims}-D tensor {key!r}")
        return tensors

    def read_records_tensors(
        self, round_index: int, name: str, pad_token_id: int, positions_from_mask: bool
    ) -> ScoredRecords:
        """The records a round stored in ``name`` (``batch``: the round's; ``target``: the held-out
        target's), with the algorithm's position convention."""
        return records_from_stored(self.read_tensors(round_index, name), pad_token_id, positions_from_mask)

    def read_metrics(self, round_index: int) -> dict[str, Any]:
        path = self.round_dir(round_index) / METRICS_FILE
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"round {round_index}: cannot read {path}: {exc}") from None
        if not isinstance(metrics, dict):
            raise StoreError(
                f"round {round_index}: {path} is damaged: a JSON {type(metrics).__name__}, not an object"
            )
        return metrics

    def read_model_info(self) -> dict[str, Any]:
        """model.json: whether the base model was saved, or what it is called (StoreError if damaged)."""
        path = self.path / MODEL_INFO_FILE
        if not path.is_file():
            raise StoreError(
                f"{self.path} keeps no model files (model.json); the run predates stored snapshots"
            )
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {path}: {exc}") from None
        if not (
            isinstance(info, dict)
            and isinstance(info.get("base_model_saved"), bool)
            and isinstance(info.get("base_model_reference"), str | None)
        ):
            raise StoreError(
                f"{path} is damaged: expected base_model_saved (true/false) and base_model_reference"
            )
        return info
