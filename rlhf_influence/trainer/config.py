"""IIFPPOConfig: TRL's PPOConfig plus the IIF settings (:class:`~rlhf_influence.iif.settings.IIFSettings`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.ppo import PPOConfig

from ..iif.settings import HELDOUT_SAMPLING, RECORD_LOSSES, SCHEDULES, SNAPSHOT_DTYPES, TARGETS, IIFSettings
from .value_head import VALUE_HEADS

__all__ = ["HELDOUT_SAMPLING", "RECORD_LOSSES", "SCHEDULES", "SNAPSHOT_DTYPES", "TARGETS", "VALUE_HEADS", "IIFPPOConfig"]


@dataclass
class IIFPPOConfig(PPOConfig, IIFSettings):
    """PPOConfig with Iterative Influence-based Filtering (IIF).

    Every field is also a command-line flag through ``TrlParser`` / ``HfArgumentParser``.
    """

    value_head: str = field(
        default="auto",
        metadata={
            "help": "PPO's value function. 'separate' (TRL's): a value model of its own, trained in full (every "
            "weight, with Adam's moments: about 16 bytes a parameter). 'shared' (the paper's): a scalar head on "
            "the policy's last hidden state with its LoRA adapter active, trained with the LoRA weights; one "
            "backbone in memory, one forward a micro-batch (the trainer takes value_model=None). 'auto' (the "
            "default): 'separate' when a value model is passed (the recipe: --value_model_path), else 'shared'.",
            "choices": list(VALUE_HEADS),
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_iif_settings()
        if self.iif_schedule == "step":
            raise ValueError(
                "iif_schedule='step' is GRPO's and RLOO's (one optimizer step a round, at the weights that sampled "
                "it); PPO's epochs take several steps at moving weights: use 'round' or 'epoch'"
            )
        if str(getattr(self.save_strategy, "value", self.save_strategy)) not in ("steps", "no"):
            raise ValueError(
                f"save_strategy={self.save_strategy!r} is the Trainer's; IIF-PPO checkpoints every save_steps rounds "
                "('steps') or never ('no')"
            )
        self.check_kl_coefficient("kl_coef", self.kl_coef)
        self.check_value_settings()

    def resolve_value_head(self, has_value_model: bool) -> str:
        """Settle ``value_head='auto'`` (a value model given: 'separate', else 'shared') and check the
        settled value against the rest (ValueError)."""
        if self.value_head == "auto":
            self.value_head = "separate" if has_value_model else "shared"
        self.check_value_settings()
        return self.value_head

    def check_value_settings(self) -> None:
        """The value head and the per-record loss go together (ValueError, in one line, if not)."""
        if self.value_head not in VALUE_HEADS:
            raise ValueError(f"value_head must be one of {VALUE_HEADS}, got {self.value_head!r}")
        if self.iif_record_loss == "policy_and_value" and self.value_head == "separate":
            raise ValueError(
                "iif_record_loss='policy_and_value' needs value_head='shared': with a separate value model the "
                "value loss does not reach the policy's LoRA weights"
            )
        if self.value_head == "shared" and self.iif_store_gradients == "training":
            raise ValueError(
                "iif_store_gradients='training' is not available with value_head='shared' yet: the training's "
                "backward holds the value loss too, normalised per micro-batch apart from the policy loss; use "
                "iif_store_gradients='snapshot'"
            )
