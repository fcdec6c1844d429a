"""A job's models: where the policy comes from (hub, folder, GGUF), whether it fits in memory,
its LoRA config, and the reward (a named or imported Python function, or a reward model)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from trl import ModelConfig, get_peft_config

from ..tasks.rewards import REWARD_FUNCTIONS, keyword_reward
from ..trainer.rewards import import_reward
from .data import load_prompts
from .errors import fail
from .flags import JobArguments
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
