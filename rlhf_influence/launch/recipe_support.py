"""What the recipes (recipes/ppo_iif.py, recipes/grpo_iif.py, recipes/rloo_iif.py) share, whatever the algorithm.

Flag parsing (an embedded task's settings as defaults that flags override, argparse's and the
configs' errors as one line), the prompt data of a job on your own model (loading, checks,
a held-out split, the length filter), the policy, its LoRA config and a named reward or reward
model, the checks of flags and of the run's directory, the training call that Ctrl-C and
SIGTERM stop cleanly, and the summary at the end. Every error is one line,
``<recipe>: error: <message>``, and a non-zero exit, before any training.
"""

from __future__ import annotations

import functools
import math
import os
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import torch
from accelerate import PartialState
from trl import ModelConfig, TrlParser, get_peft_config

from ..engine.checks import whole_number_problem
from ..iif.target_kinds import target_kind
from ..store.schema import MANIFEST_FILE, STORE_DIR
from ..tasks import DEFAULT_TASK, TASKS, TaskSpec, get_task
from ..tasks.rewards import REWARD_FUNCTIONS, keyword_reward
from ..trainer.checkpoint import CheckpointError, complete_checkpoints, resolve_checkpoint
from ..trainer.rewards import RewardError, import_reward
from .models import (
    ModelLoadError,
    check_fits_in_memory,
    first_line,
    gguf_cache_path,
    gguf_checkpoint,
    parameter_count,
    require_gguf_package,
    split_gguf_path,
)

NAMED_REWARDS = (*REWARD_FUNCTIONS, "keywords")  # --reward_function by name; anything else is an import path
DATA_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

_program = "recipe"  # the running recipe's file name, which starts every message


def set_program(name: str) -> None:
    """Name the running recipe (``ppo_iif.py``) in its errors and notes."""
    global _program
    _program = name


def program() -> str:
    return _program


class RecipeError(Exception):
    """A job the recipe refuses, with the one line that says why (:func:`one_line_errors` prints it)."""


def fail(message: str) -> NoReturn:
    """Refuse the job with a clear one-line message (before any training, or with the rounds so far kept)."""
    raise RecipeError(message)


def one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
    """A recipe's ``main`` whose refusals (:class:`RecipeError`) end the program with their one line,
    ``<recipe>: error: <why>``, on stderr and exit status 2, as argparse's own errors do."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except RecipeError as exc:
            print(f"{_program}: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return run


def one_line(exc: BaseException) -> str:
    """An exception's whole message on one line, without a closing full stop."""
    return " ".join(str(exc).split()).rstrip(".")


