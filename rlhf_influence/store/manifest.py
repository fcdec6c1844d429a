"""The attribution store's manifest (``manifest.json``): what a run scored, and how, as typed dataclasses.

Written by the trainer once per run and read by every analysis. :meth:`RunManifest.from_json`
reads every manifest written so far: keys added after the first stores get the values those
stores implied (``keep_steps`` false, ``training`` None, ...); unknown keys are ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ..iif.training_settings import Algorithm, TrainingSettings

FORMAT_VERSION = 1  # the newest manifest layout this package writes and reads



class StoreError(Exception):
    """A directory that is not a readable attribution store; the message says what is wrong."""


def _expected(hint: Any) -> str:
    """``hint`` in words, for error messages."""
    if hint is type(None):
        return "null"
    if hint is bool:
        return "true/false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "text"
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if dataclasses.is_dataclass(hint):
        return "an object"
    return " or ".join(_expected(a) for a in typing.get_args(hint))


def _convert(value: Any, hint: Any, name: str, source: str) -> Any:
    """``value`` as type ``hint`` (a union of None, bool, int, float, str, a Literal or a manifest
    dataclass); StoreError naming the field ``name`` when it is not one."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option in (bool, str) and type(value) is option:
            return value
        if option is int and type(value) is int:
            return value
        if option is float and type(value) in (int, float):
            return float(value)
        if typing.get_origin(option) is Literal and value in typing.get_args(option):
            return value
        if option is TrainingSettings and isinstance(value, dict):
            return _training_from_json(value, source, f"{name}.")
        if dataclasses.is_dataclass(option) and isinstance(value, dict):
            return option.from_json(value, source=source, prefix=f"{name}.")
    raise StoreError(f"{source} is damaged: the field {name!r} holds {value!r}, not {_expected(hint)}")


def _fields_from_json(cls: type, data: Any, source: str, prefix: str) -> dict[str, Any]:
    """The keyword arguments of ``cls`` read from ``data``: each field checked against its type
    hint; a missing field takes the dataclass default (StoreError when it has none)."""
    if not isinstance(data, dict):
        where = f"the field {prefix[:-1]!r}" if prefix else source
        raise StoreError(f"{source} is damaged: {where} is a JSON {type(data).__name__}, not an object")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], name, source)
        elif f.default is dataclasses.MISSING:
            raise StoreError(f"{source} is damaged: it lacks the field {name!r}")
    return kwargs


def _training_from_json(data: Any, source: str, prefix: str) -> TrainingSettings:
    """Read the ``training`` object; StoreError naming the field if it is wrong or if a setting its
    algorithm's replay needs is missing."""
    settings = TrainingSettings(**_fields_from_json(TrainingSettings, data, source, prefix))
    for name in settings.missing():
        raise StoreError(f"{source} is damaged: a {settings.algorithm.upper()} run lacks the field {prefix + name!r}")
    return settings


@dataclass(frozen=True, kw_only=True)
class StoredGradients:
    """How each record's gradient was taken, projected and stored (``gradients.safetensors``)."""

    projection: str  # in words: per LoRA adapter side, then a sketch when it folds
    dim: int  # the random projection's size per LoRA adapter side
    sketch_dim: int | None = None  # the sparse sign sketch's size; None: no sketch (and stores before it)
    seed: int  # seed of the projection (and the sketch)
    dtype: str  # precision of the stored vectors: "float16" or "float32"
    size: int  # entries stored per record
    taken: Literal["snapshot", "training"] = "snapshot"  # in a pass at the round start, or from the
    # optimisation's own backward (iif_store_gradients: each record's first trained step, at its weights)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, *, source: str = "manifest", prefix: str = "") -> StoredGradients:
        """Read the ``stored_gradients`` object; StoreError naming the field if it is wrong."""
        return cls(**_fields_from_json(cls, data, source, prefix))


@dataclass(frozen=True, kw_only=True)
class RunManifest:
    """A run's manifest: its IIF settings, how it ran, and what the store keeps of each round."""

    format_version: int = FORMAT_VERSION  # layout of the store; a reader refuses newer ones
    algorithm: Algorithm = "ppo"  # the trainer: "ppo" (stores before GRPO), "grpo" or "rloo"
    target: str = "heldout_return"  # what influence was measured on: "heldout_return" or "buffer_return"
    schedule: str  # "round": scored once a round; "epoch": before every epoch; "step": inside the round's step
    drop_fraction: float  # fraction p of the negative-influence records dropped
    filter: str = "influence"  # "influence" (IIF) or "random" (the control)
    min_keep_fraction: float  # never fewer kept records than this fraction of a round
    keep_steps: bool = False  # whether filtered rounds kept PPO's number of mini-batches
    whiten_after_filter: bool = False  # whether the kept records' advantages were whitened anew
    projection_dim: int  # 0: exact scores; k: scored with gradients projected to k per side
    projection_seed: int  # seed of that scoring projection
    num_processes: int  # training processes
    distributed_type: str | None = None  # accelerate's ("NO", "MULTI_GPU", ...); None: not recorded
    mixed_precision: str | None = None  # accelerate's ("no", "bf16", ...); None: not recorded
    records_per_round: int  # records scored each round, over all processes
    num_ppo_epochs: int | None = None  # PPO epochs a round (None for GRPO)
    lora_parameters: int  # trainable LoRA parameters
    lora_adapters: int  # LoRA adapter sides (A and B of each adapted layer)
    temperature: float = 1.0  # sampling temperature that the log-probs were taken at
    training: TrainingSettings | None = None  # for replaying a round; None in stores that predate it
    stored_gradients: StoredGradients | None = None  # None: the run stored no gradients
    snapshot_dtype: str = "float32"  # precision of the stored round-start adapter weights
    group_size: int | None = None  # completions per prompt for GRPO and RLOO; None for PPO
    score: str = "raw"  # "raw" <grad f, -grad loss_i> or "adam" (preconditioned by Adam's second moment)
    optimizer_state: bool = (
        False  # whether each round keeps Adam's round-start moments (optimizer.safetensors)
    )

    def to_json(self) -> dict[str, Any]:
        """The manifest as ``manifest.json`` holds it."""
        return {"format": "rlhf-influence attribution store", **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Any, *, source: str = "manifest") -> RunManifest:
        """Read a parsed ``manifest.json`` of any version up to :data:`FORMAT_VERSION`.

        Raises:
            StoreError: not an object, a newer format version, or a field missing or of the wrong type
                (the message names it; ``source`` names the file).
        """
        if not isinstance(data, dict):
            raise StoreError(f"{source} is damaged: a JSON {type(data).__name__}, not an object")
        version = data.get("format_version")
        if type(version) is not int or version > FORMAT_VERSION:
            raise StoreError(
                f"{source} has format version {version!r}; this rlhf-influence reads up to "
                f"{FORMAT_VERSION}: upgrade rlhf-influence"
            )
        manifest = cls(**_fields_from_json(cls, data, source, ""))
        if manifest.training is not None and manifest.training.algorithm != manifest.algorithm:
            raise StoreError(
                f"{source} is damaged: the field 'training.algorithm' is {manifest.training.algorithm!r}, "
                f"the run's algorithm {manifest.algorithm!r}"
            )
        return manifest
