"""IIFGRPOTrainer: TRL's GRPOTrainer that scores every completion and filters the harmful ones.

The round is :class:`~rlhf_influence.trainer.group.GroupIIFTrainer`'s; GRPO adds its config,
its per-token sampling and reference log-probs, and its loss settings (loss type, delta, the KL
term's bias correction). With ``iif_drop_fraction=0`` the weights after training equal TRL's
GRPOTrainer's (tested).
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer

from ..store import TrainingSettings
from .group import GroupIIFTrainer
from .grpo_config import IIFGRPOConfig


class IIFGRPOTrainer(GroupIIFTrainer, GRPOTrainer):
    """GRPO with Iterative Influence-based Filtering, a drop-in for TRL's ``GRPOTrainer``: its
    arguments plus ``target_dataset`` (held-out prompts), as :class:`GroupIIFTrainer` says."""

    algorithm = "grpo"
    config_class = IIFGRPOConfig
    checkpoint_settings = ("loss_type",)

    def old_token_logprobs(self, batch: dict, prompt_width: int) -> torch.Tensor | None:
        if "old_per_token_logps" not in batch:  # TRL keeps none when a generation is trained on once, in one step
            return None
        return torch.nn.functional.pad(batch["old_per_token_logps"], (prompt_width, 0))

    def training_settings(self) -> TrainingSettings:
        args = self.args
        return self.group_training_settings(
            loss_type=args.loss_type, delta=args.delta, bias_correction_kl=args.use_bias_correction_kl
        )
