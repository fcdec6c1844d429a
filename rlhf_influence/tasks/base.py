"""What an embedded task is: its models, reward, prompt sets, LoRA config and run settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset

# Settings every embedded run shares (IIFPPOConfig fields), under each task's own.
COMMON_SETTINGS = {"report_to": "none", "save_strategy": "no", "logging_steps": 1, "seed": 0}


@dataclass
class EmbeddedTask:
    """Everything a run needs from a task: models, reward, prompt sets, LoRA config."""

    tokenizer: Any
    policy: torch.nn.Module
    value_model: torch.nn.Module | None  # None: built without one (PPO's shared value head)
    reward: Callable[[list[str], list[str]], list[float]]
    train_dataset: Dataset
    heldout_dataset: Dataset
    lora_config: Any


@dataclass(frozen=True)
class TaskSpec:
    """A task by name: a one-line summary, its run settings per algorithm, and how to build it.

    ``settings`` is one table keyed by algorithm name (``ppo``, ``grpo``, ``rloo``): for PPO the
    IIFPPOConfig fields (``total_episodes`` and ``iif_num_heldout_prompts`` included), for GRPO and
    RLOO their config's fields (``max_steps`` included; the two share their values, since both
    sample ``num_generations`` completions a prompt). The recipes use them as defaults that flags
    override, the benchmarks start from them. They are known without building the task (no model
    is loaded).
    """

    name: str
    summary: str
    settings: dict[str, dict[str, Any]]  # algorithm -> its config's fields
    build: Callable[..., EmbeddedTask] = field(repr=False)

    def settings_for(self, algorithm: str) -> dict[str, Any]:
        """The task's run settings under ``algorithm`` (ValueError naming the ones it has)."""
        try:
            return self.settings[algorithm]
        except KeyError:
            raise ValueError(
                f"the task {self.name!r} has no settings for the algorithm {algorithm!r}; it has "
                f"{', '.join(self.settings)}"
            ) from None

    @property
    def records_per_round(self) -> int:
        """Records a PPO round samples."""
        ppo = self.settings_for("ppo")
        return ppo["per_device_train_batch_size"] * ppo.get("gradient_accumulation_steps", 1)

    @property
    def rounds(self) -> int:
        """The task's length in rounds (PPO's batches; GRPO's and RLOO's generation batches)."""
        return self.settings_for("ppo")["total_episodes"] // self.records_per_round


def run_settings(
    output_dir: str, training: dict[str, Any], rounds: int, heldout_prompts: int
) -> dict[str, Any]:
    """A task's full run settings: the shared ones, its PPO settings, its length and held-out prompts."""
    per_round = training["per_device_train_batch_size"] * training.get("gradient_accumulation_steps", 1)
    return {
        **COMMON_SETTINGS,
        "output_dir": output_dir,
        **training,
        "total_episodes": per_round * rounds,
        "iif_num_heldout_prompts": heldout_prompts,
    }


def prompt_dataset(tokenizer, prompts: list[str]) -> Dataset:
    """The prompts with their token ids (no special tokens): an embedded task's prompt set."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return Dataset.from_dict({"input_ids": ids, "prompt": prompts})


# Settings every embedded GRPO run shares: TRL's GRPOConfig defaults to bf16 and gradient
# checkpointing, which a CPU run and a tiny model do not want (flags turn them back on).
GRPO_COMMON_SETTINGS = {**COMMON_SETTINGS, "bf16": False, "gradient_checkpointing": False}


GROUP_ALGORITHMS = ("grpo", "rloo")  # the algorithms that sample groups of completions a prompt


def group_run_settings(
    output_dir: str, training: dict[str, Any], steps: int, heldout_prompts: int
) -> dict[str, dict[str, Any]]:
    """A task's full GRPO and RLOO run settings, keyed by algorithm: the shared ones, the task's
    group-sampling settings, its length (optimizer steps; one generation batch each with the
    defaults) and held-out prompts. ``output_dir`` names ``{algorithm}``, e.g. ``runs/{algorithm}_iif``."""
    return {
        algorithm: {
            **GRPO_COMMON_SETTINGS,
            "output_dir": output_dir.format(algorithm=algorithm),
            **training,
            "max_steps": steps,
            "iif_num_heldout_prompts": heldout_prompts,
        }
        for algorithm in GROUP_ALGORITHMS
    }
