"""The prompt data of a job on your own model: loading (hub, folder or file), checks, a
held-out split and the length filter."""

from __future__ import annotations

import os
from pathlib import Path

from accelerate import PartialState

from ..iif.target_kinds import target_kind
from .errors import fail, program
from .flags import JobArguments
from .models import (
    first_line,
)

DATA_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

def prompt_problem(value) -> str | None:
    """Why ``value`` is not a usable prompt (a non-empty string or a list of chat messages), or None."""
    if isinstance(value, str):
        return None if value.strip() else "empty text"
    if isinstance(value, list) and value:
        good = all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in value)  # fmt: skip
        return None if good else "a list that is not chat messages ({'role': str, 'content': str})"
    return f"not text or chat messages ({type(value).__name__}: {str(value)[:40]!r})"


def load_prompts(
    script_args: JobArguments,
    tokenizer,
    seed: int,
    context: int | None = None,
    response_length: int = 0,
    *,
    length_flag: str = "--response_length",
    pad_means_padding: str | None = "TRL's PPO",
):
    """(train, held-out) datasets with the prompt column and its token ids (``input_ids``), from
    any `datasets` source.

    Every prompt must be a non-empty string or a list of chat messages (else one clear line);
    prompts longer than --max_prompt_length tokens, or than the model's context leaves room for
    with ``response_length`` (the ``length_flag`` flag), are dropped, and the count is said. Where
    ``pad_means_padding`` (a trainer that reads every pad id as padding) prompts may not hold the
    pad token."""
    from datasets import load_dataset

    name = script_args.dataset_name
    if os.path.isfile(name) and os.path.getsize(name) < 4096 and not Path(name).read_bytes().strip():
        fail(f"data file {name!r} is empty")
    try:
        suffix = os.path.splitext(name)[1].lower()
        if os.path.isfile(name) and suffix in DATA_FILE_FORMATS:
            data = load_dataset(DATA_FILE_FORMATS[suffix], data_files={script_args.dataset_train_split: name})
        else:
            data = load_dataset(name, script_args.dataset_config)
    except Exception as exc:
        fail(
            f"cannot load dataset {name!r}: {type(exc).__name__}: {first_line(exc) or 'no rows could be read'}"
        )
    if script_args.dataset_train_split not in data:
        fail(f"dataset {name!r} has no split {script_args.dataset_train_split!r} (it has {sorted(data)})")
    train = data[script_args.dataset_train_split]
    if script_args.prompt_column not in train.column_names:
        fail(
            f"dataset {name!r} has no column {script_args.prompt_column!r}; its columns are {train.column_names}. "
            "Choose one with --prompt_column."
        )
    if script_args.dataset_test_split:
        if script_args.dataset_test_split not in data:
            fail(f"dataset {name!r} has no split {script_args.dataset_test_split!r} (it has {sorted(data)})")
        heldout = data[script_args.dataset_test_split]
    else:
        if len(train) <= script_args.heldout_size:
            fail(f"{len(train)} prompts cannot spare --heldout_size {script_args.heldout_size} held-out ones")
        parts = train.train_test_split(test_size=script_args.heldout_size, seed=seed)
        train, heldout = parts["train"], parts["test"]

    column = script_args.prompt_column
    for split, ds in (("training", train), ("held-out", heldout)):
        problems = [(i, why) for i, value in enumerate(ds[column]) if (why := prompt_problem(value))]
        if problems:
            row, why = problems[0]
            fail(
                f"{len(problems)} of {len(ds)} {split} prompts in column {column!r} are unusable; the first, row "
                f"{row}, is {why}. Every prompt must be a non-empty string or a list of chat messages"
            )
    limit = script_args.max_prompt_length
    if context is not None:
        if context - response_length < 1:
            fail(
                f"{length_flag} {response_length} leaves no room for a prompt in the model's context of {context}"
            )
        limit = min(limit, context - response_length)

    def tokenise(row):
        prompt = row[column]
        if isinstance(prompt, list):  # chat messages
            ids = tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "length": len(ids)}

    def prepare(ds):
        ds = ds.map(tokenise, remove_columns=[c for c in ds.column_names if c != column])
        with_pad = sum(tokenizer.pad_token_id in ids for ids in ds["input_ids"]) if pad_means_padding else 0
        if with_pad:
            fail(
                f"{with_pad} prompt(s) contain the pad token {tokenizer.pad_token!r}, which {pad_means_padding} reads "
                "as padding (it masks it out); choose another pad token with --pad_token"
            )
        kept = ds.filter(lambda row: 0 < row["length"] <= limit)
        if len(kept) < len(ds) and PartialState().is_main_process:
            why = f"--max_prompt_length {script_args.max_prompt_length}"
            if limit < script_args.max_prompt_length:
                why = f"the model's context of {context} tokens minus {length_flag} {response_length}"
            print(
                f"{program()}: dropped {len(ds) - len(kept)} of {len(ds)} prompts longer than {limit} tokens ({why})"
            )
        return kept

    return prepare(train), prepare(heldout)


def heldout_target(heldout, training_args):
    """The held-out prompts the target samples from, or None where IIF is off or targets the buffer
    (a note where a round takes more held-out samples than there are prompts)."""
    wanted = target_kind(training_args.iif_target or "heldout_return").needs_heldout
    target = heldout if training_args.iif_enabled and wanted else None
    if (
        target is not None
        and training_args.iif_num_heldout_prompts > len(target)
        and PartialState().is_main_process
    ):
        print(
            f"{program()}: note: the {training_args.iif_num_heldout_prompts} held-out samples a round takes "
            f"(--iif_num_heldout_prompts) cycle through the {len(target)} held-out prompts there are"
        )
    return target
