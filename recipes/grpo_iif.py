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

import os
import sys

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rlhf_influence import IIFGRPOConfig, IIFGRPOTrainer
from rlhf_influence.launch.errors import one_line_errors, set_program
from rlhf_influence.launch.group_recipe import GroupRecipe, run_recipe

RECIPE = GroupRecipe(
    program="grpo_iif.py", title="GRPO", algorithm="grpo", config_class=IIFGRPOConfig, trainer_class=IIFGRPOTrainer
)


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    return run_recipe(RECIPE, argv)


set_program(RECIPE.program)

if __name__ == "__main__":
    sys.exit(main())