@dataclass
class JobArguments:
    """Data and reward of a job on your own model (the policy comes from ModelConfig), or which
    embedded task runs without one. Each recipe adds its own fields in a subclass."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Prompt dataset: a hub name, a local dataset directory, or a .json/.jsonl/.parquet/.csv file."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split with the training prompts."})
    dataset_test_split: str | None = field(
        default=None,
        metadata={
            "help": "Split with held-out prompts for the heldout_return target; without it, "
            "--heldout_size prompts are set aside from the training split."
        },
    )
    heldout_size: int = field(
        default=256, metadata={"help": "Prompts set aside as held-out when there is no test split."}
    )
    prompt_column: str = field(
        default="prompt",
        metadata={
            "help": "Column holding the prompt text (or chat messages, formatted with the chat template)."
        },
    )
    max_prompt_length: int = field(
        default=256, metadata={"help": "Prompts longer than this many tokens are dropped."}
    )
    reward_function: str | None = field(
        default=None,
        metadata={
            "help": "A Python reward used instead of the --reward_model_path model: 'sentiment' (VADER "
            "lexicon), 'keywords', or your own by import path, 'package.module:function' (or "
            "'package.module.function'), called as f(prompts, completions) with two lists of strings and "
            "returning one finite float per completion (checked; a wrong one stops the run with the complete "
            "rounds on disk).",
        },
    )
    reward_keywords: list[str] | None = field(
        default=None, metadata={"help": "Words rewarded by --reward_function keywords (one point each)."}
    )
    embedded_task: str = field(
        default=DEFAULT_TASK,
        metadata={
            "help": "Without --model_name_or_path: which embedded task runs (its own settings are the "
            "defaults; flags still win). "
            + " ".join(f"{name!r}: {spec.summary}." for name, spec in TASKS.items()).replace("%", "%%")
            + " Pre-trained and converted models are cached under $RLHF_INFLUENCE_CACHE or ~/.cache/rlhf_influence.",
            "choices": list(TASKS),
        },
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "A GGUF checkpoint inside the --model_name_or_path directory (or a path to one). A "
            "--model_name_or_path ending in .gguf needs no --gguf_file. Converted once into a cached "
            "transformers checkpoint, from which the job's models and the store's files come."
        },
    )


# ---------------------------------------------------------------------------------------------- flags
# What Hugging Face's checkpoint flags mean in the recipes (their own help speaks of a Trainer's steps).
CHECKPOINT_HELP = {
    "save_steps": "Write output_dir/checkpoint-K every this many rounds (PPO) or optimizer steps (GRPO, RLOO; a "
    "checkpoint falls at the end of the round its step is in).",
    "save_total_limit": "Keep only the newest this many checkpoints.",
    "save_strategy": "'steps': checkpoints every --save_steps; 'no': none.",
    "resume_from_checkpoint": "Continue a stopped run: 'true' for its latest complete checkpoint in --output_dir, or "
    "a checkpoint-K path; the same command otherwise. The store's rounds after the checkpoint are moved to "
    "attribution/set_aside/. A checkpoint of another run, algorithm, model, LoRA layout, seed or process count is "
    "refused.",
}


class Parser(TrlParser):
    """TRL's parser with argparse's own errors (bad choices, bad types) in one line, no usage block,
    and the checkpoint flags' help as the recipes mean them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for action in self._actions:
            if action.dest in CHECKPOINT_HELP:
                action.help = CHECKPOINT_HELP[action.dest]

    def error(self, message: str):
        fail(f"{message} (see --help)")


def parse(
    argv: list[str] | None,
    dataclass_types: tuple[type, type, type],
    task_settings: Callable[[TaskSpec], dict[str, Any]],
    defaults: dict[str, Any],
    explain: Callable[[str], str] = lambda message: message,
):
    """(job arguments, training config, ModelConfig) from the command line and any --config file.

    Without --model_name_or_path the embedded task's settings (``task_settings(spec)``) are the
    defaults, flags still win: which job it is comes first, from the job and model flags alone, so
    that the training config is built (and checked) once, with the task's settings under it.
    A config's ValueError (a setting out of range, settings that do not go together) becomes one
    line, through ``explain``.
    """
    try:
        return _parse(argv, dataclass_types, task_settings, defaults)
    except ValueError as exc:  # unknown flags, bad values (HfArgumentParser raises, not exits)
        fail(f"{explain(one_line(exc))}. See --help.")
    except OSError as exc:  # --config FILE that cannot be read
        fail(f"cannot read {getattr(exc, 'filename', None) or 'the --config file'}: {exc.strerror or exc}")


def _parse(argv, dataclass_types, task_settings, defaults):
    args = list(sys.argv[1:] if argv is None else argv)
    job_type, _, model_type = dataclass_types
    which = Parser((job_type, model_type))  # the job's kind, other flags left for the full parse
    job_args, model_args, _ = which.parse_args_and_config(
        [a for a in args if a not in ("-h", "--help")], return_remaining_strings=True
    )
    parser = Parser(dataclass_types)
    parser.set_defaults(**defaults)
    if model_args.model_name_or_path is None:  # an embedded task: its own settings, flags still win
        parser.set_defaults(**task_settings(get_task(job_args.embedded_task)))
    parser.set_defaults(**CHECKPOINT_DEFAULTS)
    return parser.parse_args_and_config(args)


