"""A recipe's flags: the job's arguments, an embedded task's settings as defaults that flags
override, argparse's and the configs' errors as one line, the checks of flags that go together,
and of the run's directory."""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from trl import ModelConfig, TrlParser

from ..engine.checks import whole_number_problem
from ..store.schema import MANIFEST_FILE, STORE_DIR
from ..tasks import DEFAULT_TASK, TASKS, TaskSpec, get_task
from ..tasks.rewards import REWARD_FUNCTIONS
from ..trainer.checkpoint import CheckpointError, resolve_checkpoint
from ..trainer.rewards import RewardError, import_reward
from .errors import fail, one_line

NAMED_REWARDS = (*REWARD_FUNCTIONS, "keywords")  # --reward_function by name; anything else is an import path


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
    else:
        parser.set_defaults(**OWN_MODEL_DEFAULTS)
    parser.set_defaults(**CHECKPOINT_DEFAULTS)
    return parser.parse_args_and_config(args)


# A job on your own model records and scores every round for the audit but drops nothing unless asked
# (--iif_drop_fraction 1, the paper's p): on the real LM, 5 seeds, IIF's filtering did not reach more
# reward than plain training at the same KL to the reference (benchmarks/README.md, "IIF on the
# reward-KL frontier"). The embedded tasks keep their own settings (the studies' configurations).
OWN_MODEL_DEFAULTS = {"iif_drop_fraction": 0.0}

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
