"""A run's checkpoints, the final model, and what a resume checks, written and read in one place.

Layout (HF/TRL conventions)::

    OUTPUT_DIR/
      adapter_model.safetensors, adapter_config.json, tokenizer files   the final policy (PEFT)
      value_model/                                                       PPO's value model
      checkpoint-K/                                                      after round (PPO) / step (GRPO) K
        adapter_model.safetensors, adapter_config.json, tokenizer ...    the policy at K (PEFT)
        ...                                                              the trainer's state (see each trainer)
        iif_checkpoint.json                                              written last: what K is

A checkpoint is complete when ``iif_checkpoint.json`` is in it: PPO writes the whole folder under
a temporary name and renames it; GRPO (Hugging Face's checkpoint writer) writes the file last.
A resume refuses, in one line, a checkpoint that is incomplete or damaged, from another run
directory, algorithm, LoRA layout, base model or process count, and a store whose rounds do not
go as far as the checkpoint's or whose last round is not the checkpoint's. The store's rounds
after the checkpoint (which the resumed run redoes) are moved aside, not mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.lora import LoraLayout
from ..iif.settings import IIFSettings
from ..store import AttributionStore, StoreError
from ..store.schema import RECORDS_FILE
from ..store.writer import plain_base_state
from .shared import gathered_state_dict

CHECKPOINT_PREFIX = "checkpoint-"
INFO_FILE = "iif_checkpoint.json"  # written last: a checkpoint without it is incomplete
FORMAT_VERSION = 1
SET_ASIDE_DIR = "set_aside"  # under the store: rounds a resumed run redid, kept apart from the run's own


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, said in one line."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is: the run it belongs to, how far it got, and what must match on resume."""

    format_version: int
    algorithm: str  # "ppo" | "grpo" | "rloo"
    round: int  # rounds completed (and stored, where the run stores)
    global_step: int  # the trainer's step count (PPO: rounds; GRPO and RLOO: optimizer steps)
    output_dir: str  # the run directory, resolved
    num_processes: int
    seed: int
    base_model: str  # the policy's base model, as loaded (its name or path; the class where it has none)
    lora: str  # a digest of the LoRA layout (adapter names and shapes)
    settings: dict[str, Any]  # training settings that a resumed run must share
    stored_rounds: int | None  # rounds in the store at the checkpoint (None: no store)
    last_round_digest: str | None  # a digest of the last stored round's records table

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, source: str) -> CheckpointInfo:
        if not isinstance(data, dict):
            raise CheckpointError(f"{source} is damaged: not a JSON object")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise CheckpointError(f"{source} is damaged: it lacks {', '.join(missing)}")
        if data["format_version"] != FORMAT_VERSION:
            raise CheckpointError(
                f"{source} has format version {data['format_version']!r}; this rlhf-influence reads {FORMAT_VERSION}"
            )
        kinds = {"round": int, "global_step": int, "num_processes": int, "seed": int, "settings": dict}
        for name, kind in kinds.items():
            if not isinstance(data[name], kind) or isinstance(data[name], bool):
                raise CheckpointError(f"{source} is damaged: {name} is {data[name]!r}")
        return cls(**{n: data[n] for n in names})


def lora_digest(layout: LoraLayout) -> str:
    """A short digest of the LoRA layout: each LoRA matrix's name and shape."""
    text = ";".join(f"{x.name}:{x.in_features}x{x.out_features}" for x in layout.linears)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# The config fields that say which architecture and size a model is (names differ by family).
ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
                       "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size", "n_inner")  # fmt: skip


def base_model_name(policy: nn.Module) -> str:
    """The base model a LoRA policy wraps: its name or path as loaded (else its class: built from a
    config) and a digest of its config (architecture and sizes)."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    name = getattr(base.config, "_name_or_path", "") or type(base).__name__
    config = base.config.to_dict()
    shape = {k: config.get(k) for k in ARCHITECTURE_FIELDS if config.get(k) is not None}
    return f"{name} ({', '.join(f'{k}={v}' for k, v in shape.items())})"


def round_digest(store: AttributionStore, round_index: int) -> str:
    """A digest of a stored round's records table (which run and round it is)."""
    data = (store.round_dir(round_index) / RECORDS_FILE).read_bytes()
    return hashlib.sha256(data).hexdigest()[:16]


def checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The run's complete checkpoints (with their info file), by step, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [
        p
        for p in out.iterdir()
        if p.is_dir() and checkpoint_step(p) is not None and (p / INFO_FILE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def resolve_checkpoint(output_dir: str | os.PathLike, value: str | bool | None) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names: a path, or ``true`` for the run's latest
    complete one (None when ``value`` is empty or false). CheckpointError when there is none."""
    if value is None or value is False or str(value).lower() in ("", "false", "none"):
        return None
    if value is True or str(value).lower() == "true":
        found = complete_checkpoints(output_dir)
        if not found:
            raise CheckpointError(
                f"--resume_from_checkpoint true: {Path(output_dir).resolve()} holds no complete checkpoint-K "
                "(checkpoints are written every --save_steps rounds)"
            )
        return found[-1]
    path = Path(value).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {value}: no such checkpoint directory")
    if not (path / INFO_FILE).is_file():
        raise CheckpointError(
            f"--resume_from_checkpoint {value}: not a complete rlhf-influence checkpoint (no {INFO_FILE}; "
            "a checkpoint being written when the run was killed, or not one of this package's)"
        )
    return path


def read_info(path: Path) -> CheckpointInfo:
    source = str(path / INFO_FILE)
    try:
        data = json.loads((path / INFO_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source} is unreadable: {exc}") from None
    return CheckpointInfo.from_json(data, source)


def write_info(path: Path, info: CheckpointInfo) -> None:
    """Write the info file atomically: the last thing a checkpoint gets, which makes it complete."""
    tmp = path / f".{INFO_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(info.to_json(), indent=2, sort_keys=True))
    os.replace(tmp, path / INFO_FILE)


# What a run had before a setting existed (its checkpoint does not name it): IIFSettings' defaults,
# and TRL's separate value model (value_head's own default, 'auto', settles on the models a run is
# given, and checkpoints hold the settled value)
SETTINGS_BEFORE_THEY_EXISTED = {**{f.name: f.default for f in fields(IIFSettings)}, "value_head": "separate"}


def check_resumable(found: CheckpointInfo, expected: CheckpointInfo, path: Path) -> None:
    """Refuse (CheckpointError) a checkpoint this run cannot continue: the first difference, in one line."""
    where = f"cannot resume from {path}"
    if found.algorithm != expected.algorithm:
        raise CheckpointError(
            f"{where}: it is a {found.algorithm.upper()} checkpoint, this run trains {expected.algorithm.upper()}"
        )
    if found.output_dir != expected.output_dir:
        raise CheckpointError(
            f"{where}: it belongs to the run in {found.output_dir}, not {expected.output_dir} (resume a run in its "
            "own --output_dir)"
        )
    if found.num_processes != expected.num_processes:
        raise CheckpointError(
            f"{where}: it was written by {found.num_processes} process(es), this run has {expected.num_processes} "
            "(resume with the same process count)"
        )
    if found.base_model != expected.base_model:
        raise CheckpointError(
            f"{where}: its base model is {found.base_model!r}, this run's is {expected.base_model!r}"
        )
    if found.lora != expected.lora:
        raise CheckpointError(f"{where}: its LoRA layout (target modules, rank) differs from this run's")
    if found.seed != expected.seed:
        raise CheckpointError(
            f"{where}: it was trained with --seed {found.seed}, this run has {expected.seed}"
        )
    for name in sorted(set(found.settings) | set(expected.settings)):
        a, b = found.settings.get(name), expected.settings.get(name)
        if name not in found.settings and b == SETTINGS_BEFORE_THEY_EXISTED.get(name):
            continue  # a setting newer than the checkpoint, at the default the checkpoint's run had
        if a != b:
            raise CheckpointError(f"{where}: it was trained with --{name} {a}, this run has {b}")
    if (found.stored_rounds is None) != (expected.stored_rounds is None):
        stores = "stores" if found.stored_rounds is not None else "stores no"
        raise CheckpointError(
            f"{where}: its run {stores} attribution, this one {'does not' if found.stored_rounds is not None else 'does'}"
        )


def check_store(store: AttributionStore | None, info: CheckpointInfo, path: Path) -> None:
    """The store must hold the checkpoint's rounds, its last one the checkpoint's own."""
    if store is None or info.stored_rounds is None:
        return
    if info.stored_rounds:  # the store's own checks: a manifest, no round missing among those on disk
        try:
            AttributionStore.open(store.path)
        except StoreError as exc:
            raise CheckpointError(f"cannot resume from {path}: {exc}") from None
    have = max(store.rounds(), default=0)
    if have < info.stored_rounds:
        raise CheckpointError(
            f"cannot resume from {path}: it was written after round {info.stored_rounds}, but {store.path} holds "
            f"{have} round(s) (the store was moved, cut or is another run's)"
        )
    if info.stored_rounds and round_digest(store, info.stored_rounds) != info.last_round_digest:
        raise CheckpointError(
            f"cannot resume from {path}: round {info.stored_rounds} in {store.path} is not the one the checkpoint "
            "saw (the store is another run's)"
        )


def checked_checkpoint(path: Path, expected: CheckpointInfo, store: AttributionStore | None, process_file: str) -> CheckpointInfo:
    """The checkpoint at ``path`` once every check passed (CheckpointError at the first that does
    not): complete and readable, this run's (``expected``), the store with its rounds, and this
    process's own state file there."""
    info = read_info(path)
    check_resumable(info, expected, path)
    check_store(store, info, path)
    if not (path / process_file).is_file():
        raise CheckpointError(f"cannot resume from {path}: it lacks {process_file} (this process's state)")
    return info


def set_aside_redone_rounds(store: AttributionStore | None, info: CheckpointInfo, accelerator) -> None:
    """The main process moves the store's rounds after the checkpoint aside (and says where); all wait."""
    if store is not None and accelerator.is_main_process:
        aside = set_aside_rounds(store, info.stored_rounds or 0)
        if aside is not None:
            warnings.warn(f"rounds after round {info.stored_rounds} (redone by this resume) moved to {aside}", stacklevel=3)
    accelerator.wait_for_everyone()


def set_aside_rounds(store: AttributionStore, after: int) -> Path | None:
    """Move the store's rounds after ``after`` (which a resumed run redoes) to
    ``attribution/set_aside/after_round_<after>-<time>/``, out of the run's rounds; the folder, or None."""
    later = [r for r in store.rounds() if r > after]
    if not later:
        return None
    aside = (
        store.path / SET_ASIDE_DIR / f"after_round_{after:06d}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    )
    aside.mkdir(parents=True)
    for r in later:
        os.replace(store.round_dir(r), aside / store.round_dir(r).name)
    return aside


def rotate_checkpoints(output_dir: str | os.PathLike, limit: int | None) -> list[Path]:
    """Remove the oldest complete checkpoints beyond ``limit`` (``--save_total_limit``); those removed."""
    if not limit:
        return []
    found = complete_checkpoints(output_dir)
    removed = found[: max(0, len(found) - limit)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class ResumableBatches:
    """The training batches, pass after pass over a shuffled data loader, with a position that a
    checkpoint keeps: the pass, the batches taken in it, and the random state the pass's shuffle
    was drawn from (the global torch stream and the loader's own generator, as the pass began).
    :meth:`load_state_dict` replays that shuffle and skips the taken batches, leaving every other random
    stream as it found it, so the batches that follow are the ones the uninterrupted run took."""

    def __init__(self, dataloader) -> None:
        self.dataloader = dataloader
        self.passes = 0  # complete passes
        self.taken = 0  # batches taken in the current pass
        self._iterator = None
        self._pass_start: dict[str, Any] | None = None

    def _generator(self):
        return getattr(self.dataloader, "synchronized_generator", None)

    def _random_state(self) -> dict[str, Any]:
        generator = self._generator()
        return {
            "torch": torch.get_rng_state(),
            "generator": None if generator is None else generator.get_state(),
        }

    def _set_random_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        generator = self._generator()
        if generator is not None and state["generator"] is not None:
            generator.set_state(state["generator"])

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._iterator is None:
                self._pass_start = self._random_state()
                if hasattr(self.dataloader, "iteration"):  # accelerate's loader counts its passes
                    self.dataloader.iteration = self.passes
                self._iterator = iter(self.dataloader)
                self.taken = 0
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.passes += 1
                continue
            self.taken += 1
            return batch

    def state_dict(self) -> dict[str, Any]:
        """The position, with the loader's own generator as it is now (the next pass draws from it)."""
        return {"passes": self.passes, "taken": self.taken, "pass_start": self._pass_start, "now": self._random_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was taken: the pass's shuffle replayed, its taken batches
        skipped, the loader's generator as it was then; the global torch stream is left as it is
        now (a checkpoint restores it with the others)."""
        self.passes, self._iterator = state["passes"], None
        torch_now = torch.get_rng_state()
        if state["pass_start"] is not None:  # a batch had been taken
            self._set_random_state(state["pass_start"])
            if hasattr(self.dataloader, "iteration"):
                self.dataloader.iteration = self.passes
            self._pass_start = state["pass_start"]
            self._iterator = iter(self.dataloader)
            for _ in range(state["taken"]):
                next(self._iterator)
            self.taken = state["taken"]
        self._set_random_state({"torch": torch_now, "generator": state["now"]["generator"]})


def run_checkpoint_info(
    algorithm: str, *, round: int, global_step: int, args, accelerator, policy: nn.Module, layout: LoraLayout,
    store: AttributionStore | None, settings: tuple[str, ...],
) -> CheckpointInfo:  # fmt: skip
    """What a checkpoint a trainer takes now is, and what a resume from it must match: ``settings``
    names the fields of ``args`` that a resumed run must share with it."""
    stored = None if store is None else max(store.rounds(), default=0)
    return CheckpointInfo(
        format_version=FORMAT_VERSION, algorithm=algorithm, round=round, global_step=global_step,
        output_dir=str(Path(args.output_dir).resolve()), num_processes=accelerator.num_processes, seed=args.seed,
        base_model=base_model_name(policy), lora=lora_digest(layout),
        settings={name: getattr(args, name) for name in settings},
        stored_rounds=stored, last_round_digest=round_digest(store, stored) if stored else None,
    )  # fmt: skip


def save_trained_policy(output_dir: Path, policy: nn.Module, accelerator, save_model) -> None:
    """The trained policy as TRL's scripts save it: ``save_model(dir)`` writes the adapter and the
    tokenizer, and a base model without a name is saved beside it (:func:`point_adapter_at_base`);
    every process must call it."""
    save_model(str(output_dir))
    base_state = base_state_to_save(policy)
    if accelerator.is_main_process:
        point_adapter_at_base(output_dir, policy, base_state)
    accelerator.wait_for_everyone()


def base_state_to_save(policy: nn.Module) -> dict[str, torch.Tensor] | None:
    """The base model's weights to save beside an adapter (gathered under ZeRO-3: every process
    must call it), or None where the base model has a name or path to load it by."""
    base = policy.get_base_model()
    if getattr(base.config, "_name_or_path", ""):
        return None
    return plain_base_state(gathered_state_dict(base))


def point_adapter_at_base(output_dir: Path, policy: nn.Module, base_state: dict[str, torch.Tensor] | None) -> None:
    """Make a saved adapter loadable with ``AutoPeftModelForCausalLM.from_pretrained(output_dir)``.

    An adapter names its base model by the name or path it was loaded from; a base model built
    from a config (the embedded tasks) has none, so its weights (``base_state``, from
    :func:`base_state_to_save`) are saved beside the adapter, in ``output_dir/base_model``, and
    the adapter's config points at it."""
    from safetensors.torch import save_file

    if base_state is None:
        return
    base, path = policy.get_base_model(), output_dir / "base_model"
    path.mkdir(parents=True, exist_ok=True)
    base.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in base_state.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    config_path = output_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(path.resolve())
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def trainable_weights_only(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
    """accelerate's save-state hook: keep only the trainable weights of each model (LoRA and the
    value model; the frozen base is the one the run loads again)."""
    for model, state in zip(models, weights, strict=True):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in trainable]:
            del state[key]


def load_trainable_weights(models: list[nn.Module], input_dir: str) -> None:
    """accelerate's load-state hook, the counterpart of :func:`trainable_weights_only`: load each
    model's trainable weights, checking that every one is there and nothing else; the models
    loaded are taken off ``models`` so that accelerate does not load them again."""
    from safetensors.torch import load_file

    for i, model in enumerate(list(models)):
        path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        if not path.is_file():
            raise CheckpointError(f"cannot resume from {Path(input_dir).parent}: it lacks {path.name}")
        state = load_file(str(path))
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if set(state) != trainable:
            missing = sorted(trainable - set(state))
            raise CheckpointError(
                f"cannot resume from {Path(input_dir).parent}: its weights do not match the model's trainable ones"
                + (
                    f" (first missing: {missing[0]})"
                    if missing
                    else f" (extra: {sorted(set(state) - trainable)[0]})"
                )
            )
        model.load_state_dict(state, strict=False)
    models.clear()