# Every recipe run checkpoints (flags still win): every 20 rounds (PPO) or optimizer steps (GRPO, RLOO),
# the last 2 kept. Measured on the reviews task (benchmarks/checkpoint_cost.py, 2 CPU cores): a PPO
# checkpoint is 1.6 GB (the value model's weights and AdamW moments) in about 5 s, a quarter of a
# round, so every 20 rounds costs about 1.3% of the training time.
CHECKPOINT_DEFAULTS = {"save_strategy": "steps", "save_steps": 20, "save_total_limit": 2}


def device_defaults() -> dict[str, Any]:
    """LoRA is what IIF scores; the CPU where there is no GPU; bf16 only where the hardware has it."""
    cuda = torch.cuda.is_available()
    return {"use_peft": True, "use_cpu": not cuda, "bf16": cuda and torch.cuda.is_bf16_supported(),
            "save_final_model": True}  # fmt: skip


# TRL's model flags, which an embedded task (its own model and LoRA config) would silently ignore.
MODEL_FLAGS = {
    f.name: f.default for f in fields(ModelConfig) if f.name not in ("model_name_or_path", "use_peft")
}


def check_job_flags(
    script_args: JobArguments,
    model_args: ModelConfig,
    argv: list[str] | None,
    *,
    reward_model_path: str | None,
    default_reward_model: str | None = None,
    model_paths: Sequence[tuple[str, str | None]] = (),
) -> None:
    """Refuse, before any model loads, job flags that do not go with the job's kind (a job on your
    own model or an embedded task) or that are out of range; ``model_paths`` are (what, path) of
    further models the job loads, checked to exist as the policy and the reward model are."""
    if model_args.model_name_or_path is None:  # an embedded task brings its own data, model and reward
        job_flags = {f.name: f.default for f in fields(script_args) if f.name != "embedded_task"}
        given = [name for name, default in job_flags.items() if getattr(script_args, name) != default]
        given += [name for name, default in MODEL_FLAGS.items() if getattr(model_args, name) != default]
        if reward_model_path != default_reward_model and "reward_model_path" not in given:
            given.append("reward_model_path")
        if given:
            fail(
                f"--{given[0]} applies to a job on your own model (--model_name_or_path); without one the "
                f"embedded task {script_args.embedded_task!r} runs with its own data, model and reward"
            )
        return
    if any(a.split("=")[0] in ("--embedded_task", "--embedded-task") for a in argv or sys.argv[1:]):
        fail("--embedded_task applies only without --model_name_or_path (a job on your own model)")
    if model_args.lora_r < 1 or not math.isfinite(model_args.lora_alpha) or model_args.lora_alpha <= 0:
        fail(
            f"--lora_r must be >= 1 and --lora_alpha > 0, got {model_args.lora_r} and {model_args.lora_alpha}"
        )
    if not 0.0 <= model_args.lora_dropout < 1.0:
        fail(f"--lora_dropout must be in [0, 1), got {model_args.lora_dropout}")
    if script_args.reward_function is not None and script_args.reward_function not in NAMED_REWARDS:
        try:
            import_reward(script_args.reward_function)
        except RewardError as exc:
            fail(one_line(exc))
    if script_args.reward_function == "keywords" and not script_args.reward_keywords:
        fail("--reward_function keywords needs the words it rewards: --reward_keywords WORD [WORD ...]")
    if script_args.reward_function is None and reward_model_path == default_reward_model:
        fail(
            "a job on your own model needs a reward: --reward_model_path (a sequence classifier) or --reward_function"
        )
    paths = [("model", model_args.model_name_or_path), *model_paths]
    paths += [("reward model", reward_model_path)] if script_args.reward_function is None else []
    for what, path in paths:
        # a hub id is "name" or "org/name"; anything else that is not on disk is a path that does not exist
        local = bool(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1)
        if local and not os.path.exists(os.path.expanduser(path)):
            fail(f"cannot load the {what}: {path!r} does not exist")
    for name in ("heldout_size", "max_prompt_length"):
        if problem := whole_number_problem(getattr(script_args, name), 1):
            fail(f"--{name} {problem}")


