"""What a run's policy update was, as the store keeps it: the algorithm and the settings that score a
record and re-run a round (one typed record, written by the trainers, read by the audit's replay)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Algorithm = Literal["ppo", "grpo", "rloo"]

# The settings a replay of each algorithm's round cannot do without.
REQUIRED: dict[str, tuple[str, ...]] = {
    "ppo": ("num_ppo_epochs", "mini_batch_size", "cliprange"),
    "grpo": ("loss_type", "epsilon_low", "epsilon_high", "beta", "num_iterations", "steps_per_generation",
             "gradient_accumulation_steps", "max_completion_length"),
    "rloo": ("epsilon_low", "epsilon_high", "beta", "num_iterations", "steps_per_generation",
             "gradient_accumulation_steps"),
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """What a replay of a round's policy update needs (the intervention analysis); the fields of the
    other algorithm are None."""

    algorithm: Algorithm = "ppo"  # the policy update's algorithm (stores before GRPO: "ppo")
    learning_rate: float  # the optimizer's learning rate
    per_device_train_batch_size: int  # records per micro-batch (one forward and backward)
    pad_token_id: int  # the tokenizer's pad id, which marks padding in the stored token ids
    optimizer: str  # in words, e.g. "AdamW (re-runs start from fresh moments)"
    # PPO
    num_ppo_epochs: int | None = None  # passes over the round's kept records
    mini_batch_size: int | None = None  # records per optimizer step
    cliprange: float | None = None  # the clipped surrogate's epsilon
    value_head: str | None = None  # "separate" (TRL's value model) or "shared" (on the policy); None: separate
    record_loss: str | None = None  # "policy" or "policy_and_value": what the scores differentiate; None: policy
    # GRPO and RLOO (loss_type, delta and bias_correction_kl: GRPO's alone; RLOO's beta is in the reward)
    loss_type: str | None = None  # how token losses are averaged (TRL's GRPOConfig.loss_type)
    epsilon_low: float | None = None  # lower clipping epsilon of the ratio
    epsilon_high: float | None = None  # upper clipping epsilon of the ratio
    beta: float | None = None  # KL coefficient
    num_iterations: int | None = None  # optimisation passes over each generation
    steps_per_generation: int | None = None  # optimizer steps per generation batch
    gradient_accumulation_steps: int | None = None  # micro-batches per optimizer step
    max_completion_length: int | None = None  # longest sampled completion, in tokens
    num_generations: int | None = None  # completions sampled per prompt
    delta: float | None = None  # the upper cap of the ratio's two-sided clip (None: none)
    bias_correction_kl: bool | None = None  # the KL term multiplied by the ratio (None: TRL's default, true)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def missing(self) -> list[str]:
        """The settings this algorithm's replay needs that are not recorded."""
        return [name for name in REQUIRED[self.algorithm] if getattr(self, name) is None]
