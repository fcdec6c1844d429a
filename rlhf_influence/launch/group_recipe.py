"""What the group-sampling recipes (recipes/grpo_iif.py, recipes/rloo_iif.py) share: flags, checks, the
job's data and reward, the progress bar and the run, for one algorithm's trainer and config.

A recipe names its :class:`GroupRecipe` (program, title, IIF config and trainer, the algorithm
whose task settings it takes) and calls :func:`run_recipe`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

from tqdm.auto import tqdm
from transformers import set_seed
from trl import ModelConfig

from ..engine.checks import finite_number_problem, whole_number_problem
from ..engine.errors import NoLoraError
from ..tasks import get_task
from ..trainer import IIFPPOConfig
from ..trainer.progress import RoundProgress
from ..trainer.rewards import call_reward
from .data import heldout_target
from .errors import fail, one_line, set_program
from .flags import JobArguments, check_job_flags, check_output_location, device_defaults, parse
from .jobs import load_policy_job, load_pretrained, load_reward
from .models import ModelLoadError
from .run import train


@dataclass(frozen=True)
class GroupRecipe:
    """One group-sampling algorithm's recipe: how it is named, configured and trained."""

    program: str  # the script's name, as messages start ("grpo_iif.py")
    title: str  # "GRPO"
    algorithm: str  # whose embedded-task settings are the defaults (TaskSpec.settings_for)
    config_class: type  # IIFGRPOConfig, IIFRLOOConfig
    trainer_class: type  # IIFGRPOTrainer, IIFRLOOTrainer


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


def check_numbers(config) -> None:
    """A config's numbers, checked first, as the recipe's one-line errors (TRL's own checks that
    follow would divide by zero or raise on them)."""
    for name in AT_LEAST_ONE:
        if problem := whole_number_problem(getattr(config, name), 1):
            fail(f"--{name} {problem}")
    for name in ("steps_per_generation", "generation_batch_size"):
        if getattr(config, name) is not None and (problem := whole_number_problem(getattr(config, name), 1)):
            fail(f"--{name} {problem}")
    if problem := whole_number_problem(config.num_generations, 2):
        fail(f"--num_generations {problem}: a completion's advantage is its reward against its group's")
    for name, (low, high, closed) in FINITE_RANGES.items():
        if problem := finite_number_problem(getattr(config, name), low, high, closed):
            fail(f"--{name} {problem}")
    if config.epsilon_high is not None and (problem := finite_number_problem(config.epsilon_high, 0.0)):
        fail(f"--epsilon_high {problem}")


def recipe_config(config_class: type) -> type:
    """``config_class`` whose numbers are checked (:func:`check_numbers`) before its own checks; made
    once, and kept in this module under its name (``RecipeIIFGRPOConfig``) so that it pickles, as
    the Trainer saves its arguments."""
    name = f"Recipe{config_class.__name__}"
    if name not in globals():

        def __post_init__(self) -> None:
            check_numbers(self)
            config_class.__post_init__(self)

        namespace = {"__post_init__": __post_init__, "__module__": __name__, "__qualname__": name}
        globals()[name] = dataclass(type(name, (config_class,), namespace))
    return globals()[name]


def ppo_flags(config_class: type) -> set[str]:
    """PPO's flags (recipes/ppo_iif.py) that ``config_class`` does not have."""
    return ({f.name for f in fields(IIFPPOConfig)} - {f.name for f in fields(config_class)} - {"reward_model_path"}
            | {"pad_token", "value_model_path"})  # fmt: skip


# PPO's flags and the group trainers' flag closest to each.
COUNTERPART = {
    "num_ppo_epochs": "num_iterations",
    "response_length": "max_completion_length",
    "total_episodes": "max_steps",
    "kl_coef": "beta",
    "cliprange": "epsilon",
    "num_mini_batches": "steps_per_generation",
}


def explain(message: str, recipe: GroupRecipe) -> str:
    """A config error with what the recipe knows more: PPO's flags by name, where a generation batch
    comes from."""
    if message.startswith(("Some specified arguments are not used", "Unknown arguments from config file")):
        names = re.findall(r"--(\w+)", message)
        ppo = [name for name in names if name in ppo_flags(recipe.config_class)]
        if ppo:
            said = "; ".join(
                f"--{name} is a PPO flag (recipes/ppo_iif.py), not {recipe.title}'s"
                + (f": the nearest {recipe.title} flag is --{COUNTERPART[name]}" if name in COUNTERPART else "")
                for name in ppo
            )
            return said if len(ppo) == len(names) else f"{said}; {message}"
    if message.startswith("generation_batch_size ("):
        return (
            f"{message} (a generation batch is --per_device_train_batch_size x processes x --steps_per_generation "
            "completions, or --generation_batch_size; each prompt's --num_generations completions must fit in one)"
        )
    return message


def check_flags(script_args: RecipeArguments, training_args, model_args: ModelConfig, argv) -> None:
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
    """The dataset's prompts as the `prompt` column TRL's GRPOTrainer and RLOOTrainer read."""
    dataset = dataset.select_columns([column])
    return dataset if column == "prompt" else dataset.rename_column(column, "prompt")


def load_real_job(script_args: RecipeArguments, training_args, model_args: ModelConfig, title: str):
    from transformers import AutoTokenizer

    def check_tokenizer(tokenizer) -> None:
        if tokenizer.pad_token is None and tokenizer.eos_token is None:  # TRL pads with EOS where no pad
            fail(f"the tokenizer has neither a pad token nor an EOS token; {title} needs one to pad with")

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


class GroupProgress(RoundProgress):
    """The progress bar over the optimizer steps (one generation batch each with the defaults),
    with TRL's mean reward, the kept fraction and the KL."""

    def __init__(self, title: str) -> None:
        super().__init__()
        self.title = title

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            desc = f"IIF-{self.title} steps" if args.iif_enabled else f"{self.title} steps"
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


def run_recipe(recipe: GroupRecipe, argv: list[str] | None = None) -> int:
    """Parse the flags, check them, build the job (an embedded task or a real model, data and
    reward), and train it with the recipe's trainer; the exit status."""
    set_program(recipe.program)
    script_args, training_args, model_args = parse(
        argv,
        (RecipeArguments, recipe_config(recipe.config_class), ModelConfig),
        lambda spec: spec.settings_for(recipe.algorithm),
        device_defaults(),
        lambda message: explain(message, recipe),
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
            script_args, training_args, model_args, recipe.title
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
        trainer = recipe.trainer_class(
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
    return train(trainer, training_args, GroupProgress(recipe.title), history=lambda: reward_history(trainer))


