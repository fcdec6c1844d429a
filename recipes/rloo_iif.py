"""RLOO with Iterative Influence-based Filtering (IIF) on a LoRA policy.

    accelerate launch recipes/rloo_iif.py                          # embedded default, offline, a few min on a CPU
    accelerate launch recipes/rloo_iif.py --embedded_task keywords # the harder embedded task
    accelerate launch recipes/rloo_iif.py --embedded_task reviews  # a real LM: SmolLM2-135M-Instruct
    accelerate launch recipes/rloo_iif.py --config recipe.yaml     # a real job, flags from YAML
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/rloo_iif.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/tldr \\
        --reward_model_path my/reward-model --lora_r 16 --num_generations 4 --iif_drop_fraction 1.0

The same jobs as recipes/grpo_iif.py, trained with TRL's RLOOTrainer (REINFORCE Leave-One-Out,
Ahmadian et al. 2024): each prompt gets --num_generations completions, a completion's advantage
is its reward minus the mean reward of the group's other completions, and the KL penalty --beta
(times the completion's log-ratio to the reference) is part of its reward. Its loss is the
completion's clipped sequence ratio. A round is one generation batch; IIF scores each completion
and drops the harmful ones before TRL's optimisation steps over that batch.

Without --model_name_or_path it runs an embedded task (--embedded_task; the task's GRPO
settings, which RLOO samples alike, are the defaults, flags still win). A job on your own model
takes --model_name_or_path, --dataset_name (a `prompt` column, or --prompt_column) and a reward
(--reward_function: a built-in name or pkg.module:function; or --reward_model_path). Every
IIFRLOOConfig (RLOOConfig, TrainingArguments) field is a flag, plus TRL's LoRA flags.

Each round's attribution is written to <output_dir>/attribution; `--iif_enabled false` trains
plain RLOO from the same command. The trained policy is saved in <output_dir>; checkpoints every
--save_steps optimizer steps, and `--resume_from_checkpoint true` continues a killed run.
`--kl_control adaptive` steers --beta toward --kl_target.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rlhf_influence import IIFRLOOConfig, IIFRLOOTrainer
from rlhf_influence.launch.errors import one_line_errors, set_program
from rlhf_influence.launch.group_recipe import GroupRecipe, run_recipe

RECIPE = GroupRecipe(
    program="rloo_iif.py", title="RLOO", algorithm="rloo", config_class=IIFRLOOConfig, trainer_class=IIFRLOOTrainer
)


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    return run_recipe(RECIPE, argv)


set_program(RECIPE.program)

if __name__ == "__main__":
    sys.exit(main())