def check_output_location(training_args) -> None:
    """The run's directory must be writable, not a file, and not inside another run."""
    out = Path(training_args.output_dir).resolve()
    for path in (out, Path(training_args.attribution_dir).resolve()):
        if path.exists() and not path.is_dir():
            fail(f"--output_dir: {path} is a file, not a directory")
    for parent in out.parents:
        if (parent / STORE_DIR / MANIFEST_FILE).is_file() or (
            parent.name == STORE_DIR and (parent / MANIFEST_FILE).is_file()
        ):
            fail(f"--output_dir {out} lies inside the run {parent}; choose a directory outside it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        fail(f"cannot write to --output_dir {out}: {exc.strerror or exc}")
    if training_args.resume_from_checkpoint:
        try:
            resolve_checkpoint(training_args.output_dir, training_args.resume_from_checkpoint)
        except CheckpointError as exc:
            fail(one_line(exc))
        return  # the run goes on in its own directory
    store = Path(training_args.attribution_dir)
    if training_args.iif_enabled and training_args.iif_store and store.is_dir() and any(store.iterdir()):
        fail(
            f"{store} already holds a run; choose another --output_dir, or continue it with "
            "--resume_from_checkpoint true"
        )


# ---------------------------------------------------------------------------------------------- data
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
                f"{_program}: dropped {len(ds) - len(kept)} of {len(ds)} prompts longer than {limit} tokens ({why})"
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
            f"{_program}: note: the {training_args.iif_num_heldout_prompts} held-out samples a round takes "
            f"(--iif_num_heldout_prompts) cycle through the {len(target)} held-out prompts there are"
        )
    return target


# ---------------------------------------------------------------------------------------------- models
def resolve_model_source(script_args: JobArguments, model_args: ModelConfig) -> str:
    """The checkpoint the job loads: --model_name_or_path, or the cached conversion of a GGUF file."""
    gguf = split_gguf_path(model_args.model_name_or_path, script_args.gguf_file)
    if gguf is None:
        return model_args.model_name_or_path
    directory, name = gguf
    try:
        if not (gguf_cache_path(directory, name) / "config.json").is_file():  # first use: convert it
            require_gguf_package()
            try:
                num_params = parameter_count(directory, gguf_file=name)
            except Exception as exc:
                fail(
                    f"cannot read GGUF file {name!r} in {directory!r}: {type(exc).__name__}: {first_line(exc)}"
                )
            # converting holds the dequantised model and its plain copy, in float32
            check_fits_in_memory(num_params, 4, 2, f"GGUF model {name!r}")
        return str(gguf_checkpoint(directory, name))
    except ModelLoadError as exc:
        fail(str(exc))


def check_model_memory(source: str, dtype, copies: int) -> None:
    """Refuse before loading a policy whose ``copies`` (policy, value model, ...) would not fit in memory."""
    try:
        num_params = parameter_count(source)
    except Exception:  # unreadable config: the load that follows says why, in one line
        return
    bytes_per_param = dtype.itemsize if isinstance(dtype, torch.dtype) else 4
    try:
        check_fits_in_memory(num_params, bytes_per_param, copies, f"model {source!r}")
    except ModelLoadError as exc:
        fail(str(exc))


def load_pretrained(kind, path: str, what: str, revision: str | None = None, **kwargs):
    """``kind.from_pretrained(path)``, or one line saying why the ``what`` does not load."""
    try:
        return kind.from_pretrained(path, revision=revision, **kwargs)
    except Exception as exc:
        fail(f"cannot load the {what} from {path!r}: {type(exc).__name__}: {first_line(exc)}")


