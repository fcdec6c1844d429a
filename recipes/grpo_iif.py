"""GRPO with Iterative Influence-based Filtering (IIF) on a LoRA policy.

    accelerate launch recipes/grpo_iif.py                          # embedded default, offline, a few min on a CPU
    accelerate launch recipes/grpo_iif.py --embedded_task keywords # the harder embedded task
    accelerate launch recipes/grpo_iif.py --embedded_task reviews  # a real LM: SmolLM2-135M-Instruct
    accelerate launch recipes/grpo_iif.py --config recipe.yaml     # a real job, flags from YAML
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/grpo_iif.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/tldr \\
        --reward_model_path my/reward-model --lora_r 16 --num_generations 8 --iif_drop_fraction 1.0

The same jobs as recipes/ppo_iif.py, trained with TRL's GRPOTrainer: each prompt gets
--num_generations completions, and a completion's advantage is its reward against its group's.
A round is one generation batch (--per_device_train_batch_size x processes x
--steps_per_generation completions; with the defaults one optimizer step); IIF scores each
completion and drops the harmful ones before TRL's optimisation steps over that batch.

Without --model_name_or_path it runs an embedded task (--embedded_task, default: a tiny GPT-2
from random weights rewarded by the VADER sentiment lexicon; offline), with the task's GRPO
settings as defaults (flags still win). A job on your own model takes --model_name_or_path (a
hub name, a directory, or a .gguf file converted once into a cached checkpoint),
--dataset_name (prompts in a `prompt` column, or --prompt_column; held-out prompts from
--dataset_test_split or --heldout_size set aside), and a reward: --reward_function (sentiment,
or keywords with --reward_keywords) or --reward_model_path (a sequence classifier with one
output, scoring prompt + completion). Every IIFGRPOConfig (and so GRPOConfig /
TrainingArguments) field is a flag, plus TRL's ModelConfig LoRA flags (--lora_r,
--lora_alpha, --lora_target_modules, ...). PPO's own flags (--num_ppo_epochs,
--response_length, --total_episodes, --value_model_path, ...) are not GRPO's: see --help.

Each round's attribution (records with their prompt group, influence, kept flags, metrics) is
written to <output_dir>/attribution; Ctrl-C stops cleanly with the rounds so far on disk.
`--iif_enabled false` trains plain GRPO from the same command (no scoring, no store). The
trained policy is saved in <output_dir> at the end (and on Ctrl-C); checkpoints every
--save_steps optimizer steps, and `--resume_from_checkpoint true` continues a killed run
exactly. `--kl_control adaptive` steers --beta toward --kl_target.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field, fields

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tqdm.auto import tqdm
from transformers import set_seed
from trl import ModelConfig

from rlhf_influence import IIFGRPOConfig, IIFGRPOTrainer, IIFPPOConfig
from rlhf_influence.checks import finite_number_problem, whole_number_problem
from rlhf_influence.errors import NoLoraError
from rlhf_influence.models import ModelLoadError
from rlhf_influence.recipe_support import (
    JobArguments,
    check_job_flags,
    check_output_location,
    device_defaults,
    fail,
    heldout_target,
    load_policy_job,
    load_pretrained,
    load_reward,
    one_line,
    parse,
    set_program,
    train,
)
from rlhf_influence.tasks import get_task
from rlhf_influence.trainer.progress import RoundProgress
from rlhf_influence.trainer.rewards import call_reward

PROGRAM = "grpo_iif.py"


@dataclass
class RecipeArguments(JobArguments):
    """Data and reward of the job (the policy comes from ModelConfig)."""

    reward_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Reward model (a sequence classifier with one output: hub name or directory) scoring each "
            "prompt + completion; or name a Python reward with --reward_function."
        },
    )


AT_LEAST_ONE = ("per_device_train_batch_size", "gradient_accumulation_steps", "max_completion_length",
                "num_iterations")  # fmt: skip
FINITE_RANGES = {  # flag: (low, high, low included); the reason shows in the message
    "learning_rate": (0.0, math.inf, False),
    "temperature": (0.0, math.inf, False),
    "beta": (0.0, math.inf, True),
    "epsilon": (0.0, math.inf, False),
    "top_p": (0.0, 1.0, False),
}


@dataclass
class RecipeGRPOConfig(IIFGRPOConfig):
    """IIFGRPOConfig whose numbers are checked first, as the recipe's one-line errors (TRL's own
    checks that follow would divide by zero or raise on them)."""

    def __post_init__(self) -> None:
        for name in AT_LEAST_ONE:
            if problem := whole_number_problem(getattr(self, name), 1):
                fail(f"--{name} {problem}")
        for name in ("steps_per_generation", "generation_batch_size"):
            if getattr(self, name) is not None and (problem := whole_number_problem(getattr(self, name), 1)):
                fail(f"--{name} {problem}")
        if problem := whole_number_problem(self.num_generations, 2):
            fail(f"--num_generations {problem}: a completion's advantage is its reward against its group's")
        for name, (low, high, closed) in FINITE_RANGES.items():
            if problem := finite_number_problem(getattr(self, name), low, high, closed):
                fail(f"--{name} {problem}")
        if self.epsilon_high is not None and (problem := finite_number_problem(self.epsilon_high, 0.0)):
            fail(f"--epsilon_high {problem}")
        super().__post_init__()


# PPO's flags (recipes/ppo_iif.py) that GRPO does not have, and the GRPO flag closest to each.
PPO_FLAGS = ({f.name for f in fields(IIFPPOConfig)} - {f.name for f in fields(IIFGRPOConfig)} - {"reward_model_path"}
             | {"pad_token", "value_model_path"})  # fmt: skip
GRPO_COUNTERPART = {
    "num_ppo_epochs": "num_iterations",
    "response_length": "max_completion_length",
    "total_episodes": "max_steps",
    "kl_coef": "beta",
    "cliprange": "epsilon",
    "num_mini_batches": "steps_per_generation",
}


def explain(message: str) -> str:
    """A config error with what the recipe knows more: PPO's flags by name, where a generation batch
    comes from."""
    if message.startswith(("Some specified arguments are not used", "Unknown arguments from config file")):
        names = re.findall(r"--(\w+)", message)
        ppo = [name for name in names if name in PPO_FLAGS]
        if ppo:
            said = "; ".join(
                f"--{name} is a PPO flag (recipes/ppo_iif.py), not GRPO's"
                + (
                    f": the nearest GRPO flag is --{GRPO_COUNTERPART[name]}"
                    if name in GRPO_COUNTERPART
                    else ""
                )
                for name in ppo
            )
            return said if len(ppo) == len(names) else f"{said}; {message}"
    if message.startswith("generation_batch_size ("):
        return (
            f"{message} (a generation batch is --per_device_train_batch_size x processes x --steps_per_generation "
            "completions, or --generation_batch_size; each prompt's --num_generations completions must fit in one)"
        )
    return message


def check_flags(
    script_args: RecipeArguments, training_args: RecipeGRPOConfig, model_args: ModelConfig, argv
) -> None:
    """Refuse, before any model loads, flags that do not go together (the numbers were checked
    when the config was built)."""
    if training_args.reward_weights is not None and len(training_args.reward_weights) != 1:
        fail(
            f"--reward_weights takes one weight (the recipe has one reward), got {training_args.reward_weights}"
        )
    check_job_flags(script_args, model_args, argv, reward_model_path=script_args.reward_model_path)


def text_of(value) -> str:
    """A prompt or completion as text: chat messages become their contents, one a line."""
    if isinstance(value, list):
        return "\n".join(str(message.get("content", "")) for message in value)
    return value


def trl_reward(reward, name: str):
    """``reward(prompts, completions) -> list[float]`` as TRL's reward function (its name names the
    metric, rewards/<name>/mean); chat prompts and completions are given as their text."""

    def score(prompts, completions, **kwargs) -> list[float]:
        return call_reward(reward, [text_of(p) for p in prompts], [text_of(c) for c in completions])

    score.__name__ = score.__qualname__ = name
    return score


def prompt_column(dataset, column: str):
    """The dataset's prompts as the `prompt` column TRL's GRPOTrainer reads."""
    dataset = dataset.select_columns([column])
    return dataset if column == "prompt" else dataset.rename_column(column, "prompt")


def load_real_job(script_args: RecipeArguments, training_args: RecipeGRPOConfig, model_args: ModelConfig):
    from transformers import AutoTokenizer

    def check_tokenizer(tokenizer) -> None:
        if tokenizer.pad_token is None and tokenizer.eos_token is None:  # TRL pads with EOS where no pad
            fail("the tokenizer has neither a pad token nor an EOS token; GRPO needs one to pad with")

    job = load_policy_job(
        script_args,
        model_args,
        training_args.seed,
        response_length=training_args.max_completion_length,
        length_flag="--max_completion_length",
        model_copies=1,  # the reference policy is the policy without its adapters
        prepare_tokenizer=check_tokenizer,
    )
    revision = model_args.model_revision
    reward = load_reward(script_args, script_args.reward_model_path, job.dtype, revision)
    if script_args.reward_function is not None:
        reward, reward_tokenizer = trl_reward(reward, script_args.reward_function), None
    else:
        reward_tokenizer = load_pretrained(
            AutoTokenizer, script_args.reward_model_path, "reward model's tokenizer", revision
        )
    column = script_args.prompt_column
    return (job.tokenizer, job.policy, reward, reward_tokenizer, prompt_column(job.train, column),
            prompt_column(job.heldout, column), job.peft_config)  # fmt: skip


class GRPOProgress(RoundProgress):
    """The progress bar over GRPO's optimizer steps (one generation batch each with the defaults),
    with TRL's mean reward, the kept fraction and the KL."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            desc = "IIF-GRPO steps" if args.iif_enabled else "GRPO steps"
            self.bar = tqdm(total=state.max_steps, desc=desc, unit="step", dynamic_ncols=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            logs = {**logs, "objective/scores": logs["reward"], "objective/kl": logs.get("kl", 0.0)}
        return super().on_log(args, state, control, logs=logs, **kwargs)


def reward_history(trainer) -> list[dict]:
    """Mean reward (and kept fraction) per round; without IIF, TRL's logged mean reward per log step."""
    if trainer.iif_history:
        return trainer.iif_history
    return [{"objective/scores": row["reward"]} for row in trainer.state.log_history if "reward" in row]


def main(argv: list[str] | None = None) -> int:
    set_program(PROGRAM)
    script_args, training_args, model_args = parse(
        argv,
        (RecipeArguments, RecipeGRPOConfig, ModelConfig),
        lambda spec: spec.grpo_settings,
        device_defaults(),
        explain,
    )
    check_flags(script_args, training_args, model_args, argv)
    check_output_location(training_args)
    if model_args.model_name_or_path is None:
        try:
            task = get_task(script_args.embedded_task).build(seed=training_args.seed)
        except ModelLoadError as exc:
            fail(str(exc))
        tokenizer, policy, peft_config = task.tokenizer, task.policy, task.lora_config
        reward, reward_tokenizer = trl_reward(task.reward, script_args.embedded_task), None
        train_set, heldout = (
            prompt_column(task.train_dataset, "prompt"),
            prompt_column(task.heldout_dataset, "prompt"),
        )
    else:
        tokenizer, policy, reward, reward_tokenizer, train_set, heldout, peft_config = load_real_job(
            script_args, training_args, model_args
        )
    prompts = training_args.generation_batch_size // training_args.num_generations
    if len(train_set) < prompts:
        fail(
            f"{len(train_set)} training prompts are fewer than one generation batch's {prompts} prompts "
            f"({training_args.generation_batch_size} completions, --num_generations {training_args.num_generations} each)"
        )
    target = heldout_target(heldout, training_args)

    set_seed(training_args.seed)  # the LoRA adapters' initial weights come from the global stream
    try:
        trainer = IIFGRPOTrainer(
            model=policy,
            reward_funcs=[reward],
            args=training_args,
            train_dataset=train_set,
            target_dataset=target,
            processing_class=tokenizer,
            reward_processing_classes=None if reward_tokenizer is None else [reward_tokenizer],
            peft_config=peft_config,
        )
    except (ValueError, NoLoraError) as exc:  # settings TRL or IIF refuse once the models are known
        fail(one_line(exc))
    return train(trainer, training_args, GRPOProgress(), history=lambda: reward_history(trainer))


set_program(PROGRAM)

if __name__ == "__main__":
    sys.exit(main())