@dataclass
class PolicyJob:
    """A job on your own model as loaded: its tokenizer, policy, LoRA config and prompt sets."""

    source: str  # the checkpoint directory or hub name the policy came from
    dtype: Any
    tokenizer: Any
    policy: torch.nn.Module
    peft_config: Any
    train: Any
    heldout: Any


def load_policy_job(
    script_args: JobArguments,
    model_args: ModelConfig,
    seed: int,
    *,
    response_length: int,
    length_flag: str,
    model_copies: int,
    prepare_tokenizer: Callable[[Any], None] | None = None,
    pad_means_padding: str | None = None,
    check_memory: Callable[[str, Any], str | None] | None = None,
) -> PolicyJob:
    """Load a job on your own model: checks, tokenizer, the prompt sets (checked before the policy
    loads: a bad file costs seconds, not a model load), the policy and its LoRA config.
    ``check_memory(source, dtype)``: the recipe's own estimate of the job, a message when it does not fit."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not model_args.use_peft:
        fail(
            "IIF scores LoRA adapters: keep --use_peft (the default) and set --lora_r / --lora_target_modules"
        )
    if script_args.dataset_name is None:
        fail("a real job needs --dataset_name (a hub name, a dataset directory or a data file)")
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    source = resolve_model_source(script_args, model_args)
    check_model_memory(source, dtype, model_copies)
    if check_memory is not None and (problem := check_memory(source, dtype)):  # the trainer's own estimate
        fail(problem)
    revision = model_args.model_revision
    tokenizer = load_pretrained(AutoTokenizer, source, "tokenizer", revision, padding_side="left")
    if prepare_tokenizer is not None:
        prepare_tokenizer(tokenizer)
    config = load_pretrained(AutoConfig, source, "model config", revision)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    train, heldout = load_prompts(
        script_args,
        tokenizer,
        seed,
        context=context,
        response_length=response_length,
        length_flag=length_flag,
        pad_means_padding=pad_means_padding,
    )
    policy = load_pretrained(
        AutoModelForCausalLM,
        source,
        "policy",
        revision,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
    )
    peft_config = lora_config(model_args, policy)
    return PolicyJob(source, dtype, tokenizer, policy, peft_config, train, heldout)


def lora_config(model_args: ModelConfig, policy: torch.nn.Module):
    """TRL's LoRA config from the flags, its target modules checked against the policy's."""
    peft_config = get_peft_config(model_args)
    modules = peft_config.target_modules
    if isinstance(modules, str) and modules != "all-linear" and re.fullmatch(r"[\w.]+", modules):
        # TRL turns a single --lora_target_modules value into a string, which PEFT reads as a
        # regex over full module names (so "c_attn" would match nothing): make it a name list.
        peft_config.target_modules = modules = {modules}
    if isinstance(modules, set | list | tuple):
        names = {name.rsplit(".", 1)[-1] for name, _ in policy.named_modules()}
        missing = sorted(set(modules) - names)
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in policy.named_modules() if type(m).__name__ in
                             ("Linear", "Conv1D")})  # fmt: skip
            fail(
                f"--lora_target_modules {missing} name no module of the policy; its linear layers are {linear}"
            )
    return peft_config


def load_reward(script_args: JobArguments, reward_model_path: str | None, dtype, revision: str | None = None):
    """The job's reward: the --reward_function named (``f(prompts, completions) -> list[float]``),
    or the --reward_model_path sequence classifier (one output)."""
    from transformers import AutoModelForSequenceClassification

    if script_args.reward_function == "keywords":
        return keyword_reward(script_args.reward_keywords or [])
    if script_args.reward_function in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[script_args.reward_function]
    if script_args.reward_function is not None:
        return import_reward(script_args.reward_function)
    return load_pretrained(
        AutoModelForSequenceClassification,
        reward_model_path,
        "reward model",
        revision,
        num_labels=1,
        dtype=dtype,
    )


# ---------------------------------------------------------------------------------------------- the run
class StopSignal:
    """SIGTERM (what schedulers and `timeout` send) stops a run as Ctrl-C does: the round being
    written is discarded, the finished ones stay, and the exit status says which signal it was."""

    def __init__(self) -> None:
        self.number, self.name = signal.SIGINT.value, "interrupted"

    @contextmanager
    def on_sigterm(self):
        def stop(signum, frame):
            self.number, self.name = signum, "terminated (SIGTERM)"
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


def train(trainer, training_args, progress, history: Callable[[], list[dict]] | None = None) -> int:
    """Train with ``progress`` as the progress bar (unless --disable_tqdm); Ctrl-C or SIGTERM stop
    with the complete rounds on disk (exit status 128 + the signal); at the end, the summary of
    ``history()`` (default: the trainer's ``iif_history``). Returns the exit status."""
    if not training_args.disable_tqdm:
        from transformers.trainer_callback import ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(progress)
    stop = StopSignal()
    resume = training_args.resume_from_checkpoint
    try:
        checkpoint = resolve_checkpoint(training_args.output_dir, resume)
        with stop.on_sigterm():
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except (CheckpointError, RewardError) as exc:  # a reward that returned what cannot be one: rounds so far kept
        fail(one_line(exc))
    except KeyboardInterrupt:
        saved = None
        if training_args.save_final_model:  # the policy as the signal found it
            with stop.on_sigterm():
                saved = trainer.save_final_model()
        if trainer.accelerator.is_main_process:
            done = trainer.store.rounds() if trainer.store else []
            print(
                f"\n{stop.name}: {len(done)} complete round(s) are on disk in {training_args.attribution_dir}"
            )
            if saved is not None:
                print(f"the policy as it was when stopped is saved in {os.path.abspath(saved)}")
            latest = complete_checkpoints(training_args.output_dir)
            if latest:
                print(f"continue the run with --resume_from_checkpoint true (from {latest[-1].name})")
        return 128 + stop.number
    if trainer.accelerator.is_main_process:
        summarise(history() if history is not None else trainer.iif_history, training_args)
    end_processes(trainer.accelerator)
    return 0


def end_processes(accelerator) -> None:
    """At the end of a run on several processes: wait for all, then take the process group down
    before the interpreter exits (left to exit, gloo's threads can abort a process: 'terminate
    called without an active exception', seen once on 2 CPU processes under load)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        dist.destroy_process_group()


def sparkline(values: list[float]) -> str:
    blocks = "▁▂▃▄▅▆▇█"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(blocks[min(7, int((v - lo) / span * 8))] for v in values)


def summarise(history: list[dict], training_args) -> None:
    """Reward per round (a sparkline, first rounds against last), kept fraction, where things are."""
    rewards = [row["objective/scores"] for row in history]
    if not rewards:
        return
    k = max(1, len(rewards) // 5)
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    kept = sum(row.get("iif/kept_fraction", 1.0) for row in history) / len(history)
    print(f"\nmean reward per round: {sparkline(rewards)}")
    print(f"  first {k} rounds {first:+.3f} -> last {k} rounds {last:+.3f}; mean kept fraction {kept:.2f}")
    print(f"run directory: {os.path.abspath(training_args.output_dir)}")
    if training_args.save_final_model:
        print(f"trained model: {os.path.abspath(training_args.output_dir)} (LoRA adapter and tokenizer; load it "
              "with peft.AutoPeftModelForCausalLM.from_pretrained)")  # fmt: skip
    if not (training_args.iif_enabled and training_args.iif_store):
        print("attribution:   none stored (--iif_enabled false or --iif_store false)")
        return
    print(f"attribution:   {os.path.abspath(training_args.attribution_dir)}")
    print(f"audit it:      rlhf-influence audit {training_args.output_dir}")
